"""The C++ bookkeeping (--ppo.bookkeeping cpp) against the torch definitions it mirrors
(--ppo.bookkeeping torch).

Group "rollout_bookkeeping" (conventions in bench/conftest.py): one PPO iteration's
bookkeeping -- per-token rewards, GAE + returns, advantage whitening -- on B sequences x T
tokens (sizes["rollout"]: B=T=1024 on CPU) with lengths uniform in [1, T]:

- torch:         minirlhf.stages.ppo's per_token_rewards, gae, whiten: the readable
                 definitions (a per-timestep loop over masked (B, T) tensors; torch's threads)
- numpy:         numpy vectorised over the batch, a Python loop over T (on transposed arrays,
                 so each step reads contiguous memory)
- cpp (ours):    minirlhf.rollout's per_token_rewards, gae, whiten, on all threads
- cpp_1_thread (ours): the same on one thread
- memcpy:        libc memmove of what the bookkeeping reads (logprobs, ref_logprobs, values)
                 into as many bytes of output (rewards, advantages, returns): the floor for
                 this memory-bound pass (ours / memcpy above 1 is the distance to it)

Every implementation's output is checked against the torch definitions before it is timed.
Besides the times: effective_GBps (the 6 * B * T * 4 bytes read and written per second,
fastest round) and the threads used. No peak memory: numpy's and memcpy's buffers are
invisible to torch's allocator.

    pytest bench/test_rollout_bench.py
"""
import ctypes
import os

import numpy as np
import pytest
import torch
from conftest import measure

from minirlhf import rollout
from minirlhf.stages import ppo

KL_COEF, GAMMA, LAM, TRUNCATION_PENALTY = 0.05, 0.99, 0.95, -1.0
GROUP = "rollout_bookkeeping"


@pytest.fixture(scope="module")
def data(sizes):
    B, T = sizes["rollout"]["B"], sizes["rollout"]["T"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = ppo.response_mask(lengths, T)
    logprobs, ref_logprobs = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    values, scores = torch.randn(B, T, generator=g), torch.randn(B, generator=g)
    for x in (logprobs, ref_logprobs, values):
        x[~mask] = 0  # the numpy version masks by multiplying, so padding must be finite
    args = (logprobs, ref_logprobs, scores, lengths, values, lengths == T)
    rewards, advantages, returns = bookkeeping(ppo, *args)
    return dict(args=args, mask=mask, rewards=rewards, advantages=advantages, returns=returns, B=B, T=T,
                valid_tokens=int(lengths.sum()))


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


def _measure(benchmark, data, fn, impl, ours, rounds, threads=None):
    moved = 6 * data["B"] * data["T"] * 4  # logprobs, ref_logprobs, values read; rewards, advantages, returns written
    extra = {"B": data["B"], "T": data["T"], "valid_tokens": data["valid_tokens"], "bytes_moved": moved}
    if threads is not None:
        extra["threads"] = threads
    measure(benchmark, fn, group=GROUP, impl=impl, ours=ours, memory=False, rounds=rounds, **extra)
    benchmark.extra_info["effective_GBps"] = moved / benchmark.stats.stats.min / 1e9


def test_torch(benchmark, data):
    _measure(benchmark, data, lambda: bookkeeping(ppo, *data["args"]), "torch", False, rounds=5,
             threads=torch.get_num_threads())


def test_numpy(benchmark, data):
    args = tuple(x.numpy() for x in data["args"]) + (data["mask"].numpy(),)
    _check(numpy_vectorised(*args), data, exact=False)
    _measure(benchmark, data, lambda: numpy_vectorised(*args), "numpy", False, rounds=7)


@pytest.mark.parametrize("threads", ["all", 1])
def test_cpp(benchmark, data, threads):
    before = rollout.get_num_threads()
    n = len(os.sched_getaffinity(0)) if threads == "all" else threads
    rollout.set_num_threads(n)
    try:
        _check(bookkeeping(rollout, *data["args"]), data, exact=True)
        _measure(benchmark, data, lambda: bookkeeping(rollout, *data["args"]),
                 "cpp" if threads == "all" else "cpp_1_thread", True, rounds=100, threads=n)
    finally:
        rollout.set_num_threads(before)


def test_memcpy(benchmark, data):
    logprobs, ref_logprobs, _, _, values, _ = data["args"]
    src = torch.stack([logprobs, ref_logprobs, values])
    dst = torch.empty_like(src)
    memmove, n = ctypes.memmove, src.numel() * src.element_size()

    def copy():
        memmove(dst.data_ptr(), src.data_ptr(), n)

    copy()
    assert torch.equal(dst, src)
    _measure(benchmark, data, copy, "memcpy", False, rounds=100)
