"""Rows of logits: the softmax statistics and the gradient every op in this package is made of.

Each op (token_logprobs, ppo_loss, and through them the linear_* ops) reads a row x of
logits (length V), temperature T and label y, with z = x / T:

    lse  = log sum_j exp(z_j)
    logp = z_y - lse                         (float32; float64 for float64 input)
    H    = -sum_j p_j log p_j,  p = softmax(z)   (the entropy, optional)

and its backward writes, for per-row upstream coefficients g (of logp) and h (of H),

    dL/dx_j = [ g (1[j = y] - p_j)  -  h p_j (log p_j + H) ] / T

which needs only the row's lse and H (saved, 8 bytes a row) besides the logits. An op
differs from another only in how it turns logp into a loss and the loss into g (ppo.py).
Rows whose label equals `ignore_index` give logp = H = 0 and an exactly-zero gradient.

Two implementations of the same math, compared with the ops' references in tests/kernels:
- Triton (CUDA tensors): one program per row streams the vocabulary in blocks with an
  online log-sum-exp (running max m, sum s = sum e^(z-m), and t = sum e^(z-m)(z-m) for
  the entropy, H = log s - t/s), so the forward reads the logits once and the backward
  reads them once and writes the gradient once.
- torch, chunked (CPU tensors): the same math over blocks of rows, so no temporary is
  larger than a chunk (rows x V); the full-size tensors are the input and its gradient.

Rows are addressed without copies: an (N, V) view, or a (B, T, V) view such as
logits[:, P-1:-1] of a model's output (see as_rows / row_strides).
"""

from __future__ import annotations

import torch

from ._dispatch import triton_kernel

tl = None  # triton.language, bound by _dispatch.load_triton() before any kernel compiles.
# (Annotations such as `BLOCK_V: tl.constexpr` stay strings thanks to the __future__ import.)

IGNORE_INDEX = -100
# Upper bound on the Triton vocabulary block (tests lower it to exercise ragged blocks).
MAX_BLOCK_V = 4096
# Elements per chunk on the torch path: small enough that a chunk's temporaries stay in
# the CPU's L2 cache, large enough that per-chunk Python overhead stays small.
CHUNK_ELEMENTS = 1 << 17


# --------------------------------------------------------------------------- Triton


@triton_kernel
def _softmax_row_stats(row_ptr, n_cols, V, inv_temp, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # Columns >= n_cols load as -inf without touching memory; callers pass n_cols = 0 to
    # skip an ignored row's traffic while keeping the loop shape static.
    offs = tl.arange(0, BLOCK_V)
    m = -3.0e38  # a finite "-inf": exp(m - m_new) and (m - m_new) * s never see inf - inf
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            # t is kept relative to the running max, so H = log s - t/s has no
            # cancellation even for logits in the thousands; -inf logits add 0, not 0 * -inf.
            t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(e > 0.0, e * (z - m_new), 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


@triton_kernel
def _write_row_grad(row_ptr, drow_ptr, V, label, lse, g, g_ent, ent, inv_temp, skip,
                    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    # drow_ptr may equal row_ptr (the fused-linear path overwrites its own logits chunk):
    # each element is loaded before it is stored, by the same program.
    offs = tl.arange(0, BLOCK_V)
    n_cols = tl.where(skip, 0, V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) * inv_temp
        log_p = z - lse
        p = tl.exp(log_p)
        d = tl.where(cols == label, g, 0.0) - g * p
        if WITH_ENTROPY:
            d -= g_ent * tl.where(p > 0.0, p * (log_p + ent), 0.0)
        # Skipped rows are written as exact zeros, whatever (NaN) their logits hold.
        d = tl.where(skip, 0.0, d * inv_temp)
        tl.store(drow_ptr + cols, d.to(drow_ptr.dtype.element_ty), mask=cols < V)


@triton_kernel
def _row_offset(row, T, stride_b, stride_t):
    # row r of the flattened (B*T, V) logits is (b, t) = divmod(r, T): a (B, T, V) view such
    # as logits[:, P-1:-1] is read in place, where reshape(-1, V) would have to copy it
    b = row // T
    return b * stride_b + (row - b * T) * stride_t


@triton_kernel
def _rows_fwd_kernel(logits_ptr, T, stride_b, stride_t, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
                               V, inv_temp, ignore_index,
                               BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at N*V > 2^31
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    lse, ent = _softmax_row_stats(row_ptr, tl.where(ignored, 0, V), V, inv_temp, BLOCK_V, WITH_ENTROPY)
    z_label = tl.load(row_ptr + tl.where(ignored, 0, label)).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, z_label - lse))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.where(ignored, 0.0, ent))


@triton_kernel
def _rows_bwd_kernel(logits_ptr, T, stride_b, stride_t, dlogits_ptr, stride_drow, labels_ptr, lse_ptr,
                               ent_ptr,
                               glogp_ptr, gent_ptr, V, inv_temp, ignore_index,
                               BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(glogp_ptr + row)
    lse = tl.load(lse_ptr + row)
    if WITH_ENTROPY:
        g_ent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
        skip = (label == ignore_index) | ((g == 0.0) & (g_ent == 0.0))
    else:
        g_ent = 0.0
        ent = 0.0
        skip = (label == ignore_index) | (g == 0.0)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    _write_row_grad(row_ptr, dlogits_ptr + row * stride_drow, V, label, lse, g, g_ent, ent, inv_temp, skip,
                    BLOCK_V, WITH_ENTROPY)


def block_v(V: int) -> int:
    return min(MAX_BLOCK_V, 1 << max(V - 1, 0).bit_length())


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def triton_forward(x, labels, inv_temp, ignore_index, with_entropy):
    """x: rows (see as_rows); returns (logp, lse, ent or None), float32."""
    N, V = num_rows(x), x.shape[-1]
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    ent = torch.empty(N, dtype=torch.float32, device=x.device) if with_entropy else None
    blk = block_v(V)
    _rows_fwd_kernel[(N,)](
        x, *row_strides(x), labels, logp, lse, ent if with_entropy else lse, V, inv_temp, ignore_index,
        BLOCK_V=blk, WITH_ENTROPY=with_entropy, num_warps=num_warps(blk),
    )
    return logp, lse, ent


def triton_backward(x, labels, lse, ent, g, g_ent, inv_temp, ignore_index, out):
    """Writes dL/dx into `out` (N, V), which may be `x` itself."""
    N, V = out.shape
    with_entropy = g_ent is not None
    blk = block_v(V)
    _rows_bwd_kernel[(N,)](
        x, *row_strides(x), out, out.stride(0), labels, lse, ent if with_entropy else lse,
        g, g_ent if with_entropy else g, V, inv_temp, ignore_index,
        BLOCK_V=blk, WITH_ENTROPY=with_entropy, num_warps=num_warps(blk),
    )
    return out


# --------------------------------------------------------------------------- torch, chunked


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // V)


def _scaled(x, cdtype, inv_temp):
    z = x.to(cdtype)
    if inv_temp != 1.0:
        z = z.mul_(inv_temp) if z is not x else z * inv_temp
    return z


def chunk_forward(x, safe_labels, inv_temp, with_entropy):
    """Row stats of one chunk x (rows, V): (logp, lse, ent or None) in the compute dtype."""
    cdtype = compute_dtype(x.dtype)
    z = _scaled(x, cdtype, inv_temp)
    m = z.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(cdtype).min)  # all -inf rows: no inf - inf
    zm = z - m
    e = zm.exp()
    s = e.sum(dim=1)
    log_s = s.log()
    lse = m.squeeze(1) + log_s
    logp = z.gather(1, safe_labels.unsqueeze(1)).squeeze(1) - lse
    ent = None
    if with_entropy:
        zm.clamp_min_(torch.finfo(cdtype).min)  # -inf logits carry e = 0: 0 * finite, not 0 * -inf
        ent = log_s - torch.linalg.vecdot(e, zm) / s
    return logp, lse, ent


def chunk_backward(x, safe_labels, lse, ent, g, g_ent, inv_temp, out):
    """Writes a chunk's gradient into `out` (rows, V); `out` may be `x` itself."""
    cdtype = compute_dtype(x.dtype)
    z = _scaled(x, cdtype, inv_temp)
    in_place = out.dtype == cdtype
    buf = torch.sub(z, lse.unsqueeze(1), out=out) if in_place else z.sub(lse.unsqueeze(1))  # log p
    if g_ent is None:
        buf.exp_().mul_(g.unsqueeze(1))  # g p
    else:
        # p (g + h (log p + H)) = h (p log p) + p (g + h H); p log p first, so that a -inf
        # logit (p = 0) gives 0 * finite rather than overflowing once scaled by h
        p = buf.exp()
        buf.clamp_min_(torch.finfo(cdtype).min).mul_(p).mul_(g_ent.unsqueeze(1))
        buf.addcmul_(p, (g + g_ent * ent).unsqueeze(1))
    buf.neg_().scatter_add_(1, safe_labels.unsqueeze(1), g.unsqueeze(1))
    if inv_temp != 1.0:
        buf.mul_(inv_temp)
    if buf is not out:
        out.copy_(buf)
    return out


def torch_forward(x, labels, inv_temp, ignore_index, with_entropy):
    N, V = num_rows(x), x.shape[-1]
    cdtype = compute_dtype(x.dtype)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = torch.empty(N, dtype=cdtype, device=x.device)
    lse = torch.empty(N, dtype=cdtype, device=x.device)
    ent = torch.empty(N, dtype=cdtype, device=x.device) if with_entropy else None
    step = rows_per_chunk(V)
    for i in range(0, N, step):
        a, b, c = chunk_forward(row_chunk(x, i, i + step), safe[i:i + step], inv_temp, with_entropy)
        logp[i:i + step] = a
        lse[i:i + step] = b
        if with_entropy:
            ent[i:i + step] = c
    logp.masked_fill_(~valid, 0.0)
    if with_entropy:
        ent.masked_fill_(~valid, 0.0)
    return logp, lse, ent


def torch_backward(x, labels, lse, ent, g, g_ent, inv_temp, ignore_index, out):
    N, V = out.shape
    no_grad = (g == 0) if g_ent is None else ((g == 0) & (g_ent == 0))
    skip = (labels == ignore_index) | no_grad
    safe = torch.where(skip, 0, labels)
    step = rows_per_chunk(V)
    for i in range(0, N, step):
        sl = slice(i, i + step)
        chunk_backward(row_chunk(x, i, i + step), safe[sl], lse[sl], None if ent is None else ent[sl], g[sl],
                       None if g_ent is None else g_ent[sl], inv_temp, out[sl])
    skipped = skip.nonzero().squeeze(1)
    if skipped.numel():
        out[skipped] = 0  # exact zeros even where an ignored row's logits are not finite
    return out


# --------------------------------------------------------------------------- addressing rows


def as_rows(logits):
    """The logits (..., V) as rows without a copy where one can be avoided: an (N, V) view,
    else a (B, T, V) view (e.g. logits[:, P-1:-1] of a model's output); a copy only for
    layouts neither covers (a non-unit vocabulary stride, or leading dims that don't merge)."""
    V = logits.shape[-1]
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, V)
    except RuntimeError:
        pass
    try:
        return x.view(-1, x.shape[-2], V)
    except RuntimeError:
        return x.contiguous().view(-1, V)


def num_rows(x) -> int:
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]


def row_strides(x):
    """(T, stride_b, stride_t) such that row r starts at (r // T) * stride_b + (r % T) * stride_t."""
    if x.dim() == 2:
        return x.shape[0], 0, x.stride(0)
    return x.shape[1], x.stride(0), x.stride(1)


def row_chunk(x, i, j):
    """Rows [i, j) as a (rows, V) tensor: a view, or for rows spanning sequences of a
    (B, T, V) view, a copy of just those rows."""
    if x.dim() == 2:
        return x[i:j]
    T = x.shape[1]
    j = min(j, num_rows(x))
    if i // T == (j - 1) // T:
        return x[i // T, i % T:(j - 1) % T + 1]
    rows = torch.arange(i, j, device=x.device)
    return x[rows // T, rows % T]


# --------------------------------------------------------------------------- token inputs of the PPO ops


def loss_weights(valid: torch.Tensor, loss_agg: str, dtype=torch.float32) -> torch.Tensor:
    """Per-token weights w (flattened) such that the aggregated loss is sum_i w_i loss_i."""
    v = valid.to(dtype)
    if loss_agg == "token-mean":
        w = v / v.sum().clamp_min(1.0)
    elif loss_agg == "sum":
        w = v
    else:
        per_seq = v.reshape(-1, v.shape[-1])
        n_tok = per_seq.sum(1, keepdim=True)
        n_seq = (n_tok > 0).sum().clamp_min(1).to(dtype)
        if loss_agg == "seq-mean-token-sum":
            w = per_seq / n_seq
        else:
            w = per_seq / (n_tok.clamp_min(1.0) * n_seq)
    return w.reshape(-1)


def prepare_tokens(labels, old_logprobs, advantages, mask, ref_logprobs, loss_agg, ignore_index, dtype):
    """Flattened per-token inputs: labels with invalid tokens set to ignore_index, the
    float vectors in the compute dtype, the weights w and the valid mask."""
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    flat = lambda t: None if t is None else t.reshape(-1).to(dtype).contiguous()  # noqa: E731
    labels_eff = torch.where(valid, labels.long(), ignore_index).reshape(-1).contiguous()
    w = loss_weights(valid, loss_agg, dtype)
    return labels_eff, flat(old_logprobs), flat(advantages), flat(ref_logprobs), w, valid.reshape(-1)
