"""linear_token_logprobs / linear_ppo_loss against the reference on hidden @ weight.T."""


import pytest
import torch

import kernels
from kernels import linear_ppo_loss, linear_token_logprobs
from kernels.linear import default_chunk_size
from kernels.logprobs import token_logprobs_reference
from kernels.ppo import ppo_loss_reference
from minirlhf.memory import peak_allocated_bytes


def rand_linear(shape, H, V, dtype=torch.float32, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    with torch.no_grad():
        lp = token_logprobs_reference(h.double() @ w.double().t(), labels)
    old = (lp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g)
    ref = (lp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    mask = torch.rand(shape, generator=g) > 0.2
    return h, w, labels, old, adv, ref, mask


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("chunk", [None, 1, 4, 64])
def test_linear_token_logprobs(backend, chunk):
    h, w, labels, *_ = rand_linear((2, 5), 8, 37)
    hr, wr = leaves(h, w)
    hf, wf = leaves(h, w)
    lp0, ent0 = token_logprobs_reference(hr @ wr.t(), labels, 0.8, True)
    lp1, ent1 = linear_token_logprobs(hf, wf, labels, 0.8, True, chunk_size=chunk)
    assert lp1.shape == (2, 5)
    up = torch.randn(2, 5)
    (lp0 * up + ent0).sum().backward()
    (lp1 * up + ent1).sum().backward()
    for a, b in ((lp1, lp0), (ent1, ent0), (hf.grad, hr.grad), (wf.grad, wr.grad)):
        torch.testing.assert_close(a, b.detach(), atol=3e-5, rtol=1e-5)


CONFIGS = [
    dict(),
    dict(ref_logprobs=True, kl_coef=0.1, kl_estimator="k3", temperature=0.9, loss_agg="seq-mean-token-mean"),
    dict(ref_logprobs=True, kl_coef=0.2, kl_estimator="k2", dual_clip=1.5, clip_eps_high=0.3, loss_agg="sum"),
]


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "k3-seq", "k2-dual"])
def test_linear_ppo_loss(backend, chunk, cfg):
    h, w, labels, old, adv, ref, mask = rand_linear((3, 4), 8, 37)
    cfg = dict(cfg)
    if cfg.get("ref_logprobs"):
        cfg["ref_logprobs"] = ref
    hr, wr = leaves(h, w)
    hf, wf = leaves(h, w)
    l0, s0 = ppo_loss_reference(hr @ wr.t(), labels, old, adv, mask, **cfg)
    l1, s1 = linear_ppo_loss(hf, wf, labels, old, adv, mask, chunk_size=chunk, **cfg)
    (2.5 * l0).backward()
    (2.5 * l1).backward()  # the upstream scale reaches the gradients formed in forward
    torch.testing.assert_close(l1, l0.detach(), atol=2e-5, rtol=1e-5)
    for a, b in zip(s1, s0):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(hf.grad, hr.grad, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(wf.grad, wr.grad, atol=3e-5, rtol=1e-5)


def test_linear_ppo_extreme_log_ratios(backend):
    # log-ratios of +-100 and +-1e4 to the old and reference policies: finite, and equal to
    # the reference, which clamps them at the same bound (kernels/ppo.py)
    h, w, labels, old, adv, ref, mask = rand_linear((8,), 8, 37, ignore_frac=0.0)
    with torch.no_grad():
        lp = token_logprobs_reference(h @ w.t(), labels)
    r = torch.tensor([100.0, -100.0, 1e4, -1e4, 0.1, 100.0, -1e4, 5.0])
    old, ref = lp - r, lp + r.flip(0)
    hr, wr = leaves(h, w)
    hf, wf = leaves(h, w)
    kw = dict(ref_logprobs=ref, kl_coef=0.3, kl_estimator="k3")
    l0, _ = ppo_loss_reference(hr @ wr.t(), labels, old, adv, mask, **kw)
    l1, _ = linear_ppo_loss(hf, wf, labels, old, adv, mask, chunk_size=3, **kw)
    l0.backward()
    l1.backward()
    assert torch.isfinite(l1) and torch.isfinite(hf.grad).all() and torch.isfinite(wf.grad).all()
    torch.testing.assert_close(l1, l0.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf.grad, hr.grad, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(wf.grad, wr.grad, atol=3e-5, rtol=1e-5)


def test_linear_ppo_partial_grads_and_no_grad():
    h, w, labels, old, adv, ref, mask = rand_linear((10,), 6, 21)
    frozen_w = w.clone()
    hf = h.clone().requires_grad_()
    loss, _ = linear_ppo_loss(hf, frozen_w, labels, old, adv, mask)
    loss.backward()
    hr = h.clone().requires_grad_()
    ppo_loss_reference(hr @ w.t(), labels, old, adv, mask)[0].backward()
    torch.testing.assert_close(hf.grad, hr.grad, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        l_ng, _ = linear_ppo_loss(h.requires_grad_(), w, labels, old, adv, mask)
    torch.testing.assert_close(l_ng, loss.detach())


def test_linear_ppo_backward_twice_is_an_error():
    h, w, labels, old, adv, ref, mask = rand_linear((6,), 4, 9)
    hf = h.clone().requires_grad_()
    loss, _ = linear_ppo_loss(hf, w, labels, old, adv, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half(backend, dtype):
    h, w, labels, old, adv, ref, mask = rand_linear((2, 6), 16, 40, dtype=dtype)
    hr, wr = leaves(h, w)
    hf, wf = leaves(h, w)
    # the reference sees the same 16-bit logits the fused path computes chunk by chunk
    ppo_loss_reference(hr @ wr.t(), labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)[0].backward()
    loss, _ = linear_ppo_loss(hf, wf, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, chunk_size=5)
    loss.backward()
    assert hf.grad.dtype == dtype and wf.grad.dtype == dtype
    torch.testing.assert_close(hf.grad.float(), hr.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(wf.grad.float(), wr.grad.float(), atol=2e-2, rtol=2e-2)


def test_linear_float64_torch_path():
    # float64 end to end: linear_token_logprobs goes through gradcheck; linear_ppo_loss forms
    # its gradients in forward and scales them in place in a single backward (gradcheck
    # calls backward repeatedly), so it is held to the gradchecked reference at 1e-10
    h, w, labels, old, adv, ref, mask = rand_linear((5,), 3, 7)
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    old, adv, ref = old.double(), adv.double(), ref.double()
    with kernels._dispatch.force_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda a, b: linear_token_logprobs(a, b, labels, 0.7, True, chunk_size=2), (h, w))
        kw = dict(ref_logprobs=ref, kl_coef=0.2, dual_clip=1.5, temperature=0.8)
        loss, _ = linear_ppo_loss(h, w, labels, old, adv, mask, chunk_size=2, **kw)
        assert loss.dtype == torch.float64
        gh, gw = torch.autograd.grad(0.7 * loss, (h, w))
    hr, wr = leaves(h, w)
    ref_loss, _ = ppo_loss_reference(hr @ wr.t(), labels, old, adv, mask, **kw)
    rh, rw = torch.autograd.grad(0.7 * ref_loss, (hr, wr))
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gh, rh, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gw, rw, atol=1e-12, rtol=1e-10)


def test_default_chunk_size():
    # the chunk of logits may take the bytes of the weight's gradient (V x H)...
    for N, V, H, size in ((16384, 128256, 4096, 2), (4096, 32000, 256, 4), (4096, 32000, 1024, 4)):
        rows = default_chunk_size(N, V, H, size)
        assert rows * V * size <= V * H * size < (rows + 1) * V * size
    # ...or 16 MiB where that is more, and never more than N rows
    assert default_chunk_size(4096, 32000, 64, 4) == (16 << 20) // (32000 * 4) == 131
    assert default_chunk_size(10, 1000, 8) == 10


# --------------------------------------------------------------------------- memory


def test_linear_peak_memory_is_per_chunk():
    N, H, V, chunk = 512, 16, 2000, 32
    h, w, labels, old, adv, ref, mask = rand_linear((N,), H, V)
    full_logits = N * V * 4

    def run_ppo():
        a, b = leaves(h, w)
        linear_ppo_loss(a, b, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, chunk_size=chunk)[0].backward()

    def run_logprobs():
        a, b = leaves(h, w)
        linear_token_logprobs(a, b, labels, 1.0, True, chunk_size=chunk)[0].sum().backward()

    for fn in (run_ppo, run_logprobs):
        peak = peak_allocated_bytes(fn)
        # gradients of h and w plus a few chunk x V temporaries; the full logits would be 8 MB
        assert peak < 8 * chunk * V * 4 + 3 * (N + V) * H * 4 + 64 * N * 4, peak
        assert peak < full_logits / 2


def test_default_chunk_peak_memory_is_within_the_budget(monkeypatch):
    # with the 16 MiB floor off, the default chunk is H rows: one reused chunk buffer the
    # size of dW, plus dW and dh themselves and per-token vectors (a fresh buffer per chunk
    # would hold two chunks at once and exceed this by V * H * 4 bytes)
    monkeypatch.setattr(kernels.linear, "MIN_CHUNK_BYTES", 0)
    N, H, V = 600, 16, 3000
    h, w, labels, old, adv, ref, mask = rand_linear((N,), H, V)
    assert default_chunk_size(N, V, H, 4) == H

    def run():
        a, b = leaves(h, w)
        linear_ppo_loss(a, b, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)[0].backward()

    leaves_ = (N + V) * H * 4  # the clones run() makes of h and w
    budget = 2 * V * H * 4 + N * H * 4
    small = 8 * kernels._rows.CHUNK_ELEMENTS * 4 + 64 * N * 4
    assert peak_allocated_bytes(run) < leaves_ + budget + small


def test_token_path_peak_memory_is_the_gradient_plus_chunks():
    g = torch.Generator().manual_seed(0)
    N, V = 256, 3000
    x = torch.randn(N, V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)

    def run():
        leaf = x.clone().requires_grad_()
        kernels.ppo_loss(leaf, labels, labels.float() * 0 - 5, torch.randn(N, generator=g), None)[0].backward()

    clone_and_grad = 2 * N * V * 4
    with kernels._dispatch.force_backend("torch"):
        peak = peak_allocated_bytes(run)
    assert peak < clone_and_grad + 8 * kernels._rows.CHUNK_ELEMENTS * 4 + 64 * N * 4, peak
