"""`train`: the InstructGPT recipe end to end, one stage after another.

    inputs ─▶ pretrain ─▶ sft ─▶ rankings (SFT samples, annotator) ─▶ rm ─▶ ppo ─▶ evaluation ─▶ report

Each stage writes its checkpoint directory under the run directory. A finished stage is
kept and skipped on rerun; an unfinished one (the run was killed) continues with --resume.
Every input file is read and validated before the first stage computes anything.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint
from .config import RunConfig
from .data import Annotator, Comparison, build_task, read_corpus, read_preferences, read_prompts, read_sft
from .device import resolve_device, seed_everything, use_all_cores
from .metrics import Metrics

PREFERENCES_FILE = "preferences.jsonl"


@dataclass
class Inputs:
    """What the stages train and evaluate on: the embedded task, or the user's own files."""
    corpus: list[str]
    corpus_heldout: list[str]
    sft: list[tuple[str, str]]
    sft_heldout: list[tuple[str, str]]
    rm_prompts: list[str]
    ppo_prompts: list[str]
    eval_prompts: list[str]
    preferences: list[Comparison] | None   # the user's comparisons; None: sample + annotate
    gold_score: Callable[[str, str], float] | None  # evaluation only; None for prompts not of the task
    annotator: Annotator


def load_inputs(cfg: RunConfig) -> Inputs:
    """The embedded task, with any piece replaced by a user file (validated here, before any compute)."""
    d = cfg.data
    task = build_task(cfg.task)
    corpus = read_corpus(d.corpus) if d.corpus else task.corpus
    if d.corpus_heldout:
        corpus_heldout = read_corpus(d.corpus_heldout)
    elif d.corpus:  # hold out the last 5% of the user's corpus for perplexity
        cut = max(1, len(corpus) // 20)
        corpus, corpus_heldout = corpus[:-cut], corpus[-cut:]
    else:
        corpus_heldout = task.corpus_heldout
    if d.sft:
        sft = read_sft(d.sft)
        cut = max(1, len(sft) // 10) if len(sft) > 1 else 0
        sft, sft_heldout = sft[cut:], sft[:cut]
    else:
        sft, sft_heldout = task.sft, task.sft_heldout
    eval_prompts = read_prompts(d.eval_prompts) if d.eval_prompts else task.eval_prompts
    return Inputs(
        corpus=corpus, corpus_heldout=corpus_heldout, sft=sft, sft_heldout=sft_heldout,
        rm_prompts=read_prompts(d.rm_prompts) if d.rm_prompts else task.rm_prompts,
        ppo_prompts=read_prompts(d.ppo_prompts) if d.ppo_prompts else task.ppo_prompts,
        eval_prompts=eval_prompts,
        preferences=read_preferences(d.preferences) if d.preferences else None,
        # the gold function knows only the embedded world's prompts
        gold_score=None if d.eval_prompts else task.gold_score,
        annotator=Annotator(task.gold_score, cfg.task.annotator_noise, cfg.seed),
    )


def stage(name: str, out_dir: Path, run: Callable[[bool], Path], resume: bool, wall: dict) -> Path:
    """Run one stage unless it already finished; refuse to silently restart a killed one."""
    if checkpoint.is_finished(out_dir):
        print(f"[{name}] finished earlier, kept: {out_dir}")
        return out_dir
    if checkpoint.exists(out_dir) and not resume:
        step = checkpoint.read_meta(out_dir)["step"]
        raise ValueError(f"{out_dir}: unfinished {name} checkpoint (step {step}); rerun with --resume "
                         f"to continue it, or delete the directory to start the stage over")
    t0 = time.time()
    run(checkpoint.exists(out_dir))
    wall[name] = round(time.time() - t0, 1)
    return out_dir


def gold_curve(cfg: RunConfig, inputs: Inputs, sft_dir):
    """PPO's `evaluate` callback: gold score on a fixed slice of the held-out prompts.

    Evaluation only, for the curve in the report; the PPO reward never sees it."""
    if inputs.gold_score is None:
        return None
    from .evaluate import evaluate_policy

    tokenizer = checkpoint.load_tokenizer(sft_dir)
    prompts = inputs.eval_prompts[:cfg.ppo.eval_prompts]

    def evaluate(policy):
        return evaluate_policy(policy, tokenizer, prompts, gold_score=inputs.gold_score,
                               max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                               batch_size=cfg.eval.batch_size, seed=cfg.seed)
    return evaluate


def _prepare(cfg: RunConfig, run_dir) -> tuple[Path, Inputs, Metrics]:
    use_all_cores()
    resolve_device(cfg.device)  # fail now, not after the first stage
    seed_everything(cfg.seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, load_inputs(cfg), Metrics(run_dir)


def run_train(cfg: RunConfig, run_dir, resume: bool = False) -> dict:
    from .stages.ppo import run_ppo
    from .stages.pretrain import run_pretrain
    from .stages.rm import collect_rankings, run_rm
    from .stages.sft import run_sft

    t_start = time.time()
    run_dir, inputs, metrics = _prepare(cfg, run_dir)
    wall_path = run_dir / "wall_times.json"
    wall = json.loads(wall_path.read_text()) if wall_path.exists() else {}

    def track(name, out_dir, run):
        d = stage(name, out_dir, run, resume, wall)
        wall_path.write_text(json.dumps(wall))
        return d

    base = track("pretrain", run_dir / "pretrain", lambda r: run_pretrain(
        cfg, run_dir / "pretrain", corpus=inputs.corpus, corpus_heldout=inputs.corpus_heldout,
        metrics=metrics, resume=r))
    if cfg.skip_sft:
        print("[sft] skipped (--skip-sft): the base model is the policy init and the KL reference")
        sft = base
    else:
        sft = track("sft", run_dir / "sft", lambda r: run_sft(
            cfg, run_dir / "sft", base_dir=base, demos=inputs.sft, demos_heldout=inputs.sft_heldout,
            metrics=metrics, resume=r))

    comparisons = inputs.preferences
    if comparisons is None:
        prefs = run_dir / PREFERENCES_FILE
        if prefs.exists():
            print(f"[rankings] collected earlier, kept: {prefs}")
            comparisons = read_preferences(prefs)
        else:
            t0 = time.time()
            comparisons = collect_rankings(cfg, sft, inputs.rm_prompts, inputs.annotator, prefs)
            wall["rankings"] = round(time.time() - t0, 1)
            print(f"[rankings] {len(comparisons)} prompts x {cfg.rm.k} responses ranked -> {prefs}")
    rm = track("rm", run_dir / "rm", lambda r: run_rm(
        cfg, run_dir / "rm", sft_dir=sft, comparisons=comparisons, metrics=metrics,
        gold_score=inputs.gold_score, resume=r))

    ppo = track("ppo", run_dir / "ppo", lambda r: run_ppo(
        cfg, run_dir / "ppo", sft_dir=sft, rm_dir=rm, prompts=inputs.ppo_prompts, metrics=metrics,
        evaluate=gold_curve(cfg, inputs, sft), resume=r))

    from .report import evaluate_checkpoints, write_report

    t0 = time.time()
    stages = {"base": base, "sft": sft, "ppo": ppo}
    evals = evaluate_checkpoints(cfg, stages, rm_dir=rm, ref_dir=sft, inputs=inputs)
    wall["eval"] = round(time.time() - t0, 1)
    wall_path.write_text(json.dumps(wall))
    summary = write_report(cfg, run_dir, evals, prompts=inputs.eval_prompts, rm_dir=rm, wall=wall, total_wall=time.time() - t_start)
    print(f"[train] done in {time.time() - t_start:.0f}s: {run_dir / 'report.md'}")
    return summary


def run_one_stage(name: str, cfg: RunConfig, run_dir, *, resume: bool, from_dir=None, rm_dir=None) -> Path:
    """`python -m minirlhf pretrain|sft|rm|ppo`: one stage, its input checkpoint given explicitly."""
    from .stages.ppo import run_ppo
    from .stages.pretrain import run_pretrain
    from .stages.rm import collect_rankings, run_rm
    from .stages.sft import run_sft

    run_dir, inputs, metrics = _prepare(cfg, run_dir)
    for label, d in (("--from", from_dir), ("--rm", rm_dir)):
        if d is not None and not checkpoint.is_finished(d):
            raise ValueError(f"{label} {d}: not a finished checkpoint directory")
    out, wall = run_dir / name, {}
    if name == "pretrain":
        run = lambda r: run_pretrain(cfg, out, corpus=inputs.corpus, corpus_heldout=inputs.corpus_heldout,  # noqa: E731
                                     metrics=metrics, resume=r)
    elif name == "sft":
        run = lambda r: run_sft(cfg, out, base_dir=from_dir, demos=inputs.sft, demos_heldout=inputs.sft_heldout,  # noqa: E731
                                metrics=metrics, resume=r)
    elif name == "rm":
        comparisons = inputs.preferences
        if comparisons is None:
            comparisons = collect_rankings(cfg, from_dir, inputs.rm_prompts, inputs.annotator,
                                           run_dir / PREFERENCES_FILE)
        run = lambda r: run_rm(cfg, out, sft_dir=from_dir, comparisons=comparisons, metrics=metrics,  # noqa: E731
                               gold_score=inputs.gold_score, resume=r)
    else:
        run = lambda r: run_ppo(cfg, out, sft_dir=from_dir, rm_dir=rm_dir, prompts=inputs.ppo_prompts,  # noqa: E731
                                metrics=metrics, evaluate=gold_curve(cfg, inputs, from_dir), resume=r)
    return stage(name, out, run, resume, wall)


def run_eval_command(cfg: RunConfig, run_dir, ckpts: list[str], *, ref=None, rm=None) -> dict:
    """`python -m minirlhf eval --ckpt A --ckpt B`: gold ± SE, RM score, KL to the reference."""
    from .report import evaluate_checkpoints

    run_dir, inputs, _ = _prepare(cfg, run_dir)
    for d in [*ckpts, ref, rm]:
        if d is not None and not checkpoint.exists(d):
            raise ValueError(f"{d}: not a checkpoint directory")
    results = evaluate_checkpoints(cfg, {str(c): c for c in ckpts}, rm_dir=rm, ref_dir=ref or ckpts[0],
                                   inputs=inputs)
    out = {k: {kk: vv for kk, vv in v.items() if kk != "responses"} for k, v in results.items()}
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
    return out
