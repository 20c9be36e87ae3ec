"""The end of a run: write report.md, PNG plots and summary.json from what evaluate.py measured.

summary.json (keys documented in the README) holds the numbers a script compares runs
by; report.md shows the same numbers with plots and sample responses for a person.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import checkpoint, monitor
from .config import RunConfig
from .device import resolve_device
from .files import write_json
from .metrics import stage_history


def _plot_gold(evals: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in evals if "gold_mean" in evals[n]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(names, [evals[n]["gold_mean"] for n in names], yerr=[evals[n]["gold_se"] for n in names], capsize=6,
           color=["#999999", "#4c72b0", "#dd8452"][:len(names)])
    ax.set_ylabel("gold score (mean ± SE)")
    ax.set_title("held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ppo(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rm_score", "RM score"), ("gold", "gold score (held-out)"),
              ("kl_to_ref", "KL to reference (nats/response)"), ("kl_coef", "KL coefficient β")]
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5))
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_monitor(rows: list[dict], alarms: list, path: Path) -> None:
    """The over-optimisation monitor's series (monitor.py), with a line at each warning's first firing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kl_to_ref", "KL to reference (nats/response)"), ("kl_growth", "KL growth (nats/iteration)"),
              ("entropy", "policy entropy (nats/token)"), ("response_len", "response length (tokens)"),
              ("repeat_frac", "share of repeated tokens"), ("rm_score", "RM score"), ("gold", "gold (held-out)")]
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.2))
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        for a in alarms:
            ax.axvline(a.iteration, color="#c44e52", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO iteration", fontsize=8)
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0, 0.5, "\n".join(f"{a.iteration}: {monitor.LABELS[a.kind]}" for a in alarms) or "no warning",
                       fontsize=9, color="#c44e52" if alarms else "#555555")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(x):
    """x with every non-finite float replaced by None (JSON has no inf or nan)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _show_prompt(prompt) -> str:
    """A prompt for the report: the text, or a conversation's turns as `role: content`."""
    if isinstance(prompt, str):
        return prompt
    return " / ".join(f"{m['role']}: {m['content']}" for m in prompt)


def _fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def write_report(cfg: RunConfig, run_dir, evals: dict, *, prompts: list[str], rm_dir, wall: dict,
                 total_wall: float) -> dict:
    run_dir = Path(run_dir)
    rm_info = checkpoint.read_meta(rm_dir)["info"] if rm_dir else {}
    ppo_rows = stage_history(run_dir, "ppo")
    alarms = monitor.scan(ppo_rows, monitor.Thresholds.of(cfg.ppo))
    summary = {
        "gold": {n: {"mean": e.get("gold_mean"), "se": e.get("gold_se")} for n, e in evals.items()},
        "rm_score": {n: e.get("rm_mean") for n, e in evals.items()},
        "kl_to_ref": {n: e.get("kl_mean") for n, e in evals.items()},
        "heldout_ppl": {n: e["heldout_ppl"] for n, e in evals.items()},
        "response_len": {n: e["response_len"] for n, e in evals.items()},
        "rm_accuracy": {"vs_annotator": rm_info.get("acc_vs_labels"), "vs_gold": rm_info.get("acc_vs_gold")},
        "rm_tied_pairs": {"train_dropped": rm_info.get("tied_pairs_dropped", 0),
                          "heldout_dropped": rm_info.get("tied_pairs", 0)},
        "truncated_frac": {n: e.get("truncated_frac") for n, e in evals.items()},
        "final_kl_to_ref": evals.get("ppo", {}).get("kl_mean"),
        "eval_prompts": next(iter(evals.values()))["n"] if evals else 0,
        "monitor_warnings": [{"kind": a.kind, "iteration": a.iteration, "message": a.message} for a in alarms],
        "wall_s": {**wall, "total": round(total_wall, 1)},
        "device": str(resolve_device(cfg.device)),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(run_dir / "summary.json", _finite(summary), indent=2)  # strict JSON: inf/nan -> null
    _plot_gold(evals, run_dir / "gold_by_stage.png")
    _plot_ppo(ppo_rows, run_dir / "ppo_curves.png")
    _plot_monitor(ppo_rows, alarms, run_dir / "monitor.png")

    gold_n = max((e.get("gold_n", 0) for e in evals.values()), default=0)
    lines = ["# minirlhf run report", "",
             f"{summary['eval_prompts']} held-out prompts, one sample each (temperature {cfg.eval.temperature}); "
             + (f"gold over the {gold_n} the gold function knows; " if gold_n != summary["eval_prompts"] else "")
             + f"KL is Σ_t log π − log π_ref over the sampled response, reference = "
             f"{'the base model (--skip-sft)' if cfg.skip_sft else 'SFT'}.", "",
             "| stage | gold (mean ± SE) | RM score | KL to ref | response length | held-out perplexity |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, e in evals.items():
        gold = f"{_fmt(e.get('gold_mean'))} ± {_fmt(e.get('gold_se'))}" if "gold_mean" in e else "n/a"
        lines.append(f"| {n} | {gold} | {_fmt(e.get('rm_mean'))} | {_fmt(e.get('kl_mean'), 2)} | "
                     f"{e['response_len']:.1f} | {e['heldout_ppl']:.2f} |")
    acc = summary["rm_accuracy"]
    labels = "your preference labels" if cfg.data.preferences else "the annotator's rankings"
    lines += ["", f"Reward model held-out pairwise accuracy: {_fmt(acc['vs_annotator'])} against {labels}, "
              f"{_fmt(acc['vs_gold'])} against the gold function. Pairs whose two responses are identical "
              f"after framing carry no preference and were left out: {summary['rm_tied_pairs']['train_dropped']} in "
              f"training, {summary['rm_tied_pairs']['heldout_dropped']} held out.", "",
              "![gold by stage](gold_by_stage.png)", "", "## PPO", "", "![PPO curves](ppo_curves.png)", "",
              "### Over-optimisation monitor", ""]
    lines += [f"- **warning** (iteration {a.iteration}): {a.message}" for a in alarms] or [
        "No warning: the RM score never rose while gold fell, the entropy did not collapse, KL did not accelerate."]
    lines += ["", "![monitor](monitor.png)", "",
              "## Wall time (s)", "", "| " + " | ".join(summary["wall_s"]) + " |",
              "|" + " --- |" * len(summary["wall_s"]), "| " + " | ".join(str(v) for v in summary["wall_s"].values()) + " |",
              "", "## Samples", ""]
    for i in range(min(cfg.eval.samples_shown, len(prompts))):
        lines += [f"**{_show_prompt(prompts[i])}**", "", "| stage | response |", "| --- | --- |"]
        for n, e in evals.items():
            lines.append(f"| {n} | {e['responses'][i].replace('|', '/').replace(chr(10), ' ')} |")
        lines.append("")
    (run_dir / "report.md").write_text("\n".join(lines))
    return summary
