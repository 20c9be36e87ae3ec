"""Our SentencePiece tokenizer as a Hugging Face tokenizer.json + chat template, or a refusal.

The conversion rebuilds, with `tokenizers` components, what our SentencePiece model does
(tokenizer.py, Tokenizer.train): no normalisation but the dummy prefix ("▁" before the text)
and spaces written as "▁"; the user-defined pieces ("\\n") and, with split_digits, every digit
stand alone; words start at each "▁"; inside a word, BPE merges pairs in the order of the
merged piece's score (SentencePiece's BPE encoder), with byte fallback for characters
outside the vocabulary. Special tokens keep their ids (pad 0, unk 1, bos 2, eos 3). The chat
template (chat_template.PLAIN_TEMPLATE) writes "User: ...\\nAssistant: ..." the way
Tokenizer.prompt_ids/response_ids tokenize it.

The conversion is then checked, not trusted: `verify_same_ids` encodes a test corpus
(newlines, Chinese, emoji, digits, runs of spaces, a multi-turn chat) with both and raises
ValueError at the first text whose ids differ, so an export never ships a tokenizer that
silently encodes differently. (As with every HF tokenizer, the literal text of a special
token such as "</s>" inside user text is read as that token; SentencePiece reads it as
characters. Such text is not in the check.)
"""
from __future__ import annotations

from ..tokenizer import Tokenizer
from .chat_template import PLAIN_TEMPLATE
from .hf_tokenizer import HFTokenizer

CHECK_TEXTS = [
    "The fox eats berries.", "Lima is in Peru.\nThe fox sleeps in a den.\n\nTwo newlines above.",
    "中文也可以：狐狸吃浆果。", "emoji 🦊🍓 mixed with text 🙂", "digits 12345 and 3.14, 2024-06-01",
    "  two leading spaces", "trailing spaces  ", "tabs\tand  double  spaces", "\nstarts with a newline",
    "ends with a newline\n", "punctuation!? (brackets) [and] {braces} 'quotes' \"double\"", "a", " ", "",
    "User: What does the fox eat?\nAssistant: The fox eats berries.", "▁ a literal meta symbol",
    "Ünïcödé àccents ñ ß Ω ж", "mixed 中文 and English 🦊 in one line\nand 日本語 on the next",
]
CHECK_CHATS = [
    ("What does the fox eat?", "The fox eats berries."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Lima?"},
      {"role": "assistant", "content": "In Peru."}, {"role": "user", "content": "And the fox?\n中文 🦊"}],
     " It eats berries 🍓."),
]


def sentencepiece_to_hf(sp_tok: Tokenizer) -> HFTokenizer:
    """The tokenizers-library equivalent of our SentencePiece model (see the module docstring).
    Not yet verified: call verify_same_ids."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    sp = sp_tok.sp
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    first_byte = next((i for i in range(n) if sp.is_byte(i)), n)
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    # user-defined pieces sit between the special ids and the byte pieces (Tokenizer.train's layout)
    user = [i for i in range(first_byte) if i not in special and not sp.is_unused(i)]
    normal = [i for i in range(first_byte, n) if not (sp.is_byte(i) or sp.is_unused(i) or i in special)]
    # BPE merges: every split of a piece into two pieces, ranked by the merged piece's score
    merges = []
    for i in sorted(normal, key=lambda i: (-sp.get_score(i), i)):
        p = pieces[i]
        for k in range(1, len(p)):
            a, b = p[:k], p[k:]
            if vocab.get(a, -1) >= first_byte and vocab.get(b, -1) >= first_byte:
                merges.append((a, b))
    unk = pieces[next(i for i in special if sp.is_unknown(i))] if any(sp.is_unknown(i) for i in special) else None
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    splits = [pre_tokenizers.Split(Regex("|".join(_escape(pieces[i]) for i in user)), behavior="isolated")] \
        if user else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
                  pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    names = {sp_tok.bos_id: "bos_token", sp_tok.eos_id: "eos_token", sp_tok.pad_id: "pad_token",
             sp_tok.unk_id: "unk_token"}
    return HFTokenizer(tok, PLAIN_TEMPLATE, {name: pieces[i] for i, name in names.items()}, add_bos=True)


def _escape(s: str) -> str:
    import re

    return re.escape(s)


def verify_same_ids(sp_tok: Tokenizer, hf_tok: HFTokenizer, texts=None) -> None:
    """Raise ValueError naming the first text (of CHECK_TEXTS + texts, and CHECK_CHATS framed)
    that the two tokenizers turn into different ids."""
    if hf_tok.vocab_size != sp_tok.vocab_size:
        raise ValueError(f"tokenizer export: {hf_tok.vocab_size} ids in tokenizer.json, {sp_tok.vocab_size} in "
                         "tokenizer.model; refusing to export a tokenizer that encodes differently")
    pairs = [(t, sp_tok.encode(t), hf_tok.encode(t)) for t in [*CHECK_TEXTS, *(texts or [])]]
    pairs += [(f"chat {p!r:.60} / {r!r:.40}", sp_tok.frame(p, r)[0], hf_tok.frame(p, r)[0]) for p, r in CHECK_CHATS]
    pairs += [("special ids", [sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id], [hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id])]
    for text, a, b in pairs:
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ValueError(f"tokenizer export: tokenizer.json encodes {text!r:.80} differently from tokenizer.model "
                             f"(first difference at token {at}); refusing to export a tokenizer that encodes "
                             "differently")
