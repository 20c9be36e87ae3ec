"""Every op on CUDA tensors with the Triton kernels compiled for the GPU (no interpreter),
against the plain-torch references computed in float64 from the same inputs: fp32, bf16
and fp16, odd shapes (one token, a vocabulary of 1, V = 32003 and 128256, ragged last
vocabulary block), (B, T, V) views read in place, the PPO loss's estimators and
aggregations at ordinary and extreme log-ratios, and the fused-linear ops.

Run by bench/gpu.sh as `MINIRLHF_REQUIRE_CUDA=1 pytest tests/kernels/test_cuda_compiled.py`;
elsewhere (no GPU, or the CPU interpreter on, as in the normal test run) it is skipped.
"""

import os

import pytest
import torch

import kernels
from kernels._dispatch import force_backend, interpreter_on
from kernels.logprobs import token_logprobs_reference
from kernels.ppo import ppo_loss_reference

if not torch.cuda.is_available() or interpreter_on():
    _why = ("compiled Triton kernels need a CUDA GPU and TRITON_INTERPRET off "
            "(bench/gpu.sh runs this file with MINIRLHF_REQUIRE_CUDA=1)")
    if os.environ.get("MINIRLHF_REQUIRE_CUDA", "0") == "1":
        raise RuntimeError(f"MINIRLHF_REQUIRE_CUDA=1: {_why}")  # a collection error: loud, never a skip
    pytest.skip(_why, allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def small_blocks():
    """The real block sizes here (the conftest's tiny ones are for the interpreter)."""
    yield


@pytest.fixture(autouse=True)
def triton_backend():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    with force_backend("triton"):  # fails loudly if triton is missing, instead of falling back
        yield


def tol(dtype):
    """(value tolerance, gradient tolerance relative to the gradient's largest entry)."""
    return (2e-5, 2e-5) if dtype == torch.float32 else (2e-3, 1e-2)


def assert_rel(name, got, want, rel):
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= rel * scale, f"{name}: max abs diff {err:.3g}, scale {scale:.3g}, rel tol {rel}"


def logits_case(shape, V, dtype, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return x.to(DEV), labels.to(DEV)


SHAPES = [((1,), 1), ((7,), 17), ((3, 5), 1000), ((333,), 32003), ((2, 33), 128256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,V", SHAPES, ids=lambda v: str(v))
def test_token_logprobs(shape, V, dtype):
    x, labels = logits_case(shape, V, dtype)
    vt, gt = tol(dtype)
    leaf = x.clone().requires_grad_()
    lp, ent = kernels.token_logprobs(leaf, labels, 0.7, True)
    ref = x.double().requires_grad_()
    lp0, ent0 = token_logprobs_reference(ref, labels, 0.7, True)
    torch.testing.assert_close(lp.double(), lp0.detach(), atol=vt * 10, rtol=vt)
    torch.testing.assert_close(ent.double(), ent0.detach(), atol=vt * 10, rtol=vt)
    up = torch.randn(lp.shape, device=DEV, dtype=torch.float64)
    (lp * up.float() + ent).sum().backward()
    (lp0 * up + ent0).sum().backward()
    assert leaf.grad.dtype == dtype
    assert_rel("dlogits", leaf.grad, ref.grad, gt)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
def test_sequence_view_read_in_place(dtype):
    # logits[:, 2:-1] of a (B, T, V) output is read where it lies; the rows outside get
    # exact zeros although they hold NaN
    x, labels = logits_case((4, 9), 5003, dtype)
    old, adv, ref, mask = ppo_inputs(x, labels)
    full = torch.full((4, 12, 5003), float("nan"), device=DEV, dtype=dtype)
    full[:, 2:-1] = x
    leaf = full.clone().requires_grad_()
    kw = dict(ref_logprobs=ref, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    loss, _ = kernels.ppo_loss(leaf[:, 2:-1], labels, old, adv, mask, **kw)
    loss.backward()
    r = x.double().requires_grad_()
    kw["ref_logprobs"] = ref.double()
    loss0, _ = ppo_loss_reference(r, labels, old.double(), adv.double(), mask, **kw)
    loss0.backward()
    vt, gt = tol(dtype)
    assert_rel("loss", loss.detach().reshape(1), loss0.detach().reshape(1), max(vt, 1e-5))
    assert_rel("dlogits", leaf.grad[:, 2:-1], r.grad, gt)
    assert torch.all(leaf.grad[:, :2] == 0) and torch.all(leaf.grad[:, -1] == 0)


PPO_CONFIGS = [
    dict(kl_estimator="k1", loss_agg="token-mean"),
    dict(kl_estimator="k2", loss_agg="seq-mean-token-sum", dual_clip=3.0),
    dict(kl_estimator="k3", loss_agg="seq-mean-token-mean", clip_eps_high=0.28, temperature=0.8),
    dict(kl_estimator="k3", loss_agg="sum"),
]


def ppo_inputs(x, labels, seed=1, extreme=False):
    g = torch.Generator().manual_seed(seed)
    shape = labels.shape
    with torch.no_grad():
        lp = token_logprobs_reference(x.double(), labels).cpu()
    if extreme:
        pick = torch.tensor([100.0, -100.0, 1e4, -1e4, 0.3, -0.2], dtype=torch.float64)
        r = pick[torch.randint(0, 6, shape, generator=g)]
        d = pick[torch.randint(0, 6, shape, generator=g)]
    else:
        r, d = 0.3 * torch.randn(shape, generator=g), 0.3 * torch.randn(shape, generator=g)
    old, ref = (lp - r).float(), (lp + d).float()
    adv = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.1
    return [t.to(DEV) for t in (old, adv, ref, mask)]


@pytest.mark.parametrize("extreme", [False, True], ids=["ordinary", "extreme-log-ratios"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("cfg", PPO_CONFIGS, ids=lambda c: c["kl_estimator"] + "-" + c["loss_agg"])
def test_ppo_loss(cfg, dtype, extreme):
    x, labels = logits_case((6, 37), 32003, dtype)
    old, adv, ref, mask = ppo_inputs(x, labels, extreme=extreme)
    vt, gt = tol(dtype)
    leaf = x.clone().requires_grad_()
    loss, stats = kernels.ppo_loss(leaf, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, **cfg)
    r = x.double().requires_grad_()
    loss0, stats0 = ppo_loss_reference(r, labels, old.double(), adv.double(), mask, ref_logprobs=ref.double(),
                                       kl_coef=0.1, **cfg)
    (2.0 * loss).backward()
    (2.0 * loss0).backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    assert_rel("loss", loss.detach().reshape(1), loss0.detach().reshape(1), max(vt, 1e-5))
    for name, a, b in zip(stats._fields, stats, stats0):
        assert_rel(name, a.reshape(1), b.reshape(1), max(vt, 1e-5))
    assert_rel("dlogits", leaf.grad, r.grad, gt)


def reference_through_logits(h, w, fn):
    """fn(logits) -> scalar on float64 copies of the logits the fused path sees (h @ w.T in
    the inputs' dtype), chained by hand to dL/dh = dlogits @ W and dL/dW = dlogits^T h."""
    logits = (h @ w.t()).double().requires_grad_()
    out = fn(logits)
    (dlogits,) = torch.autograd.grad(out, logits)
    return out.detach(), dlogits @ w.double(), dlogits.t() @ h.double()


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("chunk", [None, 37])
def test_linear_ops(dtype, chunk):
    g = torch.Generator().manual_seed(2)
    N, H, V = 333, 96, 5003
    h = torch.randn(N, H, generator=g).to(dtype).to(DEV)
    w = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype).to(DEV)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:5] = -100
    labels = labels.to(DEV)
    with torch.no_grad():
        old, adv, ref, mask = ppo_inputs(h @ w.t(), labels)
    vt, gt = tol(dtype)
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = kernels.linear_ppo_loss(hf, wf, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, chunk_size=chunk)
    loss.backward()
    loss0, dh0, dw0 = reference_through_logits(h, w, lambda x: ppo_loss_reference(
        x, labels, old.double(), adv.double(), mask, ref_logprobs=ref.double(), kl_coef=0.1)[0])
    assert_rel("loss", loss.detach().reshape(1), loss0.reshape(1), max(vt, 1e-4))
    assert_rel("dhidden", hf.grad, dh0, gt * 2)
    assert_rel("dweight", wf.grad, dw0, gt * 2)
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = kernels.linear_token_logprobs(hf, wf, labels, chunk_size=chunk)
    lp.sum().backward()
    with torch.no_grad():
        lp0 = token_logprobs_reference((h @ w.t()).double(), labels)
    _, dh0, dw0 = reference_through_logits(h, w, lambda x: token_logprobs_reference(x, labels).sum())
    assert_rel("logp", lp.detach(), lp0, max(vt, 1e-4) * 10)
    assert_rel("dhidden (logprobs)", hf.grad, dh0, gt * 2)
    assert_rel("dweight (logprobs)", wf.grad, dw0, gt * 2)


def test_more_than_2_to_the_31_logits():
    # 17000 x 128256 bf16 = 2.18e9 elements: row offsets overflow int32, the kernels use int64
    N, V = 17000, 128256
    g = torch.Generator(device=DEV).manual_seed(3)
    x = torch.randn(N, V, device=DEV, dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, V, (N,), device=DEV, generator=g)
    lp = kernels.token_logprobs(x, labels)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device=DEV)
    want = token_logprobs_reference(x[rows].double(), labels[rows])
    torch.testing.assert_close(lp[rows].double(), want, atol=1e-4, rtol=1e-5)
