"""Best-of-n against the reward model, the cheap baseline RL is compared with (Gao et al. 2022):
sample n responses from the SFT policy, keep the one the RM scores highest.

One pool of N = max(ns) samples per held-out prompt is drawn once, in batches of
rm.sample_batch_size sequences, each batch scored by the RM and by gold (gold for evaluation
only) as it is drawn and its texts dropped, and every n is read off the pool's scores with the unbiased
estimator of stats.best_of_n_expectation; its KL to the SFT policy is the analytic
log n − (n − 1)/n (stats.best_of_n_kl).

Under torchrun the prompts are sharded over the ranks rather than sampled by rank 0 alone:
the pools are the bulk of the work (n_max samples per prompt, far more than an evaluation
draws) and independent of each other, so N ranks take about 1/N of the time instead of N − 1
of them waiting. Each rank loads the whole SFT policy and RM (as evaluation does), samples and
scores the pools of its contiguous share of the prompts with a seed of its own
(distributed.rank_seed), the per-prompt scores are gathered in prompt order, and rank 0 writes
the result. The samples differ from one process's (other seeds), as the evaluation's do; one
process draws the same samples on every run.
"""
from __future__ import annotations

import math
from pathlib import Path

from .. import checkpoint, distributed
from ..device import resolve_device
from ..evaluate import mean_se
from ..generate import sample_responses
from ..metrics import progress
from ..reward import score_texts
from ..files import read_json_object, write_json
from .arms import require
from .stats import best_of_n_expectation, best_of_n_kl

RESULT_FILE = "best_of_n.json"


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max (n_max itself included when it is not a power of two)."""
    ns, n = [], 1
    while n < n_max:
        ns.append(n)
        n *= 2
    return ns + [n_max]


def curve(rm_scores: list[list[float]], golds: list[list[float]], ns: list[int]) -> list[dict]:
    """Per n: {"n", "kl", "sqrt_kl", "gold_mean", "gold_se", "rm_mean", "rm_se"}, the means and
    standard errors over prompts of the best-of-n estimates. rm_scores, golds: per prompt, the
    pool's RM scores and gold scores (same length N >= max(ns))."""
    out = []
    for n in ns:
        gold = [best_of_n_expectation(r, g, n) for r, g in zip(rm_scores, golds)]
        rm = [best_of_n_expectation(r, r, n) for r in rm_scores]
        (gm, gse), (rmm, rmse) = mean_se(gold), mean_se(rm)
        kl = best_of_n_kl(n)
        out.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), "gold_mean": gm, "gold_se": gse,
                    "rm_mean": rmm, "rm_se": rmse})
    return out


def run_best_of_n(cfg, run_dir, *, prompts: list, gold_score, n_max: int) -> dict:
    """Best-of-n of run_dir's SFT policy (the base with --skip-sft) against its RM; writes and
    returns run_dir/best_of_n.json ({"ns", "curve", "prompts", "n_max"}). A finished result of the
    same n_max is read back, not recomputed; one of another n_max is replaced (a new pool of
    n_max samples per prompt: the pools themselves are not kept).

    prompts: held-out prompts the gold function knows; gold_score(prompt, response) -> float.
    The pool is sampled at eval.temperature (1 where evaluation is greedy: best-of-n needs
    distinct samples). Under torchrun: called on every rank; each samples its share of the
    prompts, every rank returns the whole result."""
    run_dir = Path(run_dir)
    out = run_dir / RESULT_FILE
    finished = distributed.on_main(lambda: read_json_object(out) if out.exists() else None)
    if finished is not None and finished.get("n_max") == n_max:
        require(out, finished, {"n_max": int, "ns": list, "prompts": int, "curve": list})
        return finished
    if finished is not None:
        print(f"[best-of-n] {out} holds n up to {finished.get('n_max')}; sampling pools of {n_max} anew")
    device = resolve_device(cfg.device)
    policy_dir = run_dir / ("pretrain" if cfg.skip_sft else "sft")
    tokenizer = checkpoint.load_tokenizer(policy_dir)
    policy = checkpoint.load_model_from(policy_dir, device=device).eval()
    rm = checkpoint.load_model_from(run_dir / "rm", device=device).eval()
    mine = prompts[distributed.shard_slice(len(prompts))]  # this rank's share; all of them in one process
    rm_scores, golds = sample_scores(policy, rm, tokenizer, mine, n_max=n_max, gold_score=gold_score,
                                     max_new_tokens=cfg.eval.max_new_tokens,
                                     temperature=cfg.eval.temperature or 1.0, batch_size=cfg.rm.sample_batch_size,
                                     max_seq_len=cfg.model.max_seq_len,
                                     seed=distributed.rank_seed(cfg.seed * 1_000_003 + 17))
    rm_scores, golds = distributed.gather(rm_scores), distributed.gather(golds)
    ns = powers_of_two(n_max)
    result = {"n_max": n_max, "ns": ns, "prompts": len(prompts), "curve": curve(rm_scores, golds, ns)}
    return distributed.on_main(_write, out, result)


def sample_scores(policy, rm, tokenizer, prompts: list, *, n_max: int, gold_score, max_new_tokens: int,
                  temperature: float, batch_size: int, max_seq_len: int, seed: int) -> tuple[list, list]:
    """(RM scores, gold scores): per prompt, those of n_max responses sampled from policy, drawn
    and scored batch_size sequences at a time (batch k seeded seed + k): only the two floats per
    sample are kept, never the texts of the pool, so memory grows with n_max by 16 bytes a sample."""
    rm_scores: list[list[float]] = [[] for _ in prompts]
    golds: list[list[float]] = [[] for _ in prompts]
    total = len(prompts) * n_max
    bar = progress(total, "best-of-n samples")
    for k, start in enumerate(range(0, total, batch_size)):
        idx = [j // n_max for j in range(start, min(start + batch_size, total))]  # the prompt of each sample
        chunk = [prompts[i] for i in idx]
        texts = [pool[0] for pool in sample_responses(policy, tokenizer, chunk, n=1, max_new_tokens=max_new_tokens,
                                                      temperature=temperature, batch_size=batch_size, seed=seed + k)]
        scores = score_texts(rm, tokenizer, chunk, texts, max_seq_len).tolist()
        for i, p, r, s in zip(idx, chunk, texts, scores):
            rm_scores[i].append(float(s))
            golds[i].append(float(gold_score(p, r)))
        bar.update(len(chunk))
    bar.close()
    return rm_scores, golds


def _write(out: Path, result: dict) -> dict:
    write_json(out, result)
    return result
