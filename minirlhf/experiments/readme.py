"""The README section "What the experiments show", rendered from the experiments' JSON:

    python -m minirlhf.experiments.readme runs/experiments-quick --images docs/experiments > section.md

Every table is recomputed from OUT/*/experiment.json (the arms' numbers), the plots are
redrawn into --images (plus one figure that puts kl-sweep's PPO runs and best-of-n on the
same gold-vs-√KL axes), and each question gets a placeholder for its answer, to be written
from the numbers. Nothing here measures anything.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..cli import make_dir
from . import plots
from .definitions import EXPERIMENTS, Options, best_of_n_stats, by_variant, final_point, gold_trajectory
from ..files import read_json_object
from .arms import ARM_FIELDS, require
from .runner import arm_processes, link, options_text, processes_text, setting_text

# what the renderer reads of an experiment.json (runner._write_report writes it)
DOC_FIELDS = {"experiment": str, "questions": list, "preset": str, "smoke": bool, "seeds": list, "device": str,
              "machine": dict, "wall_s": (int, float), "arms": list}
MACHINE_FIELDS = {"processor": str, "cpu_count": (int, type(None)), "torch": str, "torch_threads": int}

SECTIONS = [  # (experiment, heading, the question it answers, what to read the answer from)
    ("sft-ablation", "1. Skipping SFT", 0,
     "compare no-SFT with full SFT at each base alignment (the Δ table): final gold, RM accuracy against gold, the "
     "share of ranked pairs below the annotator's noise, and the SD across seeds (PPO's stability)"),
    ("sft-ablation", "2. Light SFT, and a base that is already partly aligned", 1,
     "compare light with full SFT (final gold, perplexity), and no-SFT with full SFT at base alignment 0.8"),
    ("kl-sweep", "3. What the KL penalty buys", 0,
     "final gold against β, RM score against KL, gold against √KL (does gold fall while the RM score rises?), the "
     "monitor's warnings, and the β = 0 samples"),
    ("ptx", "4. PPO-ptx and forgetting", 0,
     "Δ perplexity and Δ gold against γ = 0, with their SEs"),
    ("iterate", "5. Another round", 0, "Δ gold of round 2 against round 1, and the RMs' accuracy against gold"),
    ("best-of-n", "Best-of-n, the baseline PPO is measured against", 0,
     "gold of best-of-n against PPO at the same √KL (the figure puts them on the same axes)"),
]


def load(out: Path) -> dict[str, dict]:
    """experiment name -> its experiment.json under out; ValueError (one line naming the file and
    the field) for a file that is unreadable, not a JSON object or lacks what the renderer reads."""
    docs = {}
    for name in EXPERIMENTS:
        path = out / name / "experiment.json"
        if path.exists() or path.is_symlink():
            docs[name] = check_doc(path, read_json_object(path), name)
    return docs


def check_doc(path: Path, doc: dict, name: str) -> dict:
    """doc, once it has the fields the renderer reads (ValueError `path: field ...` otherwise)."""
    require(path, doc, DOC_FIELDS)
    if doc["experiment"] != name:
        raise ValueError(f"{path}: field 'experiment': {doc['experiment']!r}, in the directory of {name}")
    require(path, doc["machine"], MACHINE_FIELDS, "machine.")
    if len(doc["questions"]) < len(EXPERIMENTS[name].questions):
        raise ValueError(f"{path}: field 'questions': {len(doc['questions'])} of {name}'s "
                         f"{len(EXPERIMENTS[name].questions)}")
    if not doc["arms"]:
        raise ValueError(f"{path}: field 'arms': no arm")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in doc["seeds"]):
        raise ValueError(f"{path}: field 'seeds': expected a list of integers")
    if not isinstance(doc.get("options", {}), dict):
        raise ValueError(f"{path}: field 'options': expected dict, got {type(doc['options']).__name__}")
    for i, arm in enumerate(doc["arms"]):
        if not isinstance(arm, dict):
            raise ValueError(f"{path}: field 'arms[{i}]': expected dict, got {type(arm).__name__}")
        require(path, arm, {k: v for k, v in ARM_FIELDS.items() if k != "dir"}, f"arms[{i}].")
    return doc


def _options(doc: dict, out: Path) -> Options:
    return Options(seeds=tuple(doc["seeds"]), rounds=doc.get("rounds", 2), n_max=doc.get("n_max", 64),
                   exp_dir=out / doc["experiment"])


def overoptimisation_figure(docs: dict, path: Path) -> Path | None:
    """Gold against √KL: every kl-sweep arm over PPO (and its final evaluation) and best-of-n."""
    series = overoptimisation_series(docs)
    if not series:
        return None
    return plots.figure(path, [plots.Lines("gold against √KL to SFT: PPO (each β) and best-of-n",
                                           "√KL to SFT (nats^½)", "gold (held-out)", series)])


def overoptimisation_series(docs: dict) -> list:
    """The overoptimisation figure's series (plots.Lines) of docs' kl-sweep and best-of-n."""
    series = []
    if "kl-sweep" in docs:
        for v, recs in by_variant(docs["kl-sweep"]["arms"]).items():
            series += [(f"PPO {v}", *gold_trajectory(recs), "line"), final_point(f"PPO {v} (final)", recs)]
    if "best-of-n" in docs:
        bon = best_of_n_stats(docs["best-of-n"]["arms"])
        series.append(("best-of-n", [p["sqrt_kl"] for p in bon], [p["gold"]["mean"] for p in bon],
                       [p["gold"]["se"] for p in bon], "dashed"))
    return series


def _machine(doc: dict) -> str:
    m = doc["machine"]
    threads = m["torch_threads"]
    return (f"{doc['device']} ({m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {threads} "
            f"thread{'' if threads == 1 else 's'} per process)")


def _setting(doc: dict) -> str:
    text = setting_text(doc["preset"], doc["smoke"], doc.get("options", {}))
    return f"{text[0].lower()}{text[1:]}, seeds {_seeds(doc)}"


def _own(doc: dict) -> str:
    own = options_text(doc.get("options", {}))
    return f" with {own}" if own else ""


def _seeds(doc: dict) -> str:
    return ", ".join(map(str, doc["seeds"]))


def _procs(doc: dict) -> str:
    return " / ".join(map(str, arm_processes(doc))) or "?"


def header(docs: dict[str, dict], out: Path) -> list[str]:
    """The section's opening: what was run (each experiment present, its preset, seeds and the
    process counts its arms ran under, stated once when they are the same for all), where, and
    how long (the same rounding as the table)."""
    total = sum(d["wall_s"] for d in docs.values())
    runs = ["all"] if set(docs) == set(EXPERIMENTS) else list(docs)
    command = " and ".join(f"`python -m minirlhf experiment {n}`" for n in runs)
    first = next(iter(docs.values()))
    machines = {_machine(d) for d in docs.values()}
    if len({(_setting(d), _procs(d)) for d in docs.values()}) == 1:
        what = f"Measured with {command} ({_setting(first)}{processes_text(arm_processes(first))})"
    else:
        what = (f"Measured with {command}, in settings that differ between the experiments (preset, seeds and the "
                f"processes each arm ran under: the table below)")
    where = (f" on {next(iter(machines))}." if len(machines) == 1 else
             " on " + "; ".join(f"`{n}` on {_machine(d)}" for n, d in docs.items()) + ".")
    lines = ["## What the experiments show", "",
             f"{what}{where} The arms of the {len(docs)} experiment{'s' if len(docs) > 1 else ''} ran for "
             f"{total / 60:.1f} min in all (stages shared between arms ran once). ± is the standard error across "
             f"seeds; * marks a difference beyond 2 SE — a difference without * is not significant across seeds. "
             f"Every number comes from `{out}/*/experiment.json`; each experiment's own report is "
             f"`{out}/NAME/experiment.md`.", ""]
    lines += ["| experiment | preset | seeds | processes | arms | arm time (min) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {d['preset']}{' (smoke)' if d['smoke'] else ''}{_own(d)} | {_seeds(d)} | {_procs(d)} | {len(d['arms'])} "
              f"| {d['wall_s'] / 60:.1f} |" for n, d in docs.items()]
    if len(docs) > 1:
        lines.append(f"| all | | | | {sum(len(d['arms']) for d in docs.values())} | {total / 60:.1f} |")
    return lines


def render(out: Path, images: Path | None = None, image_prefix: str | None = None) -> str:
    """The section's markdown. images: a directory to draw the plots into (linked as
    image_prefix/<file>, default the images path itself; percent-encoded); None: no plots.
    ValueError: no experiment.json under out, or images cannot be a directory."""
    if not out.is_dir():
        raise ValueError(f"{out}: no such directory (the --out of `python -m minirlhf experiment`)")
    docs = load(out)
    if not docs:
        raise ValueError(f"{out}: no experiment.json under it; run `python -m minirlhf experiment all` first")
    if images:
        make_dir(images, "--images")
    reports = {}
    for name, doc in docs.items():  # every number read before anything is drawn: one line naming the file
        try:
            reports[name] = EXPERIMENTS[name].report(doc["arms"], _options(doc, out))
            overoptimisation_series({name: doc})
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            what = f"lack {e.args[0]!r}" if isinstance(e, KeyError) and e.args else f"hold what it cannot read ({e})"
            raise ValueError(f"{out / name / 'experiment.json'}: the arms or their numbers {what}") from None
    prefix = image_prefix or (str(images) if images else "")
    lines = header(docs, out)
    shown: set[str] = set()
    overopt = None
    if images:
        overopt = overoptimisation_figure(docs, images / "overoptimisation.png")
    for name, heading, qi, hint in SECTIONS:
        if name not in docs:
            continue
        doc = docs[name]
        lines += ["", f"### {heading}", "", f"> {doc['questions'][qi]}", ""]
        if name in shown:
            lines.append(f"The numbers are the `{name}` tables above.")
        else:
            shown.add(name)
            md, _, panels = reports[name]
            lines += md
            if images:
                for fname, p in panels.items():
                    plots.figure(images / fname, p, title=name)
                    lines += ["", f"![{name}]({link(f'{prefix}/{fname}')})"]
                if overopt and name in ("kl-sweep", "best-of-n"):
                    lines += ["", f"![gold against √KL: PPO and best-of-n]({link(f'{prefix}/{overopt.name}')})"]
        lines += ["", f"**Answer.** _(to be written from the measured numbers: {hint}.)_"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from ..cli import _Parser

    p = _Parser(prog="python -m minirlhf.experiments.readme", description=__doc__.split("\n\n")[0],
                allow_abbrev=False)
    p.add_argument("out", help="the experiments' directory (the --out of `python -m minirlhf experiment`)")
    p.add_argument("--images", default=None, help="directory to draw the plots into (e.g. docs/experiments)")
    p.add_argument("--image-prefix", default=None, help="how the README links that directory (default: --images)")
    try:
        args = p.parse_args(argv)
        for option, value in (("OUT", args.out), ("--images", args.images), ("--image-prefix", args.image_prefix)):
            if value is not None and not value.strip():
                raise ValueError(f"{option}: an empty path" + ("" if option == "OUT" else "; leave the option out"))
        sys.stdout.write(render(Path(args.out), Path(args.images) if args.images else None, args.image_prefix))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
