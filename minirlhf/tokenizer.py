"""Tokenizers and the chat framing shared by SFT, RM and PPO.

Every stage sees one small interface, `ChatTokenizer`, with two implementations:

- `Tokenizer` (here): our SentencePiece model, trained from scratch for our own runs.
  Ids 0..3 are pad, unk, bos, eos. Byte fallback is on, so any UTF-8 text (Chinese,
  emoji) round-trips through byte tokens even when the small vocabulary has no piece
  for it; normalisation is off, so decode(encode(text)) == text exactly.
- `HFTokenizer` (minirlhf/interop/hf_tokenizer.py): an imported model's Hugging Face
  `tokenizer.json` with the model's own Jinja chat template.

A prompt is a `str` (one user turn) or a list of {"role": "system"|"user"|"assistant",
"content": str} messages ending with a user turn. The end-of-turn token (`eos_id`) closes
every response: generation stops on it and the reward model reads its score there.
`load_tokenizer(dir)` reads whichever of the two a directory holds.
"""
from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Union

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
ROLES = ("system", "user", "assistant")

Prompt = Union[str, "list[dict]"]


def dialogue_text(prompt: str, response: str) -> str:
    """How a (prompt, response) exchange is written as plain text, in the corpus and in chat."""
    return f"User: {prompt}\nAssistant: {response}"


def as_messages(prompt: Prompt) -> list[dict]:
    """The prompt as a list of {"role", "content"} messages: a str is one user turn.

    The order every chat template takes (as minirlhf/data/formats checks data files): an
    optional system message first, then user and assistant turns alternating, starting and
    ending with a user turn. Raises ValueError naming the first message out of place or malformed."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"prompt: expected a string or a non-empty list of messages, got {type(prompt).__name__}")
    first = 1 if isinstance(prompt[0], dict) and prompt[0].get("role") == "system" else 0
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt: message {i}: expected {{'role': system|user|assistant, 'content': str}}, "
                             f"got {m!r:.80}")
        want = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        if m["role"] != want:
            if m["role"] == "system":
                raise ValueError(f"prompt: message {i}: a system message may only come first")
            raise ValueError(f"prompt: message {i}: expected the {want} turn here (user and assistant alternate, "
                             f"after an optional system message), got {m['role']}")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"prompt: the last message must be a user turn, got {prompt[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class ChatTokenizer(ABC):
    """What every stage needs from a tokenizer.

    Attributes: pad_id (padding; masked out wherever it appears), eos_id (the end-of-turn
    token that closes a response), bos_id (int, or None when the model has none),
    vocab_size (ids are < vocab_size)."""

    pad_id: int
    eos_id: int
    bos_id: int | None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of ids (list or 1-D tensor); decoding stops at the first eos_id, special tokens are dropped."""

    @abstractmethod
    def document(self, text: str) -> list[int]:
        """A pretraining document: the model's begin/end markers around encode(text)."""

    def documents(self, texts: list[str]) -> list[list[int]]:
        return [self.document(t) for t in texts]

    @abstractmethod
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """What the policy continues from: the conversation rendered up to the assistant's turn."""

    @abstractmethod
    def response_ids(self, response: str) -> list[int]:
        """A response's ids: encode(response) + [eos_id] (the end-of-turn token)."""

    @abstractmethod
    def save(self, directory) -> None:
        """Write the tokenizer into `directory` (created if missing); load_tokenizer reads it back."""

    def frame(self, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        """(token ids, response mask) of one exchange: prompt_ids + response_ids; the mask is 1
        exactly on the response tokens and the end-of-turn token."""
        p, r = self.prompt_ids(prompt), self.response_ids(response)
        return p + r, [0] * len(p) + [1] * len(r)


class Tokenizer(ChatTokenizer):
    """Our SentencePiece tokenizer; chat turns are plain text "User: ...\\nAssistant: ..."."""

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
        """From a tokenizer.model file or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        return cls(path.read_bytes())

    def save(self, path) -> None:
        """Into a directory (as tokenizer.model), or to a file path."""
        path = Path(path)
        (path / TOKENIZER_FILE if path.is_dir() else path).write_bytes(self.model_proto)

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

    def documents(self, texts: list[str]) -> list[list[int]]:
        return [[BOS_ID] + ids + [EOS_ID] for ids in self.encode_batch(texts)]

    # ---- chat framing: the one place that turns (prompt, response) into tokens ----
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """bos + "User: {prompt}\\nAssistant:" — what the policy is asked to continue.

        A conversation renders each system/user message as a line "System: ..." / "User: ...";
        an earlier assistant turn follows "\\nAssistant:" exactly as a response does
        (response_ids, eos included), so a multi-turn prompt holds the same tokens as the
        single exchanges the model was trained on."""
        ids, lines = [BOS_ID], []
        for m in as_messages(prompt):
            if m["role"] == "assistant":
                ids += self.encode("\n".join(lines) + "\nAssistant:") + self.response_ids(m["content"])
                lines = []
            else:
                lines.append(f"{m['role'].capitalize()}: {m['content']}")
        return ids + self.encode("\n".join(lines) + "\nAssistant:")

    def response_ids(self, response: str) -> list[int]:
        """" {response}" + eos: the dummy prefix supplies the space after "Assistant:"."""
        return self.encode(response) + [EOS_ID]


SentencePieceTokenizer = Tokenizer


def load_tokenizer(path) -> ChatTokenizer:
    """The tokenizer saved in a directory: tokenizer.json (+ chat template) → HFTokenizer,
    else tokenizer.model → our SentencePiece Tokenizer. A tokenizer.model file path also works.
    Raises ValueError when there is neither."""
    path = Path(path)
    if path.is_file() and path.name == TOKENIZER_FILE:
        return Tokenizer.load(path)
    if (path / HF_TOKENIZER_FILE).is_file():
        from .interop.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
    if (path / TOKENIZER_FILE).is_file():
        return Tokenizer.load(path)
    raise ValueError(f"{path}: no tokenizer here (expected {HF_TOKENIZER_FILE} or {TOKENIZER_FILE})")


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
    """The documents packed into one (N,) int64 stream: bos doc eos bos doc eos ... (each as
    `tokenizer.document` writes it)."""
    import torch

    return torch.tensor([t for doc in tokenizer.documents(list(texts)) for t in doc], dtype=torch.long)


def random_windows(stream, batch: int, seq_len: int, generator):
    """(inputs, targets), each (batch, seq_len) int64: windows of a token stream at random offsets
    drawn from generator, targets shifted by one (pretraining; PPO-ptx)."""
    import torch

    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = stream[idx]
    return w[:, :-1], w[:, 1:]
