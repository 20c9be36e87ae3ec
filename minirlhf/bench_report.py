"""`python -m minirlhf bench-report`: the saved benchmark results as markdown tables.

    pytest bench/ --benchmark-json bench/results/<device>.json    # one file per device
    python -m minirlhf bench-report [--results bench/results] [--device SLUG] [--out FILE]

Reads every bench/results/*.json written by pytest-benchmark with bench/conftest.py's
hooks (a "comparisons" section: per group, each implementation's time and peak memory and
the ratios ours / reference, all from one run) and prints, per device, a header with the
device, the torch/triton versions and the date, then one table per comparison group: each
implementation's time (fastest round and median) and peak memory, the ratio of ours to it,
and the facts a benchmark recorded with units (GB/s, TFLOP/s, gc.collect() seconds,
phase times). A ratio below 1 means ours takes less time or memory. Files without a
"comparisons" section (written some other way) are listed as skipped. A missing CUDA file
is reported as "not yet measured".

Errors (a missing results folder, a file that is not JSON) are ValueErrors: the CLI prints
them as one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# What each comparison group measures (bench/*.py); unknown groups are shown by name.
GROUP_TITLES = {
    "token_logprobs": "token_logprobs — log-prob of each label, forward + backward",
    "ppo_loss": "ppo_loss — clipped PPO loss + k3 KL from logits, forward + backward",
    "linear_ppo_loss": "linear_ppo_loss — LM head + PPO loss fused, forward + backward "
                       "(token-mean, k3 KL β=0.05, clip 0.2)",
    "ppo_update": "one PPO policy update (forward, loss, backward) at a 128256-token vocabulary",
    "ppo_iteration": "one PPO iteration (rollout + 4 epochs) vs TRL's PPO trainer",
    "transformers_coexist": "`import transformers` + a Llama forward, with our `kernels` installed",
}
# extra_info keys worth a column, with how to show them
FACTS = {
    "achieved_GBps": "{:.0f} GB/s",
    "fraction_of_memory_bandwidth": "{:.0%} of peak bandwidth",
    "achieved_TFLOPs": "{:.1f} TFLOP/s",
    "gc_collect_s": "gc.collect() {:.3f} s",
    "tokens_per_s": "{:.0f} tokens/s",
    "generate_s": "generate {:.3f} s",
    "score_s": "score {:.3f} s",
    "bookkeeping_s": "bookkeeping {:.3f} s",
    "update_s": "update {:.3f} s",
    "import_s": "import {:.2f} s",
    "forward_s": "forward {:.3f} s",
}


def fmt_time(s) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_bytes(b) -> str:
    if b is None:
        return "—"
    if b >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    return f"{b / (1 << 20):.1f} MiB"


def fmt_ratio(r) -> str:
    return "—" if r is None else f"{r:.2f}×"


def load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or "comparisons" not in data:
        return None
    return data


def device_header(data: dict, path: Path) -> list[str]:
    m = data.get("minirlhf") or data.get("machine_info", {}).get("minirlhf", {})
    name = m.get("device_name", path.stem)
    kind = "GPU" if m.get("device") == "cuda" else "CPU"
    versions = [f"torch {m.get('torch', '?')}"]
    for dist in ("triton", "transformers", "liger-kernel", "trl"):
        if m.get(dist):
            versions.append(f"{dist} {m[dist]}")
    n = m.get("torch_threads")
    threads = f", {n} torch thread{'s' * (n != 1)} of {m.get('cpu_count')} CPUs" if kind == "CPU" else ""
    load_avg = f", load average {m['load_average_1min']} at the end" if "load_average_1min" in m else ""
    sizes = f", sizes `{m['sizes']}`" if m.get("sizes") not in (None, m.get("device")) else ""
    lines = [f"### {kind}: {name} (`{path.name}`)", "",
             f"Measured {m.get('date') or data.get('datetime', '?')[:10]}{threads}{load_avg}{sizes}; "
             + ", ".join(versions) + "."]
    for what, values in (m.get("size_values") or {}).items():
        lines.append(f"Sizes `{what}`: " + ", ".join(f"{k}={v}" for k, v in values.items()) + ".")
    return lines + [""]


def group_table(name: str, group: dict, extras: dict) -> list[str]:
    impls = group["impls"]
    ours = [k for k, v in impls.items() if v["ours"]]
    lines = [f"**{GROUP_TITLES.get(name, name)}**", ""]
    head = ["implementation", "time (fastest)", "time (median)", "peak memory"]
    head += [f"{o} / this: time" for o in ours] + [f"{o} / this: memory" for o in ours] + ["notes"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ratios = group.get("ratios", {})
    for impl, e in impls.items():
        label = f"{impl} (ours)" if e["ours"] else impl
        row = [label, fmt_time(e.get("time_s")), fmt_time(e.get("time_s_median")), fmt_bytes(e.get("peak_bytes"))]
        for key in ("time", "memory"):
            for o in ours:
                r = ratios.get(f"{o}/{impl}", {}).get(key) if o != impl else None
                row.append(fmt_ratio(r))
        notes = [spec.format(extras[impl][k]) for k, spec in FACTS.items()
                 if isinstance(extras.get(impl, {}).get(k), (int, float))]
        row.append(", ".join(notes))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def report(files: list[Path]) -> str:
    out = []
    skipped = []
    seen_cuda = False
    for path in files:
        data = load(path)
        if data is None:
            skipped.append(path.name)
            continue
        seen_cuda |= path.name.startswith("cuda-")
        out += device_header(data, path)
        extras_by_test = {b.get("fullname"): b.get("extra_info") or {} for b in data.get("benchmarks", [])}
        for name, group in data["comparisons"].items():
            extras = {impl: extras_by_test.get(e.get("test"), {}) for impl, e in group["impls"].items()}
            out += group_table(name, group, extras)
    if not seen_cuda:
        out += ["### GPU: not yet measured", "",
                "No `bench/results/cuda-*.json` yet: run `bash bench/gpu.sh` on a CUDA machine.", ""]
    if skipped:
        out += [f"(Skipped, not written by `pytest bench/ --benchmark-json`: {', '.join(skipped)}.)", ""]
    return "\n".join(out).rstrip() + "\n"


def default_results_dir() -> Path:
    here = Path.cwd() / "bench" / "results"
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "bench" / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=None, help="folder of <device>.json files (default bench/results)")
    p.add_argument("--device", default=None, help="only this device's file (its slug, e.g. cpu-amd-epyc)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here instead of stdout")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minirlhf bench-report", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    """`python -m minirlhf bench-report`: the tables; exit 2 with one line when there is nothing to report."""
    results = args.results or default_results_dir()
    try:
        if not results.is_dir():
            raise ValueError(f"{results}: no such folder (run `pytest bench/ --benchmark-json "
                             f"bench/results/<device>.json` first)")
        files = sorted(results.glob("*.json"))
        if args.device:
            files = [f for f in files if f.stem == args.device]
            if not files:
                raise ValueError(f"{results}: no {args.device}.json")
        text = report(files)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
