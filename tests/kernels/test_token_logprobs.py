"""token_logprobs: the reference against independent truths, then both paths against it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels._rows import as_rows, torch_backward, torch_forward, triton_backward, triton_forward
from kernels.logprobs import TokenLogprobsFunction, token_logprobs, token_logprobs_reference

LN2, LN3 = math.log(2.0), math.log(3.0)


def rand_case(N, V, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    return x, labels


def run_both(x, labels, T=1.0, entropy=True, seed=1):
    """Value and gradient of reference and fused under random upstream weights."""
    g = torch.Generator().manual_seed(seed)
    w_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    w_h = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    out = []
    for fn in (token_logprobs_reference, token_logprobs):
        leaf = x.detach().clone().requires_grad_()
        lp, h = fn(leaf, labels, T, True)
        loss = (lp.double() * w_lp).sum() + ((h.double() * w_h).sum() if entropy else 0.0)
        loss.backward()
        out.append((lp.detach(), h.detach(), leaf.grad))
    return out


# --------------------------------------------------------------------------- the reference itself


def test_reference_hand_worked():
    # softmax([0, ln 2, ln 3]) = [1/6, 2/6, 3/6]; label 2 has log(1/2); H = 1.0114043
    x = torch.tensor([[0.0, LN2, LN3], [0.0, LN2, LN3]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, -100])
    lp, h = token_logprobs_reference(x, labels, 1.0, True)
    torch.testing.assert_close(lp, torch.tensor([-0.6931472, 0.0], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(h, torch.tensor([1.0114043, 0.0], dtype=torch.float64), atol=1e-7, rtol=0)
    (gx,) = torch.autograd.grad(lp.sum(), x, retain_graph=True)
    torch.testing.assert_close(gx[0], torch.tensor([-1 / 6, -1 / 3, 0.5], dtype=torch.float64))
    assert torch.all(gx[1] == 0)
    (gh,) = torch.autograd.grad(h.sum(), x)  # dH/dx_j = -p_j (log p_j + H)
    torch.testing.assert_close(gh[0], torch.tensor([0.1300592, 0.0290693, -0.1591285], dtype=torch.float64),
                               atol=1e-7, rtol=0)


def test_reference_hand_worked_temperature():
    # T = 2: softmax([0, ln 2, ln 3] / 2) = [1, sqrt 2, sqrt 3] / 4.1462644
    x = torch.tensor([[0.0, LN2, LN3]], dtype=torch.float64, requires_grad=True)
    lp, h = token_logprobs_reference(x, torch.tensor([2]), 2.0, True)
    assert lp.item() == pytest.approx(-0.8729016, abs=1e-7)
    assert h.item() == pytest.approx(1.0745321, abs=1e-7)
    (gx,) = torch.autograd.grad(lp.sum(), x)
    torch.testing.assert_close(gx[0], torch.tensor([-0.1205905, -0.1705407, 0.2911312], dtype=torch.float64),
                               atol=1e-7, rtol=0)


def test_reference_gradcheck():
    x, labels = rand_case(4, 7, torch.float64, ignore_frac=0.3)
    labels[0] = -100
    x.requires_grad_()
    for T in (1.0, 0.7):
        assert torch.autograd.gradcheck(lambda t: token_logprobs_reference(t, labels, T, True), (x,))


# --------------------------------------------------------------------------- properties (both paths)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_properties(impl, backend):
    fn = token_logprobs_reference if impl == "reference" else token_logprobs
    x, labels = rand_case(6, 37, scale=5.0)
    leaf = x.clone().requires_grad_()
    lp, h = fn(leaf, labels, 1.0, True)
    valid = labels != -100
    assert torch.all(lp <= 0) and torch.all(h >= -1e-6) and torch.all(h <= math.log(37) + 1e-5)
    assert torch.all(lp[~valid] == 0) and torch.all(h[~valid] == 0)
    (lp.sum() + 0.3 * h.sum()).backward()
    torch.testing.assert_close(leaf.grad.sum(-1), torch.zeros(6), atol=1e-6, rtol=0)  # softmax is shift-invariant
    assert torch.all(leaf.grad[~valid] == 0)
    shifted = fn(x + torch.linspace(-50, 80, 6).unsqueeze(1), labels, 1.0, True)  # a constant per row
    torch.testing.assert_close(shifted[0], lp.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(shifted[1], h.detach(), atol=2e-5, rtol=0)


def test_fused_gradcheck_torch_path():
    # the chunked torch path computes in float64 for float64 input, so its analytic
    # backward can be checked against finite differences directly
    x, labels = rand_case(5, 9, torch.float64)
    labels[1] = -100
    x.requires_grad_()
    with kernels._dispatch.force_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels, 0.8, True), (x,))
        assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels, 1.0, False), (x,))


# --------------------------------------------------------------------------- fused vs reference


@pytest.mark.parametrize("N,V", [(1, 1), (1, 16), (5, 37), (9, 100)])
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_matches_reference(backend, N, V, T):
    x, labels = rand_case(N, V, ignore_frac=0.0 if N == 1 else 0.25)
    (lp0, h0, g0), (lp1, h1, g1) = run_both(x, labels, T)
    assert lp1.dtype == torch.float32 and h1.dtype == torch.float32
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    x, labels = rand_case(6, 40, dtype=dtype)
    (lp0, h0, g0), (lp1, h1, g1) = run_both(x, labels, 0.9)
    assert lp1.dtype == torch.float32 and g1.dtype == dtype
    # both upcast the same 16-bit values: the values agree to float32 precision,
    # the gradients to the rounding of their 16-bit storage
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g1.float(), g0.float(), atol=1e-2, rtol=1e-2)


def test_all_negative_and_large_logits(backend):
    x, labels = rand_case(4, 30, scale=1.0, ignore_frac=0.0)
    for shifted in (x - 1000.0, x + 1000.0):
        (lp0, h0, g0), (lp1, h1, g1) = run_both(shifted, labels)
        assert torch.isfinite(lp1).all() and torch.isfinite(g1).all()
        torch.testing.assert_close(lp1, lp0, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(h1, h0, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)


def test_minus_inf_logits(backend):
    # banned tokens: -inf entries, including a whole first block; labels on finite entries
    x, labels = rand_case(4, 40, ignore_frac=0.0)
    x[:, :17] = float("-inf")
    x[1, 30:] = float("-inf")
    labels = torch.tensor([20, 25, 39, 17])
    (lp0, h0, g0), (lp1, h1, g1) = run_both(x, labels)
    for t in (lp1, h1, g1):
        assert torch.isfinite(t).all()
    assert torch.all(g1[x == float("-inf")] == 0)
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=2e-5, rtol=1e-5)


def test_leading_dims_and_no_entropy(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 20, generator=g, requires_grad=True)
    labels = torch.randint(0, 20, (2, 3), generator=g)
    lp = token_logprobs(x, labels)
    assert lp.shape == (2, 3)
    lp.sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref = token_logprobs_reference(xr, labels)
    ref.sum().backward()
    torch.testing.assert_close(lp, ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=2e-5, rtol=1e-5)


def test_only_entropy_used(backend):
    x, labels = rand_case(5, 20)
    leaf = x.clone().requires_grad_()
    token_logprobs(leaf, labels, 1.0, True)[1].sum().backward()
    xr = x.clone().requires_grad_()
    token_logprobs_reference(xr, labels, 1.0, True)[1].sum().backward()
    torch.testing.assert_close(leaf.grad, xr.grad, atol=2e-5, rtol=1e-5)


def test_ignored_rows_with_garbage_logits(backend):
    # padding rows may hold anything: they give 0 and a zero gradient, never NaN
    x, labels = rand_case(6, 24, ignore_frac=0.0)
    labels[[1, 4]] = -100
    x[1] = float("nan")
    x[4, 3] = float("inf")
    leaf = x.clone().requires_grad_()
    lp, h = token_logprobs(leaf, labels, 1.0, True)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[[1, 4]] == 0)


# --------------------------------------------------------------------------- out of bounds


def nan_padded(t, pad_rows=2, pad_cols=5):
    """t as a strided view into a NaN-filled buffer: NaN bands left, right, above, below."""
    if t.dim() == 1:
        big = torch.full((t.shape[0] + 2 * pad_rows,), float("nan"), dtype=t.dtype)
        view = big[pad_rows:pad_rows + t.shape[0]]
    else:
        N, V = t.shape
        big = torch.full((N + 2 * pad_rows, V + 2 * pad_cols), float("nan"), dtype=t.dtype)
        view = big[pad_rows:pad_rows + N, pad_cols:pad_cols + V]
    view.copy_(t)
    return big, view


def test_no_out_of_bounds_reads(backend):
    x, labels = rand_case(7, 37)
    _, xv = nan_padded(x)
    big_labels = torch.full((11,), 10**9, dtype=torch.long)  # garbage around the labels, too
    lv = big_labels[2:9]
    lv.copy_(labels)
    assert xv.stride(0) != 37
    (lp0, h0, g0), (lp1, h1, g1) = run_both(x, labels, 0.8)
    (_, _, _), (lp2, h2, g2) = run_both(xv, lv, 0.8)
    for t in (lp2, h2, g2):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(lp2, lp1, atol=0, rtol=0)
    torch.testing.assert_close(h2, h1, atol=0, rtol=0)
    torch.testing.assert_close(g2, g1, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_out_of_bounds_writes(impl):
    x, labels = rand_case(7, 37)
    fwd, bwd = (torch_forward, torch_backward) if impl == "torch" else (triton_forward, triton_backward)
    if impl == "triton":
        kernels._dispatch.load_triton()
    logp, lse, ent = fwd(x, labels, 1.0, -100, True)
    big, out = nan_padded(torch.zeros(7, 37))
    g, g_ent = torch.randn(7), torch.randn(7)
    bwd(x, labels, lse, ent, g, g_ent, 1.0, -100, out)
    assert torch.isfinite(out).all()
    band = torch.ones_like(big, dtype=torch.bool)
    band[2:9, 5:42] = False
    assert torch.isnan(big[band]).all()


def test_sliced_sequence_view_is_read_in_place(backend):
    # a trainer's logits[:, P-1:-1]: (B, T, V) rows that no (N, V) view covers; the
    # positions sliced off hold NaN and must not be read
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 9, 20, generator=g)
    full[:, :2] = float("nan")
    full[:, -1] = float("nan")
    view = full[:, 2:-1]
    labels = torch.randint(0, 20, (3, 6), generator=g)
    labels[1, 2] = -100
    rows = as_rows(view)
    assert rows.dim() == 3 and rows.data_ptr() == view.data_ptr()  # no copy
    (lp0, h0, g0), (lp1, h1, g1) = run_both(view.contiguous(), labels, 0.9)
    leaf = full.clone().requires_grad_()
    lp2, h2 = token_logprobs(leaf[:, 2:-1], labels, 0.9, True)
    (lp2.sum() + h2.sum()).backward()
    torch.testing.assert_close(lp2.detach(), lp1)
    torch.testing.assert_close(h2.detach(), h1)
    torch.testing.assert_close(lp2.detach(), lp0, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(leaf.grad[:, 2:-1]).all()
    assert torch.all(leaf.grad[:, :2] == 0) and torch.all(leaf.grad[:, -1] == 0)


# --------------------------------------------------------------------------- random shapes, torch path


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 12), V=st.integers(1, 70), T=st.sampled_from([0.5, 1.0, 1.7]),
       seed=st.integers(0, 2**16), ignore=st.floats(0.0, 1.0))
def test_torch_path_random_shapes(N, V, T, seed, ignore):
    x, labels = rand_case(N, V, seed=seed, ignore_frac=ignore)
    with kernels._dispatch.force_backend("torch"):
        (lp0, h0, g0), (lp1, h1, g1) = run_both(x, labels, T, seed=seed)
    torch.testing.assert_close(lp1, lp0, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=3e-5, rtol=1e-5)


def test_int32_labels(backend):
    x, labels = rand_case(5, 20)
    torch.testing.assert_close(token_logprobs(x, labels.int()), token_logprobs(x, labels))
    loss32 = kernels.ppo_loss(x, labels.int(), torch.zeros(5), torch.ones(5), None)[0]
    torch.testing.assert_close(loss32, kernels.ppo_loss(x, labels, torch.zeros(5), torch.ones(5), None)[0])
    h, w = torch.randn(5, 3), torch.randn(20, 3)
    torch.testing.assert_close(kernels.linear_token_logprobs(h, w, labels.int()),
                               kernels.linear_token_logprobs(h, w, labels))


def test_empty_input():
    x = torch.zeros(0, 5, requires_grad=True)
    lp = token_logprobs(x, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)
    lp.sum().backward()
    assert x.grad.shape == (0, 5)


def test_function_is_exported():
    assert kernels.token_logprobs is token_logprobs
    assert issubclass(TokenLogprobsFunction, torch.autograd.Function)
