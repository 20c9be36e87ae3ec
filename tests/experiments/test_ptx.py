"""PPO-ptx (InstructGPT eq. 2): the pretraining term by hand on a tiny batch, and the PPO stage
adding exactly γ times it to the policy loss of every minibatch."""
import json
import math

import pytest
import torch

from minirlhf import optim
from minirlhf.config import PRESETS, replace
from minirlhf.metrics import Metrics
from minirlhf.pipeline import load_inputs
from minirlhf.stages import ppo


class FixedLogits(torch.nn.Module):
    """A 'policy' whose logits are given: (N, L, V) whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, tokens):
        return self.logits


def test_ptx_loss_by_hand():
    # vocab 4, one window of 2 positions. Position 0: logits 0 0 0 0, target 2: p = 1/4, CE = ln 4.
    # Position 1: logits ln3 0 0 0, target 0: p = 3/6, CE = ln 2. Mean: (ln 4 + ln 2)/2 = 1.5 ln 2.
    policy = FixedLogits(torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0]]]))
    loss = ppo.ptx_loss(policy, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[2, 0]]))
    assert loss.item() == pytest.approx(1.5 * math.log(2))
    # with γ = 0.5 the policy loss gains 0.75 ln 2, and its gradient γ·(softmax − onehot)/2 per position
    (0.5 * loss).backward()
    want = 0.5 * torch.tensor([[[0.25, 0.25, -0.75, 0.25], [0.5 - 1, 1 / 6, 1 / 6, 1 / 6]]]) / 2
    assert torch.allclose(policy.logits.grad, want, atol=1e-6)


def test_ppo_adds_gamma_times_the_ptx_loss_to_every_policy_step(tiny_run, tmp_path, monkeypatch):
    run_dir, _ = tiny_run
    cfg = replace(PRESETS["tiny"](), ppo={"iterations": 1, "ptx_coef": 0.5, "eval_every": None})
    inputs = load_inputs(cfg)
    seen = {"pg": [], "ptx": [], "steps": []}
    kernel, ptx_fn, step = ppo.ppo_loss, ppo.ptx_loss, optim.step

    def record_pg(*a, **k):
        out = kernel(*a, **k)
        seen["pg"].append(out[0].item())
        return out

    def record_ptx(*a, **k):
        out = ptx_fn(*a, **k)
        seen["ptx"].append(out.item())
        return out

    def record_step(opt, models, losses, clip):  # one step per minibatch: {name: loss} summed
        seen["steps"].append({k: v.item() for k, v in losses.items()})
        return step(opt, models, losses, clip)

    monkeypatch.setattr(ppo, "ppo_loss", record_pg)
    monkeypatch.setattr(ppo, "ptx_loss", record_ptx)
    monkeypatch.setattr(optim, "step", record_step)
    ppo.run_ppo(cfg, tmp_path / "ppo", sft_dir=run_dir / "sft", rm_dir=run_dir / "rm", prompts=inputs.ppo_prompts,
                metrics=Metrics(tmp_path), pretrain_corpus=inputs.corpus)
    n = len(seen["pg"])
    assert n == cfg.ppo.ppo_epochs * cfg.ppo.batch_size // cfg.ppo.minibatch_size  # no early stop at this size
    assert len(seen["ptx"]) == len(seen["steps"]) == n
    for pg, ptx, losses in zip(seen["pg"], seen["ptx"], seen["steps"]):
        assert set(losses) == {"pg_loss", "vf_loss", "ptx_loss"}
        assert losses["pg_loss"] == pytest.approx(pg, rel=1e-6, abs=1e-7)
        assert losses["ptx_loss"] == pytest.approx(0.5 * ptx, rel=1e-6)   # γ · LM loss, beside the surrogate
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["ptx_loss"] == pytest.approx(sum(seen["ptx"]) / n)
    assert row["pg_loss"] == pytest.approx(sum(seen["pg"]) / n)  # the logged pg_loss is the surrogate alone


def test_ptx_off_draws_no_pretraining_batch(tiny_run, tmp_path, monkeypatch):
    run_dir, _ = tiny_run
    cfg = replace(PRESETS["tiny"](), ppo={"iterations": 1, "eval_every": None})
    inputs = load_inputs(cfg)
    monkeypatch.setattr(ppo, "ptx_loss", lambda *a, **k: pytest.fail("ptx_loss called with ptx_coef 0"))
    ppo.run_ppo(cfg, tmp_path / "ppo", sft_dir=run_dir / "sft", rm_dir=run_dir / "rm", prompts=inputs.ppo_prompts,
                metrics=Metrics(tmp_path))
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert "ptx_loss" not in row


def test_ptx_without_a_corpus_is_a_user_error(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    cfg = replace(PRESETS["tiny"](), ppo={"iterations": 1, "ptx_coef": 0.5})
    with pytest.raises(ValueError, match="ppo.ptx_coef=0.5: the pretraining corpus has 0 tokens"):
        ppo.run_ppo(cfg, tmp_path / "ppo", sft_dir=run_dir / "sft", rm_dir=run_dir / "rm", prompts=["hi"],
                    metrics=Metrics(tmp_path))
