"""The five experiments: which arms each runs, what it measures in each, what it reports.

Every arm is `run_train` on a configuration (plus, for `iterate`, the rankings stage run on
the previous round's PPO policy; for `best-of-n`, sampling from the SFT policy): the
experiments compose the pipeline's stages and add no training code of their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import distributed
from ..config import RunConfig, replace
from ..metrics import Metrics
from ..pipeline import PREFERENCES_FILE, run_train
from . import plots
from .arms import Arm
from .best_of_n import run_best_of_n
from .measure import rankings_numbers, run_numbers, task_of, top_scored_samples
from .stats import across_seeds, difference

ALIGNMENT_LOW, ALIGNMENT_HIGH = 0.2, 0.8   # task.base_alignment of sft-ablation's two bases
LIGHT_SFT_FRACTION = 0.05                  # light SFT: this share of the demonstrations
PTX_SMALL, PTX_LARGE = 0.1, 1.0            # ptx's γ besides 0
EXPLOIT_SAMPLES = 6                        # kl-sweep: top-RM responses of the β = 0 policy shown


@dataclass(frozen=True)
class Options:
    """seeds: the arms' seeds; rounds: iterate's rounds; n_max: best-of-n's largest n;
    exp_dir: the experiment's directory."""
    seeds: tuple[int, ...]
    rounds: int
    n_max: int
    exp_dir: Path


@dataclass(frozen=True)
class Experiment:
    """name; questions: the README's questions it answers; arms(cfg, opts); run(arm, arm_dir, opts);
    measure(arm, arm_dir, opts) -> numbers; report(records, opts) -> (markdown lines, numbers for
    the JSON, plot panels by file name).

    sets: the configuration fields its arms set themselves ("section.field" or a top-level field),
    each with what they set it to: a user option for one of them would be dropped or overridden,
    so it is refused (runner.check_options). derives: the fields some arms set from the user's
    value of that field (kept as given where an arm does not change it), each with how.
    measured_with(opts): the experiment-level options an
    arm's numbers depend on beyond its configuration; a finished arm measured with others is
    measured again (its training is kept)."""
    name: str
    questions: tuple[str, ...]
    arms: Callable
    run: Callable
    measure: Callable
    report: Callable
    sets: dict = field(default_factory=dict)
    derives: dict = field(default_factory=dict)
    measured_with: Callable = lambda opts: {}


def _train(arm: Arm, arm_dir: Path, opts: Options) -> None:
    run_train(arm.cfg, arm_dir, resume=True)


def _measure(arm: Arm, arm_dir: Path, opts: Options) -> dict:
    return run_numbers(arm_dir)


def _per_seed(cfg: RunConfig, opts: Options, variants: list[tuple[str, dict, dict]]) -> list[Arm]:
    """Arms for variants (name, params, config sections to replace), seed-major: every variant of
    seed 0, then of seed 1, ... (a first seed of each variant early; shared stages reused)."""
    return [Arm(name, seed, replace(cfg, seed=seed, **sections), params)
            for seed in opts.seeds for name, params, sections in variants]


# ---------------------------------------------------------------- what the reports share
def fmt(st: dict, nd: int = 2) -> str:
    """'m ± se' across seeds ('m (1 seed)' with one; 'n/a' with none)."""
    if st["mean"] is None:
        return "n/a"
    return f"{st['mean']:.{nd}f} ± {st['se']:.{nd}f}" if st["se"] is not None else f"{st['mean']:.{nd}f} (1 seed)"


def fmt_diff(d: dict, nd: int = 2) -> str:
    if d["diff"] is None:
        return "n/a"
    if d["se"] is None:
        return f"{d['diff']:+.{nd}f} (no SE)"
    return f"{d['diff']:+.{nd}f} ± {d['se']:.{nd}f}" + (" *" if d["significant"] else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def by_variant(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["variant"], []).append(r)
    return out


def stat(recs: list[dict], key: str) -> dict:
    return across_seeds([r["numbers"].get(key) for r in recs])


def scalar_stats(recs: list[dict]) -> dict:
    """across_seeds of every scalar number the arms of one variant measured."""
    keys = [k for k, v in recs[0]["numbers"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: stat(recs, k) for k in keys}


def curve_stats(recs: list[dict], key: str) -> tuple[list[int], list[float], list[float | None]]:
    """(steps, mean, se) of a PPO curve across seeds, on the steps every seed logged."""
    per = [dict(zip(r["numbers"]["curves"]["step"], r["numbers"]["curves"].get(key, []))) for r in recs]
    steps = sorted(set.intersection(*(set(k for k, v in p.items() if v is not None) for p in per))) if per else []
    st = [across_seeds([p[s] for p in per]) for s in steps]
    return steps, [x["mean"] for x in st], [x["se"] for x in st]


def gold_by_step(recs: list[dict]) -> tuple[list[int], list[float], list[float | None], list[float]]:
    """(steps, gold mean, gold SE, KL mean) over PPO's gold evaluations, across seeds, on the steps
    every seed evaluated; KL is the training batch's KL to the reference at that iteration."""
    per = [{p["step"]: p for p in r["numbers"]["gold_points"]} for r in recs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    gold = [across_seeds([p[s]["gold"] for p in per]) for s in steps]
    kl = [across_seeds([p[s]["kl_to_ref"] for p in per])["mean"] for s in steps]
    return steps, [x["mean"] for x in gold], [x["se"] for x in gold], kl


def gold_trajectory(recs: list[dict]) -> tuple[list[float], list[float], list[float | None]]:
    """(√KL, gold, se) over PPO's gold evaluations (gold_by_step; KL clipped at 0 before the root)."""
    _, gold, se, kl = gold_by_step(recs)
    return [math.sqrt(max(k, 0.0)) for k in kl], gold, se


def final_point(label: str, recs: list[dict]) -> tuple:
    """A Lines series of one point: the final evaluation's (√KL, gold ± SE across seeds)."""
    kl, gold = stat(recs, "kl"), stat(recs, "gold")
    return (label, [math.sqrt(max(kl["mean"], 0.0))], [gold["mean"]], [gold["se"]] if gold["se"] else None, "points")


def _warn_cell(recs: list[dict]) -> str:
    kinds = sorted({k for r in recs for k in r["numbers"].get("warnings", [])})
    return ", ".join(f"{k} ({sum(k in r['numbers'].get('warnings', []) for r in recs)}/{len(recs)})"
                     for k in kinds) or "none"


def _cmp(groups: dict, key: str, variant: str, ref: str) -> dict:
    return difference(stat(groups[variant], key), stat(groups[ref], key))


# ---------------------------------------------------------------- sft-ablation
def _sft_ablation_arms(cfg: RunConfig, opts: Options) -> list[Arm]:
    n_demos = cfg.task.n_sft_demos
    light = max(1, round(LIGHT_SFT_FRACTION * n_demos))
    full_steps = cfg.sft.epochs * math.ceil(n_demos / cfg.sft.batch_size)
    light_epochs = max(1, round(full_steps / math.ceil(light / cfg.sft.batch_size)))  # as many steps as full SFT
    variants = []
    for align in (ALIGNMENT_LOW, ALIGNMENT_HIGH):
        task = {"base_alignment": align}
        variants += [
            (f"no-sft_align{align}", {"sft": "none", "base_alignment": align}, {"skip_sft": True, "task": task}),
            (f"light-sft_align{align}", {"sft": f"light ({light} demos)", "base_alignment": align},
             {"task": task, "sft": {"samples": light, "epochs": light_epochs}}),
            (f"full-sft_align{align}", {"sft": f"full ({n_demos} demos)", "base_alignment": align}, {"task": task}),
        ]
    return _per_seed(cfg, opts, variants)


def _sft_ablation_measure(arm: Arm, arm_dir: Path, opts: Options) -> dict:
    task = task_of(arm.cfg.task)
    return {**run_numbers(arm_dir),
            **rankings_numbers(arm_dir / PREFERENCES_FILE, task.gold_score, arm.cfg.task.annotator_noise)}


def _sft_ablation_report(records: list[dict], opts: Options):
    g = by_variant(records)
    outcome, data, labels = [], [], []
    for v, recs in g.items():
        p = recs[0]["params"]
        labels.append(f"{p['sft'].split()[0]} / {p['base_alignment']}")
        sd = stat(recs, "gold")["sd"]
        outcome.append([p["base_alignment"], p["sft"], fmt(stat(recs, "gold")), f"{sd:.2f}" if sd is not None else "n/a",
                        fmt(stat(recs, "gold_init")), fmt(stat(recs, "ppl")), fmt(stat(recs, "kl")), _warn_cell(recs)])
        data.append([p["base_alignment"], p["sft"], fmt(stat(recs, "ranked_gold")), fmt(stat(recs, "uninformative_pairs")),
                     fmt(stat(recs, "flipped_pairs")), fmt(stat(recs, "rm_acc_vs_gold")),
                     fmt(stat(recs, "rm_acc_vs_annotator"))])
    diffs = {}
    for align in (ALIGNMENT_LOW, ALIGNMENT_HIGH):
        ref = f"full-sft_align{align}"
        for kind in ("no-sft", "light-sft"):
            v = f"{kind}_align{align}"
            if v in g and ref in g:
                diffs[f"{v} - {ref}"] = {k: _cmp(g, k, v, ref) for k in ("gold", "rm_acc_vs_gold", "uninformative_pairs", "ppl")}
    lines = ["The PPO policy: final gold (mean ± SE across seeds; the SD across seeds measures PPO's stability), the "
             "gold of the policy PPO started from (SFT, or the base without SFT), the held-out corpus perplexity "
             "after PPO (forgetting), the KL to the reference and the monitor's warnings (seeds that raised each).", ""]
    lines += table(["base alignment", "SFT", "final gold", "SD across seeds", "gold before PPO", "perplexity",
                    "KL to ref", "monitor warnings"], outcome)
    lines += ["", "The rankings and the RM: the mean gold of the ranked samples, the share of ranked pairs whose gold "
              "difference is below the annotator's noise (their order is mostly noise), the share the annotator "
              "ordered against gold, and the RM's held-out pairwise accuracy against gold and against the annotator.",
              ""]
    lines += table(["base alignment", "SFT", "gold of ranked samples", "pairs below noise", "pairs flipped",
                    "RM acc vs gold", "RM acc vs annotator"], data)
    lines += ["", "Differences to full SFT at the same base alignment (± SE across seeds; * = beyond 2 SE):", ""]
    lines += table(["arm − full SFT", "Δ final gold", "Δ RM acc vs gold", "Δ pairs below noise", "Δ perplexity"],
                   [[k, fmt_diff(d["gold"]), fmt_diff(d["rm_acc_vs_gold"]), fmt_diff(d["uninformative_pairs"]),
                     fmt_diff(d["ppl"])] for k, d in diffs.items()])
    panels = {"sft_ablation.png": [
        plots.Bars("final gold (PPO)", "gold", labels, [stat(r, "gold") for r in g.values()]),
        plots.Bars("rankings: pairs below noise", "share of ranked pairs", labels,
                   [stat(r, "uninformative_pairs") for r in g.values()]),
        plots.Bars("RM accuracy vs gold", "held-out pairwise accuracy", labels,
                   [stat(r, "rm_acc_vs_gold") for r in g.values()]),
        plots.Bars("held-out perplexity after PPO", "perplexity", labels, [stat(r, "ppl") for r in g.values()])]}
    return lines, {"differences": diffs}, panels


# ---------------------------------------------------------------- kl-sweep
def _kl_sweep_arms(cfg: RunConfig, opts: Options) -> list[Arm]:
    beta = cfg.ppo.kl_coef
    variants = [(f"beta={b:g}", {"beta": b, "adaptive": False}, {"ppo": {"kl_coef": b, "adaptive_kl": False}})
                for b in (0.0, beta / 10, beta, beta * 5)]
    variants.append(("adaptive", {"beta": beta, "adaptive": True, "kl_target": cfg.ppo.kl_target},
                     {"ppo": {"adaptive_kl": True}}))
    return _per_seed(cfg, opts, variants)


def _kl_sweep_measure(arm: Arm, arm_dir: Path, opts: Options) -> dict:
    """run_numbers, and for a β = 0 arm (every seed: an arm's numbers depend on the arm alone, not
    on which seeds this invocation runs) the responses its RM scores highest."""
    numbers = run_numbers(arm_dir)
    if arm.params["beta"] == 0:
        numbers["exploit_samples"] = top_scored_samples(arm.cfg, arm_dir, task_of(arm.cfg.task).eval_prompts,
                                                        EXPLOIT_SAMPLES)
    return numbers


def _kl_sweep_report(records: list[dict], opts: Options):
    g = by_variant(records)
    ref = "adaptive"
    rows = [[v, fmt(stat(r, "gold")), fmt(stat(r, "rm_score")), fmt(stat(r, "kl")), fmt(stat(r, "response_len"), 1),
             fmt_diff(_cmp(g, "gold", v, ref)) if v != ref and ref in g else "—", _warn_cell(r)]
            for v, r in g.items()]
    lines = ["Final evaluation on the held-out prompts (mean ± SE across seeds); Δ gold against the adaptive "
             "controller (* = beyond 2 SE).", ""]
    lines += table(["arm", "final gold", "RM score", "KL to SFT (nats)", "response length", "Δ gold vs adaptive",
                    "monitor warnings"], rows)
    shown = next((r for r in records if r["numbers"].get("exploit_samples")), None)  # the first seed's
    samples = shown["numbers"]["exploit_samples"] if shown else []
    if samples:
        lines += ["", f"What the β = 0 policy learned to exploit: its responses the RM scores highest (seed "
                  f"{shown['seed']}, one sample per held-out prompt):", ""]
        lines += table(["prompt", "response", "RM", "gold"],
                       [[s["prompt"], s["response"].replace("|", "/").replace("\n", " "), f"{s['rm']:.2f}",
                         f"{s['gold']:.2f}"] for s in samples])
    rm_vs_kl = []
    for v, r in g.items():
        _, kl, _ = curve_stats(r, "kl_to_ref")
        _, rm, _ = curve_stats(r, "rm_score")
        rm_vs_kl.append((v, kl, rm, None, "line"))
    gold_vs_kl = [(v, *gold_trajectory(r), "line") for v, r in g.items()]
    gold_vs_kl += [final_point(f"{v} (final)", r) for v, r in g.items()]
    panels = {"kl_sweep.png": [
        plots.Lines("RM score against KL over PPO", "KL to SFT (nats/response, training batch)", "RM score",
                    rm_vs_kl),
        plots.Lines("gold against √KL (dots: final evaluation)", "√KL to SFT", "gold (held-out)", gold_vs_kl),
        plots.Bars("final gold", "gold", list(g), [stat(r, "gold") for r in g.values()])]}
    return lines, {"differences_vs_adaptive": {v: _cmp(g, "gold", v, ref) for v in g if v != ref and ref in g}}, panels


# ---------------------------------------------------------------- ptx
def _ptx_arms(cfg: RunConfig, opts: Options) -> list[Arm]:
    return _per_seed(cfg, opts, [(f"gamma={gm:g}", {"gamma": gm}, {"ppo": {"ptx_coef": gm}})
                                 for gm in (0.0, PTX_SMALL, PTX_LARGE)])


def _ptx_report(records: list[dict], opts: Options):
    g = by_variant(records)
    ref = "gamma=0"
    rows = []
    for v, r in g.items():
        d_gold = fmt_diff(_cmp(g, "gold", v, ref)) if v != ref else "—"
        d_ppl = fmt_diff(_cmp(g, "ppl", v, ref)) if v != ref else "—"
        rows.append([v, fmt(stat(r, "gold")), fmt(stat(r, "rm_score")), fmt(stat(r, "kl")), fmt(stat(r, "ppl")),
                     fmt(stat(r, "ppl_init")), fmt(stat(r, "ppl_base")), d_gold, d_ppl])
    lines = ["PPO-ptx: γ · LM loss on pretraining-corpus windows added to the policy loss. Held-out corpus perplexity "
             "of the PPO policy, of the SFT policy it started from and of the base (forgetting = the rise over the "
             "base); Δ against γ = 0 (± SE across seeds, * = beyond 2 SE).", ""]
    lines += table(["arm", "final gold", "RM score", "KL to SFT", "perplexity (PPO)", "perplexity (SFT)",
                    "perplexity (base)", "Δ gold vs γ=0", "Δ perplexity vs γ=0"], rows)
    labels = list(g)
    panels = {"ptx.png": [
        plots.Bars("final gold", "gold", labels, [stat(r, "gold") for r in g.values()]),
        plots.Bars("RM score", "RM score", labels, [stat(r, "rm_score") for r in g.values()]),
        plots.Bars("held-out perplexity after PPO", "perplexity", labels, [stat(r, "ppl") for r in g.values()])]}
    diffs = {v: {k: _cmp(g, k, v, ref) for k in ("gold", "rm_score", "ppl")} for v in g if v != ref}
    return lines, {"differences_vs_gamma0": diffs}, panels


# ---------------------------------------------------------------- iterate
def merged_preferences(arm_dir: Path, rnd: int) -> Path:
    """The comparisons round `rnd`'s RM trains on: every round's rankings so far."""
    return arm_dir / f"comparisons_rounds_1-{rnd}.jsonl"


def _iterate_arms(cfg: RunConfig, opts: Options) -> list[Arm]:
    arms = []
    for seed in opts.seeds:
        for rnd in range(1, opts.rounds + 1):
            c = replace(cfg, seed=seed)
            arm = Arm(f"round{rnd}", seed, c, {"round": rnd})
            if rnd > 1:  # the RM of round r trains on the comparisons of rounds 1..r (a file in the arm's dir)
                path = merged_preferences((opts.exp_dir / "arms" / arm.dirname).resolve(), rnd)
                arm = Arm(arm.variant, seed, replace(c, data={"preferences": str(path)}), arm.params)
            arms.append(arm)
    return arms


def _iterate_run(arm: Arm, arm_dir: Path, opts: Options) -> None:
    """Round 1 is the recipe. Round r > 1: K responses per RM prompt sampled from round r−1's PPO
    policy and ranked by the annotator (the rankings stage, a fresh annotator seed), the RM
    retrained from SFT on rounds 1..r's comparisons, PPO again from the SFT policy against it.
    Under torchrun the rankings stage is spread over the ranks; rank 0 alone looks at and writes
    the files."""
    from ..stages.rankings import run_rankings

    rnd = arm.params["round"]
    if rnd > 1:
        merged = Path(arm.cfg.data.preferences)
        prev = arm_dir.parent / Arm(f"round{rnd - 1}", arm.seed, arm.cfg).dirname
        new = arm_dir / f"rankings_round{rnd}.jsonl"
        partial = new.with_name(new.name + ".partial")
        has_merged, has_new, has_partial = distributed.on_main(lambda: (merged.exists(), new.exists(),
                                                                        partial.exists()))
        if not has_merged:
            task = task_of(arm.cfg.task)
            if not has_new:
                run_rankings(replace(arm.cfg, data={"preferences": None}), new, sft_dir=prev / "ppo",
                             prompts=task.rm_prompts, gold_score=task.gold_score,
                             annotator_seed=arm.seed + 1_000_003 * (rnd - 1), metrics=Metrics(arm_dir),
                             resume=has_partial)
            old = prev / PREFERENCES_FILE if rnd == 2 else merged_preferences(prev, rnd - 1)
            distributed.on_main(_merge, old, new, merged)
    run_train(arm.cfg, arm_dir, resume=True)


def _merge(old: Path, new: Path, merged: Path) -> None:
    """merged = old's comparisons, then new's (written to a temporary name and renamed)."""
    tmp = merged.with_name(merged.name + ".tmp")
    tmp.write_text(old.read_text(encoding="utf-8").rstrip("\n") + "\n" + new.read_text(encoding="utf-8"),
                   encoding="utf-8")
    tmp.replace(merged)


def _iterate_measure(arm: Arm, arm_dir: Path, opts: Options) -> dict:
    numbers = run_numbers(arm_dir)
    path = Path(arm.cfg.data.preferences) if arm.cfg.data.preferences else arm_dir / PREFERENCES_FILE
    numbers["comparisons"] = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return numbers


def _iterate_report(records: list[dict], opts: Options):
    g = by_variant(records)
    rows = [[v, r[0]["numbers"]["comparisons"], fmt(stat(r, "gold")), fmt(stat(r, "rm_acc_vs_gold")),
             fmt(stat(r, "rm_acc_vs_annotator")), fmt(stat(r, "rm_score")), fmt(stat(r, "kl")),
             fmt_diff(_cmp(g, "gold", v, "round1")) if v != "round1" else "—", _warn_cell(r)]
            for v, r in g.items()]
    lines = ["Round 1 is the recipe. Each later round samples K responses per RM prompt from the previous round's PPO "
             "policy, has the annotator rank them, retrains the RM from SFT on all rounds' comparisons, and runs PPO "
             "again from the SFT policy against it. Gold after each round (mean ± SE across seeds; Δ against round 1, "
             "* = beyond 2 SE). The later RMs also train on more comparisons.", ""]
    lines += table(["round", "comparisons", "final gold", "RM acc vs gold", "RM acc vs annotator", "RM score",
                    "KL to SFT", "Δ gold vs round 1", "monitor warnings"], rows)
    curves = [(v, *gold_by_step(r)[:3], "line") for v, r in g.items()]
    panels = {"iterate.png": [
        plots.Bars("final gold per round", "gold", list(g), [stat(r, "gold") for r in g.values()]),
        plots.Lines("gold during PPO", "PPO iteration", "gold (held-out)", curves)]}
    return lines, {"differences_vs_round1": {v: _cmp(g, "gold", v, "round1") for v in g if v != "round1"}}, panels


# ---------------------------------------------------------------- best-of-n
def _best_of_n_arms(cfg: RunConfig, opts: Options) -> list[Arm]:
    return _per_seed(cfg, opts, [("recipe", {}, {})])


def _best_of_n_measure(arm: Arm, arm_dir: Path, opts: Options) -> dict:
    task = task_of(arm.cfg.task)
    bon = run_best_of_n(arm.cfg, arm_dir, prompts=[p for p in task.eval_prompts if task.knows(p)],
                        gold_score=task.gold_score, n_max=opts.n_max)
    return {**run_numbers(arm_dir), "best_of_n": bon["curve"], "best_of_n_prompts": bon["prompts"]}


def best_of_n_stats(records: list[dict]) -> list[dict]:
    """Per n: {"n", "kl", "sqrt_kl", "gold": across_seeds, "rm": across_seeds} of the per-seed curves."""
    ns = [p["n"] for p in records[0]["numbers"]["best_of_n"]]
    out = []
    for i, n in enumerate(ns):
        pts = [r["numbers"]["best_of_n"][i] for r in records]
        out.append({"n": n, "kl": pts[0]["kl"], "sqrt_kl": pts[0]["sqrt_kl"],
                    "gold": across_seeds([p["gold_mean"] for p in pts]), "rm": across_seeds([p["rm_mean"] for p in pts])})
    return out


def _best_of_n_report(records: list[dict], opts: Options):
    bon = best_of_n_stats(records)
    lines = [f"Best-of-n: n samples per held-out prompt from the SFT policy, the RM's favourite kept (estimated from a "
             f"pool of {records[0]['numbers']['best_of_n'][-1]['n']} samples per prompt, "
             f"{records[0]['numbers']['best_of_n_prompts']} prompts). KL = log n − (n−1)/n nats. Gold and RM score: "
             f"mean ± SE across seeds. The PPO policy of the same runs for comparison.", ""]
    rows = [[p["n"], f"{p['kl']:.3f}", f"{p['sqrt_kl']:.3f}", fmt(p["gold"]), fmt(p["rm"])] for p in bon]
    ppo_kl, ppo_gold = stat(records, "kl"), stat(records, "gold")
    rows.append(["PPO", fmt(ppo_kl, 3), f"{math.sqrt(max(ppo_kl['mean'], 0)):.3f}", fmt(ppo_gold),
                 fmt(stat(records, "rm_score"))])
    lines += table(["n", "KL (nats)", "√KL", "gold", "RM score"], rows)
    xs = [p["sqrt_kl"] for p in bon]
    panels = {"best_of_n.png": [
        plots.Lines("gold against √KL", "√KL to SFT", "gold (held-out)", [
            ("best-of-n", xs, [p["gold"]["mean"] for p in bon], [p["gold"]["se"] for p in bon], "dashed"),
            ("PPO (during training)", *gold_trajectory(records), "line"), final_point("PPO (final)", records)]),
        plots.Lines("RM score against √KL", "√KL to SFT", "RM score", [
            ("best-of-n", xs, [p["rm"]["mean"] for p in bon], [p["rm"]["se"] for p in bon], "dashed")])]}
    return lines, {"best_of_n": bon}, panels


EXPERIMENTS = {e.name: e for e in (
    Experiment("sft-ablation", (
        "Why not go straight from the base model to RM + PPO? What happens to the rankings (how informative are "
        "comparisons between bad samples?) and to PPO's stability?",
        f"SFT is costly and can cause forgetting: does a light SFT ({LIGHT_SFT_FRACTION:.0%} of the demonstrations) "
        f"do nearly as well? If the base is already partly aligned, is SFT needed at all?"),
        _sft_ablation_arms, _train, _sft_ablation_measure, _sft_ablation_report,
        sets={"skip_sft": "on in the no-SFT arms, off in the others",
              "task.base_alignment": f"{ALIGNMENT_LOW:g} and {ALIGNMENT_HIGH:g}",
              "sft.samples": f"every demonstration in full SFT, {LIGHT_SFT_FRACTION:.0%} of them in light SFT"},
        derives={"sft.epochs": "light SFT takes as many steps as full SFT's sft.epochs give"}),
    Experiment("kl-sweep", ("What does the KL penalty buy? Without it, does the policy hack the reward model?",),
               _kl_sweep_arms, _train, _kl_sweep_measure, _kl_sweep_report,
               sets={"ppo.adaptive_kl": "off in the fixed-β arms, on in the adaptive one"},
               derives={"ppo.kl_coef": "β = ppo.kl_coef: fixed 0, β/10, β, 5β; the adaptive arm starts at β"}),
    Experiment("ptx", ("Does mixing pretraining gradients into PPO (PPO-ptx, InstructGPT eq. 2) reduce forgetting, "
                       "and at what cost in reward?",), _ptx_arms, _train, _measure, _ptx_report,
               sets={"ppo.ptx_coef": f"γ = 0, {PTX_SMALL:g}, {PTX_LARGE:g}"}),
    Experiment("iterate", ("Does another round — new comparisons sampled from the PPO policy, RM retrained on old + "
                           "new, PPO again — help?",), _iterate_arms, _iterate_run, _iterate_measure, _iterate_report,
               sets={"data.preferences": "round r's RM trains on the comparisons of rounds 1..r"}),
    Experiment("best-of-n", ("How does RL compare with the cheap baseline, best-of-n against the RM, at the same KL?",),
               _best_of_n_arms, _train, _best_of_n_measure, _best_of_n_report,
               measured_with=lambda opts: {"n_max": opts.n_max}),
)}
