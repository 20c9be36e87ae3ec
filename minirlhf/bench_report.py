"""`python -m minirlhf bench-report`: the saved benchmark results as the README's markdown.

    pytest bench/ --benchmark-json bench/results/<device>.json     # one file per device
    python -m minirlhf bench-report [--results bench/results] [--device SLUG]
                                    [--out FILE | --readme README.md]

Reads every bench/results/*.json written by pytest-benchmark with bench/conftest.py's
hooks (a "comparisons" section: per group, each implementation's time and peak memory,
all measured in one run) and prints, per device, a header (device, torch/triton versions,
threads, date, the size set when it is not the device's own), then one table per
comparison group: each implementation's time (fastest round and median) and peak memory,
the ratio ours / this (below 1: ours takes less time or memory), and the facts a benchmark
recorded with units (tokens/s, GB/s, the phase split of a PPO iteration, gc.collect()
seconds). Titles carry the sizes the benchmarks recorded. Without a `cuda-*.json` a
"GPU: not yet measured" section follows. The ratios are computed here from the times
shown (the same `comparisons` bench/conftest.py stores), so a table never shows a ratio
without both of its times.

--readme FILE replaces, in place, the lines between `<!-- bench-report:begin -->` and
`<!-- bench-report:end -->` of FILE with exactly this output (the README's explanatory
text stays outside the markers); --out FILE writes it to FILE; by default it goes to stdout.

A *.json file that is JSON but not a pytest-benchmark result with a "comparisons" section
(a list, {}, an older per-file result) is skipped with a note on stderr saying why; no
file left to report is an error. Every other problem -- a missing or non-folder --results,
a file that is not UTF-8 JSON, a malformed field (a time that is not a number of seconds),
a folder where a file belongs, an --out or --readme that cannot be written -- is a
ValueError naming the file (and field): the CLI prints it as one line `error: ...` and
exits 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .files import json_error

BEGIN, END = "<!-- bench-report:begin -->", "<!-- bench-report:end -->"

def _n(count, word: str) -> str:
    """'1 prompt', '4 prompts'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _params(n) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# What each comparison group measures (bench/*.py), in the order the report shows them: the
# title from the facts its benchmarks recorded in extra_info (f), and the title when one of
# those facts is missing (an older file).
GROUP_TITLES = {
    "ppo_iteration": (
        lambda f: f"one PPO iteration vs TRL's PPO trainer: policy, reference, reward and value models of one "
                  f"Llama shape ({_params(f['policy_parameters'])} parameters in the policy), "
                  f"{_n(f['prompts'], 'prompt')} × {_n(f['new_tokens'], 'new token')}, "
                  f"{_n(f['ppo_epochs'], 'PPO epoch')}",
        "one PPO iteration (rollout + PPO epochs) vs TRL's PPO trainer"),
    "ppo_iteration_dist": (
        lambda f: f"one PPO iteration of the `{f['preset']}` preset on CPU: 2 processes × 1 thread (torchrun, gloo) "
                  f"vs 1 process × 2 threads, median of {_n(f['timed_iterations'], 'iteration')}",
        "one PPO iteration on CPU: 2 processes × 1 thread vs 1 process × 2 threads"),
    "rollout_bookkeeping": (
        lambda f: "rollout bookkeeping — per-token rewards + GAE + returns + advantage whitening, "
                  f"B={f['B']} sequences × T={f['T']} tokens",
        "rollout bookkeeping — per-token rewards + GAE + returns + advantage whitening"),
    "generate_quick": (
        lambda f: f"greedy generation, the `quick` preset's model ({_params(f['parameters'])} parameters, random "
                  f"weights): {_n(f['batch'], 'prompt')} × {_n(f['new_tokens'], 'new token')}",
        "greedy generation, the `quick` preset's model"),
    "generate_smollm2": (
        lambda f: f"greedy generation, SmolLM2-135M-Instruct ({_params(f['parameters'])} parameters, fp32): "
                  f"{_n(f['batch'], 'prompt')} × {_n(f['new_tokens'], 'new token')}",
        "greedy generation, SmolLM2-135M-Instruct"),
    "token_logprobs": (
        lambda f: "token_logprobs — log-prob of each label, forward + backward, "
                  f"N={f['tokens']} tokens, V={f['vocab_size']}, {f['dtype']}",
        "token_logprobs — log-prob of each label, forward + backward"),
    "ppo_loss": (
        lambda f: "ppo_loss — clipped PPO loss + k3 KL from logits, forward + backward, "
                  f"N={f['tokens']} tokens, V={f['vocab_size']}, {f['dtype']}",
        "ppo_loss — clipped PPO loss + k3 KL from logits, forward + backward"),
    "linear_ppo_loss": (
        lambda f: "linear_ppo_loss — LM head + PPO loss fused, forward + backward (token-mean, k3 KL β=0.05, "
                  f"clip 0.2), N={f['tokens']} tokens, H={f['hidden']}, V={f['vocab_size']}, {f['dtype']}",
        "linear_ppo_loss — LM head + PPO loss fused, forward + backward (token-mean, k3 KL β=0.05, clip 0.2)"),
    "ppo_update": (
        lambda f: "one PPO policy update (forward, loss, backward) at a "
                  f"{f['vocab_size']}-token vocabulary, {f['tokens']} tokens",
        "one PPO policy update (forward, loss, backward)"),
    "transformers_coexist": (
        lambda f: "`import transformers` + a Llama forward, with our `kernels` installed",
        "`import transformers` + a Llama forward, with our `kernels` installed"),
}
# extra_info keys worth a note, with how to show them (finite numbers only)
FACTS = {
    "generate_s": "generate {:.3f} s".format,
    "score_s": "score {:.3f} s".format,
    "bookkeeping_s": "bookkeeping {:.3f} s".format,
    "update_s": "update {:.3f} s".format,
    "update_GFLOP": "update {:.1f} GFLOP".format,
    "update_GFLOPs": "at {:.0f} GFLOP/s".format,
    "matmul_GFLOPs": "one matmul of its largest shape {:.0f} GFLOP/s".format,
    "gc_collect_s": "gc.collect() {:.3f} s".format,
    "tokens_per_s": "{:.0f} tokens/s".format,
    "effective_GBps": "{:.2f} GB/s effective".format,
    "achieved_GBps": "{:.0f} GB/s".format,
    "fraction_of_memory_bandwidth": "{:.0%} of peak bandwidth".format,
    "achieved_TFLOPs": "{:.1f} TFLOP/s".format,
    "threads": lambda n: f"{n:g} thread{'s' * (n != 1)}",
    "import_s": "import {:.2f} s".format,
    "forward_s": "forward {:.3f} s".format,
}
GPU_MISSING = ["### GPU: not yet measured", "",
               "No `bench/results/cuda-*.json` yet: `bash bench/gpu.sh` on a CUDA machine writes one (the fused "
               "losses vs naive torch and Liger-Kernel at N=16384 tokens, V=128256, bf16: time, peak memory, GB/s "
               "against the card's memory bandwidth; the peak memory of a PPO update, fused vs naive).", ""]


# --------------------------------------------------------------------------- the comparisons


def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def comparisons(benchmarks: list[dict]) -> dict:
    """pytest-benchmark's benchmarks -> per group: each implementation's time and memory, and the
    ratios ours / reference (bench/conftest.py stores this in the JSON as "comparisons").

    A benchmark joins a group when its extra_info has "impl" and "ours" (conftest's measure());
    its time is extra_info["time_s"] when given (a process that timed itself), else the fastest
    and the median round of pytest-benchmark's stats, in seconds; peak_bytes from extra_info.
    Ratios: "time" (fastest / fastest), "time_median", "memory" (peak bytes), per "ours/ref" pair.
    """
    groups: dict[str, dict] = {}
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if "impl" not in info or not b.get("group"):
            continue
        stats = b.get("stats") or {}
        entry = {
            "ours": bool(info.get("ours")),
            "time_s": info.get("time_s", stats.get("min")),
            "time_s_median": info.get("time_s", stats.get("median")),
            "rounds": stats.get("rounds"),
            "peak_bytes": info.get("peak_bytes"),
            "test": b.get("fullname"),
        }
        groups.setdefault(b["group"], {"impls": {}})["impls"][info["impl"]] = entry
    for g in groups.values():
        g["ratios"] = group_ratios(g["impls"])
    return groups


def group_ratios(impls: dict) -> dict:
    out = {}
    for o, a in impls.items():
        for r, b in impls.items():
            if not a["ours"] or b["ours"]:
                continue
            pair = {"time": ratio(a.get("time_s"), b.get("time_s")),
                    "time_median": ratio(a.get("time_s_median"), b.get("time_s_median")),
                    "memory": ratio(a.get("peak_bytes"), b.get("peak_bytes"))}
            out[f"{o}/{r}"] = {k: v for k, v in pair.items() if v is not None}
    return out


# --------------------------------------------------------------------------- reading a results file


def _number(where: str, value, what: str):
    """value if it is a finite number >= 0 or None, else a ValueError naming where."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: expected {what} (a finite number >= 0) or null, got {value!r}")
    return value


def load(path: Path) -> tuple[dict | None, str | None]:
    """(the validated results, None), or (None, why the file is not a results file).

    Raises ValueError (naming the file, and the field) for a file that cannot be read, is not
    UTF-8 JSON, or whose comparisons are malformed."""
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a results file (only <device>.json files belong in the results "
                         f"folder)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({json_error(e)} of line {e.lineno})") from None
    if not isinstance(data, dict):
        return None, f"a JSON {type(data).__name__}, not a pytest-benchmark result"
    if "comparisons" not in data:
        return None, ("no \"comparisons\" section: not written by `pytest bench/ --benchmark-json` with "
                      "bench/conftest.py's hooks")
    comps = data["comparisons"]
    if not isinstance(comps, dict):
        raise ValueError(f"{path}: comparisons: expected an object of groups, got {type(comps).__name__}")
    for name, group in comps.items():
        where = f"{path}: comparisons.{name}"
        impls = group.get("impls") if isinstance(group, dict) else None
        if not isinstance(impls, dict):
            raise ValueError(f"{where}.impls: expected an object of implementations")
        for impl, e in impls.items():
            w = f"{where}.impls.{impl}"
            if not isinstance(e, dict):
                raise ValueError(f"{w}: expected an object, got {type(e).__name__}")
            if not isinstance(e.get("ours"), bool):
                raise ValueError(f"{w}.ours: expected true or false, got {e.get('ours')!r}")
            for key in ("time_s", "time_s_median"):
                _number(f"{w}.{key}", e.get(key), "seconds")
            _number(f"{w}.peak_bytes", e.get("peak_bytes"), "bytes")
            if e.get("test") is not None and not isinstance(e["test"], str):
                raise ValueError(f"{w}.test: expected the benchmark's name, got {e['test']!r}")
    benchmarks = data.get("benchmarks", [])
    if not isinstance(benchmarks, list) or not all(isinstance(b, dict) for b in benchmarks):
        raise ValueError(f"{path}: benchmarks: expected a list of objects")
    for i, b in enumerate(benchmarks):
        if not isinstance(b.get("extra_info") or {}, dict):
            raise ValueError(f"{path}: benchmarks[{i}].extra_info: expected an object")
        if b.get("fullname") is not None and not isinstance(b["fullname"], str):
            raise ValueError(f"{path}: benchmarks[{i}].fullname: expected the benchmark's name")
    for where, facts in (("minirlhf", data.get("minirlhf")), ("machine_info", data.get("machine_info"))):
        if facts is not None and not isinstance(facts, dict):
            raise ValueError(f"{path}: {where}: expected an object of machine facts")
    if not isinstance(machine(data), dict):
        raise ValueError(f"{path}: machine_info.minirlhf: expected an object of machine facts")
    return data, None


def machine(data: dict):
    """bench/conftest.py's machine facts (top-level "minirlhf", or pytest-benchmark's machine_info)."""
    return data.get("minirlhf") or (data.get("machine_info") or {}).get("minirlhf") or {}


# --------------------------------------------------------------------------- markdown


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
    if r is None:
        return "—"
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def is_cuda(data: dict, path: Path) -> bool:
    return machine(data).get("device", "cuda" if path.name.startswith("cuda-") else "cpu") == "cuda"


def device_header(data: dict, path: Path) -> list[str]:
    m = machine(data)
    kind = "GPU" if is_cuda(data, path) else "CPU"
    name = m.get("device_name") or path.stem
    lines = [f"### {kind}: {name} (`{path.name}`)", ""]
    if not m:
        return lines + ["Machine facts not recorded (no `minirlhf` section: the file was not written with "
                        "bench/conftest.py's hooks).", ""]
    when = m.get("date") or str(data.get("datetime") or "")[:10]
    parts = [f"measured {when}" if when else "measurement date not recorded"]
    n, cpus = m.get("torch_threads"), m.get("cpu_count")
    if kind == "CPU" and isinstance(n, int):
        parts.append(f"{n} torch thread{'s' * (n != 1)}" + (f" of {cpus} CPUs" if isinstance(cpus, int) else ""))
    if isinstance(m.get("load_average_1min"), (int, float)):
        parts.append(f"load average {m['load_average_1min']} at the end")
    if m.get("sizes") and m.get("sizes") != m.get("device"):
        parts.append(f"sizes `{m['sizes']}`" + (" (numbers meaningless: a check that the suite runs)"
                                                 if m["sizes"] == "smoke" else ""))
    sentence = ", ".join(parts)
    versions = [f"{dist} {m[dist]}" for dist in ("torch", "cuda", "triton", "transformers", "liger-kernel", "trl")
                if m.get(dist)]
    if versions:
        sentence += "; " + ", ".join(versions)
    return lines + [sentence[0].upper() + sentence[1:] + ".", ""]


def group_title(name: str, extras: dict) -> str:
    """The group's title, from the first value of each fact among its implementations."""
    facts: dict = {}
    for info in extras.values():
        for k, v in info.items():
            facts.setdefault(k, v)
    if name not in GROUP_TITLES:
        return name
    full, short = GROUP_TITLES[name]
    try:
        return full(facts)
    except (KeyError, TypeError, ValueError):  # a fact missing (an older file) or of another type
        return short


def notes(info: dict) -> str:
    return ", ".join(show(v) for key, show in FACTS.items() if _finite(v := info.get(key)))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_table(name: str, group: dict, extras: dict) -> list[str]:
    """One comparison as a markdown table; columns that would be empty in every row are left out."""
    impls = group["impls"]
    ours = [k for k, v in impls.items() if v["ours"]]
    ratios = group_ratios(impls)
    head = ["implementation", "time (fastest)", "time (median)", "peak memory"]
    head += [f"{o} / this: time" for o in ours] + [f"{o} / this: memory" for o in ours] + ["notes"]
    rows = []
    for impl, e in impls.items():
        row = [f"{impl} (ours)" if e["ours"] else impl, fmt_time(e.get("time_s")),
               fmt_time(e.get("time_s_median")), fmt_bytes(e.get("peak_bytes"))]
        for key in ("time", "memory"):
            row += [fmt_ratio(ratios.get(f"{o}/{impl}", {}).get(key)) for o in ours]
        row.append(notes(extras.get(impl, {})))
        rows.append(row)
    keep = [i for i in range(len(head)) if i < 3 or any(r[i] not in ("—", "") for r in rows)]
    lines = [f"**{group_title(name, extras)}**", "",
             "| " + " | ".join(head[i] for i in keep) + " |", "|" + " --- |" * len(keep)]
    lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows]
    if not ours:
        lines += ["", "No ratio: our side of this comparison was not measured in this run."]
    elif len(ours) == len(impls):
        lines += ["", "No ratio: no reference was measured in this run."]
    return lines + [""]


def device_section(data: dict, path: Path) -> list[str]:
    out = device_header(data, path)
    extras_by_test = {b.get("fullname"): b.get("extra_info") or {} for b in data.get("benchmarks", [])}
    comps = data["comparisons"]
    order = [g for g in GROUP_TITLES if g in comps] + [g for g in comps if g not in GROUP_TITLES]
    for name in order:
        group = comps[name]
        extras = {impl: extras_by_test.get(e.get("test"), {}) for impl, e in group["impls"].items()}
        out += group_table(name, group, extras)
    if not comps:
        out += ["No comparisons recorded in this file.", ""]
    return out


def report(files: list[Path], gpu_section: bool = True, warn=None) -> str:
    """The markdown for the results files (ValueError: nothing to report, or a bad file).

    warn(message) receives one line per skipped file (default: stderr)."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    loaded, skipped = [], []
    for path in files:
        data, why = load(path)
        if data is None:
            skipped.append(f"{path.name}: {why}")
            continue
        loaded.append((path, data))
    if not loaded:
        raise ValueError("no results to report" + (f" ({'; '.join(skipped)})" if skipped else ""))
    for line in skipped:
        warn(f"note: skipped {line}")
    out = []
    for path, data in loaded:
        out += device_section(data, path)
    if gpu_section and not any(is_cuda(d, p) for p, d in loaded):
        out += GPU_MISSING
    return "\n".join(out).rstrip() + "\n"


def replace_block(readme: Path, text: str) -> str:
    """readme's content with the lines between BEGIN and END replaced by text (ValueError naming
    the file and line when the markers are missing, repeated or out of order)."""
    try:
        lines = readme.read_bytes().decode("utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        raise ValueError(f"--readme {readme}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--readme {readme}: a folder, not a file") from None
    except UnicodeDecodeError:
        raise ValueError(f"--readme {readme}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"--readme {readme}: cannot read it ({e.strerror})") from None
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1:
        found = f"{len(begins)} `{BEGIN}` and {len(ends)} `{END}` lines"
        raise ValueError(f"--readme {readme}: expected one `{BEGIN}` line and one `{END}` line after it, found {found}")
    b, e = begins[0], ends[0]
    if e < b:
        raise ValueError(f"--readme {readme}:{e + 1}: `{END}` comes before `{BEGIN}` (line {b + 1})")
    return "".join(lines[:b + 1]) + text + "".join(lines[e:])


# --------------------------------------------------------------------------- the command


def default_results_dir() -> Path:
    here = Path.cwd() / "bench" / "results"
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "bench" / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=None, help="folder of <device>.json files (default bench/results)")
    p.add_argument("--device", default=None, help="only this device's file (its slug, e.g. cpu-amd-epyc)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help="write the markdown to this file instead of stdout")
    where.add_argument("--readme", type=Path, default=None,
                       help=f"replace the lines between {BEGIN} and {END} of this file (e.g. README.md) in place")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise ValueError(f"{self.prog}: {message}")


def main(argv=None) -> int:
    p = _Parser(prog="minirlhf bench-report", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(args)


def _check_writable(flag: str, path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{flag} {path}: a folder; give the path of a file")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: no folder {parent} to write it in")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def _write(flag: str, path: Path, text: str) -> None:
    """Writes through a temporary file beside path, so an error leaves path as it was."""
    tmp = path.with_name(f".{path.name}.bench-report.tmp")
    try:
        tmp.write_bytes(text.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{flag} {path}: cannot write it ({e.strerror})") from None


def run(args) -> int:
    """`python -m minirlhf bench-report`: 0, or 2 after one line `error: ...` on stderr."""
    results = args.results or default_results_dir()
    readme, out = getattr(args, "readme", None), args.out
    try:
        if out is not None and readme is not None:
            raise ValueError("--out and --readme: give one of them")
        if not results.exists():
            raise ValueError(f"--results {results}: no such folder (run `pytest bench/ --benchmark-json "
                             f"bench/results/<device>.json` first)")
        if not results.is_dir():
            raise ValueError(f"--results {results}: a file; give the folder that holds the <device>.json files")
        if out is not None:
            _check_writable("--out", out)
        files = sorted(results.glob("*.json"))
        if args.device:
            files = [f for f in files if f.stem == args.device]
            if not files:
                raise ValueError(f"--results {results}: no {args.device}.json (--device {args.device})")
        elif not files:
            raise ValueError(f"--results {results}: no *.json files (run `pytest bench/ --benchmark-json "
                             f"bench/results/<device>.json` first)")
        text = report(files, gpu_section=not args.device)
        if readme is not None:
            new = replace_block(readme, text)
            _check_writable("--readme", readme)
            _write("--readme", readme, new)
        elif out is not None:
            _write("--out", out, text)
        else:
            sys.stdout.write(text)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
