"""Evaluation on held-out prompts: gold score (mean ± standard error), RM score, KL to a
reference, held-out perplexity.

This is the only place the gold function scores a policy's responses: PPO calls
`evaluate_policy` every `eval_every` iterations to draw the gold curve, never to compute a
reward. report.py writes what this measures. Under torchrun each rank evaluates its
contiguous share of the prompts (and windows) and the results are gathered in order.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .device import autocast
from .generate import generate
from .loop import fault_point
from .logprobs import response_logprobs
from .model import Transformer
from .reward import score_rollouts
from .tokenizer import token_stream


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of xs; SE = sample std (n − 1) / sqrt(n); (nan, nan) if empty."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def heldout_windows(stream: torch.Tensor, n: int, seq_len: int):
    """(inputs, targets), each (k, seq_len): up to n non-overlapping windows from the start of
    a token stream, k >= 1. The stream must hold at least seq_len + 1 tokens (checked where
    the inputs are loaded)."""
    n = max(1, min(n, (len(stream) - 1) // seq_len))
    w = stream[: n * seq_len + 1]
    return w[:-1].view(n, seq_len), w[1:].view(n, seq_len)


@torch.no_grad()
def stream_loss(model: Transformer, stream: torch.Tensor, seq_len: int, max_windows: int, batch: int,
                device) -> float:
    """Mean next-token cross-entropy (nats/token) of the model on a held-out token stream."""
    was_training = model.training
    model.eval()
    x, y = heldout_windows(stream, max_windows, seq_len)
    rows = distributed.shard_slice(len(x))  # this rank's windows; the sums are added over the ranks
    x, y = x[rows], y[rows]
    total, count = 0.0, 0
    with distributed.gathered(model):
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
            with autocast(device):
                logits = model(xb)
            total += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum").item()
            count += yb.numel()
    total, count = distributed.all_sum(total, count)
    model.train(was_training)
    return total / count


@torch.no_grad()
def evaluate_policy(model: Transformer, tokenizer, prompts: list, *, gold_score=None,
                    rm: Transformer | None = None, ref: Transformer | None = None, max_new_tokens: int = 32,
                    temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> dict:
    """Sample one response per prompt (temperature 0: greedy) and score it.

    gold_score(prompt, response) -> float, or None for a prompt the gold function does not
    know: gold is averaged over the prompts it knows (`gold_n` of them). The RM score is
    read exactly as PPO reads it (reward.score_rollouts). KL to ref is Σ_t log π(y_t) −
    log π_ref(y_t) over the sampled response (the sequence KL estimate), with the log-probs
    taken at the sampling temperature (at 1 for greedy decoding). Returns means, standard
    errors, the response texts and per-response RM scores."""
    model.eval()
    device = model.embed.weight.device
    mine = prompts[distributed.shard_slice(len(prompts))]  # this rank's share; gathered below in order
    g = torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))
    responses, kls, lengths, truncated, rm_scores = [], [], [], [], []
    with distributed.gathered(model):
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            gen = generate(model, [tokenizer.prompt_ids(p) for p in chunk], max_new_tokens=max_new_tokens,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature, generator=g)
            responses += [tokenizer.decode(t) for t in gen.tokens]
            lengths += gen.lengths.tolist()
            truncated += gen.truncated.tolist()
            with autocast(device):
                if rm is not None:
                    rm_scores += score_rollouts(rm, gen, tokenizer.eos_id).float().tolist()
                if ref is not None:
                    tokens, attn = gen.full()
                    P, t = gen.prompt_tokens.size(1), temperature or 1.0
                    lp = response_logprobs(model, tokens, attn, P, t)
                    lp_ref = response_logprobs(ref, tokens, attn, P, t)
                    kls += ((lp - lp_ref) * gen.mask).sum(1).tolist()
    responses, kls, lengths, truncated, rm_scores = (
        distributed.gather(x) for x in (responses, kls, lengths, truncated, rm_scores))
    out = {"n": len(prompts), "response_len": sum(lengths) / max(len(lengths), 1),
           "truncated_frac": sum(truncated) / max(len(truncated), 1), "responses": responses}
    if gold_score is not None:
        golds = [gold_score(p, r) for p, r in zip(prompts, responses)]
        known = [x for x in golds if x is not None]
        if known:
            out["gold_mean"], out["gold_se"] = mean_se(known)
            out["gold_n"] = len(known)
    if rm is not None:
        out["rm_mean"], out["rm_se"] = mean_se(rm_scores)
        out["rm_scores"] = rm_scores
    if ref is not None:
        out["kl_mean"], out["kl_se"] = mean_se(kls)
    return out


def evaluate_checkpoints(checkpoints: dict[str, Path], *, rm_dir, ref_dir, prompts: list, gold_score,
                         corpus_heldout: list[str], ec, seq_len: int, seed: int, device) -> dict:
    """Each checkpoint on all held-out prompts: gold ± SE, RM score, KL to ref, held-out perplexity.

    ec: the EvalConfig; seq_len: window of the perplexity measurement."""
    tokenizer = checkpoint.load_tokenizer(ref_dir)
    rm = checkpoint.load_model_from(rm_dir, device=device).eval() if rm_dir else None
    ref = checkpoint.load_model_from(ref_dir, device=device).eval()
    heldout = token_stream(tokenizer, corpus_heldout)
    results = {}
    for i, (name, d) in enumerate(checkpoints.items()):
        fault_point("eval", i)
        t0 = time.time()
        model = checkpoint.load_model_from(d, device=device).eval()
        r = evaluate_policy(model, tokenizer, prompts, gold_score=gold_score, rm=rm, ref=ref,
                            max_new_tokens=ec.max_new_tokens, temperature=ec.temperature,
                            batch_size=ec.batch_size, seed=seed)
        loss = stream_loss(model, heldout, seq_len, 64, 32, device)
        r["heldout_ppl"] = math.exp(loss) if loss < 700 else math.inf  # a collapsed model: e^loss overflows
        r["wall_s"] = round(time.time() - t0, 1)
        results[name] = r
        gold = f"gold {r['gold_mean']:.3f} ± {r['gold_se']:.3f}, " if "gold_mean" in r else ""
        rm_txt = f"RM {r['rm_mean']:.3f}, " if "rm_mean" in r else ""
        print(f"[eval] {name}: {gold}{rm_txt}KL to ref {r['kl_mean']:.2f}, perplexity {r['heldout_ppl']:.2f}")
    return results
