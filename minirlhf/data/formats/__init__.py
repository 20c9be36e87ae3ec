"""JSONL data files: read and validate everything before any compute starts.

Files. One JSON object per line, UTF-8, lines ending in LF or CRLF; blank lines are
skipped. A file whose name ends in .gz, or whose bytes start as gzip's do, is gunzipped
first (`.jsonl.gz`). Fields not named below are ignored (ids, metadata), in rows and in
messages alike.

Row shapes (TRL's names where they exist; "messages" is an array of {"role", "content"}):

    corpus       {"text": str}
    sft          {"prompt": P, "response": R}
                 {"prompt": P, "completion": R}            completion: TRL's name for response
                 {"messages": [..., assistant]}            prompt = everything before the last
                                                           turn, response = its content
    prompts      {"prompt": P}
    preferences  {"prompt": P, "chosen": R, "rejected": R}
                 {"chosen": C, "rejected": C}              implicit prompt (HH-RLHF): whole
                                                           conversations that share everything
                                                           before their last assistant turn
                 {"prompt": P, "responses": [R] * K, "ranking": [int] * K}   best first
                 {"prompt": P, "responses": [R] * K, "ratings": [int] * K}   1..7, 7 best
                 with K = 2..9; any mix of shapes in one file.
    responses    {"prompt": P, "responses": [R] * K}       still to be judged (`label --responses`)

    P  a non-blank string, or messages ending with a user turn
    R  a string, or (TRL's conversational form) [{"role": "assistant", "content": str}]
    C  messages ending with an assistant turn, or HH-RLHF's text
       "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..." (the space
       after each colon belongs to the marker)

What the readers return: a prompt is a `str` (one user turn) or, when the conversation
holds more (a system message, earlier turns), a list of {"role": "system"|"user"|
"assistant", "content": str} dicts (fresh dicts of those two keys) ending with a user
turn; messages holding a single user turn collapse to its string. A response is a `str`.

Conversations follow the order every chat template takes: an optional system message
first, then user and assistant alternating, starting with user. Roles other than those
three (tool, function, developer) and contents that are not strings (multimodal part
arrays) are refused. User turns must not be blank; system and assistant turns may be
empty. SFT responses must not be blank; preference responses may be "" (a sampled
policy can answer nothing at all).

Everything a JSON line can hold that later code cannot take is refused here, per kind:
bytes that are not UTF-8 (UTF-16/32 files are named as such); a lone surrogate spelt with
\\u escapes ("\\ud83e": no UTF-8 text or tokenizer can hold it) in any text we read; lines
Python's json cannot parse, integers of more than 4300 digits and nesting deeper than the
recursion limit; rows that are not objects; a field we read given twice in one object
(parsers disagree on which value counts); wrong types where we read (1.0, true, NaN or
Infinity where an integer is expected); a corrupt or truncated gzip stream. Accepted, on
purpose: NUL and other control characters written as escapes (valid Unicode; they
round-trip through SentencePiece and HF tokenizers); NaN, Infinity and repeated keys in
fields we ignore; a UTF-8 byte order mark at the start of any line (`cat a b` keeps b's);
U+2028/U+2029 inside strings (lines split at LF only).

A bad file raises DataError (a ValueError) with one line `file:line: field: what is
wrong`, where field is the path to the value (`messages[3].role`, `ratings[1]`) and line
0 stands for the file as a whole (unreadable, empty, corrupt gzip).
"""
from .chat import ROLES, Message, Prompt, as_messages
from .jsonl import DataError, write_jsonl
from .readers import (K_MAX, K_MIN, RATING_MAX, RATING_MIN, Comparison, pairs_from_ranking, pairs_from_ratings,
                      read_corpus, read_preferences, read_prompts, read_responses, read_sft, row_lines)

__all__ = [
    "Comparison", "DataError", "K_MAX", "K_MIN", "Message", "Prompt", "RATING_MAX", "RATING_MIN", "ROLES",
    "as_messages", "pairs_from_ranking", "pairs_from_ratings", "read_corpus", "read_preferences", "read_prompts",
    "read_responses", "read_sft", "row_lines", "write_jsonl",
]
