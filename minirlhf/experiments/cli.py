"""The `experiment` command's options and entry point (registered in minirlhf/cli.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import config as C
from .runner import ALL_ORDER, experiment_config, run_experiment

SMOKE_SEEDS, SEEDS, SMOKE_N_MAX, N_MAX = 1, 3, 8, 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _add_run_options, bounded

    p.usage = "minirlhf experiment NAME [--preset P] [--seeds N] [--out DIR] [--smoke] [--SECTION.FIELD VALUE ...]"
    p.add_argument("name", choices=[*ALL_ORDER, "all"], help="the experiment (all: the five, in an order that "
                                                             "shares the most finished stages)")
    _add_run_options(p)
    p.set_defaults(preset=None)
    for action in p._actions:
        if action.dest == "resume":  # an experiment always continues its unfinished arms
            action.help = argparse.SUPPRESS
        if action.dest == "preset":
            action.help = "starting configuration of every arm (default: quick; tiny with --smoke)"
        if action.dest == "out":
            action.help = ("directory of the experiments (default runs/experiments-PRESET[-smoke]); arms of all "
                           "the experiments under it share finished stages")
    p.add_argument("--seeds", type=bounded(int, ge=1), default=None,
                   help=f"seeds per arm: --seed, --seed + 1, ... (default {SEEDS}; {SMOKE_SEEDS} with --smoke)")
    p.add_argument("--rounds", type=bounded(int, ge=2), default=2, help="iterate: rounds of rankings + RM + PPO")
    p.add_argument("--n-max", type=bounded(int, ge=2), default=None,
                   help=f"best-of-n: the largest n (default {N_MAX}; {SMOKE_N_MAX} with --smoke)")
    p.add_argument("--smoke", action="store_true", help="test sizes: the tiny preset, 6 PPO iterations, one seed, "
                                                        "n up to 8 (seconds per arm): checks the machinery, "
                                                        "measures nothing")


def main(args) -> int:
    """Run the experiment(s); under torchrun every arm's stages are spread over the processes
    (as `train` spreads them) and the experiment's files are written once, by rank 0."""
    from .. import distributed
    from ..cli import apply_overrides
    from ..device import resolve_device

    preset = args.preset or ("tiny" if args.smoke else "quick")
    cfg = experiment_config(C.PRESETS[preset](), args.smoke)
    cfg = apply_overrides(cfg, {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")})
    distributed.init(cfg.model, resolve_device(cfg.device),  # several processes under torchrun; else nothing
                     distributed.Options(args.dist_strategy, args.dist_timeout, args.dist_threads))
    out = Path(args.out or f"runs/experiments-{preset}{'-smoke' if args.smoke else ''}")
    seeds = args.seeds or (SMOKE_SEEDS if args.smoke else SEEDS)
    n_max = args.n_max or (SMOKE_N_MAX if args.smoke else N_MAX)
    names = ALL_ORDER if args.name == "all" else (args.name,)
    t0 = time.time()
    docs = [run_experiment(n, cfg, out, seeds=seeds, rounds=args.rounds, n_max=n_max, preset=preset,
                           smoke=args.smoke) for n in names]
    if len(docs) > 1:
        print(f"[experiment all] {time.time() - t0:.0f}s this run; the arms of all five took "
              f"{sum(d['wall_s'] for d in docs) / 60:.1f} min -> {out}")
    return 0
