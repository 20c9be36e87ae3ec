"""ppo_loss: the reference against hand-worked numbers and gradcheck, then both paths against it."""

import inspect
import math

import pytest
import torch

import kernels
from kernels._rows import loss_weights
from kernels.ppo import (
    LOG_RATIO_CLAMP,
    PPOLossStats,
    _ppo_fwd_kernel,
    k3,
    ppo_loss,
    ppo_loss_reference,
)

LN2 = math.log(2.0)


def hand_case():
    """Four tokens over V = 2 with equal logits, so logp = log(1/2) for every label and
    old_logprobs sets each ratio: r = 1.5, 0.5, 0.5, 4 with advantages +1, +1, -1, -1."""
    logits = torch.zeros(4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0])
    ratios = torch.tensor([1.5, 0.5, 0.5, 4.0], dtype=torch.float64)
    old = math.log(0.5) - ratios.log()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    return logits, labels, old, adv


def test_reference_hand_worked_clip():
    logits, labels, old, adv = hand_case()
    x = logits.clone().requires_grad_()
    loss, stats = ppo_loss_reference(x, labels, old, adv, None, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 0.8 (clipped), 4
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 4.0) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.5)
    # approx_kl = mean(r - 1 - log r) = mean(0.0945349, 0.1931472, 0.1931472, 1.6137056)
    assert stats.approx_kl.item() == pytest.approx(0.5236337, abs=1e-6)
    assert stats.entropy.item() == pytest.approx(LN2, abs=1e-6)
    assert stats.kl_ref.item() == 0.0
    assert stats.ratio_mean.item() == pytest.approx(1.625) and stats.ratio_max.item() == pytest.approx(4.0)
    loss.backward()
    # dL/dlogp = -A r / 4 on unclipped tokens (0, -0.125, 0, 1); dlogits = that * (onehot - 1/2)
    expected = torch.tensor([[0, 0], [-0.0625, 0.0625], [0, 0], [0.5, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected)


def test_reference_hand_worked_dual_clip_and_kl():
    logits, labels, old, adv = hand_case()
    x = logits.clone().requires_grad_()
    loss, stats = ppo_loss_reference(x, labels, old, adv, None, clip_eps=0.2, dual_clip=3.0)
    # the last token (A < 0, r = 4) is capped at -A * 3 = 3
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 3.0) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.75)
    loss.backward()
    torch.testing.assert_close(x.grad[3], torch.zeros(2, dtype=torch.float64))
    # ref = logp + ln 2, so d = ref - logp = ln 2: k1 = -ln 2, k2 = (ln 2)^2 / 2, k3 = 1 - ln 2
    ref = torch.full((4,), math.log(0.5) + LN2, dtype=torch.float64)
    for est, kl in (("k1", -LN2), ("k2", LN2**2 / 2), ("k3", 1 - LN2)):
        loss_kl, st = ppo_loss_reference(logits, labels, old, adv, None, clip_eps=0.2, ref_logprobs=ref,
                                         kl_coef=0.5, kl_estimator=est)
        assert st.kl_ref.item() == pytest.approx(kl, abs=1e-6)
        assert loss_kl.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 4.0) / 4 + 0.5 * kl, abs=1e-9)


def test_reference_hand_worked_aggregation():
    # two sequences of 3 tokens, per-token loss -A (ratio 1: no clipping, no KL)
    logits = torch.zeros(2, 3, 2, dtype=torch.float64)
    labels = torch.zeros(2, 3, dtype=torch.long)
    old = torch.full((2, 3), math.log(0.5), dtype=torch.float64)
    adv = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)  # loss_i = 1 .. 6
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # valid losses: 1, 2 | 4
    expected = {"token-mean": 7 / 3, "sum": 7.0, "seq-mean-token-sum": (3 + 4) / 2,
                "seq-mean-token-mean": (1.5 + 4) / 2}
    for agg, value in expected.items():
        loss, _ = ppo_loss_reference(logits, labels, old, adv, mask, loss_agg=agg)
        assert loss.item() == pytest.approx(value), agg
        w = loss_weights(mask != 0, agg, torch.float64)  # the fused path's per-token weights
        assert (w * -adv.reshape(-1)).sum().item() == pytest.approx(value), agg


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    labels[0, 2] = -100
    with torch.no_grad():
        lp = torch.log_softmax(x, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    old = lp + 0.3 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    adv = torch.randn(2, 3, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    for est in ("k1", "k2", "k3"):
        f = lambda t: ppo_loss_reference(t, labels, old, adv, None, ref_logprobs=ref, kl_coef=0.3,  # noqa: E731
                                         kl_estimator=est, temperature=0.9, loss_agg="seq-mean-token-mean")[0]
        assert torch.autograd.gradcheck(f, (x,))


def test_reference_clamps_log_ratios_at_the_documented_bound():
    # V = 2 with equal logits: logp = -ln 2 for every token; ref - logp = 19, 20 + 1e-9... as set
    logits = torch.zeros(4, 2, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    logp = -LN2
    d = torch.tensor([19.0, 100.0, -100.0, 1e4], dtype=torch.float64)
    old = torch.full((4,), logp, dtype=torch.float64)  # ratio 1: the policy term is -A = 0
    adv = torch.zeros(4, dtype=torch.float64)
    assert LOG_RATIO_CLAMP == 20.0
    kl = [math.exp(19) - 1 - 19, math.exp(20) - 1 - 20, math.exp(-20) - 1 + 20, math.exp(20) - 1 - 20]
    dkl_dlogp = [-(math.exp(19) - 1), 0.0, 0.0, 0.0]  # exact inside the bound, zero beyond
    x = logits.clone().requires_grad_()
    loss, stats = ppo_loss_reference(x, labels, old, adv, ref_logprobs=logp + d, kl_coef=1.0, loss_agg="sum")
    assert loss.item() == pytest.approx(sum(kl), rel=1e-12)
    loss.backward()
    # dlogits = dloss/dlogp * (onehot(y) - p), p = (1/2, 1/2)
    expected = torch.tensor([[g / 2, -g / 2] for g in dkl_dlogp], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected)
    # the ratio too: a log-ratio of +-100 to the old policy is clamped to +-20, no gradient
    x = logits.clone().requires_grad_()
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    r = torch.tensor([19.0, 100.0, -100.0, -1e4], dtype=torch.float64)
    loss, stats = ppo_loss_reference(x, labels, logp - r, adv, loss_agg="sum")
    # A < 0, ratio > 1 + eps: the unclipped -A * ratio is the max; A > 0, ratio ~ 0: -A * ratio
    assert loss.item() == pytest.approx(math.exp(19) + math.exp(20) - 2 * math.exp(-20), rel=1e-12)
    assert stats.approx_kl.item() == pytest.approx(
        (math.exp(19) - 20 + math.exp(20) - 21 + 2 * (math.exp(-20) + 19)) / 4, rel=1e-6)  # float32 stats
    loss.backward()
    torch.testing.assert_close(x.grad[0], torch.tensor([math.exp(19) / 2, -math.exp(19) / 2], dtype=torch.float64))
    assert torch.all(x.grad[1:] == 0)


EXTREMES = (100.0, -100.0, 1e4, -1e4)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_extreme_log_ratios_stay_finite(backend, kl_estimator):
    # every token's log-ratio to the old and to the reference policy is one of +-100,
    # +-1e4 or an ordinary value: before the clamp, k3 and the ratio overflowed to inf
    x, labels, old, adv, ref, mask = rand_ppo((4, 6), 29, ignore_frac=0.1)
    with torch.no_grad():
        lp = torch.log_softmax(x.double(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    g = torch.Generator().manual_seed(3)
    pick = torch.tensor(EXTREMES + (0.3, -0.2, 15.0, -19.5), dtype=torch.float64)
    r = pick[torch.randint(0, len(pick), (4, 6), generator=g)]
    d = pick[torch.randint(0, len(pick), (4, 6), generator=g)]
    old, ref = (lp - r).float(), (lp + d).float()
    for kw in (dict(), dict(dual_clip=3.0, loss_agg="seq-mean-token-mean")):
        loss, stats, grad = compare(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.5,
                                    kl_estimator=kl_estimator, **kw)
        assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats)
        assert torch.isfinite(grad).all()


def test_k3_is_accurate_for_small_d():
    d64 = torch.tensor([1e-8, -1e-7, 1e-6, 3e-5, -1e-4, 1e-3, 0.01, -0.3, 0.99, -0.999, 1.0, 1.5, -4.0, 10.0],
                       dtype=torch.float64)
    # exact to float64 precision: the series where it converges fast, exp(d) - 1 - d elsewhere
    exact = torch.tensor([sum(v**k / math.factorial(k) for k in range(2, 30)) if abs(v) < 2
                          else math.expm1(v) - v for v in d64.tolist()], dtype=torch.float64)
    got = k3(d64.float()).double()
    assert torch.all((got - exact).abs() <= 1e-6 * exact.abs()), (got, exact)
    naive = (torch.exp(d64.float()) - 1 - d64.float()).double()
    assert not torch.all((naive - exact).abs() <= 1e-3 * exact.abs())  # why the series is needed


def test_kl_coef_is_a_runtime_argument():
    # kl_coef (and the clip range) are plain kernel arguments, not tl.constexpr: a new value
    # every step (adaptive KL) reuses the compiled kernel
    params = inspect.signature(_ppo_fwd_kernel).parameters
    for name in ("kl_coef", "clip_low", "clip_high", "dual_clip", "inv_temp"):
        assert "constexpr" not in str(params[name].annotation), name


# --------------------------------------------------------------------------- fused vs reference


def rand_ppo(shape, V, dtype=torch.float32, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    with torch.no_grad():
        lp = torch.log_softmax(x.double(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    old = (lp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(shape, generator=g).float()
    ref = (lp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    mask = torch.rand(shape, generator=g) > 0.2
    return x, labels, old, adv, ref, mask


def compare(x, labels, old, adv, mask, grad_tol=2e-5, **kw):
    xr, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    l0, s0 = ppo_loss_reference(xr, labels, old, adv, mask, **kw)
    l1, s1 = ppo_loss(xf, labels, old, adv, mask, **kw)
    (3.0 * l0).backward()
    (3.0 * l1).backward()
    assert isinstance(s1, PPOLossStats) and all(not s.requires_grad for s in s1)
    torch.testing.assert_close(l1.float(), l0.float(), atol=2e-5, rtol=1e-5)
    for a, b in zip(s1, s0):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad.float(), xr.grad.float(), atol=grad_tol, rtol=grad_tol)
    return l1, s1, xf.grad


CONFIGS = [
    dict(),
    dict(clip_eps=0.1, clip_eps_high=0.28, temperature=0.7, loss_agg="sum"),
    dict(ref_logprobs=True, kl_coef=0.2, kl_estimator="k1", loss_agg="seq-mean-token-sum"),
    dict(ref_logprobs=True, kl_coef=0.2, kl_estimator="k2", dual_clip=1.5, loss_agg="seq-mean-token-mean"),
    dict(ref_logprobs=True, kl_coef=0.05, kl_estimator="k3", dual_clip=2.0, clip_eps=0.05, temperature=1.3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_reference(backend, cfg):
    x, labels, old, adv, ref, mask = rand_ppo((3, 4), 37)
    cfg = dict(cfg)
    if cfg.get("ref_logprobs"):
        cfg["ref_logprobs"] = ref
    _, stats, _ = compare(x, labels, old, adv, mask, **cfg)
    assert 0 < stats.clipfrac < 1  # both branches are exercised


def test_flat_and_single_token(backend):
    x, labels, old, adv, ref, mask = rand_ppo((9,), 20)
    compare(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    x, labels, old, adv, ref, mask = rand_ppo((1,), 5, ignore_frac=0.0)
    compare(x, labels, old, adv, None, ref_logprobs=ref, kl_coef=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits(backend, dtype):
    x, labels, old, adv, ref, mask = rand_ppo((2, 5), 40, dtype=dtype)
    _, _, grad = compare(x, labels, old, adv, mask, grad_tol=1e-2, ref_logprobs=ref, kl_coef=0.1, temperature=0.8)
    assert grad.dtype == dtype


def test_kl_coef_changes_every_step(backend):
    x, labels, old, adv, ref, mask = rand_ppo((2, 6), 24)
    losses = []
    for kl_coef in (0.0, 0.1, 0.37):
        loss, stats = ppo_loss(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=kl_coef)
        losses.append(loss.item())
    pg = losses[0]
    assert losses[1] == pytest.approx(pg + 0.1 * stats.kl_ref.item() * 1, rel=1e-4)
    assert losses[2] == pytest.approx(pg + 0.37 * stats.kl_ref.item(), rel=1e-4)


def test_masked_rows_have_zero_gradient_even_with_nan_logits(backend):
    x, labels, old, adv, ref, mask = rand_ppo((2, 5), 30, ignore_frac=0.0)
    mask[0, 1] = False
    labels[1, 3] = -100
    x[0, 1] = float("nan")
    x[1, 3] = float("inf")
    leaf = x.clone().requires_grad_()
    loss, stats = ppo_loss(leaf, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats)
    assert torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[0, 1] == 0) and torch.all(leaf.grad[1, 3] == 0)
    assert torch.all(leaf.grad[~mask] == 0)


def test_no_valid_tokens(backend):
    x, labels, old, adv, ref, mask = rand_ppo((2, 3), 10)
    for agg in ("token-mean", "seq-mean-token-mean"):
        leaf = x.clone().requires_grad_()
        loss, stats = ppo_loss(leaf, labels, old, adv, torch.zeros_like(mask), loss_agg=agg)
        loss.backward()
        assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats)
        assert torch.all(leaf.grad == 0)


def test_no_out_of_bounds_reads(backend):
    x, labels, old, adv, ref, mask = rand_ppo((7,), 37)

    def padded(t, fill):
        big = torch.full((t.shape[0] + 4, *t.shape[1:]), fill, dtype=t.dtype)
        if t.dim() == 2:
            big = torch.full((t.shape[0] + 4, t.shape[1] + 6), fill, dtype=t.dtype)
            view = big[2:-2, 3:-3]
        else:
            view = big[2:-2]
        view.copy_(t)
        return view

    nan = float("nan")
    kw = dict(ref_logprobs=ref, kl_coef=0.1, temperature=0.9)
    l0, s0 = ppo_loss(x, labels, old, adv, mask, **kw)
    kw["ref_logprobs"] = padded(ref, nan)
    l1, s1 = ppo_loss(padded(x, nan), padded(labels, 10**9), padded(old, nan), padded(adv, nan), mask, **kw)
    assert torch.isfinite(l1)
    assert l1.item() == l0.item()
    for a, b in zip(s0, s1):
        assert a.item() == b.item()


def test_sliced_sequence_view(backend):
    x, labels, old, adv, ref, mask = rand_ppo((3, 5), 20)
    full = torch.full((3, 8, 20), float("nan"))
    full[:, 2:-1] = x
    leaf = full.clone().requires_grad_()
    kw = dict(ref_logprobs=ref, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    loss, stats = ppo_loss(leaf[:, 2:-1], labels, old, adv, mask, **kw)
    loss.backward()
    xr = x.clone().requires_grad_()
    l0, s0 = ppo_loss_reference(xr, labels, old, adv, mask, **kw)
    l0.backward()
    torch.testing.assert_close(loss, l0.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(leaf.grad[:, 2:-1], xr.grad, atol=2e-5, rtol=1e-5)
    assert torch.all(leaf.grad[:, :2] == 0) and torch.all(leaf.grad[:, -1] == 0)


def test_ppo_torch_path_gradcheck():
    x, labels, old, adv, ref, mask = rand_ppo((2, 3), 6)
    x = x.double().requires_grad_()
    old, adv, ref = old.double(), adv.double(), ref.double()
    with kernels._dispatch.force_backend("torch"):
        f = lambda t: ppo_loss(t, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.3,  # noqa: E731
                               dual_clip=1.5, temperature=0.8)[0]
        assert torch.autograd.gradcheck(f, (x,))
