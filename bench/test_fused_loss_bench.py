"""kernels/ against the losses people would otherwise use, forward + backward, same run.

Groups (see bench/conftest.py for the conventions):
- token_logprobs:  kernels.token_logprobs vs the naive log_softmax -> gather (and, on CUDA,
                   Liger-Kernel's cross entropy with reduction="none", which is -logp)
- ppo_loss:        kernels.ppo_loss vs the naive composition (kernels.ppo.ppo_loss_reference)
- linear_ppo_loss: kernels.linear_ppo_loss vs hidden @ W.T + the naive composition, vs
                   Liger-Kernel's LigerFusedLinearGRPOLoss and vs TRL's FusedLinearGRPOLoss
                   (trl/losses, TRL 1.13.0 only), at matching semantics: token-mean over the
                   valid tokens (their loss_type="bnpo"), k3 KL to the reference with
                   beta = kl_coef = 0.05, clip 0.2 both sides, temperature 1, one advantage
                   per sequence broadcast over its tokens (their GRPO convention). Theirs run
                   with compiled=False on CPU (torch.compile of their loss math needs a C++
                   toolchain there) and compiled=True on CUDA, as shipped.
Every implementation's loss and gradients are checked against ours on the same inputs
before anything is timed (check_* fixtures).

CUDA extras: achieved_GBps for the logits ops counts their floor traffic, 3 * N * V
bytes-per-element (read the logits forward, read them and write the gradient backward),
against the card's memory bandwidth; achieved_TFLOPs for the fused-linear ops counts
their three matmuls, 6 * N * H * V flops.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, memory_bandwidth, measure

import kernels
from kernels.logprobs import token_logprobs_reference
from kernels.ppo import ppo_loss_reference

KL_COEF, CLIP = 0.05, 0.2
COMPILE_REFS = DEVICE == "cuda"


# --------------------------------------------------------------------------- inputs


def make_inputs(B, T, V, H, dtype, seed=0):
    """One batch in GRPO/PPO shape: B sequences of T tokens, the last few of each masked out
    (ragged completion lengths), per-sequence advantages, old/ref log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv_seq = torch.randn(B, generator=g)
    noise_old, noise_ref = 0.1 * torch.randn(B, T, generator=g), 0.1 * torch.randn(B, T, generator=g)
    dev = dict(device=DEVICE)
    hidden, weight = hidden.to(dtype=dtype, **dev), weight.to(dtype=dtype, **dev)
    labels, mask = labels.to(**dev), mask.to(**dev)
    with torch.no_grad():
        logp = kernels.linear_token_logprobs(hidden, weight, labels)
    return dict(hidden=hidden, weight=weight, labels=labels, mask=mask,
                adv_seq=adv_seq.to(**dev), adv=adv_seq.to(**dev)[:, None].expand(B, T).contiguous(),
                old=logp + noise_old.to(**dev), ref=logp + noise_ref.to(**dev))


@pytest.fixture(scope="module")
def batch(sizes):
    s = sizes["loss"]
    return make_inputs(s["B"], s["T"], s["V"], s["H"], s["dtype"])


@pytest.fixture(scope="module")
def logits_batch(batch):
    """The same batch with the logits materialised (for the ops that take logits)."""
    with torch.no_grad():
        logits = batch["hidden"] @ batch["weight"].t()
    return {**batch, "logits": logits}


def _tol(dtype):
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-4


def assert_close_rel(name, got, want, tol):
    """max |got - want| <= tol * max |want|: one scale per tensor, fit for gradients whose
    entries span orders of magnitude."""
    got, want = got.detach().float(), want.detach().float()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{name}: max abs diff {err:.3g} vs scale {scale:.3g} (tol {tol})"
    return err


# --------------------------------------------------------------------------- the implementations


def logprobs_call(impl, d):
    if impl == "liger":
        ce = _liger().LigerCrossEntropyLoss(reduction="none")  # -log p of each label

        def run():
            x = d["logits"].detach().requires_grad_()
            out = -ce(x.view(-1, x.shape[-1]), d["labels"].view(-1))
            out.sum().backward()
            return out, x.grad
        return run
    op = {"kernels": kernels.token_logprobs, "naive": token_logprobs_reference}[impl]

    def run():
        x = d["logits"].detach().requires_grad_()
        out = op(x, d["labels"])
        out.sum().backward()
        return out, x.grad
    return run


def ppo_call(impl, d):
    op = {"kernels": kernels.ppo_loss, "naive": ppo_loss_reference}[impl]

    def run():
        x = d["logits"].detach().requires_grad_()
        loss, _ = op(x, d["labels"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"], clip_eps=CLIP,
                     kl_coef=KL_COEF, kl_estimator="k3")
        loss.backward()
        return loss, x.grad
    return run


def linear_call(impl, d):
    if impl in ("liger", "trl"):
        loss_fn = _grpo_loss_module(impl)

    def run():
        h, w = d["hidden"].detach().requires_grad_(), d["weight"].detach().requires_grad_()
        if impl == "kernels":
            loss, _ = kernels.linear_ppo_loss(h, w, d["labels"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"],
                                              clip_eps=CLIP, kl_coef=KL_COEF, kl_estimator="k3")
        elif impl == "naive":
            loss, _ = ppo_loss_reference(h @ w.t(), d["labels"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"],
                                         clip_eps=CLIP, kl_coef=KL_COEF, kl_estimator="k3")
        else:
            out = loss_fn(h, w, d["labels"], d["mask"].long(), d["adv_seq"], ref_per_token_logps=d["ref"],
                          old_per_token_logps=d["old"])
            loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss, h.grad, w.grad
    return run


def _liger():
    try:
        import liger_kernel.transformers as lt
    except Exception as e:  # not installed, or no build for this platform
        pytest.skip(f"Liger-Kernel is not importable: {e}")
    return lt


def _grpo_loss_module(impl):
    kw = dict(beta=KL_COEF, compiled=COMPILE_REFS, use_ref_model=True, chunk_size=1, epsilon_low=CLIP,
              epsilon_high=CLIP, loss_type="bnpo", temperature=1.0)
    if impl == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as e:
            pytest.skip(f"Liger-Kernel is not importable: {e}")
        return LigerFusedLinearGRPOLoss(**kw)
    try:
        from trl.losses.grpo_loss import FusedLinearGRPOLoss
    except Exception as e:  # only TRL 1.13.0 ships trl/losses/fused_linear_ppo.py
        pytest.skip(f"TRL's fused-linear GRPO loss is not importable (pip install trl==1.13.0): {e}")
    return FusedLinearGRPOLoss(**kw)


# --------------------------------------------------------------------------- checks before timing


def check_against_naive(call, d, names):
    """Ours against the naive composition on the benchmark's own inputs, before timing."""
    want, got = call("naive", d)(), call("kernels", d)()
    tol = _tol(d["logits"].dtype)
    return {f"max_abs_diff_{n}": assert_close_rel(n, g, w, tol) for n, g, w in zip(names, got, want)}


@pytest.fixture(scope="module")
def check_logprobs(logits_batch):
    return check_against_naive(logprobs_call, logits_batch, ("logp", "dlogits"))


@pytest.fixture(scope="module")
def check_ppo(logits_batch):
    return check_against_naive(ppo_call, logits_batch, ("loss", "dlogits"))


@pytest.fixture(scope="module")
def linear_ours(batch):
    return linear_call("kernels", batch)()


def check_linear(impl, batch, ours):
    """Theirs (or naive) against ours: loss, dL/dhidden, dL/dW."""
    theirs = linear_call(impl, batch)()
    tol = _tol(batch["hidden"].dtype)
    return {f"max_abs_diff_{name}": assert_close_rel(f"{impl} {name}", a, b, tol)
            for name, a, b in zip(("loss", "dhidden", "dweight"), theirs, ours)}


# --------------------------------------------------------------------------- benchmarks


def _sizes(d) -> dict:
    """What the groups' titles name (convention 6): N tokens, hidden H, vocabulary V, dtype."""
    B, T, H = d["hidden"].shape
    return {"tokens": B * T, "hidden": H, "vocab_size": d["weight"].shape[0],
            "dtype": str(d["hidden"].dtype).replace("torch.", "")}


def _floor_bytes(d):
    return 3 * d["logits"].numel() * d["logits"].element_size()


def _bandwidth_facts(info, floor_bytes, benchmark):
    if DEVICE != "cuda":
        return
    t = benchmark.stats.stats.min
    facts = {"floor_bytes": floor_bytes, "achieved_GBps": floor_bytes / t / 1e9}
    bw = memory_bandwidth()
    if bw:
        facts["fraction_of_memory_bandwidth"] = floor_bytes / t / bw
    benchmark.extra_info.update(facts)


# Liger's cross entropy is a Triton kernel: a reference on CUDA only
@pytest.mark.parametrize("impl", ["kernels", "naive"] + (["liger"] if DEVICE == "cuda" else []))
def test_token_logprobs(benchmark, logits_batch, check_logprobs, impl):
    extra = check_logprobs if impl == "kernels" else {}
    if impl == "liger":
        got = logprobs_call("liger", logits_batch)()
        want = logprobs_call("naive", logits_batch)()
        extra = {"max_abs_diff_logp": assert_close_rel("liger logp", got[0], want[0].reshape(-1), _tol(got[0].dtype))}
    info = measure(benchmark, logprobs_call(impl, logits_batch), group="token_logprobs", impl=impl,
                   ours=impl == "kernels", **extra, **_sizes(logits_batch))
    _bandwidth_facts(info, _floor_bytes(logits_batch), benchmark)


@pytest.mark.parametrize("impl", ["kernels", "naive"])
def test_ppo_loss(benchmark, logits_batch, check_ppo, impl):
    info = measure(benchmark, ppo_call(impl, logits_batch), group="ppo_loss", impl=impl, ours=impl == "kernels",
                   **(check_ppo if impl == "kernels" else {}), **_sizes(logits_batch))
    _bandwidth_facts(info, _floor_bytes(logits_batch), benchmark)


@pytest.mark.parametrize("impl", ["kernels", "naive", "liger", "trl"])
def test_linear_ppo_loss(benchmark, batch, linear_ours, impl):
    extra = {} if impl == "kernels" else check_linear(impl, batch, linear_ours)
    measure(benchmark, linear_call(impl, batch), group="linear_ppo_loss", impl=impl, ours=impl == "kernels",
            **extra, **_sizes(batch))
    if DEVICE == "cuda":
        B, T, H = batch["hidden"].shape
        flops = 6 * B * T * H * batch["weight"].shape[0]
        benchmark.extra_info["achieved_TFLOPs"] = flops / benchmark.stats.stats.min / 1e12
