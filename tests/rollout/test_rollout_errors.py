"""Bad input is a ValueError from the C++ library naming the argument (and the row), never a crash."""
import math

import numpy as np
import pytest
import torch

from minirlhf import rollout

B, T = 4, 6
LENGTHS = torch.tensor([6, 2, 3, 1])


def f32(*shape, fill=0.5):
    return torch.full(shape, fill, dtype=torch.float32)


def with_item(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def call_rewards(**change):
    args = dict(logprobs=f32(B, T, fill=-1.0), ref_logprobs=f32(B, T, fill=-1.5), scores=f32(B), lengths=LENGTHS,
                kl_coef=0.1)
    args.update(change)
    return rollout.per_token_rewards(**args)


REWARD_CASES = {
    "dtype": (dict(logprobs=torch.zeros(B, T, dtype=torch.float64)), r"logprobs must have dtype float32, got float64"),
    "bfloat16": (dict(logprobs=f32(B, T).bfloat16()),
                 r"logprobs must be an array of float32 \(a CPU torch tensor or numpy array\), got torch.bfloat16 Tensor "
                 r"on cpu"),
    "not on the CPU": (dict(ref_logprobs=torch.empty(B, T, device="meta")),
                       r"ref_logprobs must be an array of float32 .*, got torch.float32 Tensor on meta"),
    "list": (dict(logprobs=[[0.0] * T] * B), r"logprobs must be an array of float32 .*, got list"),
    "rank": (dict(logprobs=f32(B * T)), r"logprobs must have 2 dimensions, got shape \(24,\)"),
    "shape": (dict(ref_logprobs=f32(B, T + 1)), r"ref_logprobs has shape \(4, 7\), expected \(4, 6\)"),
    "rows": (dict(ref_logprobs=f32(B + 1, T)), r"ref_logprobs has shape \(5, 6\), expected \(4, 6\)"),
    "scores shape": (dict(scores=f32(B + 1)), r"scores has shape \(5,\), expected \(4,\)"),
    "scores dtype": (dict(scores=torch.zeros(B, dtype=torch.float64)), r"scores must have dtype float32"),
    "lengths dtype": (dict(lengths=LENGTHS.int()), r"lengths must have dtype int64, got int32"),
    "lengths rank": (dict(lengths=LENGTHS[None]), r"lengths must have 1 dimension, got shape \(1, 4\)"),
    "lengths count": (dict(lengths=LENGTHS[:3]), r"logprobs has shape \(4, 6\), expected \(3, 6\)"),
    "length > T": (dict(lengths=with_item(LENGTHS, 2, 70)), r"lengths\[2\]=70 exceeds T=6"),
    "length 0": (dict(lengths=with_item(LENGTHS, 1, 0)), r"lengths\[1\]=0 must be >= 1"),
    "length < 0": (dict(lengths=with_item(LENGTHS, 3, -5)), r"lengths\[3\]=-5 must be >= 1"),
    "logprobs nan": (dict(logprobs=with_item(f32(B, T), (2, 1), math.nan)), r"logprobs\[2, 1\]=nan is not finite"),
    "ref -inf": (dict(ref_logprobs=with_item(f32(B, T), (1, 1), -math.inf)), r"ref_logprobs\[1, 1\]=-inf is not finite"),
    "score inf": (dict(scores=with_item(f32(B), 3, math.inf)), r"scores\[3\]=inf is not finite"),
    "kl negative": (dict(kl_coef=-0.1), r"kl_coef=-0.1 must be finite and >= 0"),
    "kl nan": (dict(kl_coef=math.nan), r"kl_coef=nan must be finite"),
    "penalty nan": (dict(truncated=torch.zeros(B, dtype=torch.bool), truncation_penalty=math.nan),
                    r"truncation_penalty=nan must be finite"),
    "clip zero": (dict(reward_clip=0.0), r"reward_clip=0 must be finite and > 0 \(None turns clipping off\)"),
    "clip nan": (dict(reward_clip=math.nan), r"reward_clip=nan must be finite and > 0"),
    "truncated dtype": (dict(truncated=torch.zeros(B, dtype=torch.int64)), r"truncated must have dtype bool, got int64"),
    "truncated shape": (dict(truncated=torch.zeros(B + 2, dtype=torch.bool)), r"truncated has shape \(6,\)"),
    "empty batch": (dict(logprobs=f32(0, T), ref_logprobs=f32(0, T), scores=f32(0),
                         lengths=torch.zeros(0, dtype=torch.int64)), r"empty batch: B=0 sequences"),
    "empty rows": (dict(logprobs=f32(B, 0), ref_logprobs=f32(B, 0)), r"empty batch: T=0 tokens per row"),
    "numpy strided": (dict(logprobs=np.zeros((B, 2 * T), np.float32)[:, ::2]),
                      r"logprobs must be C-contiguous, aligned and in native byte order"),
    "numpy big-endian": (dict(logprobs=np.zeros((B, T), ">f4")),
                         r"logprobs must be C-contiguous, aligned and in native byte order"),
    "overflow": (dict(logprobs=f32(B, T, fill=3e38), ref_logprobs=f32(B, T, fill=-3e38)),
                 r"rewards overflow float32 in row 0"),
}


@pytest.mark.parametrize("change,message", REWARD_CASES.values(), ids=REWARD_CASES.keys())
def test_per_token_rewards_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        call_rewards(**change)


GAE_CASES = {
    "gamma > 1": (dict(gamma=1.5), r"gamma=1.5 is outside \[0, 1\]"),
    "gamma < 0": (dict(gamma=-0.1), r"gamma=-0.1 is outside \[0, 1\]"),
    "gamma nan": (dict(gamma=math.nan), r"gamma=nan is outside \[0, 1\]"),
    "lam > 1": (dict(lam=2.0), r"lam=2 is outside \[0, 1\]"),
    "rewards nan": (dict(rewards=with_item(f32(B, T), (0, 5), math.nan)), r"rewards\[0, 5\]=nan is not finite"),
    "values inf": (dict(values=with_item(f32(B, T), (3, 0), math.inf)), r"values\[3, 0\]=inf is not finite"),
    "values shape": (dict(values=f32(B, T + 2)), r"values has shape \(4, 8\), expected \(4, 6\)"),
    "values dtype": (dict(values=torch.zeros(B, T, dtype=torch.float16)), r"values must have dtype float32, got float16"),
    "length > T": (dict(lengths=with_item(LENGTHS, 0, 7)), r"lengths\[0\]=7 exceeds T=6"),
    "overflow": (dict(rewards=f32(B, T, fill=3e38), values=f32(B, T, fill=-3e38)),
                 r"advantages or returns overflow float32 in row 0"),
}


@pytest.mark.parametrize("change,message", GAE_CASES.values(), ids=GAE_CASES.keys())
def test_gae_rejects(change, message):
    args = dict(rewards=f32(B, T), values=f32(B, T), lengths=LENGTHS, gamma=0.99, lam=0.95)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rollout.gae(**args)


WHITEN_CASES = {
    "one token": (dict(x=f32(1, 3), lengths=torch.tensor([1])), r"whitening needs at least 2 valid tokens, got 1"),
    "x -inf": (dict(x=with_item(f32(B, T), (2, 2), -math.inf)), r"x\[2, 2\]=-inf is not finite"),
    "x nan, given statistics": (dict(x=with_item(f32(B, T), (3, 0), math.nan), mean=0.0, var=1.0),
                                r"x\[3, 0\]=nan is not finite"),
    "length > T": (dict(lengths=with_item(LENGTHS, 1, 9)), r"lengths\[1\]=9 exceeds T=6"),
    "rank": (dict(x=f32(B, T, 1)), r"x must have 2 dimensions, got shape \(4, 6, 1\)"),
    "mean alone": (dict(mean=0.0), r"mean and var go together .*, got only mean"),
    "var alone": (dict(var=1.0), r"mean and var go together .*, got only var"),
    "var negative": (dict(mean=0.0, var=-1.0), r"var=-1 must be finite and >= 0"),
    "mean nan": (dict(mean=math.nan, var=1.0), r"mean=nan must be finite"),
}


@pytest.mark.parametrize("change,message", WHITEN_CASES.values(), ids=WHITEN_CASES.keys())
def test_whiten_rejects(change, message):
    args = dict(x=f32(B, T), lengths=LENGTHS)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rollout.whiten(**args)


def test_moments_reject():
    with pytest.raises(ValueError, match=r"shift=inf must be finite"):
        rollout.masked_moments(f32(B, T), LENGTHS, math.inf)
    with pytest.raises(ValueError, match=r"x\[1, 1\]=nan is not finite"):
        rollout.masked_moments(with_item(f32(B, T), (1, 1), math.nan), LENGTHS)
    with pytest.raises(ValueError, match=r"whitening needs at least 2 valid tokens, got 1"):
        rollout.masked_mean_var(f32(1, 3), torch.tensor([1]))


@pytest.mark.parametrize("args,message", [
    ((0, 4, 0), r"n=0 must be >= 1"),
    ((8, 0, 0), r"minibatch_size=0 must be >= 1"),
    ((8, 4, -1), r"seed=-1 must be >= 0"),
])
def test_minibatches_reject(args, message):
    with pytest.raises(ValueError, match=message):
        rollout.minibatches(*args)


def test_scalars_of_the_wrong_type_are_type_errors():
    for call in (lambda: rollout.minibatches(8.5, 4, 0), lambda: rollout.minibatches(8, 4, 2**64),
                 lambda: call_rewards(kl_coef="0.1"), lambda: rollout.whiten(f32(B, T), LENGTHS, mean="0", var=1.0)):
        with pytest.raises(TypeError):
            call()
    with pytest.raises(ValueError, match=r"num_threads=0 must be >= 1"):
        rollout.set_num_threads(0)


def test_nan_in_padding_is_fine():
    x = with_item(f32(B, T), (1, 4), math.nan)  # lengths[1] = 2: column 4 is padding
    rollout.per_token_rewards(x, x, f32(B), LENGTHS, 0.1)
    rollout.gae(x, x, LENGTHS, 0.9, 0.9)
    rollout.whiten(x, LENGTHS)
    rollout.whiten(x, LENGTHS, mean=0.0, var=1.0)
    rollout.masked_moments(x, LENGTHS)


def test_calls_do_not_leak():
    """No reference or Python object left behind by any binding, on success or on error."""
    import gc
    import sys
    import tracemalloc

    r, v, lengths = f32(B, T), f32(B, T), LENGTHS.clone()

    def every_call():
        rollout.per_token_rewards(r, v, f32(B), lengths, 0.1, truncated=torch.zeros(B, dtype=torch.bool),
                                  reward_clip=1.0)
        rollout.gae(r, v, lengths, 0.9, 0.9)
        rollout.whiten(r, lengths)
        rollout.whiten(r, lengths, mean=0.5, var=2.0)
        rollout.masked_mean_var(r, lengths)
        rollout.minibatches(B, 3, 0)
        # (Not a wrong type here: the names in its message (numpy's str(dtype), a type's
        # __name__) fill caches of Python's for a while, which tracemalloc sees as growth.
        # The refcounts below cover them.)
        for bad in (dict(gamma=2.0), dict(lengths=with_item(lengths, 0, 99)), dict(values=f32(B, T + 1))):
            with pytest.raises(ValueError):
                rollout.gae(**{**dict(rewards=r, values=v, lengths=lengths, gamma=0.9, lam=0.9), **bad})

    def wrong_types():
        for rewards in (r.double(), [1.0], r.bfloat16()):
            with pytest.raises(ValueError):
                rollout.gae(rewards, v, lengths, 0.9, 0.9)

    every_call()  # warm caches
    wrong_types()
    refs = [sys.getrefcount(x) for x in (r, v, lengths)]
    for _ in range(50):
        wrong_types()
    tracemalloc.start()
    try:
        every_call()
        gc.collect()  # cyclic garbage (e.g. generator frames) is not a leak
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            every_call()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(x) for x in (r, v, lengths)] == refs
    assert grown < 10_000, f"{grown} bytes still allocated after 200 rounds of every call"


@pytest.mark.parametrize("threads", [1, 3])
def test_the_first_bad_row_is_reported(threads):
    # Rows are worked on longest first and on several threads; the error still names the lowest row.
    g = torch.Generator().manual_seed(1)
    n, width = 200, 400  # enough work for several threads
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    lengths[[17, 150]] = torch.tensor([30, width])
    r, v = f32(n, width), f32(n, width)
    r[150, 0] = math.inf
    v[17, 29] = math.nan
    before = rollout.get_num_threads()
    rollout.set_num_threads(threads)
    try:
        with pytest.raises(ValueError, match=r"values\[17, 29\]=nan is not finite"):
            rollout.gae(r, v, lengths, 0.9, 0.9)
        with pytest.raises(ValueError, match=r"logprobs\[150, 0\]=inf is not finite"):
            rollout.per_token_rewards(r, v.nan_to_num(), f32(n), lengths, 0.1)
    finally:
        rollout.set_num_threads(before)
