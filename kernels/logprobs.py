"""token_logprobs: log-probability (and entropy) of given tokens, one read of the logits.

For a row of logits x (length V), temperature T and label y, with z = x / T:

    logp = z_y - log sum_j exp(z_j)          (the output; float32, float64 for float64 input)
    H    = -sum_j p_j log p_j,  p = softmax(z)   (the entropy, optional)

The forward saves each row's log-sum-exp (and H); the backward writes
dL/dx_j = [ g (1[j = y] - p_j) - h p_j (log p_j + H) ] / T for upstream gradients g
(of logp) and h (of H). Rows whose label equals `ignore_index` give logp = H = 0 and an
exactly-zero gradient.

The Triton kernels and the chunked torch path that compute this live in _rows.py (every
op shares them); this file is the op: its autograd.Function, its functional entry point
and `token_logprobs_reference`, the naive log_softmax -> gather the tests compare against.
"""

from __future__ import annotations

import torch

from . import _checks
from ._dispatch import backend_for
from ._rows import (
    IGNORE_INDEX,
    as_rows,
    compute_dtype,
    num_rows,
    torch_backward,
    torch_forward,
    triton_backward,
    triton_forward,
)

__all__ = ["token_logprobs", "token_logprobs_reference", "TokenLogprobsFunction", "IGNORE_INDEX"]


class TokenLogprobsFunction(torch.autograd.Function):
    """(x (N, V) or (B, T, V) rows, labels (N,)) -> logp (N,) [, entropy (N,)]; gradient for x only."""

    @staticmethod
    def forward(ctx, x, labels, inv_temp, ignore_index, with_entropy, backend):
        fwd = triton_forward if backend == "triton" else torch_forward
        logp, lse, ent = fwd(x, labels, inv_temp, ignore_index, with_entropy)
        ctx.save_for_backward(x, labels, lse, ent)
        ctx.cfg = (inv_temp, ignore_index, backend)
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @_checks.first_order_only("token_logprobs")
    def backward(ctx, g, g_ent=None):
        x, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, backend = ctx.cfg
        if g is None and g_ent is None:
            return (None,) * 6
        stat_dtype = lse.dtype
        g = torch.zeros_like(lse) if g is None else g.to(stat_dtype).contiguous()
        if g_ent is not None:
            g_ent = g_ent.to(stat_dtype).contiguous()
        out = torch.empty(num_rows(x), x.shape[-1], dtype=x.dtype, device=x.device)
        bwd = triton_backward if backend == "triton" else torch_backward
        bwd(x, labels, lse, ent, g, g_ent, inv_temp, ignore_index, out)
        return out.view(x.shape), None, None, None, None, None


def token_logprobs(logits, labels, temperature=1.0, return_entropy=False, *, ignore_index=IGNORE_INDEX):
    """Log-probability of each label under softmax(logits / temperature).

    logits: (..., V) float16/bfloat16/float32/float64, e.g. (N, V) or (B, T, V).
    labels: (...) integer, in [0, V) or == ignore_index.
    Returns logp (...) float32 (float64 for float64 logits), and with return_entropy=True
    also the entropy (...) of each row's distribution. Rows with label == ignore_index
    give 0 and receive a zero gradient. Differentiable w.r.t. logits, once: a backward
    with create_graph=True (second derivatives) raises RuntimeError.
    Raises ValueError for a bad argument, naming it.
    """
    op = "token_logprobs"
    _checks.check_logits(op, logits)
    lead, V = logits.shape[:-1], logits.shape[-1]
    _checks.check_labels(op, labels, lead, logits, V, ignore_index)
    inv_temp = 1.0 / _checks.check_positive(op, "temperature", temperature)
    cdtype = compute_dtype(logits.dtype)
    if logits.numel() == 0:
        zero = logits.new_zeros(lead, dtype=cdtype) + 0.0 * logits.sum()
        return (zero, zero.clone()) if return_entropy else zero
    backend = backend_for(logits)
    out = TokenLogprobsFunction.apply(as_rows(logits), labels.reshape(-1).long().contiguous(), inv_temp,
                                      int(ignore_index), bool(return_entropy), backend)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def token_logprobs_reference(logits, labels, temperature=1.0, return_entropy=False, *,
                             ignore_index=IGNORE_INDEX):
    """The naive composition (N x V log-softmax, gather); for tests and benchmarks only."""
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    p = logsm.exp()
    ent = -(p * logsm.masked_fill(p == 0, 0.0)).sum(-1)  # 0 log 0 = 0, and no 0 * inf in backward
    return logp, torch.where(valid, ent, 0.0)
