"""Per-token log-probs and values of the response part of prompt+response sequences.

Layout (what generate() returns, concatenated): columns 0..P-1 hold the left-padded
prompt, columns P..P+R-1 the right-padded response. The logits at column P-1+t
predict response token t, and the critic's value of the state before token t is read
at the same column.
"""
from __future__ import annotations

from kernels import token_logprobs

from .model import Transformer


def response_logits(model: Transformer, tokens, attn, prompt_len: int):
    """Logits (B, R, V) predicting each response token (the LM head runs on those columns only)."""
    return model(tokens, attn, columns=slice(prompt_len - 1, -1))


def response_logprobs(model: Transformer, tokens, attn, prompt_len: int, temperature: float = 1.0):
    """fp32 (B, R): log π(y_t | x, y_<t) of each response token (padding positions hold garbage)."""
    return token_logprobs(response_logits(model, tokens, attn, prompt_len), tokens[:, prompt_len:], temperature)


def response_values(critic: Transformer, tokens, attn, prompt_len: int):
    """fp32 (B, R): V(x, y_<t), the critic's value of the state before each response token."""
    return critic.scalars(tokens, attn, columns=slice(prompt_len - 1, -1))
