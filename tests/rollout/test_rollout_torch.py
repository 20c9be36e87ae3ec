"""The buffer against the torch bookkeeping a PPO stage would otherwise use, and torch in/out."""
import numpy as np
import pytest

from minirlhf import rollout

torch = pytest.importorskip("torch")


def torch_bookkeeping(old, ref, values, scores, lengths, kl_coef, gamma, lam):
    """Rewards, GAE, returns and whitened advantages the way TRL's PPO trainer writes them:
    masked tensors and a per-timestep loop over the batch."""
    B, T = old.shape
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = -kl_coef * (old - ref) * mask
    rewards[torch.arange(B), lengths - 1] += scores
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
    whitened = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return rewards, advantages, returns, whitened


@pytest.mark.parametrize("seed,B,T", [(0, 2, 1), (4, 1, 9), (1, 7, 33), (2, 64, 128), (3, 257, 300)])
def test_same_numbers_as_the_torch_loop(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # at least two valid tokens to whiten
    old = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    values = torch.randn(B, T, generator=g)
    scores = torch.randn(B, generator=g) * 2
    kl_coef, gamma, lam = 0.05, 0.99, 0.95
    want_r, want_adv, want_ret, want_white = torch_bookkeeping(old, ref, values, scores, lengths, kl_coef, gamma, lam)

    rewards = rollout.assemble_rewards(old, ref, scores, lengths, kl_coef)
    adv, ret = rollout.gae(rewards, values, lengths, gamma, lam)
    white = rollout.whiten(adv, lengths)
    assert all(isinstance(x, torch.Tensor) for x in (rewards, adv, ret, white))
    # Same float32 operations in the same order: identical, not just close.
    torch.testing.assert_close(rewards, want_r, rtol=0, atol=0)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)
    # Whitening sums in double here, in float32 there.
    torch.testing.assert_close(white, want_white, rtol=0, atol=1e-6)


def test_torch_tensors_are_shared_not_copied():
    lengths = torch.tensor([3, 1])
    rewards = torch.randn(2, 4)
    values = torch.randn(2, 4, requires_grad=True)  # detached on the way in
    adv, ret = torch.empty(2, 4), torch.empty(2, 4)
    got = rollout.gae(rewards, values, lengths, 0.9, 0.9, out_advantages=adv, out_returns=ret)
    assert got[0] is adv and got[1] is ret
    assert adv[0, 0] != 0 and adv[1, 1:].eq(0).all()
    assert isinstance(rollout.whiten(adv, lengths), torch.Tensor)
    # Inputs cross without a copy: writing the advantages over the rewards tensor is seen by torch.
    expected = adv.clone()
    rollout.gae(rewards, values, lengths, 0.9, 0.9, out_advantages=rewards)
    assert torch.equal(rewards, expected)
    # Non-contiguous inputs are copied once; outputs must be contiguous.
    rollout.gae(rewards.t().contiguous().t(), values, lengths, 0.9, 0.9)
    with pytest.raises(ValueError, match="out_advantages must be C-contiguous"):
        rollout.gae(rewards, values, lengths, 0.9, 0.9, out_advantages=torch.empty(4, 2).t())
    with pytest.raises(ValueError, match=r"rewards must have dtype float32, got float64"):
        rollout.gae(rewards.double(), values, lengths, 0.9, 0.9)
    with pytest.raises(ValueError, match=r"rewards has dtype torch.bfloat16"):
        rollout.gae(rewards.bfloat16(), values, lengths, 0.9, 0.9)


def test_buffer_minibatches_as_torch():
    buf = rollout.RolloutBuffer(capacity=6, max_len=5)
    buf.add(tokens=np.arange(30).reshape(6, 5), old_logprobs=np.zeros((6, 5), np.float32),
            ref_logprobs=np.zeros((6, 5), np.float32), values=np.ones((6, 5), np.float32),
            scores=np.arange(6, dtype=np.float32), lengths=np.array([5, 4, 3, 2, 1, 2]))
    buf.compute(kl_coef=0.1, gamma=1.0, lam=1.0)
    seen = []
    for mb in buf.minibatches(4, seed=3, to_torch=True):
        assert isinstance(mb["advantages"], torch.Tensor) and mb["advantages"].dtype == torch.float32
        assert mb["tokens"].shape == (len(mb["index"]), int(mb["lengths"].max()))
        seen += mb["index"].tolist()
    assert sorted(seen) == list(range(6))
