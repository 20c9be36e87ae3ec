"""The LM-head matmul fused with token_logprobs / ppo_loss: logits = hidden @ weight.T is
computed chunk by chunk of tokens and never exists whole.

    linear_token_logprobs(hidden (..., H), weight (V, H), labels (...)) = token_logprobs(hidden @ weight.T, labels)
    linear_ppo_loss(hidden, weight, labels, ...)                       = ppo_loss(hidden @ weight.T, labels, ...)

Peak extra memory is one chunk of logits (chunk x V, one buffer reused by every chunk
and overwritten in place by its own gradient) plus the gradients of hidden and weight,
instead of several N x V tensors.

How many rows a chunk has comes from a memory budget (default_chunk_size): the chunk may
take as many bytes as the weight's gradient (V x H), which the op returns anyway, so the
peak stays about twice the gradients whatever N is. In rows that is H, which is also
what keeps the matmuls efficient: dW += dlogits^T @ hidden reads and writes all of dW for
every chunk, 2 * rows * V * H flops per 2 * V * H elements moved, so chunks of a few dozen
rows leave the matmul memory-bound (at N=4096, H=256, V=32000 fp32 on a 2-core CPU,
32-row chunks took 1.6x the time of 128-row ones; bench/test_fused_loss_bench.py).

How the gradients are formed:
- linear_ppo_loss returns a scalar, so its gradient is known up to the upstream scalar
  as soon as the forward has the chunk's logits: the forward writes dL/dlogits into the
  chunk and accumulates dhidden = dlogits @ W and dW += dlogits^T @ hidden; backward only
  scales them. Three matmuls per chunk, as many as the unfused graph, so no speed loss.
  (When no input needs a gradient, e.g. under torch.no_grad(), only the loss is formed.)
- linear_token_logprobs returns a vector, whose upstream gradient arrives only in
  backward, so backward recomputes each chunk's logits (four matmuls per chunk) and saves
  only (N,) row statistics in forward.

dW is accumulated across chunks in the weight's dtype (as torch.addmm does for a
bfloat16 weight); hidden and weight must share a dtype and device.
"""

from __future__ import annotations

import torch

from . import _checks
from ._checks import check_ppo_args
from ._dispatch import backend_for
from ._rows import (
    IGNORE_INDEX,
    compute_dtype,
    prepare_tokens,
    torch_backward,
    torch_forward,
    triton_backward,
    triton_forward,
)
from .ppo import (
    STATS,
    PPOLossStats,
    reduce_stats,
    torch_ppo_forward,
    triton_ppo_forward,
)


# The smallest budget for a chunk of logits, for heads so small that V x H would give
# chunks too thin for an efficient matmul (e.g. H = 64 with a large vocabulary).
MIN_CHUNK_BYTES = 16 << 20


def default_chunk_size(N: int, V: int, H: int, itemsize: int = 4) -> int:
    """Token rows per chunk, from a memory budget: the chunk of logits (rows x V elements of
    `itemsize` bytes, the hidden/weight dtype) may take as many bytes as the weight's
    gradient (V x H), or MIN_CHUNK_BYTES if that is more; at most N rows, at least 1."""
    budget = max(V * H * itemsize, MIN_CHUNK_BYTES)
    return max(1, min(N, budget // (V * itemsize)))


def _chunk_buffer(h, weight, chunk):
    """The one (chunk, V) buffer every chunk's logits are computed into: a fresh tensor per
    chunk would hold two chunks at once while the next one is being computed."""
    return torch.empty(min(chunk, h.shape[0]), weight.shape[0], dtype=h.dtype, device=h.device)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, inv_temp, ignore_index, with_entropy, backend, chunk):
        N = h.shape[0]
        cdtype = torch.float32 if backend == "triton" else compute_dtype(h.dtype)
        logp = torch.empty(N, dtype=cdtype, device=h.device)
        lse = torch.empty(N, dtype=cdtype, device=h.device)
        ent = torch.empty(N, dtype=cdtype, device=h.device) if with_entropy else None
        fwd = triton_forward if backend == "triton" else torch_forward
        buf = _chunk_buffer(h, weight, chunk)
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            logits = torch.mm(h[sl], weight.t(), out=buf[:h[sl].shape[0]])
            a, b, c = fwd(logits, labels[sl], inv_temp, ignore_index, with_entropy)
            logp[sl], lse[sl] = a, b
            if with_entropy:
                ent[sl] = c
        ctx.save_for_backward(h, weight, labels, lse, ent)
        ctx.cfg = (inv_temp, ignore_index, backend, chunk)
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @_checks.first_order_only("linear_token_logprobs")
    def backward(ctx, g, g_ent=None):
        h, weight, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, backend, chunk = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g is None and g_ent is None) or not (need_h or need_w):
            return (None,) * 8
        g = torch.zeros_like(lse) if g is None else g.to(lse.dtype).contiguous()
        if g_ent is not None:
            g_ent = g_ent.to(lse.dtype).contiguous()
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        bwd = triton_backward if backend == "triton" else torch_backward
        buf = _chunk_buffer(h, weight, chunk)
        for i in range(0, h.shape[0], chunk):
            sl = slice(i, i + chunk)
            dlogits = torch.mm(h[sl], weight.t(), out=buf[:h[sl].shape[0]])
            bwd(dlogits, labels[sl], lse[sl], None if ent is None else ent[sl], g[sl],
                None if g_ent is None else g_ent[sl], inv_temp, ignore_index, dlogits)
            if need_h:
                torch.mm(dlogits, weight, out=dh[sl])
            if need_w:
                dw.addmm_(dlogits.t(), h[sl])
        return dh, dw, None, None, None, None, None, None


class LinearPPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, old, adv, ref, w, inv_temp, ignore_index, cfg, backend, chunk):
        N = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = need_h or need_w
        sdtype = old.dtype
        loss = torch.empty(N, dtype=sdtype, device=h.device)
        stats = torch.empty(STATS, N, dtype=sdtype, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        buf = _chunk_buffer(h, weight, chunk)
        for i in range(0, N, chunk):
            sl = slice(i, i + chunk)
            logits = torch.mm(h[sl], weight.t(), out=buf[:h[sl].shape[0]])
            ref_c = None if ref is None else ref[sl]
            args = (labels[sl], old[sl], adv[sl], ref_c, w[sl], inv_temp, ignore_index, cfg)
            if backend == "triton":
                # the kernel overwrites the chunk's logits with their gradient after reading them
                grad_out = logits if want_grad else None
                loss[sl], g, _, stats[:, sl] = triton_ppo_forward(logits, *args, grad_out=grad_out)
            else:
                loss[sl], g, lse, stats[:, sl] = torch_ppo_forward(logits, *args)
                if want_grad:
                    torch_backward(logits, labels[sl], lse, None, g, None, inv_temp, ignore_index, logits)
            if need_h:
                torch.mm(logits, weight, out=dh[sl])
            if need_w:
                dw.addmm_(logits.t(), h[sl])
        ctx.grads = [dh, dw]
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss.sum(), stats

    @staticmethod
    @_checks.first_order_only("linear_ppo_loss")
    def backward(ctx, grad_loss, _grad_stats=None):
        none = (None,) * 10
        if grad_loss is None:
            return (None, None) + none
        if ctx.grads is None:
            raise RuntimeError("linear_ppo_loss: backward through the same graph twice is not supported")
        dh, dw = ctx.grads
        ctx.grads = None  # scaled in place below: the forward's buffers become the gradients
        if dh is not None:
            dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw.mul_(grad_loss.to(dw.dtype))
        return (dh, dw) + none


def _check_linear(op, hidden, weight, labels, ignore_index):
    _checks.check_tensor(op, "hidden", hidden, ndim_min=1)
    _checks.check_float(op, "hidden", hidden)
    _checks.check_tensor(op, "weight", weight, ndim_min=2)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be (V, H), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: weight ({weight.dtype}) and hidden ({hidden.dtype}) must share a dtype")
    _checks.check_same_device(op, "hidden", hidden, "weight", weight)
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"{op}: hidden's last dim ({hidden.shape[-1]}) must equal weight's H (weight is {V} x {H})")
    if V < 1:
        raise ValueError(f"{op}: weight must have at least one row (vocabulary entry)")
    lead = hidden.shape[:-1]
    _checks.check_labels(op, labels, lead, hidden, V, ignore_index, ref_name="hidden")
    return lead, V, H


def _chunk(op, chunk_size, N, V, H, itemsize):
    if chunk_size is None:
        return default_chunk_size(N, V, H, itemsize)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def linear_token_logprobs(hidden, weight, labels, temperature=1.0, return_entropy=False, *,
                          ignore_index=IGNORE_INDEX, chunk_size=None):
    """token_logprobs(hidden @ weight.T, labels, ...) without materialising the logits.

    hidden (..., H), weight (V, H) of one float dtype, labels (...). Returns logp (...)
    float32 (float64 for float64 inputs) [, entropy (...)]; differentiable w.r.t. hidden
    and weight, once (create_graph=True raises RuntimeError). chunk_size: token rows per
    chunk (default: from the memory budget of default_chunk_size). Raises ValueError for a
    bad argument, naming it.
    """
    op = "linear_token_logprobs"
    lead, V, H = _check_linear(op, hidden, weight, labels, ignore_index)
    inv_temp = 1.0 / _checks.check_positive(op, "temperature", temperature)
    h = hidden.reshape(-1, H)
    N = h.shape[0]
    chunk = _chunk(op, chunk_size, N, V, H, hidden.element_size())
    if N == 0:
        zero = hidden.new_zeros(lead, dtype=compute_dtype(hidden.dtype)) + 0.0 * (hidden.sum() + weight.sum())
        return (zero, zero.clone()) if return_entropy else zero
    backend = backend_for(hidden)
    flat_labels = labels.reshape(-1).long().contiguous()
    out = LinearTokenLogprobsFunction.apply(h.contiguous(), weight.contiguous(), flat_labels, inv_temp,
                                            int(ignore_index), bool(return_entropy), backend, chunk)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask=None, *, ref_logprobs=None,
                    clip_eps=0.2, clip_eps_high=None, dual_clip=None, kl_coef=0.0, kl_estimator="k3",
                    temperature=1.0, loss_agg="token-mean", ignore_index=IGNORE_INDEX, chunk_size=None):
    """ppo_loss(hidden @ weight.T, labels, ...) without materialising the logits.

    Same arguments, ranges, errors and return value as kernels.ppo_loss, with hidden
    (..., H) and weight (V, H) in place of logits; gradients for hidden and weight, once.
    """
    op = "linear_ppo_loss"
    lead, V, H = _check_linear(op, hidden, weight, labels, ignore_index)
    cfg, inv_temp = check_ppo_args(op, hidden, lead, labels, old_logprobs, advantages, mask, ref_logprobs,
                                   clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, temperature,
                                   loss_agg, ref_name="hidden")
    h = hidden.reshape(-1, H)
    N = h.shape[0]
    chunk = _chunk(op, chunk_size, N, V, H, hidden.element_size())
    backend = backend_for(hidden)
    sdtype = torch.float32 if backend == "triton" else compute_dtype(hidden.dtype)
    labels_eff, old, adv, ref, w, valid = prepare_tokens(labels, old_logprobs, advantages, mask, ref_logprobs,
                                                         loss_agg, ignore_index, sdtype)
    if N == 0:
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        return ((hidden.sum() + weight.sum()) * 0.0).to(sdtype), PPOLossStats(*[zero] * 6)
    loss, stats = LinearPPOLossFunction.apply(h.contiguous(), weight.contiguous(), labels_eff, old, adv, ref, w,
                                              inv_temp, int(ignore_index), cfg, backend, chunk)
    return loss, reduce_stats(stats, valid)
