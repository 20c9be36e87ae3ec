"""Peak memory (and time) of one PPO policy update: the fused losses vs the naive one.

Group "ppo_update" (conventions in bench/conftest.py): the forward of a minirlhf
Transformer whose LM head has the largest vocabulary in common use (V = 128256, Llama 3's;
sizes["update"] in bench/conftest.py), the clipped PPO loss with a k3 KL penalty over every
token, and the backward to all parameters -- three ways:

- naive:           logits = model(tokens); the plain-torch loss (kernels.ppo.ppo_loss_reference)
- ppo_loss:        logits = model(tokens); kernels.ppo_loss (what stages/ppo.py does today)
- linear_ppo_loss: hidden = model.hidden(tokens); kernels.linear_ppo_loss(hidden, lm_head.weight):
                   the (tokens x V) logits never exist

The optimizer step is left out: its memory (AdamW's two moments) is the same for all three.
Loss and gradients of every variant are checked against the naive one before timing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, measure

import kernels
from kernels.ppo import ppo_loss_reference
from minirlhf.config import ModelConfig
from minirlhf.model import Transformer

PPO_KW = dict(clip_eps=0.2, kl_coef=0.05, kl_estimator="k3")
VARIANTS = ("naive", "ppo_loss", "linear_ppo_loss")


@pytest.fixture(scope="module")
def setup(sizes):
    s = sizes["update"]
    B, T, V, dim = s["B"], s["T"], s["V"], s["dim"]
    heads = max(1, dim // 64)
    cfg = ModelConfig(vocab_size=V, dim=dim, n_layers=s["n_layers"], n_heads=heads, n_kv_heads=max(1, heads // 2),
                      ffn_dim=3 * dim, max_seq_len=T, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=DEVICE, dtype=s["dtype"])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((B, 1), -100)], 1)  # next token; the last has none
    with torch.no_grad():
        logp = kernels.token_logprobs(model(tokens.to(DEVICE)), labels.to(DEVICE)).cpu()
    batch = dict(tokens=tokens, labels=labels, old=logp + 0.1 * torch.randn(B, T, generator=g),
                 adv=torch.randn(B, T, generator=g), ref=logp + 0.1 * torch.randn(B, T, generator=g),
                 mask=torch.rand(B, T, generator=g) > 0.1)
    return model, {k: v.to(DEVICE) for k, v in batch.items()}


def update(model, d, variant):
    """One forward + loss + backward; returns the loss (gradients land in model's .grad)."""
    model.zero_grad(set_to_none=True)
    args = (d["labels"], d["old"], d["adv"], d["mask"])
    if variant == "linear_ppo_loss":
        loss, _ = kernels.linear_ppo_loss(model.hidden(d["tokens"]), model.lm_head.weight, *args,
                                          ref_logprobs=d["ref"], **PPO_KW)
    else:
        op = kernels.ppo_loss if variant == "ppo_loss" else ppo_loss_reference
        loss, _ = op(model(d["tokens"]), *args, ref_logprobs=d["ref"], **PPO_KW)
    loss.backward()
    return loss.detach()


@pytest.fixture(scope="module")
def checked(setup):
    """Every variant's loss and gradients against the naive update's, before any timing."""
    model, d = setup
    results = {}
    for variant in VARIANTS:
        loss = update(model, d, variant)
        results[variant] = (loss, {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                   if p.grad is not None})  # the scalar head takes no part
    model.zero_grad(set_to_none=True)
    tol = 2e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    want_loss, want_grads = results["naive"]
    diffs = {}
    for variant in VARIANTS[1:]:
        loss, grads = results[variant]
        assert abs(loss.item() - want_loss.item()) <= tol * max(1.0, abs(want_loss.item())), (variant, loss, want_loss)
        worst = 0.0
        for name, want in want_grads.items():
            err = (grads[name] - want).abs().max().item()
            assert err <= tol * max(want.abs().max().item(), 1e-30), (variant, name, err)
            worst = max(worst, err)
        diffs[variant] = worst
    return diffs


@pytest.mark.parametrize("variant", VARIANTS)
def test_ppo_update(benchmark, setup, checked, variant, sizes):
    model, d = setup
    extra = {"vocab_size": sizes["update"]["V"], "tokens": d["tokens"].numel(),
             "parameters": sum(p.numel() for p in model.parameters())}
    if variant != "naive":
        extra["max_abs_diff_grad"] = checked[variant]
    measure(benchmark, lambda: update(model, d, variant), group="ppo_update", impl=variant,
            ours=variant != "naive", **extra)
    model.zero_grad(set_to_none=True)
