"""Bad input is a ValueError naming the argument (and the row), never a crash."""
import numpy as np
import pytest

from minirlhf import _rollout, rollout

B, T = 4, 6
LENGTHS = np.array([6, 2, 3, 1], np.int64)


def f32(*shape, fill=0.5):
    return np.full(shape, fill, np.float32)


def with_item(x, index, value):
    x = x.copy()
    x[index] = value
    return x


def rewards_args(**change):
    args = dict(old_logprobs=f32(B, T, fill=-1.0), ref_logprobs=f32(B, T, fill=-1.5),
                scores=f32(B), lengths=LENGTHS.copy(), kl_coef=0.1)
    args.update(change)
    return args


def call_rewards(**change):
    a = rewards_args(**change)
    kw = {k: a.pop(k) for k in list(a) if k not in ("old_logprobs", "ref_logprobs", "scores", "lengths", "kl_coef")}
    return rollout.assemble_rewards(a["old_logprobs"], a["ref_logprobs"], a["scores"], a["lengths"],
                                    a["kl_coef"], **kw)


REWARD_CASES = {
    "dtype": (dict(old_logprobs=np.zeros((B, T))), r"old_logprobs must have dtype float32, got float64"),
    "rank": (dict(old_logprobs=f32(B * T)), r"old_logprobs must have 2 dimensions"),
    "shape": (dict(ref_logprobs=f32(B, T + 1)), r"ref_logprobs has shape \(4, 7\), expected \(4, 6\)"),
    "rows": (dict(ref_logprobs=f32(B + 1, T)), r"ref_logprobs has shape \(5, 6\)"),
    "scores shape": (dict(scores=f32(B + 1)), r"scores has shape \(5,\), expected \(4,\)"),
    "scores dtype": (dict(scores=np.zeros(B)), r"scores must have dtype float32"),
    "lengths dtype": (dict(lengths=LENGTHS.astype(np.int32)), r"lengths must have dtype int64, got int32"),
    "lengths rank": (dict(lengths=LENGTHS[None]), r"lengths must have 1 dimension"),
    "lengths count": (dict(lengths=LENGTHS[:3]), r"old_logprobs has shape \(4, 6\), expected \(3, 6\)"),
    "length > T": (dict(lengths=with_item(LENGTHS, 2, 70)), r"lengths\[2\]=70 exceeds T=6"),
    "length 0": (dict(lengths=with_item(LENGTHS, 1, 0)), r"lengths\[1\]=0 must be >= 1"),
    "length < 0": (dict(lengths=with_item(LENGTHS, 3, -5)), r"lengths\[3\]=-5 must be >= 1"),
    "old nan": (dict(old_logprobs=with_item(f32(B, T), (2, 1), np.nan)), r"old_logprobs\[2, 1\]=nan is not finite"),
    "ref -inf": (dict(ref_logprobs=with_item(f32(B, T), (1, 1), -np.inf)), r"ref_logprobs\[1, 1\]=-inf is not finite"),
    "score inf": (dict(scores=with_item(f32(B), 3, np.inf)), r"scores\[3\]=inf is not finite"),
    "kl negative": (dict(kl_coef=-0.1), r"kl_coef=-0.1 must be finite and >= 0"),
    "kl nan": (dict(kl_coef=float("nan")), r"kl_coef=nan"),
    "kl not a number": (dict(kl_coef="0.1"), r"kl_coef must be a number"),
    "penalty positive": (dict(no_eos_penalty=1.0), r"no_eos_penalty=1 must be finite and <= 0"),
    "clip zero": (dict(reward_clip=0.0), r"reward_clip=0.0 must be > 0"),
    "clip nan": (dict(reward_clip=float("nan")), r"reward_clip=nan must be > 0"),
    "hit_max dtype": (dict(hit_max=np.zeros(B, np.int64)), r"hit_max must have dtype bool"),
    "hit_max shape": (dict(hit_max=np.zeros(B + 2, bool)), r"hit_max has shape \(6,\)"),
    "empty batch": (dict(old_logprobs=f32(0, T), ref_logprobs=f32(0, T), scores=f32(0),
                         lengths=np.zeros(0, np.int64)), r"empty batch: B=0"),
    "empty rows": (dict(old_logprobs=f32(B, 0), ref_logprobs=f32(B, 0)), r"empty batch: T=0"),
    "list": (dict(old_logprobs=[[0.0] * T] * B), r"old_logprobs must be a numpy array or a torch tensor, got list"),
    "out dtype": (dict(out=np.zeros((B, T))), r"out must have dtype float32"),
    "out shape": (dict(out=f32(B, T - 1)), r"out has shape \(4, 5\)"),
    "out strided": (dict(out=f32(B, 2 * T)[:, ::2]), r"out must be C-contiguous"),
}


@pytest.mark.parametrize("change,message", REWARD_CASES.values(), ids=REWARD_CASES.keys())
def test_assemble_rewards_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        call_rewards(**change)


def test_read_only_and_overlapping_outputs():
    out = f32(B, T)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        call_rewards(out=out)
    big = f32(B + 1, T)
    with pytest.raises(ValueError, match="out partially overlaps old_logprobs"):
        call_rewards(old_logprobs=big[:B], out=big[1:])
    with pytest.raises(ValueError, match="out_advantages shares memory with out_returns"):
        x = f32(B, T)
        rollout.gae(f32(B, T), f32(B, T), LENGTHS, 0.9, 0.9, out_advantages=x, out_returns=x)


GAE_CASES = {
    "gamma > 1": (dict(gamma=1.5), r"gamma=1.5 is outside \[0, 1\]"),
    "gamma < 0": (dict(gamma=-0.1), r"gamma=-0.1 is outside \[0, 1\]"),
    "gamma nan": (dict(gamma=float("nan")), r"gamma=nan is outside \[0, 1\]"),
    "lam > 1": (dict(lam=2.0), r"lam=2 is outside \[0, 1\]"),
    "rewards nan": (dict(rewards=with_item(f32(B, T), (0, 5), np.nan)), r"rewards\[0, 5\]=nan is not finite"),
    "values inf": (dict(values=with_item(f32(B, T), (3, 0), np.inf)), r"values\[3, 0\]=inf is not finite"),
    "values shape": (dict(values=f32(B, T + 2)), r"values has shape \(4, 8\), expected \(4, 6\)"),
    "values dtype": (dict(values=np.zeros((B, T), np.float16)), r"values must have dtype float32, got float16"),
    "length > T": (dict(lengths=with_item(LENGTHS, 0, 7)), r"lengths\[0\]=7 exceeds T=6"),
    "out dtype": (dict(out_returns=np.zeros((B, T))), r"out_returns must have dtype float32"),
    "overflow": (dict(rewards=f32(B, T, fill=3e38), values=f32(B, T, fill=-3e38)),
                 r"overflow float32 in row 0"),
}


@pytest.mark.parametrize("change,message", GAE_CASES.values(), ids=GAE_CASES.keys())
def test_gae_rejects(change, message):
    args = dict(rewards=f32(B, T), values=f32(B, T), lengths=LENGTHS.copy(), gamma=0.99, lam=0.95)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rollout.gae(**args)


def test_nan_in_padding_is_fine():
    x = with_item(f32(B, T), (1, 4), np.nan)  # lengths[1] = 2: column 4 is padding
    rollout.gae(x, x, LENGTHS, 0.9, 0.9)
    rollout.whiten(x, LENGTHS)


def test_whiten_rejects():
    with pytest.raises(ValueError, match=r"whitening needs at least 2 valid tokens, got 1"):
        rollout.whiten(f32(1, 3), np.array([1]))
    with pytest.raises(ValueError, match=r"x\[2, 2\]=-inf is not finite"):
        rollout.whiten(with_item(f32(B, T), (2, 2), -np.inf), LENGTHS)
    with pytest.raises(ValueError, match=r"lengths\[1\]=9 exceeds T=6"):
        rollout.whiten(f32(B, T), with_item(LENGTHS, 1, 9))
    with pytest.raises(ValueError, match=r"x must have 2 dimensions"):
        rollout.whiten(f32(B, T, 1), LENGTHS)


@pytest.mark.parametrize("args,message", [
    ((0, 4, 0), r"n=0 must be >= 1"),
    ((8, 0, 0), r"minibatch_size=0 must be >= 1"),
    ((8, 4, -1), r"seed=-1 must be in \[0, 9223372036854775808\)"),
    ((8, 4, 2**64), r"seed=18446744073709551616 must be in"),
    ((8.5, 4, 0), r"n must be an integer"),
    ((8, 4, 1.0), r"seed must be an integer"),
])
def test_minibatches_reject(args, message):
    with pytest.raises(ValueError, match=message):
        rollout.minibatches(*args)


def test_low_level_binding_rejects_negative_seed():
    with pytest.raises(ValueError, match=r"seed=-1 must be >= 0"):
        _rollout.permutation(5, -1)


def test_gather_rejects():
    x = f32(B, T)
    with pytest.raises(ValueError, match=r"idx\[1\]=4 is outside \[0, 4\)"):
        rollout.gather(x, np.array([0, 4]))
    with pytest.raises(ValueError, match=r"idx\[0\]=-1 is outside \[0, 4\)"):
        rollout.gather({"x": x}, np.array([-1, 2]), lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"idx must be a \(n,\) int64 array, got float64"):
        rollout.gather(x, np.array([0.0]))
    with pytest.raises(ValueError, match=r"idx is empty"):
        rollout.gather(x, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"arrays\['y'\] has 3 rows, the first array has 4"):
        rollout.gather({"x": x, "y": f32(3, T)}, np.array([0]))
    with pytest.raises(ValueError, match=r"arrays\[1\] has 2 columns, the longest response has 6"):
        rollout.gather([x, f32(B, 2)], np.array([0]), lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"arrays is empty"):
        rollout.gather({}, np.array([0]))


def test_pack_rejects():
    with pytest.raises(ValueError, match=r"lengths\[2\]=9 exceeds budget=8"):
        rollout.pack(np.array([1, 2, 9]), 8)
    with pytest.raises(ValueError, match=r"lengths\[0\]=0 must be >= 1"):
        rollout.pack(np.array([0, 2]), 8)
    with pytest.raises(ValueError, match=r"budget=0 must be >= 1"):
        rollout.pack(np.array([1]), 0)
    with pytest.raises(ValueError, match=r"empty batch"):
        rollout.pack(np.zeros(0, np.int64), 8)
    with pytest.raises(ValueError, match=r"lengths must have dtype int64"):
        rollout.pack(np.array([1.0]), 8)

    lengths = np.array([3, 2, 4])
    p = rollout.pack(lengths, 5)
    x = f32(3, 4)
    moved = p._replace(offset_of_seq=with_item(p.offset_of_seq, 0, 3))
    with pytest.raises(ValueError, match=r"offset_of_seq\[0\]=3 with lengths\[0\]=3 does not fit budget=5"):
        rollout.pack_array(x, lengths, moved)
    clash = p._replace(row_of_seq=np.zeros(3, np.int64), offset_of_seq=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"sequence 1 overlaps another one in row 0"):
        rollout.pack_array(x, lengths, clash)
    with pytest.raises(ValueError, match=r"row_of_seq\[2\]=7 is outside"):
        rollout.pack_array(x, lengths, p._replace(row_of_seq=with_item(p.row_of_seq, 2, 7)))
    with pytest.raises(ValueError, match=r"lengths\[2\]=4 exceeds T=3"):
        rollout.pack_array(f32(3, 3), lengths, p)
    with pytest.raises(ValueError, match=r"packing must be a Packing"):
        rollout.pack_array(x, lengths, tuple(p))


def test_buffer_rejects():
    buf = rollout.RolloutBuffer(capacity=4, max_len=8)
    chunk = dict(tokens=np.zeros((3, 5), np.int64), old_logprobs=f32(3, 5), ref_logprobs=f32(3, 5),
                 values=f32(3, 5), scores=f32(3), lengths=np.array([5, 1, 2]))
    with pytest.raises(ValueError, match=r"empty batch: nothing was added"):
        buf.compute(kl_coef=0.1, gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match=r"tokens must have dtype int64, got int32"):
        buf.add(**{**chunk, "tokens": np.zeros((3, 5), np.int32)})
    with pytest.raises(ValueError, match=r"values has shape \(3, 4\), tokens has shape \(3, 5\)"):
        buf.add(**{**chunk, "values": f32(3, 4)})
    with pytest.raises(ValueError, match=r"lengths\[2\]=6 exceeds T=5"):
        buf.add(**{**chunk, "lengths": np.array([5, 1, 6])})
    with pytest.raises(ValueError, match=r"tokens has 9 columns, more than the buffer's max_len=8"):
        buf.add(**{k: (np.zeros((3, 9), v.dtype) if v.ndim == 2 else v) for k, v in chunk.items()})
    buf.add(**chunk)
    with pytest.raises(ValueError, match=r"3 responses do not fit: 3 of capacity 4 are used"):
        buf.add(**chunk)
    with pytest.raises(ValueError, match=r"call compute\(\) before minibatches\(\)"):
        next(buf.minibatches(2, seed=0))
    with pytest.raises(ValueError, match=r"gamma=1.1 is outside"):
        buf.compute(kl_coef=0.1, gamma=1.1, lam=0.95)


def test_calls_do_not_leak():
    """No reference or Python object left behind by any binding, on success or on error."""
    import gc
    import sys
    import tracemalloc

    r, v, lengths = f32(B, T), f32(B, T), LENGTHS.copy()
    idx = np.array([1, 0])

    def every_call():
        rollout.assemble_rewards(r, v, f32(B), lengths, 0.1, hit_max=np.zeros(B, bool), reward_clip=1.0)
        rollout.gae(r, v, lengths, 0.9, 0.9)
        rollout.whiten(r, lengths)
        rollout.masked_mean_var(r, lengths)
        rollout.minibatches(B, 3, 0)
        rollout.gather({"r": r, "lengths": lengths}, idx, lengths=lengths)
        packing = rollout.pack(lengths, T)
        rollout.unpack_array(rollout.pack_array(r, lengths, packing), lengths, packing, T)
        # (Not a dtype error here: numpy's str(dtype), which its message uses, shows up as
        # growth under tracemalloc with PYTHONMALLOC=malloc.  The refcounts below cover it.)
        for bad in (dict(gamma=2.0), dict(lengths=with_item(lengths, 0, 99)), dict(values=f32(B, T + 1))):
            with pytest.raises(ValueError):
                rollout.gae(**{**dict(rewards=r, values=v, lengths=lengths, gamma=0.9, lam=0.9), **bad})

    def wrong_dtype():
        with pytest.raises(ValueError):
            rollout.gae(r.astype(np.float64), v, lengths, 0.9, 0.9)

    every_call()  # warm caches
    wrong_dtype()
    refs = [sys.getrefcount(x) for x in (r, v, lengths, idx)]
    for _ in range(50):
        wrong_dtype()
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
    assert [sys.getrefcount(x) for x in (r, v, lengths, idx)] == refs
    assert grown < 10_000, f"{grown} bytes still allocated after 200 rounds of every call"


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_first_bad_row_is_reported(in_place, threads):
    # Rows are worked on longest first and on several threads; the error still names the lowest row.
    rng = np.random.default_rng(1)
    n, width = 200, 400  # enough work for several threads
    lengths = rng.integers(1, width + 1, n)
    lengths[[17, 150]] = [30, width]
    r, v = f32(n, width), f32(n, width)
    r[150, 0] = np.inf
    v[17, 29] = np.nan
    before = rollout.get_num_threads()
    rollout.set_num_threads(threads)
    try:
        with pytest.raises(ValueError, match=r"values\[17, 29\]=nan is not finite"):
            if in_place:
                rollout.gae(r, v, lengths, 0.9, 0.9, out_advantages=r, out_returns=v)
            else:
                rollout.gae(r, v, lengths, 0.9, 0.9)
    finally:
        rollout.set_num_threads(before)
