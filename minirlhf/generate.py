"""Batched sampling with a KV cache.

Prompts of different lengths are left-padded into one (B, P) block so that every
prompt's last token sits in the same column and all sequences step together. Each
step feeds one token per sequence, writes its key/value into the cache and samples
the next. A sequence that emits EOS is finished: later steps still run for it (the
batch moves in lockstep) but what they sample is replaced by padding and masked out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import progress
from .model import Transformer


@dataclass
class Generation:
    prompt_tokens: torch.Tensor   # (B, P) long, left-padded
    prompt_mask: torch.Tensor     # (B, P) bool, True on real prompt tokens
    tokens: torch.Tensor          # (B, R) long, response tokens, right-padded with pad_id
    logprobs: torch.Tensor        # (B, R) fp32, log-prob of each sampled token (0 on padding)
    mask: torch.Tensor            # (B, R) bool, True on response tokens (EOS included)
    lengths: torch.Tensor         # (B,) long, response lengths (EOS included)
    truncated: torch.Tensor       # (B,) bool, True where the response hit max_new_tokens without EOS

    def full(self):
        """(tokens, attention_mask) of prompt + response concatenated: (B, P + R)."""
        return (torch.cat([self.prompt_tokens, self.tokens], 1),
                torch.cat([self.prompt_mask, self.mask], 1))


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """(tokens, mask) of shape (B, max_len), each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return tokens.to(device), mask.to(device)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Top-k, then nucleus (top-p, Holtzman et al. 2020) filtering: dropped logits become -inf."""
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens ranked above it already reaches top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), drawn by inverting the CDF with one uniform per row:
    the first index whose cumulative probability exceeds u · total. Exact sampling, like
    torch.multinomial, which draws B·V exponentials instead of B uniforms (the costliest op of
    a small model's decoding step). Zero-probability tokens (filtered out) are never drawn."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> Generation:
    """Sample up to max_new_tokens per prompt.

    temperature 0 is greedy. The returned logprobs are log-softmax(logits / temperature)
    of the sampled token, before top-k/top-p, i.e. the log-prob the policy assigns under
    the temperature it is trained with (what PPO's old log-probs must be)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = model.embed.weight.device
    prompt_tokens, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = prompt_tokens.shape
    if P + max_new_tokens - 1 > model.cfg.max_seq_len:  # checked before any compute, not at the step that overflows
        raise ValueError(f"generate: a prompt of {P} tokens and max_new_tokens={max_new_tokens} need "
                         f"{P + max_new_tokens - 1} positions, more than model.max_seq_len={model.cfg.max_seq_len}; "
                         f"shorten the prompt or lower the new tokens")
    cache = model.new_cache(B, P + max_new_tokens)
    key_mask = torch.cat([prompt_mask, torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
    positions = prompt_mask.long().cumsum(-1) - 1

    out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)

    logits = model.forward_cached(prompt_tokens, positions.clamp(min=0), key_mask[:, :P], cache, 0,
                                  last_only=True)[:, -1]
    next_pos = positions[:, -1] + 1
    for t in range(max_new_tokens):
        logits = logits.float()
        if not torch.isfinite(logits).all():  # sampling would fail, or worse, go on with garbage
            from .checkpoint import NonFiniteError
            raise NonFiniteError(f"non-finite logits at generation step {t}")
        if temperature == 0:
            token = logits.argmax(-1)
            logp = F.log_softmax(logits, -1)
        else:
            logp = F.log_softmax(logits / temperature, -1)
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = sample(probs, generator)
        out_tokens[:, t] = torch.where(alive, token, pad_id)
        out_logprobs[:, t] = torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0)
        key_mask[:, P + t] = alive
        alive = alive & (token != eos_id)
        if not alive.any() or t == max_new_tokens - 1:
            break
        logits = model.forward_cached(out_tokens[:, t:t + 1], next_pos[:, None], key_mask[:, :P + t + 1],
                                      cache, P + t, last_only=True)[:, -1]
        next_pos = next_pos + 1

    mask = key_mask[:, P:]
    lengths = mask.sum(-1)
    width = max(int(lengths.max()), 1)  # drop columns every sequence left empty
    return Generation(prompt_tokens, prompt_mask, out_tokens[:, :width], out_logprobs[:, :width],
                      mask[:, :width], lengths, truncated=alive)


@torch.no_grad()
def sample_responses(model: Transformer, tokenizer, prompts: list[str], *, n: int,
                     max_new_tokens: int, temperature: float, batch_size: int, seed: int,
                     desc: str | None = None) -> list[list[str]]:
    """n sampled responses (decoded text) for each prompt: a list of n strings per prompt,
    sampled in batches of batch_size sequences, seeded (same seed, same texts)."""
    model.eval()
    g = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    texts = []
    bar = progress(len(flat), desc) if desc else None
    for i in range(0, len(flat), batch_size):
        chunk = flat[i:i + batch_size]
        gen = generate(model, [tokenizer.prompt_ids(p) for p in chunk], max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature, generator=g)
        texts += [tokenizer.decode(t) for t in gen.tokens]
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
