"""PPO bookkeeping in C++: the fast path of the plain-torch definitions in minirlhf/stages/ppo.py.

Each function has the name, arguments and results of the torch function it mirrors —
`per_token_rewards`, `gae`, `whiten` (``--ppo.bookkeeping cpp|torch`` picks a path;
tests/rollout compares them) — and runs in csrc/rollout_buffer.cpp (built as
``minirlhf._rollout``) on threads, with the GIL released. Also here: `minibatches` (the
seeded order of one PPO epoch) and, for a batch split over ranks, `masked_mean_var`
(whitening's statistics of the whole batch, exact, for ``whiten(..., mean=, var=)``).

Layout
    (B, T) float32, right-padded: response token t of sequence b sits at [b, t] for
    t < lengths[b]; lengths is (B,) int64 with 1 <= lengths[b] <= T. Padding is never
    read (it may hold NaN) and is 0 in every output.

Tensors in and out
    Inputs are CPU torch tensors, shared with C++ without a copy (one that is not
    contiguous is made so first); numpy arrays work too, if C-contiguous. dtypes are
    never converted: float64 where float32 is expected is an error. Results are new
    CPU tensors.

Errors
    Every argument is checked once, by the C++ library: a bad one (dtype, shape, a
    length outside [1, T], NaN/inf in a valid token, gamma outside [0, 1], ...) raises
    ValueError naming the argument and the offending row, e.g. ``lengths[3]=70 exceeds
    T=64`` or ``logprobs[2, 1]=nan is not finite``. A scalar of the wrong type (a str for
    kl_coef) is a TypeError.

Threads
    Work is split over sequences on ``get_num_threads()`` threads (default: the CPUs this
    process may use, capped by OMP_NUM_THREADS); results do not depend on the count.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

try:
    from minirlhf import _rollout
except ImportError as e:  # pragma: no cover - a broken install, not a user error
    raise ImportError(
        "minirlhf._rollout (the C++ rollout buffer) is not built: run `pip install -e .` in the repository root"
    ) from e

__all__ = ["per_token_rewards", "gae", "whiten", "masked_moments", "masked_mean_var", "minibatches",
           "set_num_threads", "get_num_threads"]

set_num_threads = _rollout.set_num_threads
get_num_threads = _rollout.get_num_threads


def _array(x: Any) -> Any:
    """x's memory as a numpy array when x is a CPU tensor numpy can share; anything else as it
    is, for the C++ library to check (it says what it got, e.g. a bfloat16 or CUDA tensor)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
        try:
            return x.detach().contiguous().numpy()
        except TypeError:  # a dtype numpy does not have (bfloat16)
            pass
    return x


def per_token_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef: float, *, truncated=None,
                      truncation_penalty: float = 0.0, reward_clip: float | None = None) -> torch.Tensor:
    """`minirlhf.stages.ppo.per_token_rewards` in C++, the same float32 operations (equal bit for bit):

        r_t = −β · (log π_old(y_t) − log π_ref(y_t))            every response token t
        r_T += clip(RM score, ±reward_clip) + truncation_penalty · truncated     last token T

    logprobs, ref_logprobs: (B, T) float32; scores: (B,) float32; lengths: (B,) int64;
    kl_coef β >= 0; truncated: (B,) bool or None; truncation_penalty finite; reward_clip:
    > 0, or None = off. Returns (B, T) float32.
    """
    return torch.from_numpy(_rollout.per_token_rewards(
        _array(logprobs), _array(ref_logprobs), _array(scores), _array(lengths), kl_coef, _array(truncated),
        truncation_penalty, reward_clip))


def gae(rewards, values, lengths, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`minirlhf.stages.ppo.gae` in C++ (Schulman et al. 2016), the same float32 operations in the
    same order (equal bit for bit):

        δ_t = r_t + γ · V_{t+1} − V_t  (V = 0 after the last token),  A_t = δ_t + γλ · A_{t+1},
        returns_t = A_t + V_t

    rewards, values: (B, T) float32; lengths: (B,) int64; gamma, lam in [0, 1].
    Returns (advantages, returns), each (B, T) float32.
    """
    advantages, returns = _rollout.gae(_array(rewards), _array(values), _array(lengths), gamma, lam)
    return torch.from_numpy(advantages), torch.from_numpy(returns)


def whiten(x, lengths, shift_mean: bool = True, *, mean: float | None = None,
           var: float | None = None) -> torch.Tensor:
    """`minirlhf.stages.ppo.whiten` in C++: (x − mean) / sqrt(var + 1e-8) over the valid tokens,
    plus the mean again when not shift_mean. x: (B, T) float32; returns (B, T) float32.

    mean, var (floats, both or neither): the statistics to use, e.g. those of the whole batch
    across ranks from `masked_mean_var`; None: this batch's own (var unbiased, accumulated in
    float64; needs >= 2 valid tokens). Equal to torch's up to float32 rounding (1e-6 in tests/rollout).
    """
    return torch.from_numpy(_rollout.whiten(_array(x), _array(lengths), shift_mean, mean, var))


def masked_moments(x, lengths, shift: float = 0.0) -> tuple[int, float, float]:
    """(count, Σ d, Σ d²) over the valid tokens of x ((B, T) float32), d = x − shift in float64,
    summed in row order (the same on every run)."""
    return _rollout.masked_moments(_array(x), _array(lengths), shift)


def masked_mean_var(x, lengths, *, all_reduce: Callable[[torch.Tensor], Any] | None = None) -> tuple[float, float]:
    """Mean and unbiased variance of x over the valid tokens of the whole batch, in float64.

    all_reduce(t): sums the float64 tensor t over the ranks in place, as
    ``torch.distributed.all_reduce`` does (with gloo; for NCCL, reduce a CUDA copy and copy it
    back), so each rank passes its own shard x; None: x is the whole batch. Two passes, as
    with one process: the global mean from the summed counts and sums, then the corrected
    two-pass variance (Σd² − (Σd)²/n) / (n − 1) from sums of deviations d = x − mean (Chan,
    Golub & LeVeque 1983), so a batch split over ranks gives its one-process statistics to
    float64 rounding.
    """
    def summed(*values: float) -> list[float]:
        if all_reduce is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        all_reduce(t)
        return t.tolist()

    count, total, _ = masked_moments(x, lengths)
    count, total = summed(count, total)
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {int(count)}")
    mean = total / count
    _, deviations, squares = masked_moments(x, lengths, mean)
    deviations, squares = summed(deviations, squares)
    return mean, (squares - deviations * deviations / count) / (count - 1)


def minibatches(n: int, minibatch_size: int, seed: int) -> list[torch.Tensor]:
    """One PPO epoch's minibatches: a seeded random permutation of range(n) (Fisher-Yates driven
    by splitmix64: a seed gives the same order on every platform), cut into (minibatch_size,)
    int64 tensors, the last one shorter when minibatch_size does not divide n.
    n, minibatch_size >= 1; 0 <= seed < 2**63."""
    order = torch.from_numpy(_rollout.minibatch_order(n, minibatch_size, seed))
    return list(order.split(minibatch_size))
