"""One AdamW over policy and critic (one backward, one step, two clipped norms) is two AdamWs."""
import pytest
import torch

from minirlhf import optim
from minirlhf.checkpoint import NonFiniteError


def _pair(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)), torch.nn.Linear(4, 1)


def test_joint_step_equals_two_separate_steps():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    a1, b1 = _pair(0)
    a2, b2 = _pair(0)
    opt_a, opt_b = optim.make_optimizer(a1, 1e-2, 0.1), optim.make_optimizer(b1, 3e-2, 0.1)
    joint = optim.make_optimizer(a2, 1e-2, 0.1, also=((b2, 3e-2),))
    for _ in range(5):
        na = optim.step(opt_a, a1, (a1(x) ** 2).mean() * 50, 0.5)
        nb = optim.step(opt_b, b1, (b1(x) - 1).abs().mean(), 0.5)
        n = optim.step(joint, [a2, b2], {"pg_loss": (a2(x) ** 2).mean() * 50, "vf_loss": (b2(x) - 1).abs().mean()}, 0.5)
        assert n == pytest.approx([na, nb], rel=1e-6)
    for p, q in zip([*a1.parameters(), *b1.parameters()], [*a2.parameters(), *b2.parameters()]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_a_non_finite_loss_is_named_and_nothing_changes():
    a, b = _pair(1)
    joint = optim.make_optimizer(a, 1e-2, 0.0, also=((b, 1e-2),))
    before = [p.clone() for p in [*a.parameters(), *b.parameters()]]
    x = torch.randn(2, 4)
    with pytest.raises(NonFiniteError, match="vf_loss is nan"):
        optim.step(joint, [a, b], {"pg_loss": a(x).mean(), "vf_loss": b(x).mean() * float("nan")}, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(before, [*a.parameters(), *b.parameters()]))
