"""PPO's bookkeeping by hand, the KL controller against its formula, and the switch from
torch bookkeeping to the C++ buffer leaving a PPO iteration's advantages unchanged."""
import math
import types

import pytest
import torch

from minirlhf import rollout
from minirlhf.stages.ppo import AdaptiveKLController, FixedKLController, value_loss


def test_reward_assembly_by_hand():
    # log π_old = [-1, -2, -0.5], log π_ref = [-1.5, -1, -0.5] → KL_t = [0.5, -1, 0]
    # β = 0.1: r = [-0.05, 0.1, 0 + score]; score 2 → r_2 = 2
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 9.0]])
    score = torch.tensor([2.0, -3.0])
    lengths = torch.tensor([3, 2])
    r = rollout.assemble_rewards(old, ref, score, lengths, 0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -3.0, 0.0]]))
    # the second response hit max length without EOS: penalty -1 on its last token; RM score clipped to ±1.5
    r = rollout.assemble_rewards(old, ref, score, lengths, 0.1, hit_max=torch.tensor([False, True]),
                                 no_eos_penalty=-1.0, reward_clip=1.5)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 1.5], [-0.1, -2.5, 0.0]]))


def test_gae_by_hand():
    # γ=0.9, λ=0.8, sequence 0 of length 3: r = [1, 0, 2], V = [0.5, 1, 1.5]
    #   δ2 = 2 − 1.5 = 0.5                 A2 = 0.5
    #   δ1 = 0 + 0.9·1.5 − 1 = 0.35        A1 = 0.35 + 0.72·0.5 = 0.71
    #   δ0 = 1 + 0.9·1 − 0.5 = 1.4         A0 = 1.4 + 0.72·0.71 = 1.9112
    # sequence 1 of length 2 (its third column is padding holding garbage): r = [0, 1], V = [1, 2]
    #   δ1 = 1 − 2 = −1                    A1 = −1
    #   δ0 = 0 + 0.9·2 − 1 = 0.8           A0 = 0.8 − 0.72 = 0.08
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 77.0]])
    adv, ret = rollout.gae(rewards, values, torch.tensor([3, 2]), 0.9, 0.8)
    assert torch.allclose(adv, torch.tensor([[1.9112, 0.71, 0.5], [0.08, -1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[2.4112, 1.71, 2.0], [1.08, 1.0, 0.0]]), atol=1e-6)


def test_adaptive_kl_controller_follows_its_formula():
    # β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)
    for kl, want in ((9.0, 0.1 * (1 + 0.2 * 256 / 10000)), (3.0, 0.1 * (1 - 0.2 * 256 / 10000)),
                     (6.6, 0.1 * (1 + 0.1 * 256 / 10000))):
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, 256)
        assert math.isclose(ctl.value, want, rel_tol=1e-12)
    fixed = FixedKLController(0.2)
    fixed.update(100.0, 256)
    assert fixed.value == 0.2


def test_value_loss_clipping_by_hand():
    # old V = 1, return = 3, new V = 2: unclipped err (2−3)² = 1; clipped V = 1 + 0.2 → (1.2−3)² = 3.24
    v, old, ret, m = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([[1.0]])
    assert math.isclose(value_loss(v, old, ret, m, 0.2).item(), 0.5 * 3.24, rel_tol=1e-6)
    assert math.isclose(value_loss(v, old, ret, m, 0.0).item(), 0.5 * 1.0, rel_tol=1e-6)


# ---- torch bookkeeping, as the PPO stage wrote it before the C++ buffer took over
def torch_assemble_rewards(old, ref, score, lengths, kl_coef, *, hit_max=None, no_eos_penalty=0.0, reward_clip=None):
    mask = (torch.arange(old.shape[1])[None] < lengths[:, None]).float()
    rewards = -kl_coef * (old - ref) * mask
    if reward_clip:
        score = score.clamp(-reward_clip, reward_clip)
    if hit_max is not None:
        score = score + no_eos_penalty * hit_max.float()
    rewards[torch.arange(len(score)), lengths - 1] += score
    return rewards


def torch_gae(rewards, values, lengths, gamma, lam):
    mask = (torch.arange(rewards.shape[1])[None] < lengths[:, None]).float()
    adv = torch.zeros_like(rewards)
    next_value = next_adv = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t] * mask[:, t], adv[:, t]
    return adv, (adv + values) * mask


def torch_whiten(x, lengths):
    # moments accumulated in float64, as the buffer does (a float32 sum over B·T tokens drifts)
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).double()
    n = mask.sum()
    mean = (x.double() * mask).sum() / n
    var = (((x.double() - mean) * mask) ** 2).sum() / (n - 1)
    return ((x - mean.float()) * torch.rsqrt(var + 1e-8).float() * mask.float())


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from minirlhf.config import PRESETS
    from minirlhf.pipeline import run_train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = PRESETS["tiny"]()
    run_train(cfg, run_dir)
    return cfg, run_dir


def test_ppo_advantages_unchanged_by_the_switch_to_the_buffer(tiny_checkpoints, tmp_path, monkeypatch):
    from minirlhf.config import apply_overrides
    from minirlhf.metrics import Metrics
    from minirlhf.pipeline import load_inputs
    from minirlhf.stages import ppo

    cfg, run_dir = tiny_checkpoints
    # one iteration: from the second on, rollouts come from a policy updated with float32
    # advantages that differ in the last bit, and sampling amplifies that; the bookkeeping
    # is compared on identical rollouts
    cfg = apply_overrides(cfg, {"ppo.iterations": "1", "ppo.batch_size": "16"})
    prompts = load_inputs(cfg).ppo_prompts

    def run(name, bookkeeping):
        seen = []
        whiten = bookkeeping.whiten

        def recording_whiten(x, lengths, *a, **k):
            out = whiten(x, lengths, *a, **k)
            seen.append(out.clone())
            return out

        monkeypatch.setattr(ppo, "rollout", types.SimpleNamespace(
            assemble_rewards=bookkeeping.assemble_rewards, gae=bookkeeping.gae, whiten=recording_whiten,
            minibatches=rollout.minibatches))
        torch.manual_seed(0)
        ppo.run_ppo(cfg, tmp_path / name, sft_dir=run_dir / "sft", rm_dir=run_dir / "rm", prompts=prompts,
                    metrics=Metrics(tmp_path))
        return seen

    buffer = run("buffer", rollout)
    plain = run("torch", types.SimpleNamespace(assemble_rewards=torch_assemble_rewards, gae=torch_gae,
                                               whiten=torch_whiten))
    assert len(buffer) == len(plain) == cfg.ppo.iterations
    for a, b in zip(buffer, plain):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rollout_scores_are_read_at_each_responses_last_token(tiny_checkpoints):
    """Left-padded prompts of different lengths: the score must equal that of the sequence alone."""
    from minirlhf import checkpoint
    from minirlhf.generate import generate
    from minirlhf.stages.ppo import score_rollouts

    cfg, run_dir = tiny_checkpoints
    rm = checkpoint.load_model_from(run_dir / "rm").eval()
    with torch.no_grad():  # a head that reads the hidden state, so positions matter
        rm.scalar_head.weight.normal_(0, 1.0)
    tok = checkpoint.load_tokenizer(run_dir / "rm")
    prompts = [tok.prompt_ids(p) for p in ("Where is Quito?", "What are two facts about the dog? Answer briefly.")]
    gen = generate(rm, prompts, max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(0))
    got = score_rollouts(rm, gen)
    for b, p in enumerate(prompts):
        alone = torch.tensor([p + gen.tokens[b, :int(gen.lengths[b])].tolist()])
        assert torch.allclose(got[b], rm.scalars(alone)[0, -1], atol=1e-5)
