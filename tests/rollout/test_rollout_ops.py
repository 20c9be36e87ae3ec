"""The C++ path (minirlhf.rollout) against the torch definitions in minirlhf.stages.ppo, on
random batches, and against hand-worked examples."""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minirlhf import rollout
from minirlhf.stages import ppo

from . import reference

# The sanitizer run (.ci/sanitize.sh) lowers this to stay within its time budget.
EXAMPLES = int(os.environ.get("MINIRLHF_HYPOTHESIS_EXAMPLES", "60"))
props = settings(max_examples=EXAMPLES, deadline=None)

unit = st.floats(0.0, 1.0)


@st.composite
def batches(draw, max_b=9, max_t=40):
    """(generator, lengths, T): B sequences of random true lengths in [1, T]; sizes 1 and odd included."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), dtype=torch.int64)
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))), lengths, T


def padded(g, lengths, T, scale=1.0, loc=0.0, pad=math.nan):
    """(B, T) float32 with random valid tokens and `pad` (NaN by default) beyond each length."""
    x = torch.randn(len(lengths), T, generator=g) * scale + loc
    x[~ppo.response_mask(lengths, T)] = pad
    return x


def identical(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def whitening_close(actual, expected):
    """Equal to float32 rounding: torch rounds a float64 result once, C++ computes in float32."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * (1 + expected.abs().max().item()))


# ---------------------------------------------------------------- C++ = the torch definitions

@props
@given(batches(), st.floats(0.0, 2.0), st.floats(-3.0, 3.0), st.none() | st.floats(0.05, 5.0), st.booleans())
def test_per_token_rewards_equal_torch(batch, kl_coef, penalty, clip, any_truncated):
    g, lengths, T = batch
    logprobs, ref_logprobs = padded(g, lengths, T), padded(g, lengths, T)
    scores = torch.randn(len(lengths), generator=g) * 3
    truncated = torch.rand(len(lengths), generator=g) < 0.5 if any_truncated else None
    kw = dict(truncated=truncated, truncation_penalty=penalty, reward_clip=clip)
    # the same float32 operations in the same order: equal bit for bit
    identical(rollout.per_token_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef, **kw),
              ppo.per_token_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef, **kw))


@props
@given(batches(), unit, unit)
def test_gae_equals_torch(batch, gamma, lam):
    g, lengths, T = batch
    rewards, values = padded(g, lengths, T), padded(g, lengths, T)
    advantages, returns = rollout.gae(rewards, values, lengths, gamma, lam)
    want_advantages, want_returns = ppo.gae(rewards, values, lengths, gamma, lam)
    identical(advantages, want_advantages)
    identical(returns, want_returns)


@props
@given(batches().filter(lambda b: b[1].sum() >= 2), st.booleans(), st.floats(-50, 50), st.floats(0.01, 100))
def test_whiten_equals_torch(batch, shift_mean, loc, scale):
    g, lengths, T = batch
    x = padded(g, lengths, T, scale=scale, loc=loc)
    got = rollout.whiten(x, lengths, shift_mean)
    whitening_close(got, ppo.whiten(x, lengths, shift_mean))
    assert got[~ppo.response_mask(lengths, T)].eq(0).all()


@props
@given(batches(), st.booleans(), st.floats(-5, 5), st.floats(0.0, 10.0))
def test_whiten_with_given_statistics_equals_torch(batch, shift_mean, mean, var):
    g, lengths, T = batch
    x = padded(g, lengths, T, scale=2.0)
    whitening_close(rollout.whiten(x, lengths, shift_mean, mean=mean, var=var),
                    ppo.whiten(x, lengths, shift_mean, mean=mean, var=var))


@pytest.mark.parametrize("seed,B,T", [(0, 2, 1), (4, 1, 9), (1, 7, 33), (2, 64, 128), (3, 257, 300)])
def test_same_rollouts_same_advantages_on_both_paths(seed, B, T):
    """One PPO iteration's bookkeeping, --ppo.bookkeeping cpp against torch."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # at least two valid tokens to whiten
    logprobs, ref_logprobs = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    values, scores = torch.randn(B, T, generator=g), torch.randn(B, generator=g) * 2
    truncated = lengths == T
    outputs = []
    for path in (rollout, ppo):
        rewards = path.per_token_rewards(logprobs, ref_logprobs, scores, lengths, 0.05, truncated=truncated,
                                         truncation_penalty=-1.0, reward_clip=3.0)
        advantages, returns = path.gae(rewards, values, lengths, 0.99, 0.95)
        outputs.append((rewards, returns, path.whiten(advantages, lengths)))
    (rewards, returns, advantages), (want_rewards, want_returns, want_advantages) = outputs
    assert all(isinstance(x, torch.Tensor) for x in (rewards, returns, advantages))
    identical(rewards, want_rewards)
    identical(returns, want_returns)
    torch.testing.assert_close(advantages, want_advantages, rtol=0, atol=1e-6)


@props
@given(batches(), st.floats(-10, 10))
def test_masked_moments_are_float64_sums(batch, shift):
    g, lengths, T = batch
    x = padded(g, lengths, T, scale=3.0, loc=1.0)
    count, total, squares = rollout.masked_moments(x, lengths, shift)
    d = x[ppo.response_mask(lengths, T)].double() - shift
    assert count == int(lengths.sum())
    assert total == pytest.approx(d.sum().item(), rel=1e-12, abs=1e-9)
    assert squares == pytest.approx((d * d).sum().item(), rel=1e-12, abs=1e-9)


# ---------------------------------------------------------------- hand-worked examples

def test_per_token_rewards_by_hand():
    # KL_t = logprobs - ref_logprobs = [0.5, -1] on the two valid tokens; beta = 0.5:
    #   r = [-0.25, 0.5 + score 4] (+ the truncation penalty -1 when truncated); padding (9) ignored
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-1.0, -2.0, 9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, 9.0], [-1.5, -1.0, 9.0]])
    scores, lengths = torch.tensor([4.0, 4.0]), torch.tensor([2, 2])
    got = rollout.per_token_rewards(logprobs, ref_logprobs, scores, lengths, 0.5)
    identical(got, torch.tensor([[-0.25, 4.5, 0.0], [-0.25, 4.5, 0.0]]))
    # clipped to +-1.5: 0.5 + 1.5 = 2; the second response truncated: 2 - 1 = 1
    got = rollout.per_token_rewards(logprobs, ref_logprobs, scores, lengths, 0.5, truncated=torch.tensor([False, True]),
                                    truncation_penalty=-1.0, reward_clip=1.5)
    identical(got, torch.tensor([[-0.25, 2.0, 0.0], [-0.25, 1.0, 0.0]]))


def test_gae_by_hand():
    # Sequence 0, three tokens, gamma = 0.9, lam = 0.5 (gamma * lam = 0.45):
    #   t=2: delta = 1 + 0.9*0    - 0.5  =  0.5     A = 0.5                   R = 0.5 + 0.5  = 1.0
    #   t=1: delta = 0 + 0.9*0.5  - 0.25 =  0.2     A = 0.2 + 0.45*0.5   = 0.425    R = 0.675
    #   t=0: delta = 0 + 0.9*0.25 - 0.5  = -0.275   A = -0.275 + 0.45*0.425 = -0.08375   R = 0.41625
    # Sequence 1, one token: delta = 2 - 1 = 1, A = 1, R = 2.  Padding (99) is ignored; outputs are 0 there.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 99.0], [2.0, 99.0, 99.0, 99.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 99.0], [1.0, 99.0, 99.0, 99.0]])
    advantages, returns = rollout.gae(rewards, values, torch.tensor([3, 1]), 0.9, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[-0.08375, 0.425, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.41625, 0.675, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))


def test_whiten_by_hand():
    # valid tokens 0, 2, 4: mean 2, unbiased var (4 + 0 + 4) / 2 = 4, std 2 (the 1e-8 is below float32 here)
    x = torch.tensor([[0.0, 2.0, math.nan], [4.0, math.nan, math.nan]])
    lengths = torch.tensor([2, 1])
    identical(rollout.whiten(x, lengths), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    identical(rollout.whiten(x, lengths, shift_mean=False), torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))
    # given statistics (say, of a larger batch across ranks): mean 1, var 4 -> (x - 1) / 2
    identical(rollout.whiten(x, lengths, mean=1.0, var=4.0), torch.tensor([[-0.5, 0.5, 0.0], [1.5, 0.0, 0.0]]))
    # Σd and Σd² around shift 1: d = -1, 1, 3
    assert rollout.masked_moments(x, lengths, 1.0) == (3, 3.0, 11.0)
    flat = rollout.whiten(torch.full((2, 3), 5.0), torch.tensor([3, 3]))
    identical(flat, torch.zeros(2, 3))  # zero variance: no division by zero


@props
@given(batches(), unit)
def test_gae_lambda_one_is_discounted_return_to_go(batch, gamma):
    # With lam = 1 the advantage telescopes: returns_t = sum_k gamma^k r_{t+k}.
    g, lengths, T = batch
    rewards, values = padded(g, lengths, T), padded(g, lengths, T)
    _, returns = rollout.gae(rewards, values, lengths, gamma, 1.0)
    for b, n in enumerate(lengths.tolist()):
        to_go = [sum(gamma**k * rewards[b, t + k].item() for k in range(n - t)) for t in range(n)]
        np.testing.assert_allclose(returns[b, :n].numpy(), to_go, rtol=1e-5, atol=1e-5 * (1 + max(map(abs, to_go))))


@props
@given(batches(), unit, unit)
def test_each_sequence_alone_gives_its_numbers_in_the_batch(batch, gamma, lam):
    g, lengths, T = batch
    rewards, values = padded(g, lengths, T, pad=math.nan), padded(g, lengths, T, pad=math.inf)
    advantages, returns = rollout.gae(rewards, values, lengths, gamma, lam)
    for b in range(len(lengths)):
        alone = rollout.gae(rewards[b:b + 1], values[b:b + 1], lengths[b:b + 1], gamma, lam)
        identical(alone[0][0], advantages[b])
        identical(alone[1][0], returns[b])


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(0)
    B, T = 301, 257  # big enough for several threads, odd on purpose
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    logprobs, ref_logprobs, values = (padded(g, lengths, T) for _ in range(3))
    scores = torch.randn(B, generator=g)
    before = rollout.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            rollout.set_num_threads(threads)
            rewards = rollout.per_token_rewards(logprobs, ref_logprobs, scores, lengths, 0.1)
            advantages, returns = rollout.gae(rewards, values, lengths, 0.99, 0.95)
            runs.append((rewards, advantages, returns, rollout.whiten(advantages, lengths),
                         torch.tensor(rollout.masked_moments(advantages, lengths, 0.5)[1:])))
    finally:
        rollout.set_num_threads(before)
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            identical(x, y)


# ---------------------------------------------------------------- minibatches

@props
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 2**63 - 1))
def test_minibatches_are_the_seeded_permutation(n, size, seed):
    parts = rollout.minibatches(n, size, seed)
    assert all(p.dtype == torch.int64 for p in parts)
    assert [len(p) for p in parts[:-1]] == [size] * (len(parts) - 1) and 1 <= len(parts[-1]) <= size
    assert torch.cat(parts).tolist() == reference.splitmix64_permutation(n, seed)


def test_minibatches_differ_by_seed_and_are_uniform():
    assert not torch.equal(rollout.minibatches(50, 50, 1)[0], rollout.minibatches(50, 50, 2)[0])
    # Where does element 0 land in a permutation of 4?  Uniform over 4000 seeds (chi-square, 3 dof).
    counts = np.bincount([int((rollout.minibatches(4, 4, s)[0] == 0).nonzero()[0, 0]) for s in range(4000)],
                         minlength=4)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 16.3  # p = 0.001


# ---------------------------------------------------------------- tensors in and out

def test_tensors_cross_without_a_copy():
    rewards = torch.randn(2, 4, requires_grad=True)  # detached on the way in
    values = torch.randn(2, 4)
    lengths = torch.tensor([3, 1])
    assert rollout._array(values).ctypes.data == values.data_ptr()
    assert rollout._array(rewards).ctypes.data == rewards.data_ptr()
    advantages, returns = rollout.gae(rewards, values, lengths, 0.9, 0.9)
    assert advantages.dtype == torch.float32 and advantages.device.type == "cpu" and not advantages.requires_grad
    # a result owns its memory: it outlives everything that made it, and can be written
    del rewards, values
    advantages += 1
    assert advantages[1, 1:].eq(1).all()
    # numpy arrays are inputs too; a tensor that is not contiguous is made so first
    x = torch.randn(6, 3)
    identical(rollout.whiten(x.t(), lengths.new_tensor([6, 6, 1])),
              rollout.whiten(x.t().contiguous().numpy(), np.array([6, 6, 1])))
