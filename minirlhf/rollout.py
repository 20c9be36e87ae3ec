"""PPO bookkeeping between generation and the update, in C++.

The Python face of the rollout buffer (csrc/rollout_buffer.h, built as
``minirlhf._rollout``): per-token rewards, GAE and returns, advantage
whitening, seeded minibatches, and sequence packing.

Layout
    Every per-token array is (B, T) float32 and right-padded: response token t
    of sequence b sits at [b, t] for t < lengths[b].  ``lengths`` is (B,) int64
    with 1 <= lengths[b] <= T.  Padding is never read (it may hold anything,
    NaN included) and every output is 0 there.

Arrays in, arrays out
    Inputs are numpy arrays or CPU torch tensors, used in place (zero copy)
    when C-contiguous and copied once when not.  dtypes are never converted: a
    float64 array where float32 is expected is a ValueError, not a silent cast.
    Results are numpy arrays, or torch tensors sharing their memory when the
    first array argument is a torch tensor.  ``out=`` arrays (numpy or torch)
    are written in place and must already be exactly right: dtype, shape,
    C-contiguous, writable.  An output may be the very same array as an input
    (e.g. ``gae(..., out_advantages=rewards)``), never a partial overlap.

Errors
    Bad input (dtype, rank, shape, a length outside [1, T], NaN/inf in a valid
    token, gamma or lam outside [0, 1], an empty batch, ...) raises ValueError
    naming the argument and the offending row, e.g. ``lengths[3]=70 exceeds T=64``.

Threads
    Every loop runs in C++ with the GIL released, split over sequences on
    ``get_num_threads()`` threads (default: the CPUs this process may use,
    capped by OMP_NUM_THREADS).  Results do not depend on the thread count.
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple

import numpy as np

try:
    from minirlhf import _rollout
except ImportError as e:  # pragma: no cover - a broken install, not a user error
    raise ImportError(
        "minirlhf._rollout (the C++ rollout buffer) is not built: run `pip install -e .` "
        "in the repository root"
    ) from e

__all__ = [
    "assemble_rewards", "gae", "whiten", "masked_mean_var", "minibatches", "gather",
    "Packing", "pack", "pack_array", "unpack_array", "RolloutBuffer",
    "set_num_threads", "get_num_threads",
]

set_num_threads = _rollout.set_num_threads
get_num_threads = _rollout.get_num_threads


# ---------------------------------------------------------------- arrays in and out

def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "numpy")


def _numpy(x: Any, name: str, *, out: bool = False) -> np.ndarray:
    """The numpy array over x's memory; inputs that are not C-contiguous are copied once."""
    if _is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; the rollout buffer works on CPU tensors")
        try:
            arr = x.detach().numpy()
        except TypeError as e:  # e.g. bfloat16 has no numpy dtype
            raise ValueError(f"{name} has dtype {x.dtype}, which numpy cannot share: {e}") from None
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if not arr.flags.c_contiguous:
        if out:
            raise ValueError(f"{name} must be C-contiguous to be written in place")
        arr = np.ascontiguousarray(arr)
    return arr


def _like(arr: np.ndarray, template: Any):
    """arr as a torch tensor over the same memory if template is one, else arr."""
    if _is_torch(template):
        import torch

        return torch.from_numpy(arr)
    return arr


def _output(out: Any, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    return np.empty(shape, dtype) if out is None else _numpy(out, name, out=True)


def _number(x: Any, name: str) -> float:
    if isinstance(x, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{name} must be a number, got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None


def _integer(x: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {x!r}")
    try:
        value = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {x!r}") from None
    if value < low or (high is not None and value >= high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}={value} must be {bounds}")
    return value


def _lengths(lengths: Any) -> np.ndarray:
    lens = _numpy(lengths, "lengths")
    if lens.ndim != 1:
        raise ValueError(f"lengths must have 1 dimension (B,), got shape {lens.shape}")
    return lens


def _width(x: np.ndarray, name: str) -> int:
    if x.ndim != 2:
        raise ValueError(f"{name} must have 2 dimensions (B, T), got shape {x.shape}")
    return x.shape[1]


# ---------------------------------------------------------------- rewards, GAE, whitening

def assemble_rewards(old_logprobs, ref_logprobs, scores, lengths, kl_coef, *, no_eos_penalty=0.0,
                     hit_max=None, reward_clip=None, out=None):
    """Per-token rewards with the KL penalty to the reference policy (InstructGPT).

    r[b, t] = -kl_coef * (old_logprobs - ref_logprobs)[b, t] for t < lengths[b], and at the
    last token t = lengths[b] - 1 also + clip(scores[b], -reward_clip, reward_clip)
    + (no_eos_penalty if hit_max[b]).  0 beyond lengths[b].

    old_logprobs, ref_logprobs: (B, T) float32; scores: (B,) float32 (RM score per
    sequence); lengths: (B,) int64; kl_coef >= 0; hit_max: (B,) bool, True where the
    response hit the length limit without EOS; no_eos_penalty <= 0 (it is added);
    reward_clip > 0 or None.  Returns (B, T) float32 (``out`` if given).
    """
    old = _numpy(old_logprobs, "old_logprobs")
    ref = _numpy(ref_logprobs, "ref_logprobs")
    sc = _numpy(scores, "scores")
    lens = _lengths(lengths)
    hit = None if hit_max is None else _numpy(hit_max, "hit_max")
    clip = 0.0
    if reward_clip is not None:
        clip = _number(reward_clip, "reward_clip")
        if not clip > 0:  # also rejects NaN
            raise ValueError(f"reward_clip={reward_clip} must be > 0 (or None for no clipping)")
    T = _width(old, "old_logprobs")
    res = _output(out, "out", (lens.shape[0], T))
    _rollout.assemble_rewards(old, ref, sc, lens, hit, _number(kl_coef, "kl_coef"),
                              _number(no_eos_penalty, "no_eos_penalty"), clip, res)
    return out if out is not None else _like(res, old_logprobs)


def gae(rewards, values, lengths, gamma, lam, out_advantages=None, out_returns=None):
    """Generalised advantage estimation and returns, per sequence, over its true length.

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last token (the
    episode ends there); A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    rewards, values: (B, T) float32; lengths: (B,) int64; gamma, lam in [0, 1].
    Returns (advantages, returns), each (B, T) float32 and 0 on padding.  The
    float32 arithmetic follows the usual torch loop step for step, so it matches
    it bit for bit on the same inputs.
    """
    r = _numpy(rewards, "rewards")
    v = _numpy(values, "values")
    lens = _lengths(lengths)
    shape = (lens.shape[0], _width(r, "rewards"))
    adv = _output(out_advantages, "out_advantages", shape)
    ret = _output(out_returns, "out_returns", shape)
    _rollout.gae(r, v, lens, _number(gamma, "gamma"), _number(lam, "lam"), adv, ret)
    return (out_advantages if out_advantages is not None else _like(adv, rewards),
            out_returns if out_returns is not None else _like(ret, rewards))


def whiten(x, lengths, shift_mean=True, *, out=None):
    """Whitened x over valid tokens: (x - mean) / sqrt(var + 1e-8), var unbiased.

    With shift_mean=False the mean is added back (only the scale changes), as
    TRL does for rewards.  x: (B, T) float32, needs >= 2 valid tokens in all.
    Returns (B, T) float32, 0 on padding; ``out`` may be x itself.
    """
    arr = _numpy(x, "x")
    lens = _lengths(lengths)
    res = _output(out, "out", (lens.shape[0], _width(arr, "x")))
    _rollout.whiten(arr, lens, not bool(shift_mean), res)
    return out if out is not None else _like(res, x)


def masked_mean_var(x, lengths) -> tuple[float, float]:
    """(mean, unbiased variance) of x over valid tokens, accumulated in double."""
    _, mean, var = _rollout.masked_moments(_numpy(x, "x"), _lengths(lengths))
    return mean, var


# ---------------------------------------------------------------- minibatches

def minibatches(n, minibatch_size, seed) -> list:
    """Indices of a seeded random permutation of range(n), cut into minibatches.

    Every minibatch has minibatch_size indices except the last, which has the
    n % minibatch_size left over when n is not a multiple.  The permutation is
    Fisher-Yates over splitmix64(seed): the same seed gives the same minibatches
    on every platform.  Returns a list of (<= minibatch_size,) int64 arrays.
    """
    n = _integer(n, "n", 1)
    size = _integer(minibatch_size, "minibatch_size", 1)
    perm = _rollout.permutation(n, _integer(seed, "seed", 0, 2**63))
    return [perm[i:i + size] for i in range(0, n, size)]


def gather(arrays, idx, *, lengths=None):
    """Rows idx of every array, as new C-contiguous arrays.

    arrays: a dict of arrays, a list/tuple of arrays, or one array, all with the
    same first dimension B; any dtype.  idx: (n,) int64 in [0, B).  With lengths
    ((B,) int64), arrays of 2 or more dimensions are cut to the longest response
    of the minibatch, [:, :max(lengths[idx])], so no compute is spent on columns
    that are padding in every row.  Returns the same structure; numpy or torch
    per array, as given.
    """
    single = not isinstance(arrays, (dict, list, tuple))
    items = {None: arrays} if single else dict(arrays) if isinstance(arrays, dict) else dict(enumerate(arrays))
    if not items:
        raise ValueError("arrays is empty")
    index = _numpy(idx, "idx")
    if index.dtype != np.int64 or index.ndim != 1:
        raise ValueError(f"idx must be a (n,) int64 array, got {index.dtype} of shape {index.shape}")
    if index.size == 0:
        raise ValueError("idx is empty")
    width = None
    if lengths is not None:
        lens = _lengths(lengths)
        if lens.dtype != np.int64:
            raise ValueError(f"lengths must have dtype int64, got {lens.dtype}")
        if index.min() < 0 or index.max() >= lens.shape[0]:
            bad = int(np.flatnonzero((index < 0) | (index >= lens.shape[0]))[0])
            raise ValueError(f"idx[{bad}]={index[bad]} is outside [0, {lens.shape[0]})")
        width = int(lens[index].max())
    B = None
    result = {}
    for key, value in items.items():
        name = "arrays" if single else f"arrays[{key!r}]"
        src = _numpy(value, name)
        if src.ndim == 0:
            raise ValueError(f"{name} must have at least 1 dimension")
        if B is None:
            B = src.shape[0]
        elif src.shape[0] != B:
            raise ValueError(f"{name} has {src.shape[0]} rows, the first array has {B}")
        w = 1
        if src.ndim >= 2:
            w = src.shape[1] if width is None else width
            if w > src.shape[1]:
                raise ValueError(f"{name} has {src.shape[1]} columns, the longest response has {w} tokens")
        shape = (index.shape[0],) + ((w,) + src.shape[2:] if src.ndim >= 2 else ())
        out = np.empty(shape, src.dtype)
        _rollout.gather_rows(src, index, w, out)
        result[key] = _like(out, value)
    if single:
        return result[None]
    return result if isinstance(arrays, dict) else type(arrays)(result[i] for i in range(len(result)))


# ---------------------------------------------------------------- packing

class Packing(NamedTuple):
    """Where first-fit-decreasing put each sequence in rows of `budget` tokens.

    row_of_seq, offset_of_seq: (B,) int64, sequence b occupies
    [offset_of_seq[b], offset_of_seq[b] + lengths[b]) of row row_of_seq[b].
    position_ids: (R, budget) int64, position of each token inside its own
    sequence (restarts at 0 for every sequence; 0 on padding).
    segment_ids: (R, budget) int64, the sequence b each token belongs to, -1 on
    padding: attention is allowed where segment ids are equal and not -1.
    """
    row_of_seq: Any
    offset_of_seq: Any
    position_ids: Any
    segment_ids: Any

    @property
    def n_rows(self) -> int:
        return int(self.position_ids.shape[0])

    @property
    def budget(self) -> int:
        return int(self.position_ids.shape[1])


def pack(lengths, budget) -> Packing:
    """First-fit-decreasing packing of sequences into rows of `budget` tokens.

    Longest first (ties by index), each into the first row with room.  Every
    1 <= lengths[b] <= budget.  O(B log B).
    """
    lens = _lengths(lengths)
    budget = _integer(budget, "budget", 1)
    parts = _rollout.pack(lens, budget)
    return Packing(*(_like(p, lengths) for p in parts))


def _plan(packing: Packing):
    if not isinstance(packing, Packing):
        raise ValueError(f"packing must be a Packing from pack(), got {type(packing).__name__}")
    return _numpy(packing.row_of_seq, "row_of_seq"), _numpy(packing.offset_of_seq, "offset_of_seq")


def pack_array(x, lengths, packing: Packing):
    """x (B, T, ...) in the packed layout (R, budget, ...); padding 0."""
    arr = _numpy(x, "x")
    if arr.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (B, T, ...), got shape {arr.shape}")
    row, offset = _plan(packing)
    packed = np.empty((packing.n_rows, packing.budget) + arr.shape[2:], arr.dtype)
    _rollout.pack_rows(arr, _lengths(lengths), row, offset, packed)
    return _like(packed, x)


def unpack_array(packed, lengths, packing: Packing, max_len):
    """packed (R, budget, ...) back to the padded layout (B, max_len, ...); padding 0."""
    arr = _numpy(packed, "packed")
    if arr.ndim < 2:
        raise ValueError(f"packed must have at least 2 dimensions (R, budget, ...), got shape {arr.shape}")
    lens = _lengths(lengths)
    row, offset = _plan(packing)
    max_len = _integer(max_len, "max_len", 1)
    padded = np.empty((lens.shape[0], max_len) + arr.shape[2:], arr.dtype)
    _rollout.unpack_rows(arr, lens, row, offset, padded)
    return _like(padded, packed)


# ---------------------------------------------------------------- the buffer

class RolloutBuffer:
    """Storage for one PPO batch: up to `capacity` responses of up to `max_len` tokens.

    Allocated once and refilled each PPO iteration: ``clear()``, ``add(...)`` the
    generated chunks, ``compute(...)``, then iterate ``minibatches(...)``.  The
    storage is plain numpy ((capacity, max_len) arrays); the properties return
    views of the filled rows, e.g. ``buf.advantages`` is (size, max_len) float32.
    """

    _PER_TOKEN = ("old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns")

    def __init__(self, capacity: int, max_len: int):
        self.capacity = _integer(capacity, "capacity", 1)
        self.max_len = _integer(max_len, "max_len", 1)
        self._store = {"tokens": np.zeros((self.capacity, self.max_len), np.int64)}
        for name in self._PER_TOKEN:
            self._store[name] = np.zeros((self.capacity, self.max_len), np.float32)
        self._store["scores"] = np.zeros(self.capacity, np.float32)
        self._store["lengths"] = np.ones(self.capacity, np.int64)
        self._store["hit_max"] = np.zeros(self.capacity, np.bool_)
        self.size = 0
        self.computed = False

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name: str):
        store = self.__dict__.get("_store", {})
        if name in store:
            return store[name][: self.size]
        raise AttributeError(name)

    def clear(self) -> None:
        self.size = 0
        self.computed = False

    def add(self, *, tokens, old_logprobs, ref_logprobs, values, scores, lengths, hit_max=None) -> slice:
        """Appends n responses: (n, t) arrays with t <= max_len (tokens int64, the rest
        float32), scores (n,) float32, lengths (n,) int64, hit_max (n,) bool or None.
        Copies them in (one copy, no dtype conversion); returns the rows they took."""
        given = {"tokens": (tokens, np.int64), "old_logprobs": (old_logprobs, np.float32),
                 "ref_logprobs": (ref_logprobs, np.float32), "values": (values, np.float32)}
        arrays = {}
        for name, (value, dtype) in given.items():
            arr = _numpy(value, name)
            if arr.dtype != dtype:
                raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
            if arr.ndim != 2:
                raise ValueError(f"{name} must have 2 dimensions (n, t), got shape {arr.shape}")
            arrays[name] = arr
        n, t = arrays["tokens"].shape
        for name, arr in arrays.items():
            if arr.shape != (n, t):
                raise ValueError(f"{name} has shape {arr.shape}, tokens has shape {(n, t)}")
        if n == 0:
            raise ValueError("empty batch: tokens has 0 rows")
        if t > self.max_len:
            raise ValueError(f"tokens has {t} columns, more than the buffer's max_len={self.max_len}")
        if self.size + n > self.capacity:
            raise ValueError(f"{n} responses do not fit: {self.size} of capacity {self.capacity} are used")
        sc = _numpy(scores, "scores")
        lens = _numpy(lengths, "lengths")
        for name, arr, dtype in (("scores", sc, np.float32), ("lengths", lens, np.int64)):
            if arr.dtype != dtype or arr.shape != (n,):
                raise ValueError(f"{name} must be ({n},) {np.dtype(dtype)}, got {arr.dtype} of shape {arr.shape}")
        _rollout.check_lengths(lens, t)  # 1 <= lengths[b] <= t, named per row
        hit = np.zeros(n, np.bool_) if hit_max is None else _numpy(hit_max, "hit_max")
        if hit.dtype != np.bool_ or hit.shape != (n,):
            raise ValueError(f"hit_max must be ({n},) bool, got {hit.dtype} of shape {hit.shape}")

        rows = slice(self.size, self.size + n)
        for name, arr in arrays.items():
            self._store[name][rows, :t] = arr
            self._store[name][rows, t:] = 0
        self._store["scores"][rows] = sc
        self._store["lengths"][rows] = lens
        self._store["hit_max"][rows] = hit
        self.size += n
        self.computed = False
        return rows

    def compute(self, *, kl_coef, gamma, lam, whiten_advantages=True, shift_mean=True,
                no_eos_penalty=0.0, reward_clip=None) -> None:
        """Fills rewards, advantages and returns of the filled rows, in place.

        Returns are computed from the raw advantages; whitening (over all valid
        tokens of the batch) applies to the advantages only."""
        if self.size == 0:
            raise ValueError("empty batch: nothing was added to the buffer")
        assemble_rewards(self.old_logprobs, self.ref_logprobs, self.scores, self.lengths, kl_coef,
                         no_eos_penalty=no_eos_penalty, hit_max=self.hit_max, reward_clip=reward_clip,
                         out=self.rewards)
        gae(self.rewards, self.values, self.lengths, gamma, lam,
            out_advantages=self.advantages, out_returns=self.returns)
        if whiten_advantages:
            whiten(self.advantages, self.lengths, shift_mean, out=self.advantages)
        self.computed = True

    def minibatches(self, minibatch_size, seed, *, to_torch=False):
        """Yields dicts of the filled rows in seeded random order, minibatch_size at a time
        (the last may be smaller): every stored array plus "index" (the rows taken), the
        per-token ones cut to the minibatch's longest response.  to_torch: torch tensors
        over the gathered numpy memory."""
        if not self.computed:
            raise ValueError("call compute() before minibatches()")
        names = ("tokens",) + self._PER_TOKEN + ("scores", "lengths", "hit_max")
        views = {name: getattr(self, name) for name in names}
        for idx in minibatches(self.size, minibatch_size, seed):
            batch = gather(views, idx, lengths=views["lengths"])
            batch["index"] = idx
            if to_torch:
                import torch

                batch = {k: torch.from_numpy(v) for k, v in batch.items()}
            yield batch


def per_token_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef, *, truncated=None, truncation_penalty=0.0,
                      reward_clip=None):
    """assemble_rewards under the name and arguments of stages/ppo.py's torch definition."""
    return assemble_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef, hit_max=truncated,
                            no_eos_penalty=truncation_penalty, reward_clip=reward_clip)
