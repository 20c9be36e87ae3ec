"""PPO's bookkeeping by hand (the torch definitions in stages/ppo.py and the C++ path), the KL
controller and the value loss against their formulas, the diagnostics by hand, and
--ppo.bookkeeping torch|cpp giving the same advantages on the same rollouts."""
import math

import pytest
import torch

from minirlhf import rollout
from minirlhf.stages import ppo
from minirlhf.stages.ppo import AdaptiveKLController, FixedKLController, explained_variance, value_loss

BOOKKEEPING = pytest.mark.parametrize("bk", [ppo.TORCH_BOOKKEEPING, rollout], ids=["torch", "cpp"])


@BOOKKEEPING
def test_reward_assembly_by_hand(bk):
    # log π_old = [-1, -2, -0.5], log π_ref = [-1.5, -1, -0.5] → KL_t = [0.5, -1, 0]
    # β = 0.1: r = [-0.05, 0.1, 0 + score]; score 2 → r_2 = 2
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 9.0]])
    score = torch.tensor([2.0, -3.0])
    lengths = torch.tensor([3, 2])
    r = bk.per_token_rewards(old, ref, score, lengths, 0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -3.0, 0.0]]))
    # the second response was truncated (no EOS): penalty -1 on its last token; RM score clipped to ±1.5
    r = bk.per_token_rewards(old, ref, score, lengths, 0.1, truncated=torch.tensor([False, True]),
                             truncation_penalty=-1.0, reward_clip=1.5)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 1.5], [-0.1, -2.5, 0.0]]))


@BOOKKEEPING
def test_gae_by_hand(bk):
    # γ=0.9, λ=0.8, sequence 0 of length 3: r = [1, 0, 2], V = [0.5, 1, 1.5]
    #   δ2 = 2 − 1.5 = 0.5                 A2 = 0.5
    #   δ1 = 0 + 0.9·1.5 − 1 = 0.35        A1 = 0.35 + 0.72·0.5 = 0.71
    #   δ0 = 1 + 0.9·1 − 0.5 = 1.4         A0 = 1.4 + 0.72·0.71 = 1.9112
    # sequence 1 of length 2 (its third column is padding holding garbage): r = [0, 1], V = [1, 2]
    #   δ1 = 1 − 2 = −1                    A1 = −1
    #   δ0 = 0 + 0.9·2 − 1 = 0.8           A0 = 0.8 − 0.72 = 0.08
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 77.0]])
    adv, ret = bk.gae(rewards, values, torch.tensor([3, 2]), 0.9, 0.8)
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


@BOOKKEEPING
def test_whitening_by_hand(bk):
    # valid tokens 1, 2, 3, 6 (the padding 99 is ignored): mean 3, unbiased var (4+1+0+9)/3 = 14/3
    x = torch.tensor([[1.0, 2.0, 3.0], [6.0, 99.0, 99.0]])
    w = bk.whiten(x, torch.tensor([3, 1]))
    sd = math.sqrt(14 / 3 + 1e-8)
    torch.testing.assert_close(w, torch.tensor([[-2 / sd, -1 / sd, 0.0], [3 / sd, 0.0, 0.0]]))


def test_value_loss_clipping_by_hand():
    # old V = 1, return = 3, new V = 2: unclipped err (2−3)² = 1; clipped V = 1 + 0.2 → (1.2−3)² = 3.24
    # second token: old V = 1, new V = 1.1 (inside the clip), return 0: both errors 1.21, not clipped
    v, old, ret = torch.tensor([[2.0, 1.1]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]])
    m = torch.tensor([[1.0, 1.0]])
    loss, clipfrac = value_loss(v, old, ret, m, 0.2)
    assert math.isclose(loss.item(), 0.5 * (3.24 + 1.21) / 2, rel_tol=1e-6) and clipfrac.item() == 0.5
    loss, clipfrac = value_loss(v, old, ret, m, None)
    assert math.isclose(loss.item(), 0.5 * (1.0 + 1.21) / 2, rel_tol=1e-6) and clipfrac.item() == 0.0


def test_explained_variance_by_hand():
    # returns 1, 2, 3 (var 2/3); values 1, 2, 2 → residuals 0, 0, 1 (var 2/9) → 1 − (2/9)/(2/3) = 2/3
    returns, values, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 2.0]]), torch.ones(1, 3)
    assert math.isclose(explained_variance(values, returns, mask), 2 / 3, rel_tol=1e-9)
    assert math.isclose(explained_variance(returns, returns, mask), 1.0)


@pytest.fixture
def tiny_checkpoints(tiny_run):
    from minirlhf.config import PRESETS

    return PRESETS["tiny"](), tiny_run[0]


def test_bookkeeping_switch_gives_the_same_advantages(tiny_checkpoints, tmp_path, monkeypatch):
    """--ppo.bookkeeping torch and cpp on identical rollouts (one iteration: from the second on,
    rollouts come from policies updated with advantages that differ in the last bit)."""
    from minirlhf.cli import apply_overrides
    from minirlhf.metrics import Metrics
    from minirlhf.pipeline import load_inputs

    cfg, run_dir = tiny_checkpoints
    prompts = load_inputs(cfg).ppo_prompts

    def run(name):
        seen = []
        c = apply_overrides(cfg, {"ppo.iterations": "1", "ppo.batch_size": "16", "ppo.bookkeeping": name})
        impl = ppo.TORCH_BOOKKEEPING if name == "torch" else rollout
        real = impl.whiten

        def recording_whiten(x, lengths, *a, **k):
            out = real(x, lengths, *a, **k)
            seen.append(out.clone())
            return out

        monkeypatch.setattr(impl, "whiten", recording_whiten)
        torch.manual_seed(0)
        ppo.run_ppo(c, tmp_path / name, sft_dir=run_dir / "sft", rm_dir=run_dir / "rm", prompts=prompts,
                    metrics=Metrics(tmp_path))
        monkeypatch.undo()
        return seen

    cpp, plain = run("cpp"), run("torch")
    assert len(cpp) == len(plain) == 1
    assert cpp[0].abs().sum() > 0
    torch.testing.assert_close(cpp[0], plain[0], rtol=0, atol=1e-6)


def test_rollout_scores_are_read_at_each_responses_last_token(tiny_checkpoints):
    """Left-padded prompts of different lengths: the score must equal that of the sequence alone."""
    from minirlhf import checkpoint
    from minirlhf.generate import generate
    from minirlhf.reward import score_rollouts

    cfg, run_dir = tiny_checkpoints
    rm = checkpoint.load_model_from(run_dir / "rm").eval()
    with torch.no_grad():  # a head that reads the hidden state, so positions matter
        rm.scalar_head.weight.normal_(0, 1.0)
    tok = checkpoint.load_tokenizer(run_dir / "rm")
    prompts = [tok.prompt_ids(p) for p in ("Where is Quito?", "What are two facts about the dog? Answer briefly.")]
    gen = generate(rm, prompts, max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(0))
    got = score_rollouts(rm, gen, tok.eos_id)
    for b, p in enumerate(prompts):
        alone = torch.tensor([p + gen.tokens[b, :int(gen.lengths[b])].tolist() + [tok.eos_id] * int(gen.truncated[b])])
        assert torch.allclose(got[b], rm.scalars(alone)[0, -1], atol=1e-5)


def test_minibatches_without_padding_columns_give_the_same_losses(tiny_checkpoints):
    """Dropping the columns that are padding in every row of a minibatch changes no number."""
    from kernels import ppo_loss as fused_loss
    from minirlhf import checkpoint
    from minirlhf.generate import generate
    from minirlhf.logprobs import response_logits, response_values

    _, run_dir = tiny_checkpoints
    policy, tok = checkpoint.load_model_from(run_dir / "ppo"), checkpoint.load_tokenizer(run_dir / "ppo")
    prompts = ["What does the fox eat?", "Where is Quito?", "List two facts about the owl. Answer briefly please."]
    gen = generate(policy, [tok.prompt_ids(p) for p in prompts], max_new_tokens=8, eos_id=tok.eos_id,
                   pad_id=tok.pad_id, generator=torch.Generator().manual_seed(0))
    tokens, attn = gen.full()
    P = gen.prompt_tokens.size(1)
    idx = torch.tensor([0, 1])  # the two short prompts: the longest prompt's extra columns are padding here
    cols, resp, mb_P = ppo._unpadded(gen.prompt_mask[idx], gen.lengths[idx], P)
    assert cols.start > 0
    adv = torch.randn(gen.tokens.shape, generator=torch.Generator().manual_seed(1))
    mask = gen.mask.float()
    with torch.no_grad():
        full, _ = fused_loss(response_logits(policy, tokens[idx], attn[idx], P), gen.tokens[idx],
                             gen.logprobs[idx], adv[idx], mask[idx])
        cut, _ = fused_loss(response_logits(policy, tokens[idx][:, cols], attn[idx][:, cols], mb_P),
                            gen.tokens[idx][:, resp], gen.logprobs[idx][:, resp], adv[idx][:, resp], mask[idx][:, resp])
        v_full = response_values(policy, tokens[idx], attn[idx], P)[:, resp]
        v_cut = response_values(policy, tokens[idx][:, cols], attn[idx][:, cols], mb_P)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-6)
    m = mask[idx][:, resp].bool()
    torch.testing.assert_close(v_cut[m], v_full[m], rtol=0, atol=1e-5)
