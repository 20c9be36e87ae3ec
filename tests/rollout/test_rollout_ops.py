"""Property tests: every rollout operation against the numpy reference."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minirlhf import rollout

from . import reference

# The sanitizer run (.ci/sanitize.sh) lowers this to stay within its time budget.
EXAMPLES = int(os.environ.get("MINIRLHF_HYPOTHESIS_EXAMPLES", "60"))
props = settings(max_examples=EXAMPLES, deadline=None)

unit = st.floats(0.0, 1.0)


@st.composite
def batches(draw, max_b=9, max_t=40):
    """(rng, lengths, T): B sequences of random true lengths in [1, T]; sizes 1 and odd included."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng, lengths, T


def padded(rng, lengths, T, scale=1.0, pad=np.nan):
    """(B, T) float32 with random valid tokens and `pad` (NaN by default) beyond each length."""
    x = (rng.standard_normal((len(lengths), T)) * scale).astype(np.float32)
    x[np.arange(T)[None, :] >= lengths[:, None]] = pad
    return x


def close(actual, expected, tol=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * (1 + np.abs(expected).max()))


# ---------------------------------------------------------------- rewards

@props
@given(batches(), st.floats(0.0, 2.0), st.floats(-3.0, 0.0), st.none() | st.floats(0.05, 5.0))
def test_rewards_match_reference(batch, kl_coef, penalty, clip):
    rng, lengths, T = batch
    old, ref = padded(rng, lengths, T), padded(rng, lengths, T)
    scores = (rng.standard_normal(len(lengths)) * 3).astype(np.float32)
    hit = rng.random(len(lengths)) < 0.5
    got = rollout.assemble_rewards(old, ref, scores, lengths, kl_coef, no_eos_penalty=penalty,
                                   hit_max=hit, reward_clip=clip)
    assert got.dtype == np.float32 and got.shape == old.shape
    close(got, reference.rewards(old, ref, scores, lengths, kl_coef, penalty, hit, clip))


def test_rewards_without_hit_max_or_clip():
    old = np.array([[-1.0, -2.0, 9.0]], np.float32)
    ref = np.array([[-1.5, -1.0, 9.0]], np.float32)
    got = rollout.assemble_rewards(old, ref, np.array([4.0], np.float32), np.array([2]), 0.5)
    np.testing.assert_array_equal(got, [[-0.25, 0.5 + 4.0, 0.0]])


# ---------------------------------------------------------------- GAE

def test_gae_hand_worked():
    # Sequence 0, three tokens, gamma = 0.9, lam = 0.5 (gamma * lam = 0.45):
    #   t=2: delta = 1 + 0.9*0    - 0.5  =  0.5     A = 0.5                   R = 0.5 + 0.5  = 1.0
    #   t=1: delta = 0 + 0.9*0.5  - 0.25 =  0.2     A = 0.2 + 0.45*0.5   = 0.425    R = 0.675
    #   t=0: delta = 0 + 0.9*0.25 - 0.5  = -0.275   A = -0.275 + 0.45*0.425 = -0.08375   R = 0.41625
    # Sequence 1, one token: delta = 2 - 1 = 1, A = 1, R = 2.  Padding (99) is ignored; outputs are 0 there.
    rewards = np.array([[0.0, 0.0, 1.0, 99.0], [2.0, 99.0, 99.0, 99.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.5, 99.0], [1.0, 99.0, 99.0, 99.0]], np.float32)
    adv, ret = rollout.gae(rewards, values, np.array([3, 1]), 0.9, 0.5)
    np.testing.assert_allclose(adv, [[-0.08375, 0.425, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.41625, 0.675, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]], atol=1e-6)


@props
@given(batches(), unit, unit)
def test_gae_matches_reference(batch, gamma, lam):
    rng, lengths, T = batch
    r, v = padded(rng, lengths, T), padded(rng, lengths, T)
    adv, ret = rollout.gae(r, v, lengths, gamma, lam)
    ref_adv, ref_ret = reference.gae(r, v, lengths, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)


@props
@given(batches(), unit)
def test_gae_lambda_one_is_discounted_return_to_go(batch, gamma):
    # With lam = 1 the advantage telescopes to sum_k gamma^k r_{t+k} - V_t.
    rng, lengths, T = batch
    r, v = padded(rng, lengths, T), padded(rng, lengths, T)
    adv, ret = rollout.gae(r, v, lengths, gamma, 1.0)
    for b, n in enumerate(lengths):
        to_go = [sum(gamma**k * float(r[b, t + k]) for k in range(n - t)) for t in range(n)]
        close(ret[b, :n], to_go)


@props
@given(batches(), unit, unit)
def test_gae_ignores_padding_and_other_sequences(batch, gamma, lam):
    rng, lengths, T = batch
    r, v = padded(rng, lengths, T, pad=np.nan), padded(rng, lengths, T, pad=np.inf)
    adv, ret = rollout.gae(r, v, lengths, gamma, lam)
    invalid = np.arange(T)[None, :] >= lengths[:, None]
    assert np.all(adv[invalid] == 0) and np.all(ret[invalid] == 0)
    # Each row alone gives the same numbers as in the batch.
    for b in range(len(lengths)):
        a1, r1 = rollout.gae(r[b:b + 1], v[b:b + 1], lengths[b:b + 1], gamma, lam)
        np.testing.assert_array_equal(a1[0], adv[b])
        np.testing.assert_array_equal(r1[0], ret[b])


@props
@given(batches(), unit, unit)
def test_gae_outputs_may_alias_inputs(batch, gamma, lam):
    rng, lengths, T = batch
    r, v = padded(rng, lengths, T), padded(rng, lengths, T)
    adv, ret = rollout.gae(r, v, lengths, gamma, lam)
    r2, v2 = r.copy(), v.copy()
    a2, ret2 = rollout.gae(r2, v2, lengths, gamma, lam, out_advantages=r2, out_returns=v2)
    assert a2 is r2 and ret2 is v2
    np.testing.assert_array_equal(r2, adv)
    np.testing.assert_array_equal(v2, ret)


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(0)
    B, T = 301, 257  # big enough for several threads, odd on purpose
    lengths = rng.integers(1, T + 1, B)
    r, v = padded(rng, lengths, T), padded(rng, lengths, T)
    before = rollout.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            rollout.set_num_threads(threads)
            adv, ret = rollout.gae(r, v, lengths, 0.99, 0.95)
            runs.append((adv, ret, rollout.whiten(adv, lengths)))
    finally:
        rollout.set_num_threads(before)
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- whitening

@props
@given(batches().filter(lambda b: b[1].sum() >= 2), st.booleans(), st.floats(-50, 50), st.floats(0.01, 100))
def test_whiten_matches_reference(batch, shift_mean, loc, scale):
    rng, lengths, T = batch
    x = padded(rng, lengths, T, scale=scale) + np.float32(loc)
    got = rollout.whiten(x, lengths, shift_mean)
    expected = reference.whiten(x, lengths, shift_mean)
    close(got, expected, tol=1e-4)
    invalid = np.arange(T)[None, :] >= lengths[:, None]
    assert np.all(got[invalid] == 0)
    mean, var = rollout.masked_mean_var(x, lengths)
    valid = np.concatenate([x[b, :n] for b, n in enumerate(lengths)]).astype(np.float64)
    assert mean == pytest.approx(valid.mean(), rel=1e-9, abs=1e-9)
    assert var == pytest.approx(valid.var(ddof=1), rel=1e-9, abs=1e-9)


def test_whiten_in_place_and_constant_input():
    x = np.array([[1.0, 2.0, 3.0, 7.0], [4.0, 5.0, 0.0, 0.0]], np.float32)
    lengths = np.array([3, 2])
    expected = rollout.whiten(x, lengths)
    assert rollout.whiten(x, lengths, out=x) is x
    np.testing.assert_array_equal(x, expected)
    flat = rollout.whiten(np.full((2, 3), 5.0, np.float32), np.array([3, 3]))
    np.testing.assert_array_equal(flat, 0.0)  # zero variance: no division by zero


# ---------------------------------------------------------------- minibatches and gather

@props
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 2**63 - 1))
def test_minibatches_are_the_seeded_permutation(n, size, seed):
    parts = rollout.minibatches(n, size, seed)
    assert all(p.dtype == np.int64 for p in parts)
    assert [len(p) for p in parts[:-1]] == [size] * (len(parts) - 1) and 1 <= len(parts[-1]) <= size
    np.testing.assert_array_equal(np.concatenate(parts), reference.splitmix64_permutation(n, seed))


def test_minibatches_differ_by_seed_and_are_uniform():
    assert not np.array_equal(rollout.minibatches(50, 50, 1)[0], rollout.minibatches(50, 50, 2)[0])
    # Where does element 0 land in a permutation of 4?  Uniform over 4000 seeds (chi-square, 3 dof).
    counts = np.bincount([int(np.flatnonzero(rollout.minibatches(4, 4, s)[0] == 0)[0]) for s in range(4000)],
                         minlength=4)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 16.3  # p = 0.001


@props
@given(batches(), st.data())
def test_gather_matches_numpy_indexing(batch, data):
    rng, lengths, T = batch
    B = len(lengths)
    idx = np.array(data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=2 * B)), np.int64)
    arrays = {"x": padded(rng, lengths, T, pad=0.0), "tokens": rng.integers(0, 99, (B, T)),
              "lengths": lengths, "feat": rng.standard_normal((B, T, 3))}
    got = rollout.gather(arrays, idx)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k][idx])
        assert got[k].flags.c_contiguous
    trimmed = rollout.gather(arrays, idx, lengths=lengths)
    width = lengths[idx].max()
    for k in arrays:
        want = arrays[k][idx] if arrays[k].ndim == 1 else arrays[k][idx][:, :width]
        np.testing.assert_array_equal(trimmed[k], want)
    as_list = rollout.gather([arrays["x"], arrays["lengths"]], idx)
    np.testing.assert_array_equal(as_list[1], lengths[idx])
    np.testing.assert_array_equal(rollout.gather(arrays["x"], idx), arrays["x"][idx])


# ---------------------------------------------------------------- packing

@props
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(0, 30), st.data())
def test_pack_is_first_fit_decreasing(lens, extra, data):
    lengths = np.array(lens, np.int64)
    budget = max(lens) + extra
    p = rollout.pack(lengths, budget)
    row, offset, n_rows = reference.first_fit_decreasing(lengths, budget)
    np.testing.assert_array_equal(p.row_of_seq, row)
    np.testing.assert_array_equal(p.offset_of_seq, offset)
    assert p.position_ids.shape == p.segment_ids.shape == (n_rows, budget)
    expected_seg = np.full((n_rows, budget), -1)
    expected_pos = np.zeros((n_rows, budget), np.int64)
    for b, n in enumerate(lens):
        assert expected_seg[row[b], offset[b]:offset[b] + n].max() == -1  # no overlap
        expected_seg[row[b], offset[b]:offset[b] + n] = b
        expected_pos[row[b], offset[b]:offset[b] + n] = np.arange(n)
    np.testing.assert_array_equal(p.segment_ids, expected_seg)
    np.testing.assert_array_equal(p.position_ids, expected_pos)

    # Round trip of per-token data through the packed layout.
    T = max(lens) + data.draw(st.integers(0, 3))
    x = np.random.default_rng(len(lens)).standard_normal((len(lens), T, 2)).astype(np.float32)
    packed = rollout.pack_array(x, lengths, p)
    assert packed.shape == (n_rows, budget, 2)
    assert np.all(packed[p.segment_ids == -1] == 0)
    back = rollout.unpack_array(packed, lengths, p, T)
    valid = np.arange(T)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(back[valid], x[valid])
    assert np.all(back[~valid] == 0)
