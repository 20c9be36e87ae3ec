"""The four readers — corpus, SFT demonstrations, prompts, preferences — over the row shapes
listed in the package docstring; each validates the whole file before returning anything."""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import chat
from .chat import Prompt
from .jsonl import DataError, Row, _parse, json_type, rows, show

K_MIN, K_MAX = 2, 9
RATING_MIN, RATING_MAX = 1, 7


@dataclass
class Comparison:
    """Responses to one prompt and the preferences among them.

    prompt is a `str`, or a list of {"role", "content"} messages ending with a user turn
    (see `chat`). pairs holds (better, worse) indices into responses: all C(K, 2) pairs of a
    ranking, [(0, 1)] for chosen/rejected (responses = [chosen, rejected]), and for ratings
    every pair with strictly different ratings (ties carry no preference and are dropped).
    """
    prompt: Prompt
    responses: list[str]
    pairs: list[tuple[int, int]]


def pairs_from_ranking(ranking: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of a ranking listed best first: all C(K, 2) of them."""
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def pairs_from_ratings(ratings: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of ratings (higher is better); ties give no pair."""
    k = len(ratings)
    return [(i, j) for i in range(k) for j in range(k) if ratings[i] > ratings[j]]


def row_lines(path: str | os.PathLike) -> list[int]:
    """The 1-based line number of each row of a JSONL file (plain or gzip), in order: the i-th
    item read_corpus, read_sft or read_prompts returns came from line row_lines(path)[i]
    (read_preferences leaves out all-tied rows). Raises DataError for an unreadable file."""
    return [row.line for row in rows(path)]


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Documents of a corpus file: rows {"text": str}. Raises DataError."""
    return [row.text("text") for row in rows(path)]


def _demonstration(row: Row) -> tuple[Prompt, str]:
    if row.has("messages"):
        if row.has("prompt") or row.has("response") or row.has("completion"):
            raise row.error("messages", "give either messages or prompt and response, not both")
        conversation = chat.messages(row, "messages", row.get("messages"), last="assistant")
        last = len(conversation) - 1
        response = row.text("content", conversation[last]["content"], f"messages[{last}].content")
        return chat.collapse(conversation[:last]), response
    prompt = chat.prompt(row)
    if row.has("completion"):
        if row.has("response"):
            raise row.error("completion", "give either response or completion (the same field), not both")
        return prompt, chat.response(row, "completion", row.get("completion"), empty_ok=False)
    return prompt, chat.response(row, "response", row.get("response"), empty_ok=False)


def read_sft(path: str | os.PathLike) -> list[tuple[Prompt, str]]:
    """(prompt, response) demonstrations: rows {"prompt", "response" or "completion"} or
    {"messages"} (the prompt is everything before the last turn, which must be the
    assistant's, and the response is its content). Raises DataError."""
    return [_demonstration(row) for row in rows(path)]


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts: rows {"prompt": str or an array of messages ending with a user turn}. Raises DataError."""
    return [chat.prompt(row) for row in rows(path)]


def _pair(row: Row) -> Comparison:
    if row.has("responses"):
        raise row.error("responses", "give either chosen/rejected or responses, not both")
    if row.has("prompt"):
        prompt = chat.prompt(row)
        chosen, rejected = (chat.response(row, k, row.get(k), empty_ok=True) for k in ("chosen", "rejected"))
        return Comparison(prompt, [chosen, rejected], [(0, 1)])
    # implicit prompt (HH-RLHF): chosen and rejected are whole conversations sharing all but the last turn
    chosen = chat.whole_conversation(row, "chosen")
    if chosen is None:
        raise row.error("prompt", 'missing (without one, chosen and rejected must be whole conversations: '
                                  'arrays of messages or "\\n\\nHuman: ... \\n\\nAssistant: ..." text)')
    rejected = chat.whole_conversation(row, "rejected")
    if rejected is None:
        raise row.error("rejected", "expected a whole conversation like chosen (there is no prompt), got a "
                                    "string without Human:/Assistant: turns")
    prompt = chat.shared_prompt(row, chosen, rejected, rejected_is_text=isinstance(row.get("rejected"), str))
    return Comparison(prompt, [chosen[-1]["content"], rejected[-1]["content"]], [(0, 1)])


def _responses(row: Row, k_max: int = K_MAX) -> list[str]:
    value = row.get("responses")
    if not isinstance(value, list):
        raise row.error("responses", f"expected an array of responses, got {json_type(value)}")
    if not K_MIN <= len(value) <= k_max:
        raise row.error("responses", f"{len(value)} given, expected {K_MIN} to {k_max}")
    return [chat.response(row, f"responses[{i}]", r, empty_ok=True) for i, r in enumerate(value)]


def _comparison(row: Row) -> Comparison:
    if row.has("chosen") or row.has("rejected"):
        return _pair(row)
    prompt = chat.prompt(row)
    responses = _responses(row)
    k = len(responses)
    if row.has("ranking") and row.has("ratings"):
        raise row.error("ranking", "give either ranking or ratings, not both")
    if row.has("ranking"):
        ranking = row.ints("ranking")
        if sorted(ranking) != list(range(k)):
            raise row.error("ranking", f"{show(ranking)} is not a permutation of 0..{k - 1}")
        return Comparison(prompt, responses, pairs_from_ranking(ranking))
    if row.has("ratings"):
        ratings = row.ints("ratings")
        if len(ratings) != k:
            raise row.error("ratings", f"{len(ratings)} ratings for {k} responses")
        for i, r in enumerate(ratings):
            if not RATING_MIN <= r <= RATING_MAX:
                raise row.error(f"ratings[{i}]", f"{show(r)} is outside {RATING_MIN}..{RATING_MAX}")
        return Comparison(prompt, responses, pairs_from_ratings(ratings))
    raise row.error("ranking", "missing (with responses, give ranking or ratings)")


def read_responses(path: str | os.PathLike, k_max: int = K_MAX) -> list[tuple[Prompt, list[str]]]:
    """(prompt, responses) of responses still to be judged: rows {"prompt": P, "responses": [R] * K},
    the ranking shape without its ranking (a ranking or ratings, if given, are ignored), with
    K = 2..k_max (k_max <= K_MAX). Raises DataError."""
    return [(chat.prompt(row), _responses(row, k_max)) for row in rows(path)]


def read_preferences(path: str | os.PathLike) -> list[Comparison]:
    """Comparisons from a preference file (any mix of the row shapes). Rows whose ratings are
    all tied carry no preference and are left out. Raises DataError."""
    return [c for c in map(_comparison, rows(path)) if c.pairs]


def check_preference_line(path: str | os.PathLike, line: int, text: str) -> Comparison:
    """read_preferences' checks on one line of a preference file, for a caller that splits the
    file itself (`label`, continuing the labels file it appends to): `text` is line `line` of
    `path`, decoded. Returns its Comparison (pairs empty when all tied). Raises DataError
    `path:line: field: what`, the message read_preferences gives for that line."""
    obj = _parse(str(path), line, text.removeprefix("\ufeff"))
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: row: expected a JSON object, got {json_type(obj)}")
    return _comparison(Row(str(path), line, obj))
