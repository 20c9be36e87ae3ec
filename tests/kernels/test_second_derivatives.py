"""Every op can be differentiated once; a backward that builds a graph (create_graph=True,
for second derivatives) is refused with a message naming the op, instead of failing deep
inside the row kernels or (linear_ppo_loss) returning a gradient cut off from the graph."""

import pytest
import torch

from kernels import linear_ppo_loss, linear_token_logprobs, ppo_loss, token_logprobs

Y = torch.tensor([[0, 3, 1], [4, 2, -100]])
OLD = torch.full((2, 3), -1.5)
ADV = torch.tensor([[1.0, -0.5, 2.0], [-1.0, 0.3, 1.0]])


def _logits():
    return torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)


def _linear():
    return (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 4, dtype=torch.float64, requires_grad=True))


CASES = {
    "token_logprobs": lambda: (lambda x: (token_logprobs(x, Y, return_entropy=True)[1].sum(), (x,)))(_logits()),
    "ppo_loss": lambda: (lambda x: (ppo_loss(x, Y, OLD, ADV, ref_logprobs=OLD, kl_coef=0.1)[0], (x,)))(_logits()),
    "linear_token_logprobs": lambda: (lambda h, w: (linear_token_logprobs(h, w, Y).sum(), (h, w)))(*_linear()),
    "linear_ppo_loss": lambda: (lambda h, w: (linear_ppo_loss(h, w, Y, OLD, ADV)[0], (h, w)))(*_linear()),
}


@pytest.mark.parametrize("op", CASES)
def test_create_graph_is_refused(op):
    loss, inputs = CASES[op]()
    with pytest.raises(RuntimeError, match=f"^{op}: second derivatives are not supported"):
        torch.autograd.grad(loss, inputs, create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("op", CASES)
def test_backward_create_graph_is_refused(op):
    loss, _ = CASES[op]()
    with pytest.raises(RuntimeError, match=f"^{op}: second derivatives are not supported"):
        loss.backward(create_graph=True)
