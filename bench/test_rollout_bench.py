"""The C++ bookkeeping (--ppo.bookkeeping cpp) against the torch definitions it mirrors
(--ppo.bookkeeping torch).

One PPO iteration's bookkeeping — per-token rewards, GAE + returns, advantage whitening —
on B=1024 sequences x T=1024 tokens with lengths uniform in [1, T], timed in one
pytest-benchmark run:

- torch:   minirlhf.stages.ppo's per_token_rewards, gae, whiten: the readable definitions
           (a per-timestep loop over masked (B, T) tensors; torch's default threads)
- numpy:   numpy vectorised over the batch, a Python loop over T (on transposed arrays, so
           each step reads contiguous memory)
- cpp:     minirlhf.rollout's per_token_rewards, gae, whiten, on all threads and on one
- memcpy:  libc memmove of what the bookkeeping reads (logprobs, ref_logprobs, values:
           12 MiB) into as many bytes of output (rewards, advantages, returns): the floor
           for this memory-bound pass

Every implementation's output is checked against the torch definitions before it is timed.
The medians, ratios and effective GB/s go to bench/results/rollout-<machine>.json (name the
machine with MINIRLHF_BENCH_MACHINE; default: CPU model + CPU count).

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
from minirlhf.stages import ppo

B, T = 1024, 1024
KL_COEF, GAMMA, LAM, TRUNCATION_PENALTY = 0.05, 0.99, 0.95, -1.0
GROUP = "rewards+gae+whiten B=1024 T=1024"
RESULTS = Path(__file__).parent / "results"

_medians: dict[str, float] = {}
_valid_tokens: list[int] = []


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = ppo.response_mask(lengths, T)
    logprobs, ref_logprobs = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    values, scores = torch.randn(B, T, generator=g), torch.randn(B, generator=g)
    for x in (logprobs, ref_logprobs, values):
        x[~mask] = 0  # the numpy version masks by multiplying, so padding must be finite
    _valid_tokens[:] = [int(lengths.sum())]
    args = (logprobs, ref_logprobs, scores, lengths, values, lengths == T)
    rewards, advantages, returns = bookkeeping(ppo, *args)
    return dict(args=args, mask=mask, rewards=rewards, advantages=advantages, returns=returns)


# ---------------------------------------------------------------- the implementations

def bookkeeping(impl, logprobs, ref_logprobs, scores, lengths, values, truncated):
    """What one PPO iteration runs, through `impl`: minirlhf.stages.ppo or minirlhf.rollout."""
    rewards = impl.per_token_rewards(logprobs, ref_logprobs, scores, lengths, KL_COEF, truncated=truncated,
                                     truncation_penalty=TRUNCATION_PENALTY)
    advantages, returns = impl.gae(rewards, values, lengths, GAMMA, LAM)
    return rewards, impl.whiten(advantages, lengths), returns


def numpy_vectorised(logprobs, ref_logprobs, scores, lengths, values, truncated, valid):
    """numpy over the batch, a loop over T, on (T, B) copies so every step is contiguous."""
    rewards = np.float32(-KL_COEF) * (logprobs - ref_logprobs) * valid
    rows = np.arange(len(lengths))
    rewards[rows, lengths - 1] += scores + np.float32(TRUNCATION_PENALTY) * truncated
    r, v = rewards.T.copy(), (values * valid).T.copy()
    adv = np.empty_like(r)
    g, gl = np.float32(GAMMA), np.float32(GAMMA * LAM)
    last = np.zeros(r.shape[1], np.float32)
    next_v = np.zeros(r.shape[1], np.float32)
    for t in range(r.shape[0] - 1, -1, -1):
        last = r[t] + g * next_v - v[t] + gl * last
        adv[t] = last
        next_v = v[t]
    adv, ret = adv.T, (adv + v).T
    picked = adv[valid].astype(np.float64)
    whitened = (adv - picked.mean()) / np.sqrt(picked.var(ddof=1) + 1e-8)
    return rewards, np.where(valid, whitened, 0).astype(np.float32), ret


# ---------------------------------------------------------------- the benchmarks

def _check(got, data, exact):
    """Rewards and returns bit for bit (C++) or to 1e-4 (numpy); whitened advantages to 1e-6 or 1e-4."""
    rewards, advantages, returns = (torch.as_tensor(x) for x in got)
    tol = 0 if exact else 1e-4
    torch.testing.assert_close(rewards, data["rewards"], rtol=tol, atol=tol)
    torch.testing.assert_close(returns, data["returns"], rtol=tol, atol=tol)
    torch.testing.assert_close(advantages, data["advantages"], rtol=tol or 1e-6, atol=tol or 1e-6)


def _record(benchmark, name):
    _medians[name] = benchmark.stats.stats.median


@pytest.mark.benchmark(group=GROUP)
def test_torch(benchmark, data):
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(bookkeeping, (ppo, *data["args"]), rounds=5, warmup_rounds=1)
    _record(benchmark, "torch")


@pytest.mark.benchmark(group=GROUP)
def test_numpy(benchmark, data):
    args = tuple(x.numpy() for x in data["args"]) + (data["mask"].numpy(),)
    _check(numpy_vectorised(*args), data, exact=False)
    benchmark.pedantic(numpy_vectorised, args, rounds=7, warmup_rounds=1)
    _record(benchmark, "numpy")


@pytest.mark.parametrize("threads", ["all", 1])
@pytest.mark.benchmark(group=GROUP)
def test_cpp(benchmark, data, threads):
    before = rollout.get_num_threads()
    n = len(os.sched_getaffinity(0)) if threads == "all" else threads
    rollout.set_num_threads(n)
    try:
        _check(bookkeeping(rollout, *data["args"]), data, exact=True)
        benchmark.extra_info["threads"] = n
        benchmark.pedantic(bookkeeping, (rollout, *data["args"]), rounds=100, warmup_rounds=3)
    finally:
        rollout.set_num_threads(before)
    _record(benchmark, "cpp_all_threads" if threads == "all" else "cpp_1_thread")


@pytest.mark.benchmark(group=GROUP)
def test_memcpy(benchmark, data):
    logprobs, ref_logprobs, _, _, values, _ = data["args"]
    src = torch.stack([logprobs, ref_logprobs, values])
    dst = torch.empty_like(src)
    memmove, n = ctypes.memmove, src.numel() * src.element_size()

    def copy():
        memmove(dst.data_ptr(), src.data_ptr(), n)

    copy()
    assert torch.equal(dst, src)
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
    if len(_medians) < 5:
        return  # a partial run (-k ...) does not overwrite the results
    machine = _machine()
    moved = 6 * B * T * 4  # logprobs, ref_logprobs, values read; rewards, advantages, returns written (float32)
    cpp_all, cpp_1 = _medians["cpp_all_threads"], _medians["cpp_1_thread"]
    result = {
        "benchmark": "PPO bookkeeping: per-token rewards + GAE + returns + advantage whitening",
        "config": {"B": B, "T": T, "lengths": "uniform in [1, T], seed 0", "kl_coef": KL_COEF, "gamma": GAMMA,
                   "lam": LAM, "valid_tokens": _valid_tokens[0]},
        "machine": machine,
        "median_ms": {k: round(t * 1e3, 4) for k, t in _medians.items()},
        "speedup_of_cpp_all_threads": {"vs_torch": round(_medians["torch"] / cpp_all, 1),
                                       "vs_numpy": round(_medians["numpy"] / cpp_all, 1)},
        "speedup_of_cpp_1_thread": {"vs_torch": round(_medians["torch"] / cpp_1, 1),
                                    "vs_numpy": round(_medians["numpy"] / cpp_1, 1)},
        "effective_GBps": {k: round(moved / t / 1e9, 2) for k, t in _medians.items()},
        "effective_bytes": moved,
        "cpp_fraction_of_memcpy_bandwidth": {"all_threads": round(_medians["memcpy"] / cpp_all, 3),
                                             "1_thread": round(_medians["memcpy"] / cpp_1, 3)},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"rollout-{_slug(machine)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
