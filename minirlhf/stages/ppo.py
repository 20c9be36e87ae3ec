"""Stage 4 — PPO against the frozen reward model, with a per-token KL penalty to the SFT policy.

One iteration (Ouyang et al. 2022 §3.5; Ziegler et al. 2019; Stiennon et al. 2020):

  1. rollout    sample a batch of prompts; the policy answers them (KV-cache generation)
  2. score      the frozen RM scores each response; the policy (old), the frozen
                reference (SFT) and the critic give per-token log-probs and values
  3. rewards    r_t = −β · (log π_old − log π_ref)_t  on every response token,
                + RM score (+ no-EOS penalty) on the last one
  4. GAE        advantages A_t with GAE(γ, λ), returns = A_t + V_t, whitened advantages
  5. update     ppo_epochs passes over shuffled minibatches: clipped surrogate, clipped
                value loss, optional entropy bonus; stop early when approx-KL is too big
  6. β          the adaptive KL controller moves β towards the target KL

The gold function is never used here: PPO sees only the learned RM, as with human
labellers. `evaluate` (a callback) may score held-out prompts with gold to draw curves.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from kernels import ppo_loss, token_logprobs

from .. import checkpoint, optim, rollout
from ..config import PPOConfig, RunConfig
from ..device import autocast, resolve_device
from ..generate import generate
from ..logprobs import response_logits, response_logprobs, response_values
from ..metrics import Metrics, progress
from ..model import Transformer
from .rm import scores

STAGE = "ppo"


# ---------------------------------------------------------------- bookkeeping: rewards, GAE, whitening
# The readable definitions (plain torch). `--ppo.bookkeeping cpp` (the default) runs the same
# three functions in C++ (minirlhf/rollout.py, csrc/), which the tests compare against these.
# Layout: (B, T) float32, right-padded; response token t of sequence b sits at [b, t] for
# t < lengths[b] (1 <= lengths[b] <= T). Padding may hold anything (NaN included) and is 0
# in every output.

def response_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool: True at the response tokens t < lengths[b]."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def per_token_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef: float, *, truncated=None,
                      truncation_penalty: float = 0.0, reward_clip: float | None = None) -> torch.Tensor:
    """The per-token reward of InstructGPT (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019, eq. 2):

        r_t = −β · (log π_old(y_t) − log π_ref(y_t))            every response token t
        r_T += clip(RM score, ±reward_clip) + truncation_penalty · truncated     last token T

    logprobs, ref_logprobs: (B, T) float32; scores: (B,) float32, the RM score of each response;
    lengths: (B,) int64; kl_coef β >= 0; truncated: (B,) bool, True where the response hit
    max_new_tokens without EOS (None: none did); reward_clip: None = off. Returns (B, T) float32.
    """
    mask = response_mask(lengths, logprobs.shape[1])
    kl = torch.where(mask, logprobs - ref_logprobs, 0.0)    # the per-token KL estimate k1
    rewards = -kl_coef * kl
    score = scores.float()
    if reward_clip is not None:
        score = score.clamp(-reward_clip, reward_clip)
    if truncated is not None:
        score = score + truncation_penalty * truncated.float()
    last = (lengths - 1)[:, None]
    return rewards.scatter_add(1, last, score[:, None])     # the sequence-level reward on the last token


def gae(rewards, values, lengths, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16) per sequence:

        δ_t = r_t + γ · V(s_{t+1}) − V(s_t)          V = 0 after the last token (the episode ends)
        A_t = δ_t + γ · λ · A_{t+1}
        returns_t = A_t + V(s_t)                     the critic's regression target

    rewards, values: (B, T) float32; lengths: (B,) int64; gamma, lam in [0, 1].
    Returns (advantages, returns), each (B, T) float32, 0 on padding.
    """
    mask = response_mask(lengths, rewards.shape[1])
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages, torch.where(mask, advantages + values, 0.0)


def whiten(x, lengths, shift_mean: bool = True) -> torch.Tensor:
    """Advantage whitening over the valid tokens of the batch: (x − mean) / sqrt(var + 1e-8),
    var unbiased, the moments accumulated in float64. shift_mean=False adds the mean back
    (only the scale changes). x: (B, T) float32 with >= 2 valid tokens in all; (B, T) float32.
    """
    mask = response_mask(lengths, x.shape[1])
    valid = x[mask].double()
    if valid.numel() < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {valid.numel()}")
    mean, var = valid.mean(), valid.var(unbiased=True)
    out = (x.double() - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out.float(), 0.0)


# ---------------------------------------------------------------- KL controllers
class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: β ← β · (1 + K_β · e_t), e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),
    with K_β = n_steps / horizon (n_steps = rollouts in this iteration)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def kl_controller(pc: PPOConfig):
    if pc.adaptive_kl:
        return AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
    return FixedKLController(pc.kl_coef)


# ---------------------------------------------------------------- the losses
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def value_loss(values, old_values, returns, mask, value_clip: float):
    """Clipped value loss (as in OpenAI baselines' PPO2): max of the plain and clipped squared errors."""
    err = (values - returns) ** 2
    if value_clip > 0:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        err = torch.max(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def score_rollouts(reward_model: Transformer, gen) -> torch.Tensor:
    """The RM score of each rollout, read at its last response token (column P + length − 1
    of the [left-padded prompt | right-padded response] layout)."""
    tokens, attn = gen.full()
    last = gen.prompt_tokens.size(1) + gen.lengths - 1
    return scores(reward_model, tokens, attn, last)


# ---------------------------------------------------------------- the stage
def run_ppo(cfg: RunConfig, out_dir, *, sft_dir, rm_dir, prompts: list[str], metrics: Metrics,
            evaluate=None, resume: bool = False) -> Path:
    """Optimise the SFT policy against the RM; returns the PPO checkpoint directory.

    evaluate(policy) -> dict, optional: called every eval_every iterations (gold curves)."""
    out_dir, pc = Path(out_dir), cfg.ppo
    device = resolve_device(cfg.device)
    t0 = time.time()
    if not prompts:
        raise ValueError("ppo: no training prompts")
    tokenizer = checkpoint.load_tokenizer(sft_dir)
    resuming = resume and checkpoint.exists(out_dir)
    policy = checkpoint.load_model_from(out_dir if resuming else sft_dir, device=device)
    reference = checkpoint.load_model_from(sft_dir, device=device).eval().requires_grad_(False)
    reward_model = checkpoint.load_model_from(rm_dir, device=device).eval().requires_grad_(False)
    # The critic starts as a copy of the RM (InstructGPT): its trunk already reads how good a
    # response is and its head already outputs the reward's scale, so the first value estimates
    # are near the returns and the first advantages are not dominated by critic error.
    critic = checkpoint.load_model_from(out_dir if resuming else rm_dir, name="critic" if resuming else "model",
                                        device=device)
    policy_opt = optim.make_optimizer(policy, pc.lr, 0.0)
    critic_opt = optim.make_optimizer(critic, pc.critic_lr, 0.0)
    kl_ctl = kl_controller(pc)
    iteration = 0
    if resuming:
        state = checkpoint.load_state(out_dir)
        policy_opt.load_state_dict(state["optimizer"])
        critic_opt.load_state_dict(state["critic_optimizer"])
        kl_ctl.value = state["kl_coef"]
        checkpoint.set_rng_state(state["rng"])
        iteration = state["step"]

    def save(finished: bool, info=None):
        checkpoint.save(out_dir, stage=STAGE, model=policy, tokenizer=tokenizer, step=iteration, finished=finished,
                        extra_models={"critic": critic}, info=info,
                        state={"optimizer": policy_opt.state_dict(), "critic_optimizer": critic_opt.state_dict(),
                               "kl_coef": kl_ctl.value})

    print(f"[ppo] {len(prompts)} prompts, {pc.iterations} iterations x {pc.batch_size} rollouts")
    metrics.log(STAGE, iteration, event="start")
    bar = progress(pc.iterations, "ppo", initial=iteration)
    last_eval: dict = {}
    while iteration < pc.iterations:
        it_rng = random.Random(cfg.seed * 1_000_003 + iteration)  # the same batch again after a resume
        batch_prompts = [prompts[it_rng.randrange(len(prompts))] for _ in range(pc.batch_size)]

        # 1. rollout ---------------------------------------------------------------
        policy.eval()
        gen = generate(policy, [tokenizer.prompt_ids(p) for p in batch_prompts], max_new_tokens=pc.max_new_tokens,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=pc.temperature,
                       generator=torch.Generator(device=device).manual_seed(cfg.seed + iteration))
        tokens, attn = gen.full()
        P, mask = gen.prompt_tokens.size(1), gen.mask.float()
        labels = gen.tokens

        # 2. score: RM at the last token, old/ref log-probs and values per token -------
        with torch.no_grad(), autocast(device):
            rm_score = score_rollouts(reward_model, gen)
            old_logprobs = response_logprobs(policy, tokens, attn, P, pc.temperature) * mask
            ref_logprobs = response_logprobs(reference, tokens, attn, P, pc.temperature) * mask
            old_values = response_values(critic, tokens, attn, P) * mask

        # 3. rewards: r_t = −β·KL_t on every token, + RM score (+ no-EOS penalty) at the last
        #    (C++ rollout buffer, minirlhf/rollout.py; CPU arrays, zero copy)
        lengths = gen.lengths.cpu()
        kl = (old_logprobs - ref_logprobs) * mask  # per-token KL estimate log π_old − log π_ref
        rewards = rollout.assemble_rewards(old_logprobs.cpu(), ref_logprobs.cpu(), rm_score.float().cpu(), lengths,
                                           kl_ctl.value, hit_max=gen.truncated.cpu(), no_eos_penalty=pc.no_eos_penalty,
                                           reward_clip=pc.reward_clip or None)
        # 4. GAE(γ, λ) per sequence over its true length; returns = A + V; advantage whitening
        advantages, returns = rollout.gae(rewards, old_values.cpu(), lengths, pc.gamma, pc.lam)
        if pc.whiten_advantages:
            advantages = rollout.whiten(advantages, lengths)
        advantages, returns = advantages.to(device), returns.to(device)

        # 5. PPO epochs over shuffled minibatches ----------------------------------------
        policy.train()
        critic.train()
        stats: dict[str, list[float]] = {k: [] for k in ("policy", "value", "approx_kl", "clipfrac", "entropy")}
        early_stop = False
        for epoch in range(pc.ppo_epochs):
            mb_seed = (cfg.seed * 1_000_003 + iteration) * 97 + epoch  # reshuffled every epoch, same on resume
            for idx in rollout.minibatches(pc.batch_size, pc.minibatch_size, mb_seed):
                idx = torch.from_numpy(idx).to(device)
                mb_tokens, mb_attn, mb_mask = tokens[idx], attn[idx], mask[idx]
                with autocast(device):
                    logits = response_logits(policy, mb_tokens, mb_attn, P)
                    # clipped surrogate objective (Schulman et al. 2017, eq. 7), token-mean, fused kernel
                    pl, ps = ppo_loss(logits, labels[idx], old_logprobs[idx], advantages[idx], mb_mask,
                                      clip_eps=pc.clip_eps, temperature=pc.temperature)
                    if pc.entropy_coef > 0:  # entropy bonus
                        _, entropy = token_logprobs(logits, labels[idx], pc.temperature, return_entropy=True)
                        pl = pl - pc.entropy_coef * masked_mean(entropy, mb_mask)
                    values = response_values(critic, mb_tokens, mb_attn, P)
                    vl = value_loss(values, old_values[idx], returns[idx], mb_mask, pc.value_clip)
                optim.step(policy_opt, policy, pl, pc.grad_clip)
                optim.step(critic_opt, critic, vl, pc.grad_clip)
                for k, v in (("policy", pl), ("value", vl), ("approx_kl", ps.approx_kl),
                             ("clipfrac", ps.clipfrac), ("entropy", ps.entropy)):
                    stats[k].append(float(v.detach()))
                if ps.approx_kl > pc.max_approx_kl:
                    early_stop = True  # the policy moved too far from the one that collected the data
                    break
            if early_stop:
                break

        # 6. adaptive KL coefficient -------------------------------------------------------
        kl_per_response = kl.sum(1).mean().item()
        kl_ctl.update(kl_per_response, pc.batch_size)
        iteration += 1

        row = {"ppo/loss/policy": _mean(stats["policy"]), "ppo/loss/value": _mean(stats["value"]),
               "ppo/approx_kl": _mean(stats["approx_kl"]), "ppo/clipfrac": _mean(stats["clipfrac"]),
               "ppo/entropy": _mean(stats["entropy"]), "ppo/kl_to_ref": kl_per_response,
               "ppo/kl_coef": kl_ctl.value, "ppo/returns/mean": masked_mean(returns, mask).item(),
               "ppo/advantages/mean": masked_mean(advantages, mask).item(),
               "ppo/response_len": gen.lengths.float().mean().item(), "ppo/early_stop": float(early_stop),
               "rm/score/mean": rm_score.mean().item()}
        if evaluate is not None and pc.eval_every and (iteration % pc.eval_every == 0 or iteration == pc.iterations):
            last_eval = evaluate(policy)
            row["gold/score/mean"] = last_eval["gold_mean"]
        metrics.log(STAGE, iteration, **row)
        bar.set_postfix(rm=f"{row['rm/score/mean']:.2f}", kl=f"{kl_per_response:.2f}", beta=f"{kl_ctl.value:.3f}",
                        **({"gold": f"{last_eval['gold_mean']:.3f}"} if last_eval else {}))
        bar.update(1)
        if iteration % 10 == 0 and iteration < pc.iterations:
            save(finished=False)
    bar.close()
    info = {"iterations": iteration, "kl_coef": kl_ctl.value, "wall_s": round(time.time() - t0, 1)}
    save(finished=True, info=info)
    print(f"[ppo] done in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
