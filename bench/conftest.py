"""The benchmark suite's conventions, device detection, sizes and helpers.

Read this before adding a bench file (rollout bookkeeping, generation, one PPO iteration,
the fused losses all follow it).

Running
    pytest bench/                                   # plain `pytest` runs tests/ only
    pytest bench/ --benchmark-json bench/results/<device>.json
    python -m minirlhf bench-report --readme README.md   # the saved JSON -> README's Performance block
<device> is `cpu-<cpu model>` or `cuda-<gpu name>`, slugged (e.g. cpu-intel-xeon-processor,
cuda-nvidia-h200); the header of every `pytest bench/` run prints it, and so does
`python bench/conftest.py`. One file per device: rerunning overwrites it. That file is the
only output: no bench file writes results of its own.

Conventions
1. A comparison is a pytest-benchmark group: our implementation and each reference are
   separate benchmarks of the same group, measured in the same run, each recorded with
   `measure(benchmark, fn, group=..., impl=..., ours=...)`. At the end of the run
   `pytest_benchmark_update_json` below adds `comparisons` to the JSON: per group, the
   ratio ours / reference (below 1: ours is faster or smaller) of the time (fastest and
   median round) and of the peak memory -- one direction everywhere, never a "speedup".
   That ratio is the result; nothing in bench/ asserts a time. Every group has a title in
   minirlhf/bench_report.py's GROUP_TITLES, filled from the sizes the benchmark records in
   extra_info (convention 6), so the report's titles say what was measured.
2. Correctness first: before a benchmark times anything, the same test module checks
   ours against its reference on the benchmark's own inputs (values and gradients, or
   tokens), so a wrong fast path never produces a ratio.
3. Sizes scale with the device: every bench file takes its sizes from the `sizes` fixture
   (SIZES[SIZE_SET]; module-level parametrisation reads SIZES[SIZE_SET] itself). The
   rollout, generation, multi-process and PPO-iteration comparisons run on the CPU on any
   machine, so their "cuda" sizes are the CPU ones. MINIRLHF_BENCH_SIZES=smoke picks tiny
   sizes, to check in seconds that a file runs (the TRL comparison, which builds venvs
   for minutes, skips under smoke); its numbers are meaningless and bench-report says so.
   On CPU the whole suite must finish in 10 minutes on 2 cores. The plan, from the sizes
   below and earlier runs on the shared 2-core machine (1 torch thread), in seconds:
       fused losses 150 (linear_ppo_loss's naive reference alone ~40), PPO update 45,
       TRL's PPO trainer 100 (two versions x two modes x 4 iterations; building its
       venvs the first time takes minutes more), multi-process PPO 100 (two launches of
       3 quick-preset iterations), SmolLM2 generation 50 (when installed), generation on
       the quick model 10, transformers coexistence 10, our PPO iteration 10, rollout
       bookkeeping 5: about 480 s.
4. Peak memory: `peak_bytes(fn)` is the allocator's high-water mark during fn above what
   was live before it (CUDA: torch.cuda.max_memory_allocated; CPU: the profiler's
   "Total Allocated" track, which counts every tensor torch allocates). Pass memory=False
   where torch's allocator does not see the work (numpy, memcpy, another process) or the
   profiler's trace would cost more than the run (thousands of small decode steps).
5. A benchmark whose timed call is not the thing measured (a subprocess that reports its
   own time per iteration) passes `time_s=` to measure(); ratios then use it.
   One PPO iteration: bench/test_trl_ppo_bench.py records TRL's PPO trainer in group
   PPO_ITERATION_GROUP (impls "trl-<version>" as shipped and "trl-<version>-gc-removed");
   our side joins the same group from bench/test_ppo_bench.py with
   `measure(benchmark, lambda: None, group=PPO_ITERATION_GROUP, impl="minirlhf", ours=True,
   memory=False, time_s=..., generate_s=..., score_s=..., bookkeeping_s=..., update_s=...)`
   on the `ppo_iteration_shapes` / `ppo_iteration_model_config` fixtures, and the ratios to
   every TRL entry follow (bench-report shows the *_s phase times as notes).
6. Other facts go in `benchmark.extra_info` (measure()'s keyword arguments) under names
   with units (tokens_per_s, effective_GBps, peak_bytes, generate_s); the sizes the
   group's title names (tokens, vocab_size, ...); agreement checks under `max_abs_diff_*`.
7. MINIRLHF_REQUIRE_CUDA=1 (set by bench/gpu.sh) turns every skip into a failure, so
   that on a GPU machine a benchmark that cannot run is an error, not a silent gap.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from minirlhf.bench_report import comparisons
from minirlhf.memory import peak_allocated_bytes

BENCH_DIR = Path(__file__).resolve().parent
REQUIRE_CUDA = os.environ.get("MINIRLHF_REQUIRE_CUDA", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Timed rounds per benchmark (after one warm-up call, which also measures peak memory).
ROUNDS = int(os.environ.get("MINIRLHF_BENCH_ROUNDS", "3" if DEVICE == "cpu" else "10"))

# Problem sizes per device (convention 3). "loss": the fused-loss comparisons (N = B * T
# tokens, vocabulary V, hidden H of the fused-linear ops). "update": one PPO update of a model
# whose LM head has the largest vocabulary in common use (Llama 3's), for peak memory fused vs
# naive. "rollout": the bookkeeping of B sequences x T tokens. "generate_quick" /
# "generate_smollm2": greedy generation, prompts x new tokens. "dist": one PPO iteration of a
# preset, 2 processes vs 1, `iterations` per launch (the first a warm-up). "ppo_iteration":
# one PPO iteration vs TRL's PPO trainer: four models (policy, reference, reward, value) with
# this Llama shape -- 1.31M parameters for the policy with an untied LM head on CPU -- the
# prompts, prompt and response lengths, PPO epochs and minibatches of one iteration, and
# `iterations` per run (the first a warm-up, on both sides).
PPO_ITERATION_SHAPES = dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                            prompts=16, prompt_len=16, new_tokens=32, ppo_epochs=4, minibatches=1)
_CPU_ONLY = {  # comparisons that run on the CPU on any machine
    "rollout": dict(B=1024, T=1024),
    "generate_quick": dict(batch=8, new_tokens=64),
    "generate_smollm2": dict(batch=4, new_tokens=16),
    "dist": dict(preset="quick", iterations=3),
    "ppo_iteration": dict(PPO_ITERATION_SHAPES, iterations=4),
}
SIZES = {
    "cpu": {
        "loss": dict(B=16, T=256, V=32000, H=256, dtype=torch.float32),
        "update": dict(B=4, T=128, V=128256, dim=128, n_layers=2, dtype=torch.float32),
        **_CPU_ONLY,
    },
    "cuda": {
        "loss": dict(B=16, T=1024, V=128256, H=4096, dtype=torch.bfloat16),
        "update": dict(B=16, T=1024, V=128256, dim=2048, n_layers=4, dtype=torch.bfloat16),
        **_CPU_ONLY,
    },
    # MINIRLHF_BENCH_SIZES=smoke: seconds, to check that the suite runs (numbers meaningless)
    "smoke": {
        "loss": dict(B=4, T=32, V=1000, H=64, dtype=torch.float32),
        "update": dict(B=2, T=32, V=4096, dim=64, n_layers=1, dtype=torch.float32),
        "rollout": dict(B=64, T=64),
        "generate_quick": dict(batch=2, new_tokens=4),
        "generate_smollm2": dict(batch=1, new_tokens=2),
        "dist": dict(preset="tiny", iterations=1),
        "ppo_iteration": dict(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, prompts=4,
                              prompt_len=8, new_tokens=8, ppo_epochs=1, minibatches=1, iterations=2),
    },
}
SIZE_SET = os.environ.get("MINIRLHF_BENCH_SIZES", DEVICE)
if SIZE_SET not in SIZES:
    raise pytest.UsageError(f"MINIRLHF_BENCH_SIZES={SIZE_SET!r}: expected one of {', '.join(SIZES)}")

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
    return peak_allocated_bytes(fn, DEVICE)


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
# comparisons(benchmarks) is minirlhf.bench_report's (imported above): the same function
# computes the stored ratios and the report's.


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
    """The shapes of the PPO-iteration comparison (SIZES[SIZE_SET]["ppo_iteration"]), with
    `iterations`: runs per side, the first a warm-up."""
    return dict(SIZES[SIZE_SET]["ppo_iteration"])


@pytest.fixture(scope="session")
def ppo_iteration_model_config(ppo_iteration_shapes):
    """minirlhf's ModelConfig with the Llama shape TRL's four models get (untied LM head,
    room for prompt + response). TRL's side also uses: kl_coef 0.05, lr 1e-5, temperature
    1, responses cut at EOS, one minibatch of all the prompts, the same PPO epochs."""
    from minirlhf.config import ModelConfig

    s = ppo_iteration_shapes
    return ModelConfig(vocab_size=s["vocab_size"], dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                       n_kv_heads=s["n_kv_heads"], ffn_dim=s["ffn_dim"], max_seq_len=s["prompt_len"] + s["new_tokens"],
                       tie_embeddings=False)


def trl_ppo_iteration(version: str, shapes: dict, threads: int = 0) -> dict:
    """Runs bench/trl_ppo/trl_ppo_iteration.py in bench/.venv-trl-<version> (built by
    bench/trl_ppo/make_venv.sh first if missing, which takes minutes) on `shapes` (the
    ppo_iteration_shapes fixture: its `iterations` - 1 are timed after one warm-up, as on our
    side) and returns its JSON: per mode ("shipped", "gc_removed") the seconds of each timed
    iteration and more."""
    import subprocess
    import sys

    shapes = dict(shapes)
    timed = shapes.pop("iterations") - 1
    venv_python = BENCH_DIR / f".venv-trl-{version}" / "bin" / "python"
    if not venv_python.exists():
        subprocess.run(["bash", str(BENCH_DIR / "trl_ppo" / "make_venv.sh"), version], check=True)
    cmd = [str(venv_python), str(BENCH_DIR / "trl_ppo" / "trl_ppo_iteration.py"),
           "--shapes", json.dumps(shapes), "--iterations", str(timed),
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
