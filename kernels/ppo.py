"""ppo_loss: the clipped PPO policy loss with a KL penalty, fused with the log-softmax.

Per token i (valid = label != ignore_index and mask != 0), with logp_i the log-prob of
the label under softmax(logits_i / T) (see kernels/logprobs.py):

    r     = clamp(logp - old_logprobs, -B, B)    B = LOG_RATIO_CLAMP = 20 (see below)
    ratio = exp(r)
    pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
    pg    = min(pg, -A * dual_clip)            only where A < 0, if dual_clip is set
                                               (dual-clip PPO, Ye et al. 2020)
    d     = ref_logprobs - logp                the KL penalty's sign convention
    kl    = k1: -d  (= logp - ref)   k2: c^2 / 2   k3: exp(c) - 1 - c,  c = clamp(d, -B, B)
            (Schulman's estimators of KL(pi || pi_ref) from samples of pi; k3 >= 0, unbiased)
    loss_i = pg + kl_coef * kl

and loss = sum_i w_i * loss_i, where the weights w implement `loss_agg`:

    "token-mean"           w = 1 / (number of valid tokens)
    "sum"                  w = 1
    "seq-mean-token-sum"   w = 1 / (number of sequences with a valid token)
    "seq-mean-token-mean"  w = 1 / (valid tokens in its sequence * number of such sequences)

(the two seq- modes need logits of shape (..., T, V); a sequence is a row of the labels'
last dim). Invalid tokens have w = 0 and an exactly-zero gradient. Gradients flow to
the logits only: old_logprobs, advantages, ref_logprobs and mask are constants.

Since the loss is a weighted sum over tokens, its gradient is, per row,
dL/dx = w_i * dloss_i/dlogp_i * (onehot(y) - p) / T, the token_logprobs backward with a
per-row coefficient, which the forward computes along with the loss:

    dpg/dlogp = -A * ratio where the unclipped branch is taken, else 0
    dkl/dlogp = k1: 1   k2: -c   k3: -(exp(c) - 1)     (times 1[|d| <= B] for k2, k3)

k3 and exp(d) - 1 are evaluated with a Taylor series for |d| < 1, where exp(d) - 1 - d
would lose most of its digits to cancellation.

The clamp keeps every term finite for finite inputs (exp overflows float32 past 88: a
log-ratio of 100 gave an infinite loss and NaN gradients). Each log-ratio that enters an
exp or a square (r, and d for k2/k3; k1 is linear) is clamped to [-20, 20] first, as
veRL's policy loss and kl_penalty do. The loss is a function of the clamped value, with
torch.clamp's gradient: exact where |log-ratio| <= 20, zero beyond, where the probability
moved by e^20 ~ 5e8 (ppo_loss_reference applies the same clamp).

Stats (detached, means over valid tokens): clipfrac = fraction of tokens where a clipped
value was taken (ratio clip or dual clip); approx_kl = k3 of the ratio to the old policy,
exp(r) - 1 - r with r the clamped logp - old_logprobs, the estimate of KL(pi_old || pi);
kl_ref = the `kl_estimator` to the reference (0 without ref_logprobs); entropy;
ratio_mean and ratio_max = the mean and the largest probability ratio exp(r).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _checks
from ._checks import check_ppo_args
from ._dispatch import backend_for, triton_kernel
from ._rows import (
    IGNORE_INDEX,
    _row_offset,
    _softmax_row_stats,
    _write_row_grad,
    as_rows,
    block_v,
    compute_dtype,
    num_rows,
    num_warps,
    prepare_tokens,
    row_strides,
    torch_backward,
    torch_forward,
    triton_backward,
)
from .logprobs import token_logprobs_reference

tl = None  # triton.language, bound by _dispatch.load_triton(); annotations stay strings

STATS = 5  # per-token stats rows: clipped, k3 to old, KL to ref, entropy, ratio
LOG_RATIO_CLAMP = 20.0  # |log-ratio| bound before exp or square (module docstring)


class PPOLossStats(NamedTuple):
    """Detached float32 scalars: means over valid tokens, and ratio_max, the largest
    probability ratio π/π_old of a valid token (0 when none is valid)."""

    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    kl_ref: torch.Tensor
    entropy: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


# --------------------------------------------------------------------------- Triton


@triton_kernel
def _k3(d):
    # exp(d) - 1 - d. For |d| < 1, d^2 * sum_{k>=0} d^k / (k+2)! to d^8 / 10! (truncation
    # below 5e-8 relative); beyond, the direct formula has no cancellation to speak of.
    c = 1.0 / 3628800.0
    c = c * d + 1.0 / 362880.0
    c = c * d + 1.0 / 40320.0
    c = c * d + 1.0 / 5040.0
    c = c * d + 1.0 / 720.0
    c = c * d + 1.0 / 120.0
    c = c * d + 1.0 / 24.0
    c = c * d + 1.0 / 6.0
    c = c * d + 0.5
    return tl.where(tl.abs(d) < 1.0, d * d * c, tl.exp(d) - 1.0 - d)


@triton_kernel
def _ppo_fwd_kernel(logits_ptr, T, stride_b, stride_t, labels_ptr, old_ptr, adv_ptr, ref_ptr, w_ptr,
                    loss_ptr, g_ptr, lse_ptr, stats_ptr, dlogits_ptr, stride_drow,
                    N, V, inv_temp, ignore_index, clip_low, clip_high, dual_clip, kl_coef, bound,
                    BLOCK_V: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr,
                    HAS_DUAL: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    lse, ent = _softmax_row_stats(row_ptr, tl.where(valid, V, 0), V, inv_temp, BLOCK_V, True)
    logp = tl.load(row_ptr + safe_label).to(tl.float32) * inv_temp - lse

    adv = tl.load(adv_ptr + row)
    r = logp - tl.load(old_ptr + row)
    log_ratio = tl.minimum(tl.maximum(r, -bound), bound)
    ratio = tl.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = pg2 > pg1
    pg = tl.where(clipped, pg2, pg1)
    dpg = tl.where(clipped | (tl.abs(r) > bound), 0.0, pg1)
    if HAS_DUAL:
        pg3 = -adv * dual_clip
        dual = (adv < 0.0) & (pg3 < pg)
        pg = tl.where(dual, pg3, pg)
        dpg = tl.where(dual, 0.0, dpg)
        clipped = clipped | dual
    loss = pg
    dloss = dpg
    kl = 0.0
    if HAS_REF:
        d = tl.load(ref_ptr + row) - logp
        c = tl.minimum(tl.maximum(d, -bound), bound)
        inside = tl.abs(d) <= bound
        if KL_EST == 1:
            kl = -d
            dkl = 1.0
        elif KL_EST == 2:
            kl = 0.5 * c * c
            dkl = tl.where(inside, -c, 0.0)
        else:
            kl = _k3(c)
            dkl = tl.where(inside, -(c + kl), 0.0)  # -(exp(c) - 1), accurate at small c through the series
        loss = loss + kl_coef * kl
        dloss = dloss + kl_coef * dkl

    w = tl.load(w_ptr + row)
    g = tl.where(valid, w * dloss, 0.0)
    tl.store(loss_ptr + row, tl.where(valid, w * loss, 0.0))
    tl.store(g_ptr + row, g)
    tl.store(lse_ptr + row, lse)
    tl.store(stats_ptr + row, tl.where(valid & clipped, 1.0, 0.0))
    tl.store(stats_ptr + N + row, tl.where(valid, _k3(log_ratio), 0.0))
    tl.store(stats_ptr + 2 * N + row, tl.where(valid, kl, 0.0))
    tl.store(stats_ptr + 3 * N + row, tl.where(valid, ent, 0.0))
    tl.store(stats_ptr + 4 * N + row, tl.where(valid, ratio, 0.0))
    if WRITE_GRAD:
        # The fused-linear path: the gradient of this chunk's logits, for an upstream 1.
        _write_row_grad(row_ptr, dlogits_ptr + row * stride_drow, V, label, lse, g, 0.0, 0.0,
                        inv_temp, (~valid) | (g == 0.0), BLOCK_V, False)


def triton_ppo_forward(x, labels, old, adv, ref, w, inv_temp, ignore_index, cfg, grad_out=None):
    """Per-token (weighted loss, dL/dlogp, lse, stats (STATS, N)); with grad_out, also writes
    dL/dx into grad_out (which may be x)."""
    N, V = num_rows(x), x.shape[-1]
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, g, lse = (torch.empty(N, **f32) for _ in range(3))
    stats = torch.empty(STATS, N, **f32)
    blk = block_v(V)
    write = grad_out is not None
    _ppo_fwd_kernel[(N,)](
        x, *row_strides(x), labels, old, adv, ref if ref is not None else old, w,
        loss, g, lse, stats, grad_out if write else x, grad_out.stride(0) if write else 0,
        N, V, inv_temp, ignore_index, cfg["clip_low"], cfg["clip_high"],
        cfg["dual_clip"] if cfg["dual_clip"] is not None else 0.0, cfg["kl_coef"], LOG_RATIO_CLAMP,
        BLOCK_V=blk, HAS_REF=ref is not None, KL_EST=int(cfg["kl_estimator"][1]),
        HAS_DUAL=cfg["dual_clip"] is not None, WRITE_GRAD=write, num_warps=num_warps(blk),
    )
    return loss, g, lse, stats


# --------------------------------------------------------------------------- torch


def k3(d: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1 - d without cancellation at small |d| (see _k3); the series runs to
    d^18 / 20! here, so that float64 inputs are exact to float64 precision too."""
    ds = d.clamp(-1.0, 1.0)  # the unselected series branch must not overflow (0 * inf in backward)
    c = torch.full_like(d, 1.0 / math.factorial(20))
    for k in range(19, 1, -1):
        c = c * ds + 1.0 / math.factorial(k)
    return torch.where(d.abs() < 1.0, ds * ds * c, torch.expm1(d) - d)


def token_terms(logp, old, adv, ref, w, valid, cfg):
    """The PPO epilogue on per-token vectors: (w * loss_i, w * dloss_i/dlogp, stats (STATS, N))."""
    B = LOG_RATIO_CLAMP
    r = logp - old
    log_ratio = r.clamp(-B, B)
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg["clip_low"], 1.0 + cfg["clip_high"])
    clipped = pg2 > pg1
    pg = torch.where(clipped, pg2, pg1)
    dloss = torch.where(clipped | (r.abs() > B), 0.0, pg1)
    if cfg["dual_clip"] is not None:
        pg3 = -adv * cfg["dual_clip"]
        dual = (adv < 0) & (pg3 < pg)
        pg = torch.where(dual, pg3, pg)
        dloss = torch.where(dual, 0.0, dloss)
        clipped = clipped | dual
    loss = pg
    kl = torch.zeros_like(logp)
    if ref is not None:
        d = ref - logp
        c, outside = d.clamp(-B, B), d.abs() > B
        est, coef = cfg["kl_estimator"], cfg["kl_coef"]
        if est == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif est == "k2":
            kl, dkl = 0.5 * c * c, torch.where(outside, 0.0, -c)
        else:
            kl = k3(c)
            dkl = torch.where(outside, 0.0, -(c + kl))
        loss = loss + coef * kl
        dloss = dloss + coef * dkl
    zero = torch.zeros_like(logp)
    stats = torch.stack([clipped.to(logp.dtype), k3(log_ratio), kl, zero, ratio])
    stats = torch.where(valid, stats, 0.0)
    return torch.where(valid, w * loss, 0.0), torch.where(valid, w * dloss, 0.0), stats


def torch_ppo_forward(x, labels, old, adv, ref, w, inv_temp, ignore_index, cfg):
    logp, lse, ent = torch_forward(x, labels, inv_temp, ignore_index, True)
    valid = labels != ignore_index
    loss, g, stats = token_terms(logp, old, adv, ref, w, valid, cfg)
    stats[3] = ent
    return loss, g, lse, stats


# --------------------------------------------------------------------------- autograd


class PPOLossFunction(torch.autograd.Function):
    """(x (N, V) or (B, T, V) rows, ...) -> (loss (), per-token stats (STATS, N)); gradient for x only."""

    @staticmethod
    def forward(ctx, x, labels, old, adv, ref, w, inv_temp, ignore_index, cfg, backend):
        fwd = triton_ppo_forward if backend == "triton" else torch_ppo_forward
        loss, g, lse, stats = fwd(x, labels, old, adv, ref, w, inv_temp, ignore_index, cfg)
        ctx.save_for_backward(x, labels, lse, g)
        ctx.cfg = (inv_temp, ignore_index, backend)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss.sum(), stats

    @staticmethod
    @_checks.first_order_only("ppo_loss")
    def backward(ctx, grad_loss, _grad_stats=None):
        none = (None,) * 9
        if grad_loss is None:
            return (None,) + none
        x, labels, lse, g = ctx.saved_tensors
        inv_temp, ignore_index, backend = ctx.cfg
        g = g * grad_loss.to(g.dtype)
        out = torch.empty(num_rows(x), x.shape[-1], dtype=x.dtype, device=x.device)
        bwd = triton_backward if backend == "triton" else torch_backward
        bwd(x, labels, lse, None, g, None, inv_temp, ignore_index, out)
        return (out.view(x.shape),) + none


# --------------------------------------------------------------------------- API


def reduce_stats(stats: torch.Tensor, valid: torch.Tensor) -> PPOLossStats:
    """Per-token stats (STATS, N), 0 on invalid tokens -> PPOLossStats."""
    stats = stats.detach().to(torch.float32)
    n = valid.sum().clamp_min(1).to(torch.float32)
    means = stats.sum(1) / n
    return PPOLossStats(*means.unbind(0), stats[4].max() if stats.shape[1] else torch.zeros(()))


def ppo_loss(logits, labels, old_logprobs, advantages, mask=None, *, ref_logprobs=None, clip_eps=0.2,
             clip_eps_high=None, dual_clip=None, kl_coef=0.0, kl_estimator="k3", temperature=1.0,
             loss_agg="token-mean", ignore_index=IGNORE_INDEX):
    """Clipped PPO loss (+ kl_coef * KL to ref) from logits; returns (loss, PPOLossStats).

    logits (..., V) float (e.g. (N, V) or (B, T, V)); labels (...) int; old_logprobs,
    advantages, ref_logprobs (...) float; mask (...) bool/number (nonzero = valid) or None.
    Ranges: clip_eps in [0, 1); clip_eps_high >= clip_eps, default clip_eps (set it higher
    for the asymmetric "clip-higher" of DAPO, Yu et al. 2025); dual_clip > 1 or None bounds
    the loss of negative-advantage tokens; kl_coef >= 0 (> 0 needs ref_logprobs);
    temperature > 0; all finite. kl_coef and every other scalar are plain kernel
    arguments, so changing them each step costs no recompilation.
    The loss is a float32 scalar (float64 for float64 logits); see the module docstring.
    Raises ValueError for a bad argument, naming it, before any compute; the loss can be
    differentiated once: a backward with create_graph=True raises RuntimeError.
    """
    op = "ppo_loss"
    _checks.check_logits(op, logits)
    lead, V = logits.shape[:-1], logits.shape[-1]
    _checks.check_labels(op, labels, lead, logits, V, ignore_index)
    cfg, inv_temp = check_ppo_args(op, logits, lead, labels, old_logprobs, advantages, mask, ref_logprobs,
                                   clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, temperature,
                                   loss_agg)
    cdtype = compute_dtype(logits.dtype)
    labels_eff, old, adv, ref, w, valid = prepare_tokens(labels, old_logprobs, advantages, mask, ref_logprobs,
                                                         loss_agg, ignore_index, cdtype)
    if logits.numel() == 0:
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        return (logits.sum() * 0.0).to(cdtype), PPOLossStats(*[zero] * 6)
    backend = backend_for(logits)
    if backend == "triton":
        old, adv, w = old.float(), adv.float(), w.float()
        ref = None if ref is None else ref.float()
    loss, stats = PPOLossFunction.apply(as_rows(logits), labels_eff, old, adv, ref, w, inv_temp,
                                        int(ignore_index), cfg, backend)
    return loss.to(cdtype), reduce_stats(stats, valid)


def ppo_loss_reference(logits, labels, old_logprobs, advantages, mask=None, *, ref_logprobs=None, clip_eps=0.2,
                       clip_eps_high=None, dual_clip=None, kl_coef=0.0, kl_estimator="k3", temperature=1.0,
                       loss_agg="token-mean", ignore_index=IGNORE_INDEX):
    """The naive composition, written as a trainer would; for tests and benchmarks only."""
    logp, ent = token_logprobs_reference(logits, labels, temperature, True, ignore_index=ignore_index)
    dt = logp.dtype
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    old, adv = old_logprobs.to(dt), advantages.to(dt)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        clipped = clipped | ((adv < 0) & (pg3 < pg))
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        d = ref_logprobs.to(dt) - logp
        c = torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = {"k1": lambda: -d, "k2": lambda: 0.5 * c**2, "k3": lambda: k3(c)}[kl_estimator]()
    per_token = torch.where(valid, pg + kl_coef * kl, 0.0)
    vf = valid.to(dt)
    if loss_agg == "token-mean":
        loss = per_token.sum() / vf.sum().clamp_min(1)
    elif loss_agg == "sum":
        loss = per_token.sum()
    else:
        T = labels.shape[-1]
        tok_sum = per_token.reshape(-1, T).sum(-1)
        n_tok = vf.reshape(-1, T).sum(-1)
        seq = tok_sum if loss_agg == "seq-mean-token-sum" else tok_sum / n_tok.clamp_min(1)
        nonempty = n_tok > 0
        loss = seq[nonempty].sum() / nonempty.sum().clamp_min(1)
    n = vf.sum().clamp_min(1)
    with torch.no_grad():
        mean = lambda t: (torch.where(valid, t, 0.0).sum() / n).float()  # noqa: E731
        r = log_ratio
        ratio_max = torch.where(valid, ratio, 0.0).max().float() if valid.numel() else torch.zeros(())
        stats = PPOLossStats(mean(clipped.to(dt)), mean(torch.expm1(r) - r), mean(kl), mean(ent), mean(ratio),
                             ratio_max)
    return loss, stats
