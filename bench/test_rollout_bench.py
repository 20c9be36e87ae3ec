"""The C++ rollout buffer against the ways Python RLHF code does the same work.

GAE + returns + advantage whitening on B=1024 sequences x T=1024 tokens with
lengths uniform in [1, T], timed in one pytest-benchmark run:

- torch_loop:  a per-timestep torch loop over masked (B, T) tensors, the way TRL's
               PPO trainer writes it (torch's default threads)
- numpy:       numpy vectorised over the batch, a Python loop over T (on the
               transposed arrays, so each step reads contiguous memory)
- cpp:         minirlhf.rollout.gae + whiten, on all threads and on one
- memcpy:      libc memmove of the same bytes: rewards and values (8 MiB) copied
               to advantages and returns (8 MiB), the floor for this memory-bound pass

Every implementation's output is checked against ours before it is timed.  The
medians, ratios and effective GB/s go to bench/results/rollout-<machine>.json
(name the machine with MINIRLHF_BENCH_MACHINE; default: CPU model + CPU count).

    pytest bench/test_rollout_bench.py
"""
import ctypes
import json
import os
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minirlhf import rollout

B, T = 1024, 1024
GAMMA, LAM = 0.99, 0.95
RESULTS = Path(__file__).parent / "results"

_medians: dict[str, float] = {}
_valid_tokens: list[int] = []


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, T + 1, B)
    rewards = rng.standard_normal((B, T), np.float32)
    values = rng.standard_normal((B, T), np.float32)
    valid = np.arange(T)[None, :] < lengths[:, None]
    rewards[~valid] = 0  # the torch and numpy versions mask by multiplying, so padding must be finite
    values[~valid] = 0
    _valid_tokens[:] = [int(lengths.sum())]
    adv, ret = rollout.gae(rewards, values, lengths, GAMMA, LAM)
    return dict(lengths=lengths, rewards=rewards, values=values, valid=valid,
                expected_adv=rollout.whiten(adv, lengths), expected_ret=ret)


# ---------------------------------------------------------------- the implementations

def torch_loop(rewards, values, mask, gamma, lam):
    """TRL-style: masked tensors, one step per token, list + stack, masked whitening."""
    T = rewards.shape[1]
    rewards = rewards * mask
    values = values * mask
    last, reversed_adv = 0.0, []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    n = mask.sum()
    mean = (advantages * mask).sum() / n
    var = (((advantages - mean) ** 2) * mask).sum() / n * (n / (n - 1))
    advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return advantages, returns


def numpy_vectorised(rewards, values, valid, gamma, lam):
    """numpy over the batch, a loop over T, on (T, B) copies so every step is contiguous."""
    r = np.where(valid, rewards, 0).T.copy()
    v = np.where(valid, values, 0).T.copy()
    adv = np.empty_like(r)
    g, gl = np.float32(gamma), np.float32(gamma * lam)
    last = np.zeros(r.shape[1], np.float32)
    next_v = np.zeros(r.shape[1], np.float32)
    for t in range(r.shape[0] - 1, -1, -1):
        last = r[t] + g * next_v - v[t] + gl * last
        adv[t] = last
        next_v = v[t]
    adv, ret = adv.T, (adv + v).T
    picked = adv[valid]
    whitened = (adv - picked.mean()) / np.sqrt(picked.var(ddof=1) + 1e-8)
    return np.where(valid, whitened, 0), ret


def cpp(rewards, values, lengths, gamma, lam, adv, ret):
    rollout.gae(rewards, values, lengths, gamma, lam, adv, ret)
    rollout.whiten(adv, lengths, out=adv)
    return adv, ret


# ---------------------------------------------------------------- the benchmarks

def _record(benchmark, name):
    _medians[name] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="gae+returns+whiten B=1024 T=1024")
def test_torch_loop(benchmark, data):
    args = (torch.from_numpy(data["rewards"]), torch.from_numpy(data["values"]),
            torch.from_numpy(data["valid"]).float(), GAMMA, LAM)
    adv, ret = torch_loop(*args)
    np.testing.assert_allclose(adv.numpy(), data["expected_adv"], atol=1e-4)
    np.testing.assert_allclose(ret.numpy(), data["expected_ret"], atol=1e-4)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(torch_loop, args, rounds=7, warmup_rounds=1)
    _record(benchmark, "torch_loop")


@pytest.mark.benchmark(group="gae+returns+whiten B=1024 T=1024")
def test_numpy_vectorised(benchmark, data):
    args = (data["rewards"], data["values"], data["valid"], GAMMA, LAM)
    adv, ret = numpy_vectorised(*args)
    np.testing.assert_allclose(adv, data["expected_adv"], atol=1e-4)
    np.testing.assert_allclose(ret, data["expected_ret"], atol=1e-4)
    benchmark.pedantic(numpy_vectorised, args, rounds=7, warmup_rounds=1)
    _record(benchmark, "numpy")


@pytest.mark.parametrize("threads", ["all", 1])
@pytest.mark.benchmark(group="gae+returns+whiten B=1024 T=1024")
def test_cpp(benchmark, data, threads):
    before = rollout.get_num_threads()
    n = len(os.sched_getaffinity(0)) if threads == "all" else threads
    rollout.set_num_threads(n)
    try:
        adv, ret = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
        args = (data["rewards"], data["values"], data["lengths"], GAMMA, LAM, adv, ret)
        cpp(*args)
        np.testing.assert_array_equal(adv, data["expected_adv"])
        np.testing.assert_array_equal(ret, data["expected_ret"])
        benchmark.extra_info["threads"] = n
        benchmark.pedantic(cpp, args, rounds=100, warmup_rounds=3)
    finally:
        rollout.set_num_threads(before)
    _record(benchmark, f"cpp_{threads}_threads" if threads == "all" else "cpp_1_thread")


@pytest.mark.benchmark(group="gae+returns+whiten B=1024 T=1024")
def test_memcpy(benchmark, data):
    src = np.stack([data["rewards"], data["values"]])
    dst = np.empty_like(src)
    memmove, n = ctypes.memmove, src.nbytes

    def copy():
        memmove(dst.ctypes.data, src.ctypes.data, n)

    copy()
    np.testing.assert_array_equal(dst, src)
    benchmark.pedantic(copy, rounds=100, warmup_rounds=3)
    _record(benchmark, "memcpy")


# ---------------------------------------------------------------- the results file

def _machine():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def field(name):
        m = re.search(rf"^{name}\s*:\s*(.+)$", info, re.M)
        return m.group(1).strip() if m else None

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": field("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{field('cpu family')}/{field('model')}",
        "cpus": cpus,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _slug(machine):
    name = os.environ.get("MINIRLHF_BENCH_MACHINE")
    if not name:
        cpu = re.sub(r"\((r|tm)\)|\b(cpu|processor)\b|@.*", "", machine["cpu"], flags=re.I)
        name = f"{cpu}-{machine['cpus']}cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    cpp_all = _medians.get("cpp_all_threads")
    if cpp_all is None or len(_medians) < 5:
        return  # a partial run (-k ...) does not overwrite the results
    machine = _machine()
    moved = 4 * B * T * 4  # rewards + values read, advantages + returns written, as float32
    gbps = {k: moved / t / 1e9 for k, t in _medians.items()}
    result = {
        "benchmark": "GAE + returns + advantage whitening",
        "config": {"B": B, "T": T, "lengths": "uniform in [1, T], seed 0", "gamma": GAMMA, "lam": LAM,
                   "valid_tokens": _valid_tokens[0]},
        "machine": machine,
        "median_ms": {k: round(t * 1e3, 4) for k, t in _medians.items()},
        "speedup_of_cpp_all_threads": {
            "vs_torch_loop": round(_medians["torch_loop"] / cpp_all, 1),
            "vs_numpy": round(_medians["numpy"] / cpp_all, 1),
        },
        "speedup_of_cpp_1_thread": {
            "vs_torch_loop": round(_medians["torch_loop"] / _medians["cpp_1_thread"], 1),
            "vs_numpy": round(_medians["numpy"] / _medians["cpp_1_thread"], 1),
        },
        "effective_GBps": {k: round(v, 2) for k, v in gbps.items()},
        "effective_bytes": moved,
        "cpp_fraction_of_memcpy_bandwidth": {
            "all_threads": round(_medians["memcpy"] / cpp_all, 3),
            "1_thread": round(_medians["memcpy"] / _medians["cpp_1_thread"], 3),
        },
        "targets": {"vs_torch_loop": ">= 20x", "vs_numpy": ">= 5x"},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"rollout-{_slug(machine)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
