"""What an arm's run directory says, as numbers: the final evaluation (summary.json), the PPO
curves (metrics.jsonl), how informative its rankings were, and what a policy's top-scored
responses look like. Gold is used here to evaluate, never to train."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from .. import checkpoint
from ..config import TaskConfig
from ..data import build_task, read_preferences
from ..device import resolve_device
from ..evaluate import evaluate_policy
from ..metrics import stage_history

CURVE_KEYS = ("kl_to_ref", "rm_score", "entropy", "response_len", "repeat_frac", "kl_growth", "kl_coef", "ptx_loss")


@functools.lru_cache(maxsize=4)
def task_of(task_cfg: TaskConfig):
    """The embedded task of a TaskConfig (built once per config)."""
    return build_task(task_cfg)


def run_numbers(run_dir: Path) -> dict:
    """The final evaluation of a `train` run directory (summary.json) and its PPO curves.

    Scalars: gold (PPO policy, mean over held-out prompts) and gold_se (SE over prompts),
    gold_init (the policy PPO started from: SFT, or the base with --skip-sft), gold_base,
    rm_score, kl (to the reference, nats/response), ppl / ppl_init / ppl_base (held-out corpus
    perplexity), response_len, rm_acc_vs_gold, rm_acc_vs_annotator, warnings (the monitor's
    warning kinds). curves: per PPO iteration (see CURVE_KEYS); gold_points: the gold
    evaluations during PPO with the training batch's KL at that iteration."""
    s = json.loads((run_dir / "summary.json").read_text())
    init = "sft" if "sft" in s["gold"] else "base"
    rows = stage_history(run_dir, "ppo")
    curves = {"step": [r["step"] for r in rows]}
    for k in CURVE_KEYS:
        if any(k in r for r in rows):
            curves[k] = [r.get(k) for r in rows]
    return {
        "gold": s["gold"]["ppo"]["mean"], "gold_se": s["gold"]["ppo"]["se"],
        "gold_init": s["gold"][init]["mean"], "gold_base": s["gold"]["base"]["mean"],
        "rm_score": s["rm_score"]["ppo"], "rm_score_init": s["rm_score"][init],
        "kl": s["kl_to_ref"]["ppo"], "response_len": s["response_len"]["ppo"],
        "ppl": s["heldout_ppl"]["ppo"], "ppl_init": s["heldout_ppl"][init], "ppl_base": s["heldout_ppl"]["base"],
        "rm_acc_vs_gold": s["rm_accuracy"]["vs_gold"], "rm_acc_vs_annotator": s["rm_accuracy"]["vs_annotator"],
        "warnings": sorted({w["kind"] for w in s.get("monitor_warnings", [])}),
        "n_warnings": len(s.get("monitor_warnings", [])),
        "curves": curves,
        "gold_points": [{"step": r["step"], "gold": r["gold"], "gold_se": r.get("gold_se"), "kl_to_ref": r["kl_to_ref"]}
                        for r in rows if "gold" in r],
    }


def rankings_numbers(path: Path, gold_score, noise: float) -> dict:
    """How informative a rankings file is, judged by gold: over every pair of responses a ranking
    orders (K(K−1)/2 per prompt), uninformative_pairs = the share whose gold difference is below
    the annotator's noise scale (or zero: the annotator's order of them is mostly a coin flip),
    flipped_pairs = the share the annotator ordered against gold (ties in gold excluded), and
    ranked_gold = the mean gold of the ranked responses (how good the samples were)."""
    below = flipped = pairs = decided = 0
    golds_all = []
    for c in read_preferences(path):
        golds = [gold_score(c.prompt, r) for r in c.responses]
        golds_all += golds
        for better, worse in c.pairs:
            d = golds[better] - golds[worse]
            pairs += 1
            below += abs(d) < noise or d == 0
            if d != 0:
                decided += 1
                flipped += d < 0
    return {"uninformative_pairs": below / pairs if pairs else None,
            "flipped_pairs": flipped / decided if decided else None,
            "ranked_gold": sum(golds_all) / len(golds_all) if golds_all else None, "ranked_pairs": pairs}


def top_scored_samples(cfg, run_dir: Path, prompts: list, k: int, n_prompts: int = 64) -> list[dict]:
    """The k responses of run_dir's PPO policy that its RM scores highest, among one sample for
    each of the first n_prompts held-out prompts gold knows: what the policy learned to make
    the RM like. Each {"prompt", "response", "rm", "gold"}."""
    task = task_of(cfg.task)
    prompts = [p for p in prompts if task.knows(p)][:n_prompts]
    device = resolve_device(cfg.device)
    policy = checkpoint.load_model_from(run_dir / "ppo", device=device)
    rm = checkpoint.load_model_from(run_dir / "rm", device=device)
    r = evaluate_policy(policy, checkpoint.load_tokenizer(run_dir / "ppo"), prompts, rm=rm,
                        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                        batch_size=cfg.eval.batch_size, seed=cfg.seed)
    rows = [{"prompt": p, "response": y, "rm": s, "gold": task.gold_score(p, y)}
            for p, y, s in zip(prompts, r["responses"], r["rm_scores"])]
    return sorted(rows, key=lambda x: -x["rm"] if math.isfinite(x["rm"]) else math.inf)[:k]
