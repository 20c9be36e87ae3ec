"""The `experiment` command's options and entry point (registered in minirlhf/cli.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import config as C
from ..files import DirLock
from .runner import (ALL_ORDER, check_embedded_task, check_experiments, check_kl_coef, check_options, experiment_config,
                     run_experiment)

SMOKE_SEEDS, SEEDS, SMOKE_N_MAX, N_MAX, ROUNDS = 1, 3, 8, 64, 2
SEEDS_LIMIT, N_MAX_LIMIT, ROUNDS_LIMIT = 100, 4096, 20  # the most --seeds, --n-max, --rounds accept
SEED_MAX = 2**32 - 1  # config.RunConfig.seed's range: every arm's seed within it
# the experiment-level options and the one experiment that reads each
OWN_OPTIONS = {"rounds": ("--rounds", "iterate"), "n_max": ("--n-max", "best-of-n")}


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
    p.add_argument("--seeds", type=bounded(int, ge=1, le=SEEDS_LIMIT), default=None,
                   help=f"seeds per arm: --seed, --seed + 1, ... (default {SEEDS}; {SMOKE_SEEDS} with --smoke; "
                        f"at most {SEEDS_LIMIT}; the last, --seed + --seeds - 1, at most {SEED_MAX})")
    p.add_argument("--rounds", type=bounded(int, ge=2, le=ROUNDS_LIMIT), default=None,
                   help=f"iterate: rounds of rankings + RM + PPO (default {ROUNDS}; at most {ROUNDS_LIMIT})")
    p.add_argument("--n-max", type=bounded(int, ge=2, le=N_MAX_LIMIT), default=None,
                   help=f"best-of-n: the largest n (default {N_MAX}; {SMOKE_N_MAX} with --smoke; at most "
                        f"{N_MAX_LIMIT}); samples are drawn in batches, only their RM and gold scores kept")
    p.add_argument("--smoke", action="store_true", help="test sizes: the tiny preset (no other --preset), 6 PPO "
                                                        "iterations, one seed, n up to 8 (seconds per arm): checks "
                                                        "the machinery, measures nothing")


def main(args) -> int:
    """Run the experiment(s); under torchrun every arm's stages are spread over the processes
    (as `train` spreads them) and the experiment's files are written once, by rank 0.

    ValueError (one line, exit 2, before any compute): an option an experiment sets in its
    arms (runner.check_options), --rounds / --n-max for an experiment that has none, an empty
    --out or one that cannot be a directory."""
    from .. import distributed
    from ..cli import apply_overrides, make_dir
    from ..device import resolve_device

    if args.smoke and args.preset not in (None, "tiny"):
        raise ValueError(f"--smoke runs the tiny preset (seconds per arm), not --preset {args.preset}; drop one of "
                         f"the two")
    preset = args.preset or ("tiny" if args.smoke else "quick")
    names = ALL_ORDER if args.name == "all" else (args.name,)
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    for dest, (flag, owner) in OWN_OPTIONS.items():
        if getattr(args, dest) is not None and owner not in names:
            raise ValueError(f"{flag}: only the {owner} experiment has it, not {args.name}; drop the option")
    cfg = apply_overrides(C.PRESETS[preset](), given)
    check_embedded_task(cfg)
    check_options(names, given)
    check_kl_coef(names, cfg)
    cfg = experiment_config(cfg, args.smoke, given)
    default = f"runs/experiments-{preset}{'-smoke' if args.smoke else ''}"
    if args.out is not None and not args.out.strip():
        raise ValueError(f"--out: an empty path; leave the option out for the default {default}")
    out = Path(args.out or default)
    seeds = args.seeds or (SMOKE_SEEDS if args.smoke else SEEDS)
    last = cfg.seed + seeds - 1
    if last > SEED_MAX:
        raise ValueError(f"--seed {cfg.seed} --seeds {seeds}: the arms would use seeds {cfg.seed}..{last}; every seed "
                         f"must be between 0 and {SEED_MAX} (lower --seed or --seeds)")
    n_max = args.n_max or (SMOKE_N_MAX if args.smoke else N_MAX)
    rounds = args.rounds or ROUNDS
    # every experiment's directories and arms checked before anything is created or computed
    check_experiments(names, cfg, out, seeds=seeds, rounds=rounds, n_max=n_max)  # read-only, on every rank
    for d in (out, *(out / n for n in names)):
        make_dir(d, "--out")
    distributed.init(cfg.model, resolve_device(cfg.device),  # several processes under torchrun; else nothing
                     distributed.Options(args.dist_strategy, args.dist_timeout, args.dist_threads))
    lock = DirLock(out)  # one experiment run at a time under an --out (its arms share stages)
    distributed.on_main(lock.acquire)
    t0 = time.time()
    try:
        docs = [run_experiment(n, cfg, out, seeds=seeds, rounds=rounds, n_max=n_max, preset=preset,
                               smoke=args.smoke, options=given) for n in names]
    except KeyboardInterrupt:  # cli.main prints it: an experiment resumes on a plain rerun, no --resume
        raise KeyboardInterrupt("finished arms and stages are kept; run the same command again to continue "
                                "(the unfinished arm resumes)") from None
    finally:
        lock.release()
    if len(docs) > 1:
        print(f"[experiment all] {time.time() - t0:.0f}s this run; the arms of all five took "
              f"{sum(d['wall_s'] for d in docs) / 60:.1f} min -> {out}")
    return 0
