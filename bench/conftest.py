"""The benchmark suite's conventions, device detection, sizes and helpers.

Read this before adding a bench file (rollout bookkeeping, generation, one PPO iteration,
the fused losses all follow it).

Running
    pytest bench/                                   # plain `pytest` runs tests/ only
    pytest bench/ --benchmark-json bench/results/<device>.json
    python -m minirlhf bench-report                 # the saved JSON -> README tables
<device> is `cpu-<cpu model>` or `cuda-<gpu name>`, slugged (e.g. cpu-intel-xeon-processor,
cuda-nvidia-h200); the header of every `pytest bench/` run prints it, and so does
`python bench/conftest.py`. One file per device: rerunning overwrites it.

Conventions
1. A comparison is a pytest-benchmark group: our implementation and each reference are
   separate benchmarks of the same group, measured in the same run, each timed with
   `measure(benchmark, fn, group=..., impl=..., ours=...)`. At the end of the run
   `pytest_benchmark_update_json` below adds `comparisons` to the JSON: per group, the
   ratio ours / reference of the time (fastest and median round) and of the peak memory.
   That ratio is the result; nothing in bench/ asserts a time.
2. Correctness first: before a benchmark times anything, the same test module checks
   ours against its reference on the benchmark's own inputs (values and gradients, or
   tokens), so a wrong fast path never produces a ratio.
3. Sizes scale with the device: take them from the `sizes` fixture (SIZES[DEVICE]). On
   CPU the whole suite must finish in 10 minutes on 2 cores; on CUDA use GPU sizes.
   MINIRLHF_BENCH_SIZES=smoke picks tiny sizes, to check in seconds that a file runs.
4. Peak memory: `peak_bytes(fn)` is the allocator's high-water mark during fn above what
   was live before it (CUDA: torch.cuda.max_memory_allocated; CPU: the profiler's
   "Total Allocated" track, which counts every tensor torch allocates).
5. A benchmark whose timed call is not the thing measured (a subprocess that reports its
   own time per iteration) passes `time_s=` to measure(); ratios then use it.
   One PPO iteration: bench/test_trl_ppo_bench.py records TRL's PPO trainer in group
   PPO_ITERATION_GROUP (impls "trl-<version>" as shipped and "trl-<version>-gc-removed");
   our side joins the same group from bench/test_ppo_bench.py with
   `measure(benchmark, one_iteration, group=PPO_ITERATION_GROUP, impl="minirlhf", ours=True,
   memory=False, generate_s=..., score_s=..., bookkeeping_s=..., update_s=...)` on the
   `ppo_iteration_shapes` / `ppo_iteration_model_config` fixtures, and the ratios to
   every TRL entry follow (bench-report shows the *_s phase times as notes).
6. Other facts go in `benchmark.extra_info` under names with units (tokens_per_s,
   achieved_GBps, peak_bytes); agreement checks under `max_abs_diff_*`.
7. MINIRLHF_REQUIRE_CUDA=1 (set by bench/gpu.sh) turns every skip into a failure, so
   that on a GPU machine a benchmark that cannot run is an error, not a silent gap.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REQUIRE_CUDA = os.environ.get("MINIRLHF_REQUIRE_CUDA", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Timed rounds per benchmark (after one warm-up call, which also measures peak memory).
ROUNDS = int(os.environ.get("MINIRLHF_BENCH_ROUNDS", "3" if DEVICE == "cpu" else "10"))

# Problem sizes per device. "loss": the fused-loss comparisons (N = B * T tokens, vocabulary
# V, hidden H of the fused-linear ops). "update": one PPO update of a model whose LM head has
# the largest vocabulary in common use (Llama 3's), for peak memory fused vs naive.
SIZES = {
    "cpu": {
        "loss": dict(B=16, T=256, V=32000, H=256, dtype=torch.float32),
        "update": dict(B=4, T=128, V=128256, dim=128, n_layers=2, dtype=torch.float32),
    },
    "cuda": {
        "loss": dict(B=16, T=1024, V=128256, H=4096, dtype=torch.bfloat16),
        "update": dict(B=16, T=1024, V=128256, dim=2048, n_layers=4, dtype=torch.bfloat16),
    },
    # MINIRLHF_BENCH_SIZES=smoke: seconds, to check that the suite runs (numbers meaningless)
    "smoke": {
        "loss": dict(B=4, T=32, V=1000, H=64, dtype=torch.float32),
        "update": dict(B=2, T=32, V=4096, dim=64, n_layers=1, dtype=torch.float32),
    },
}
SIZE_SET = os.environ.get("MINIRLHF_BENCH_SIZES", DEVICE)
if SIZE_SET not in SIZES:
    raise pytest.UsageError(f"MINIRLHF_BENCH_SIZES={SIZE_SET!r}: expected one of {', '.join(SIZES)}")

# One PPO iteration, minirlhf vs TRL's PPO trainer (bench/test_trl_ppo_bench.py runs TRL
# with these, bench/test_ppo_bench.py our trainer with the same): four models (policy,
# reference, reward, value) with this Llama shape -- 1.31M parameters for the policy with
# an untied LM head -- 16 prompts of 16 tokens, 32 new tokens, 4 PPO epochs, one minibatch.
PPO_ITERATION_SHAPES = dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                            prompts=16, prompt_len=16, new_tokens=32, ppo_epochs=4, minibatches=1)
PPO_ITERATION_GROUP = "ppo_iteration"
TRL_VERSIONS = ("1.12.0", "0.11.4")  # venvs bench/trl_ppo/make_venv.sh builds (0.11.4: PPOv2Trainer)

# Peak memory bandwidth (bytes/s) by device-name fragment, for cards whose properties lack
# the memory clock and bus width (first match wins, so specific names come first).
HBM_BANDWIDTH = {
    "H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "GH200": 4.0e12,
    "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
    "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12, "RTX 4090": 1.008e12,
}


# --------------------------------------------------------------------------- the device


def slug(name: str) -> str:
    name = name.lower().replace("(r)", "").replace("(tm)", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else cpu_model()


def device_slug() -> str:
    """The results file's name: bench/results/<device_slug()>.json."""
    return f"{DEVICE}-{slug(device_name())}"


def memory_bandwidth() -> float | None:
    """The GPU's peak memory bandwidth in bytes/s, or None (CPU, or an unknown card)."""
    if DEVICE != "cuda":
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8  # double data rate
    return next((bw for frag, bw in HBM_BANDWIDTH.items() if frag in props.name), None)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    facts = {
        "device": DEVICE, "device_name": device_name(), "device_slug": device_slug(),
        "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "date": datetime.date.today().isoformat(), "sizes": SIZE_SET,
        "size_values": {k: {n: str(v).replace("torch.", "") for n, v in d.items()} for k, d in SIZES[SIZE_SET].items()},
    }
    for dist in ("triton", "transformers", "liger-kernel", "trl", "pytest-benchmark"):
        facts[dist] = _version(dist)
    if DEVICE == "cuda":
        facts["cuda"] = torch.version.cuda
        facts["memory_bandwidth_Bps"] = memory_bandwidth()
    if hasattr(os, "getloadavg"):
        facts["load_average_1min"] = round(os.getloadavg()[0], 2)
    return facts


# --------------------------------------------------------------------------- measuring


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn) -> int:
    """High-water mark of the allocator while fn() runs, above what was live before it."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # "Total Allocated" is the CPU allocator's running total since the profiler started.
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return int(max([0, *totals]))


def measure(benchmark, fn, *, group: str, impl: str, ours: bool, memory: bool = True,
            rounds: int | None = None, time_s: float | None = None, **extra) -> dict:
    """Times fn() with pytest-benchmark (ROUNDS rounds after a warm-up) and records what the
    comparison needs in benchmark.extra_info: impl, ours, peak_bytes (unless memory=False),
    time_s where given (conventions 1, 5), and any extra facts."""
    benchmark.group = group
    info = {"impl": impl, "ours": bool(ours), **extra}
    if memory:
        info["peak_bytes"] = peak_bytes(fn)  # doubles as the warm-up call
    else:
        fn()
    sync()

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, rounds=rounds or ROUNDS, iterations=1, warmup_rounds=0)
    if time_s is not None:
        info["time_s"] = float(time_s)
    benchmark.extra_info.update(info)
    return info


def time_calls(fn, rounds: int) -> list[float]:
    """Wall times of `rounds` calls of fn (for work timed outside pytest-benchmark)."""
    out = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- the JSON


def comparisons(benchmarks: list[dict]) -> dict:
    """Per group: each implementation's time and memory, and ours / reference ratios."""
    groups: dict[str, dict] = {}
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if "impl" not in info or not b.get("group"):
            continue
        stats = b.get("stats") or {}
        entry = {
            "ours": info["ours"],
            "time_s": info.get("time_s", stats.get("min")),
            "time_s_median": info.get("time_s", stats.get("median")),
            "rounds": stats.get("rounds"),
            "peak_bytes": info.get("peak_bytes"),
            "test": b.get("fullname"),
        }
        groups.setdefault(b["group"], {"impls": {}})["impls"][info["impl"]] = entry
    for g in groups.values():
        impls = g["impls"]
        ours = [k for k, v in impls.items() if v["ours"]]
        refs = [k for k, v in impls.items() if not v["ours"]]
        ratios = {}
        for o in ours:
            for r in refs:
                a, b = impls[o], impls[r]
                ratio = {}
                if a["time_s"] and b["time_s"]:
                    ratio["time"] = a["time_s"] / b["time_s"]
                    ratio["time_median"] = a["time_s_median"] / b["time_s_median"]
                if a["peak_bytes"] is not None and b["peak_bytes"]:
                    ratio["memory"] = a["peak_bytes"] / b["peak_bytes"]
                ratios[f"{o}/{r}"] = ratio
        g["ratios"] = ratios
    return groups


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["minirlhf"] = machine_facts()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["comparisons"] = comparisons(output_json.get("benchmarks", []))
    output_json["minirlhf"] = machine_facts()


def pytest_report_header(config):
    return [f"bench device: {device_name()} ({DEVICE}); save results with "
            f"--benchmark-json bench/results/{device_slug()}.json"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CUDA and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under MINIRLHF_REQUIRE_CUDA=1, which makes a skip an error: {reason}"


def pytest_sessionstart(session):
    if REQUIRE_CUDA and DEVICE != "cuda":
        raise pytest.UsageError("MINIRLHF_REQUIRE_CUDA=1 but torch sees no CUDA device")


@pytest.fixture(scope="session")
def ppo_iteration_shapes() -> dict:
    """The shapes of the PPO-iteration comparison (PPO_ITERATION_SHAPES)."""
    return dict(PPO_ITERATION_SHAPES)


@pytest.fixture(scope="session")
def ppo_iteration_model_config():
    """minirlhf's ModelConfig with the Llama shape TRL's four models get (untied LM head,
    room for prompt + response). TRL's side also uses: kl_coef 0.05, lr 1e-5, temperature
    1, responses cut at EOS, one minibatch of all the prompts, 4 PPO epochs."""
    from minirlhf.config import ModelConfig

    s = PPO_ITERATION_SHAPES
    return ModelConfig(vocab_size=s["vocab_size"], dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                       n_kv_heads=s["n_kv_heads"], ffn_dim=s["ffn_dim"], max_seq_len=s["prompt_len"] + s["new_tokens"],
                       tie_embeddings=False)


def trl_ppo_iteration(version: str, iterations: int = 3, threads: int = 0) -> dict:
    """Runs bench/trl_ppo/trl_ppo_iteration.py in bench/.venv-trl-<version> (built by
    bench/trl_ppo/make_venv.sh first if missing, which takes minutes) and returns its JSON:
    per mode ("shipped", "gc_removed") the seconds of each timed iteration and more."""
    import subprocess
    import sys

    venv_python = BENCH_DIR / f".venv-trl-{version}" / "bin" / "python"
    if not venv_python.exists():
        subprocess.run(["bash", str(BENCH_DIR / "trl_ppo" / "make_venv.sh"), version], check=True)
    cmd = [str(venv_python), str(BENCH_DIR / "trl_ppo" / "trl_ppo_iteration.py"),
           "--shapes", json.dumps(PPO_ITERATION_SHAPES), "--iterations", str(iterations),
           "--threads", str(threads or torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{' '.join(cmd[:2])} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def sizes() -> dict:
    """SIZES for this device (or the MINIRLHF_BENCH_SIZES override)."""
    return SIZES[SIZE_SET]


if __name__ == "__main__":
    print(device_slug())
