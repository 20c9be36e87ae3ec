"""`python -m minirlhf experiment NAME`: run an experiment's arms, then write experiment.md,
experiment.json (every number) and the PNG plots into OUT/NAME/.

Under torchrun every rank runs the arms (arms.run_arms) and rank 0 alone writes the report;
every rank returns its document."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import fields
from pathlib import Path
from urllib.parse import quote

import torch

from .. import distributed
from ..config import RunConfig, replace
from ..device import resolve_device
from . import plots
from ..files import write_json
from ..pipeline import init_source
from .arms import check_arms, no_file_in_the_way, run_arms
from .definitions import EXPERIMENTS, Options, by_variant, scalar_stats

# `experiment all`: this order lets each experiment reuse the most finished stages of the ones before
ALL_ORDER = ("kl-sweep", "ptx", "best-of-n", "iterate", "sft-ablation")


def experiment_config(cfg: RunConfig, smoke: bool, given=()) -> RunConfig:
    """The experiments' common starting point, from cfg (a preset with the user's options applied):
    8 gold evaluations per PPO run (the curves); --smoke: 6 PPO iterations, gold every 2, monitor
    windows of 2 (seconds per arm). given: the "section.field" options the user set; each is
    kept as given (the evaluations spread over the PPO iterations given)."""
    ppo = {"iterations": 6, "eval_every": 2, "monitor_window": 2} if smoke else {}
    iterations = cfg.ppo.iterations if "ppo.iterations" in given else ppo.get("iterations", cfg.ppo.iterations)
    ppo.setdefault("eval_every", max(1, iterations // 8))
    return replace(cfg, ppo={k: v for k, v in ppo.items() if f"ppo.{k}" not in given})


def option_flag(name: str) -> str:
    """The command-line option of a configuration field: --ppo.kl_coef, --skip-sft."""
    return f"--{name}" if "." in name else "--" + name.replace("_", "-")


def check_options(names, given) -> None:
    """ValueError (one line, before any compute) for a user option that one of the experiments
    `names` sets in its arms (Experiment.sets): it would be dropped or overridden silently.
    given: the configuration fields the user set ("ppo.ptx_coef", "skip_sft", ...)."""
    for name in names:
        for f, what in EXPERIMENTS[name].sets.items():
            if f in given:
                also = "; run the other experiments by name to set it for them" if len(names) > 1 else ""
                raise ValueError(f"{option_flag(f)}: the {name} experiment sets {f} in its arms ({what}); "
                                 f"drop the option{also}")


KL_COEF_MAX = 100.0  # the largest β an experiment accepts (kl-sweep runs 5β): a penalty beyond it swamps any reward


def check_kl_coef(names, cfg: RunConfig) -> None:
    """ValueError (one line, before any compute) for a --ppo.kl_coef the experiments `names` cannot
    run: above KL_COEF_MAX (the rewards overflow float32 long before 1e300), or, for kl-sweep, not
    > 0 (its arms 0, β/10, β, 5β would be one run counted four times)."""
    beta = cfg.ppo.kl_coef
    if not beta <= KL_COEF_MAX:
        raise ValueError(f"--ppo.kl_coef {beta:g}: the experiments take a finite β of at most {KL_COEF_MAX:g}")
    if "kl-sweep" in names and not beta / 10 > 0:
        raise ValueError(f"--ppo.kl_coef {beta:g}: kl-sweep runs β = 0, β/10, β and 5β, which need β > 0 "
                         f"(β/10 > 0 too) to be four different arms")


def check_embedded_task(cfg: RunConfig) -> None:
    """The experiments measure gold, which only the embedded task has: no --data.* files."""
    given = [f.name for f in fields(cfg.data) if getattr(cfg.data, f.name) is not None]
    if given:
        raise ValueError(f"config: data.{given[0]}: experiments measure every arm with the embedded task's gold "
                         f"judge; they run on the embedded task only (drop the --data.* options)")


def machine() -> dict:
    """The machine of this invocation (the one that writes the report); torch_threads: per process.
    How many processes ran each arm is the arm's own record (run_arms), as arms of one experiment
    may have run in several invocations."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def arm_processes(doc: dict) -> list[int]:
    """The distinct process counts (torchrun's world size, 1 without it) the arms of an
    experiment.json ran under, sorted; an older document's single machine.processes."""
    known = sorted({a["processes"] for a in doc["arms"] if a.get("processes") is not None})
    return known or ([doc["machine"]["processes"]] if "processes" in doc.get("machine", {}) else [])


def processes_text(procs: list[int]) -> str:
    """', 2 processes under torchrun' (nothing for one process; each count when they differ)."""
    if len(procs) > 1:
        return f", arms under {' / '.join(map(str, procs))} processes (torchrun; each arm's in its record)"
    return f", {procs[0]} processes under torchrun" if procs and procs[0] > 1 else ""


def link(target: str) -> str:
    """A Markdown link destination for a path: percent-encoded (spaces, parentheses, ...), '/' kept."""
    return quote(target, safe="/")


def plan(name: str, cfg: RunConfig, out_root, *, seeds: int, rounds: int = 2, n_max: int = 64):
    """(experiment, its Options, its arms) of experiment `name` under out_root/name."""
    exp = EXPERIMENTS[name]
    exp_dir = Path(out_root) / name
    opts = Options(seeds=tuple(cfg.seed + i for i in range(seeds)), rounds=rounds, n_max=n_max, exp_dir=exp_dir)
    return exp, opts, exp.arms(cfg, opts)


def check_experiments(names, cfg: RunConfig, out_root, *, seeds: int, rounds: int = 2, n_max: int = 64) -> None:
    """Read-only, before anything is created or computed: ValueError (one line) when out_root, an
    experiment's directory or one of its arms' directories cannot be made or holds what the run
    cannot use (arms.check_arms: another configuration, unreadable files, two arms in one
    directory), for every experiment of `names` (all of them for `experiment all`)."""
    if cfg.init_from:
        init_source(cfg)
    out_root = Path(out_root)
    for name in names:
        for d in (out_root, out_root / name, out_root / name / "arms"):
            no_file_in_the_way(d)
        check_arms(plan(name, cfg, out_root, seeds=seeds, rounds=rounds, n_max=n_max)[2], out_root / name)


def run_experiment(name: str, cfg: RunConfig, out_root, *, seeds: int, rounds: int = 2, n_max: int = 64,
                   preset: str = "quick", smoke: bool = False, options: dict | None = None) -> dict:
    """Run (or resume) experiment `name` under out_root/name; returns the experiment.json document.

    seeds: arms per variant, seeded cfg.seed, cfg.seed + 1, ...; rounds: iterate's rounds; n_max:
    best-of-n's largest n; options: the user's configuration options ({"ppo.iterations": "40"}),
    recorded in experiment.json and stated in the reports. ValueError (before any compute) for
    --data.* files (gold needs the embedded task), or an arm directory that holds a run of
    another configuration or unreadable files (every arm's, before the first arm runs). Under
    torchrun: call it on every rank; rank 0 writes the files, every rank returns its document."""
    check_embedded_task(cfg)
    out_root = Path(out_root)
    exp, opts, arms = plan(name, cfg, out_root, seeds=seeds, rounds=rounds, n_max=n_max)
    exp_dir = opts.exp_dir
    distributed.on_main(check_experiments, [name], cfg, out_root, seeds=seeds, rounds=rounds, n_max=n_max)
    distributed.on_main(exp_dir.mkdir, parents=True, exist_ok=True)
    t0 = time.time()
    records = run_arms(name, arms, exp_dir, out_root, run=lambda a, d: exp.run(a, d, opts),
                       measure=lambda a, d: exp.measure(a, d, opts), measured_with=exp.measured_with(opts))
    doc = distributed.on_main(_write_report, exp, records, opts, exp_dir, cfg, preset=preset, smoke=smoke,
                              started=t0, options=options or {})
    print(f"[experiment {name}] done: {exp_dir / 'experiment.md'}")
    return doc


def options_text(options: dict) -> str:
    """'--ppo.iterations 40, --skip-sft true' of the user's recorded options ('' without any)."""
    return ", ".join(f"{option_flag(k)} {v}" for k, v in options.items())


def setting_text(preset: str, smoke: bool, options: dict) -> str:
    """What the arms ran with: 'Preset `tiny`, --smoke sizes except --ppo.iterations 40',
    'Preset `quick` with --ppo.kl_coef 0.1', 'Preset `tiny`, --smoke sizes'."""
    own = options_text(options)
    if smoke:
        return f"Preset `{preset}`, --smoke sizes" + (f" except {own}" if own else "")
    return f"Preset `{preset}`" + (f" with {own}" if own else "")


def _write_report(exp, records: list[dict], opts: Options, exp_dir: Path, cfg: RunConfig, *, preset: str,
                  smoke: bool, started: float, options: dict) -> dict:
    """experiment.json, experiment.md and the plots of the finished arms' records; returns the JSON document."""
    name = exp.name
    rounds, n_max = opts.rounds, opts.n_max
    lines, extra, panels = exp.report(records, opts)
    images = [plots.figure(exp_dir / fname, p, title=name).name for fname, p in panels.items()]
    doc = {
        "experiment": name, "questions": list(exp.questions), "preset": preset, "smoke": smoke,
        "options": dict(options), "seeds": list(opts.seeds), **({"rounds": rounds} if name == "iterate" else {}),
        **({"n_max": n_max} if name == "best-of-n" else {}),
        "device": str(resolve_device(cfg.device)), "machine": machine(), "processes": arm_processes({"arms": records}),
        "wall_s": round(sum(r["wall_s"] for r in records), 1), "wall_s_this_run": round(time.time() - started, 1),
        "plots": images, "arms": records,
        "aggregate": {v: {"params": recs[0]["params"], **scalar_stats(recs)} for v, recs in by_variant(records).items()},
        **extra,
    }
    write_json(exp_dir / "experiment.json", doc)
    md = [f"# Experiment `{name}`", ""] + [f"> {q}" for q in exp.questions] + [
        "", f"{setting_text(preset, smoke, options)}, seeds {', '.join(map(str, opts.seeds))}, "
        f"device {doc['device']} ({doc['machine']['processor']}, {doc['machine']['cpu_count']} cores, torch "
        f"{doc['machine']['torch']}{processes_text(doc['processes'])}). Arms ran for {doc['wall_s'] / 60:.1f} min "
        f"in all (stages shared with other arms were linked, not rerun). Every number is also in experiment.json.", ""]
    md += lines + [""] + [f"![{i}]({link(i)})" for i in images] + ["", "## Arms", ""]
    md += ["| arm | seed | run directory | processes | wall time (s) |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {r['variant']} | {r['seed']} | [{r['dir']}]({link(r['dir'] + '/report.md')}) | "
           f"{r.get('processes') or '?'} | {r['wall_s']} |" for r in records]
    tmp = exp_dir / "experiment.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(exp_dir / "experiment.md")
    return doc
