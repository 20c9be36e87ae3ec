"""The InstructGPT ranking loss, by hand and against its pairwise decomposition."""
import math

import torch

from minirlhf.data import pairs_from_ranking
from minirlhf.stages.rm import ranking_loss


def _loss(rewards, comparisons):
    """comparisons: list of (first response index, pairs) over the flat rewards tensor."""
    better, worse, group = [], [], []
    for g, (base, pairs) in enumerate(comparisons):
        for b, w in pairs:
            better.append(base + b)
            worse.append(base + w)
            group.append(g)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return ranking_loss(torch.tensor(rewards), t(better), t(worse), t(group), len(comparisons))


def test_hand_worked_k3():
    # rewards of responses 0, 1, 2 = 1, 0, -1; the labeller ranked 0 > 2 > 1.
    # pairs (0,2), (0,1), (2,1): differences 2, 1, -1;
    # loss = (log(1+e^-2) + log(1+e^-1) + log(1+e^1)) / 3
    #      = (0.1269280110 + 0.3132616875 + 1.3132616875) / 3 = 0.5844837954
    loss = _loss([1.0, 0.0, -1.0], [(0, pairs_from_ranking([0, 2, 1]))])
    assert math.isclose(loss.item(), 0.5844837954, rel_tol=1e-6)


def test_k_way_loss_is_the_mean_of_its_pairwise_losses():
    torch.manual_seed(0)
    for k in range(2, 10):
        rewards = torch.randn(k).tolist()
        ranking = torch.randperm(k).tolist()
        pairs = pairs_from_ranking(ranking)
        assert len(pairs) == k * (k - 1) // 2
        k_way = _loss(rewards, [(0, pairs)])
        pairwise = [_loss([rewards[b], rewards[w]], [(0, [(0, 1)])]) for b, w in pairs]
        assert torch.allclose(k_way, torch.stack(pairwise).mean(), atol=1e-6)


def test_each_prompt_weighs_the_same_whatever_its_k():
    # a K=4 prompt (6 pairs) and a K=2 prompt (1 pair): the batch loss is the mean of the two prompt losses
    r4, r2 = [0.3, -0.2, 1.0, 0.1], [0.5, 0.9]
    both = _loss(r4 + r2, [(0, pairs_from_ranking([2, 0, 3, 1])), (4, [(0, 1)])])
    alone4 = _loss(r4, [(0, pairs_from_ranking([2, 0, 3, 1]))])
    alone2 = _loss(r2, [(0, [(0, 1)])])
    assert torch.allclose(both, (alone4 + alone2) / 2, atol=1e-6)


def test_gradient_pushes_better_up():
    r = torch.tensor([0.0, 0.0], requires_grad=True)
    ranking_loss(r, torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), 1).backward()
    assert r.grad[1] < 0 < r.grad[0]  # descending the loss raises the better response's reward
