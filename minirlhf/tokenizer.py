"""SentencePiece tokenizer and the chat framing shared by SFT, RM and PPO.

Ids 0..3 are pad, unk, bos, eos. Byte fallback is on, so any UTF-8 text (Chinese,
emoji) round-trips through byte tokens even when the small vocabulary has no piece
for it; normalisation is off, so decode(encode(text)) == text exactly.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"


def dialogue_text(prompt: str, response: str) -> str:
    """How a (prompt, response) exchange is written as plain text, in the corpus and in chat."""
    return f"User: {prompt}\nAssistant: {response}"


class Tokenizer:
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def train(cls, texts, vocab_size: int, seed: int = 0) -> "Tokenizer":
        """Train a BPE SentencePiece model on an iterable of texts."""
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
            minloglevel=2, hard_vocab_limit=False,  # a small corpus may not fill the vocab
            # '\n' separates the turns of a dialogue: give it a piece of its own
            user_defined_symbols=["\n"],
        )
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        return cls(path.read_bytes())

    def save(self, path) -> None:
        Path(path).write_bytes(self.model_proto)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        """Text of ids; pad/bos/eos are dropped, decoding stops at the first eos."""
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return self.sp.decode(out)

    def document(self, text: str) -> list[int]:
        """A pretraining document: bos text eos."""
        return [BOS_ID] + self.encode(text) + [EOS_ID]

    # ---- chat framing: the one place that turns (prompt, response) into tokens ----
    def prompt_ids(self, prompt: str) -> list[int]:
        """bos + "User: {prompt}\\nAssistant:" — what the policy is asked to continue."""
        return [BOS_ID] + self.encode(dialogue_text(prompt, "")[:-1])

    def response_ids(self, response: str) -> list[int]:
        """" {response}" + eos: the dummy prefix supplies the space after "Assistant:"."""
        return self.encode(response) + [EOS_ID]

    def frame(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(token ids, response mask) of one exchange; the mask is 1 exactly on response tokens + eos."""
        p, r = self.prompt_ids(prompt), self.response_ids(response)
        return p + r, [0] * len(p) + [1] * len(r)


# ---- batches of framed exchanges and documents, as tensors ----
def frame_batch(tokenizer, pairs, max_len: int):
    """(tokens, attention_mask, response_mask), each (B, T) with T <= max_len, right-padded.

    Each (prompt, response) is framed by `tokenizer.frame`. An exchange longer than max_len
    is cut on the left: the end of the prompt and the whole response (with the EOS the
    reward model reads) are kept; only a response longer than max_len itself loses its start."""
    import torch

    framed = [tokenizer.frame(p, r) for p, r in pairs]
    T = min(max_len, max(len(ids) for ids, _ in framed))
    tokens = torch.full((len(framed), T), tokenizer.pad_id, dtype=torch.long)
    attn = torch.zeros((len(framed), T), dtype=torch.bool)
    resp = torch.zeros((len(framed), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(framed):
        ids, mask = ids[-T:], mask[-T:]  # left truncation
        tokens[i, :len(ids)] = torch.tensor(ids)
        attn[i, :len(ids)] = True
        resp[i, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return tokens, attn, resp


def token_stream(tokenizer, texts):
    """The documents packed into one (N,) int64 stream: bos doc eos bos doc eos ..."""
    import torch

    return torch.tensor([t for ids in tokenizer.encode_batch(list(texts))
                         for t in [tokenizer.bos_id, *ids, tokenizer.eos_id]], dtype=torch.long)
