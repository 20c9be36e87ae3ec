"""Evaluation on held-out prompts: gold score (mean ± standard error), RM score, KL to a reference.

This is the only place the gold function scores a policy's responses; PPO calls it
every `eval_every` iterations to draw the curve, never to compute a reward.
"""
from __future__ import annotations

import math

import torch

from .generate import generate
from .logprobs import response_logprobs
from .model import Transformer
from .tokenizer import Tokenizer


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


@torch.no_grad()
def evaluate_policy(model: Transformer, tokenizer: Tokenizer, prompts: list[str], *, gold_score=None,
                    rm: Transformer | None = None, ref: Transformer | None = None, max_new_tokens: int = 32,
                    temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> dict:
    """Sample one response per prompt and score it. Returns means, standard errors and the texts."""
    from .stages.rm import score_texts

    model.eval()
    device = model.embed.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    responses, kls, lengths = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gen = generate(model, [tokenizer.prompt_ids(p) for p in chunk], max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature, generator=g)
        responses += [tokenizer.decode(t) for t in gen.tokens]
        lengths += gen.lengths.tolist()
        if ref is not None:
            tokens, attn = gen.full()
            P = gen.prompt_tokens.size(1)
            lp = response_logprobs(model, tokens, attn, P, temperature)
            lp_ref = response_logprobs(ref, tokens, attn, P, temperature)
            # sequence KL(π || π_ref) estimated by Σ_t log π(y_t) − log π_ref(y_t) over the sampled response
            kls += ((lp - lp_ref) * gen.mask).sum(1).tolist()
    out = {"n": len(prompts), "response_len": sum(lengths) / max(len(lengths), 1), "responses": responses}
    if gold_score is not None:
        out["gold_mean"], out["gold_se"] = mean_se([gold_score(p, r) for p, r in zip(prompts, responses)])
    if rm is not None:
        r = score_texts(rm, tokenizer, prompts, responses, rm.cfg.max_seq_len).tolist()
        out["rm_mean"], out["rm_se"] = mean_se(r)
    if ref is not None:
        out["kl_mean"], out["kl_se"] = mean_se(kls)
    return out
