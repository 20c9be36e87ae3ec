"""Stage 4 — PPO against the frozen reward model, with a per-token KL penalty to the SFT policy.

Read top to bottom, one iteration (Ouyang et al. 2022 §3.5; Ziegler et al. 2019; Stiennon
et al. 2020; the implementation details follow Huang et al. 2022, "The 37 implementation
details of PPO", and CleanRL's ppo.py):

  1. rollout      sample a batch of prompts; the policy answers them (KV-cache generation)
  2. score        the frozen RM scores each response at its EOS (reward.py); the policy
                  (π_old), the frozen reference π_ref (SFT) and the critic give per-token
                  log-probs and values V(s_t)
  3. rewards      r_t = −β·(log π_old − log π_ref)_t on every response token, plus the RM
                  score (and the truncation penalty) on the last one      per_token_rewards
  4. advantages   GAE(γ, λ) per sequence; returns = A + V; advantage whitening   gae, whiten
  5. update       ppo_epochs passes over shuffled minibatches: the clipped surrogate (fused
                  kernel), the clipped value loss, an optional entropy bonus; an epoch
                  loop stops early when approx-KL to π_old grows too big
  6. β            the adaptive KL controller moves β towards the target KL

The gold function is never used here: PPO sees only the learned RM, as with human
labellers. `evaluate` (a callback) may score held-out prompts with gold to draw curves.

Under torchrun (minirlhf/distributed.py) each rank generates and scores its contiguous share
of the iteration's prompts; the whitening statistics and the controller's mean KL are those of
the whole batch (all-reduced where they are used), so every rank keeps the same β; each rank
cuts its share into minibatches (minibatch_size / N rollouts) and DDP/FSDP2 average the gradients.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kernels import ppo_loss, token_logprobs

from .. import checkpoint, distributed, loop, optim, rollout
from ..config import PPOConfig, RunConfig
from ..device import autocast, resolve_device
from ..generate import generate
from ..logprobs import response_logits, response_logprobs, response_values
from ..metrics import Metrics, stage_history
from ..monitor import Monitor, Thresholds
from ..reward import score_rollouts
from ..tokenizer import random_windows, token_stream

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


def whiten(x, lengths, shift_mean: bool = True, *, mean: float | None = None,
           var: float | None = None) -> torch.Tensor:
    """Advantage whitening over the valid tokens of the batch: (x − mean) / sqrt(var + 1e-8),
    var unbiased, the moments accumulated in float64. shift_mean=False adds the mean back
    (only the scale changes). x: (B, T) float32 with >= 2 valid tokens in all; (B, T) float32.
    mean, var (floats, both or neither): the statistics to use instead of the batch's own,
    e.g. those of the whole batch across ranks (rollout.masked_mean_var).
    """
    mask = response_mask(lengths, x.shape[1])
    if mean is None and var is None:
        valid = x[mask].double()
        if valid.numel() < 2:
            raise ValueError(f"whitening needs at least 2 valid tokens, got {valid.numel()}")
        mean, var = valid.mean(), valid.var(unbiased=True)
    elif mean is None or var is None:
        raise ValueError("whiten: mean and var go together (the statistics to use)")
    out = (x.double() - mean) * torch.rsqrt(torch.as_tensor(var, dtype=torch.float64) + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out.float(), 0.0)


def masked_mean_var(x, lengths, *, all_reduce=None) -> tuple[float, float]:
    """Mean and unbiased variance of x ((B, T) float32) over the valid tokens of the whole batch,
    in float64, for whiten(mean=, var=) when the batch is split over ranks: all_reduce(t) sums a
    float64 tensor over the ranks in place (None: x is the whole batch). Two passes: the mean from
    the summed counts and sums, then (Σd² − (Σd)²/n) / (n − 1) from the sums of d = x − mean
    (the corrected two-pass variance; Chan, Golub & LeVeque 1983). The plain-torch definition of
    rollout.masked_mean_var. ValueError with fewer than 2 valid tokens in all."""
    valid = x[response_mask(lengths, x.shape[1])].double()

    def summed(*values) -> list[float]:
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
        if all_reduce is not None:
            all_reduce(t)
        return t.tolist()

    count, total = summed(valid.numel(), valid.sum())
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {int(count)}")
    mean = total / count
    d = valid - mean
    deviations, squares = summed(d.sum(), (d * d).sum())
    return mean, (squares - deviations * deviations / count) / (count - 1)


# what --ppo.bookkeeping torch runs; `cpp` runs the same functions of minirlhf/rollout.py
TORCH_BOOKKEEPING = SimpleNamespace(per_token_rewards=per_token_rewards, gae=gae, whiten=whiten,
                                    masked_mean_var=masked_mean_var)


# ---------------------------------------------------------------- KL controllers
class FixedKLController:
    """β stays at kl_coef."""

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


# ---------------------------------------------------------------- the critic's loss and diagnostics
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def value_loss(values, old_values, returns, mask, value_clip: float | None):
    """Clipped value loss (OpenAI baselines' PPO2; Huang et al. 2022, detail 9):
    0.5 · mean over valid tokens of max((V − R)², (V_old + clip(V − V_old, ±value_clip) − R)²).

    values, old_values, returns, mask: (B, T). Returns (vf_loss, vf_clipfrac): the loss and
    the fraction of valid tokens where the clipped error was the larger one."""
    err = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * masked_mean(err, mask), torch.zeros(())
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    err_clipped = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(err, err_clipped), mask), masked_mean((err_clipped > err).float(), mask)


def explained_variance(values, returns, mask) -> float:
    """1 − Var(returns − V) / Var(returns) over valid tokens (1 = the critic predicts the
    returns perfectly, 0 = no better than their mean, < 0 = worse). nan if Var(returns) = 0."""
    v, r = values[mask.bool()].double(), returns[mask.bool()].double()
    var_r = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / var_r) if var_r > 0 else float("nan")


def ptx_loss(policy, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PPO-ptx's pretraining term (Ouyang et al. 2022, eq. 2: the objective adds
    γ · E_{x ~ D_pretrain}[log π(x)]): the policy's mean next-token cross-entropy on windows of
    the pretraining corpus, −mean_t log π(x_{t+1} | x_≤t), nats/token; the policy loss adds γ times it.

    inputs, targets: (N, L) long, targets = inputs shifted by one (tokenizer.random_windows)."""
    logits = policy(inputs)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------- the stage
def run_ppo(cfg: RunConfig, out_dir, *, sft_dir, rm_dir, prompts: list, metrics: Metrics,
            evaluate=None, resume: bool = False, pretrain_corpus: list[str] | None = None) -> Path:
    """Optimise the SFT policy against the RM; returns the PPO checkpoint directory.

    evaluate(policy) -> {"gold_mean": float, ...}, optional: called every eval_every
    iterations (the gold curve of the report; never a reward). pretrain_corpus: the texts
    PPO-ptx draws its windows from (needed when ppo.ptx_coef > 0)."""
    out_dir, pc = Path(out_dir), cfg.ppo
    device = resolve_device(cfg.device)
    t0 = time.time()
    tokenizer = checkpoint.load_tokenizer(sft_dir)
    # The critic starts as a copy of the RM (InstructGPT): its trunk already reads how good a
    # response is and its head already outputs the reward's scale, so the first value estimates
    # are near the returns and the first advantages are not dominated by critic error.
    kl_ctl = kl_controller(pc)
    run = loop.open_stage(out_dir, STAGE, resume=resume, device=device, tokenizer=tokenizer, names=("model", "critic"),
                          init=lambda: {"model": checkpoint.load_model_from(sft_dir, device=device),
                                        "critic": checkpoint.load_model_from(rm_dir, device=device)},
                          # one AdamW over both: one backward and one step per minibatch (two lrs, two clipped norms)
                          optimizers=lambda m: {"model": optim.make_optimizer(m["model"], pc.lr, 0.0,
                                                                              also=((m["critic"], pc.critic_lr),))},
                          extra_state=lambda: {"kl_coef": kl_ctl.value})
    policy, critic, optimizer, views = run.models["model"], run.models["critic"], run.optimizers["model"], run.views
    if run.state is not None and pc.adaptive_kl:  # the controller's β is state; a fixed β is the config's
        kl_ctl.value = run.state["kl_coef"]
    # the learning rates are the config's, also on a resume (which may lower them): the optimizer state
    # restores its groups' old ones; groups 0-1 are the policy's, 2-3 the critic's (optim.make_optimizer)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = pc.lr if i < 2 else pc.critic_lr
    reference = checkpoint.load_model_from(sft_dir, device=device).eval().requires_grad_(False)
    reward_model = checkpoint.load_model_from(rm_dir, device=device).eval().requires_grad_(False)
    bookkeeping = rollout if pc.bookkeeping == "cpp" else TORCH_BOOKKEEPING
    last_eval: dict = {}
    ptx_stream = None
    if pc.ptx_coef > 0:  # PPO-ptx: windows of the pretraining corpus, as the pretrain stage draws them
        ptx_stream = token_stream(tokenizer, pretrain_corpus or [])
        if len(ptx_stream) < cfg.pretrain.seq_len + 2:
            raise ValueError(f"config: ppo.ptx_coef={pc.ptx_coef}: the pretraining corpus has {len(ptx_stream)} "
                             f"tokens, fewer than one window of pretrain.seq_len={cfg.pretrain.seq_len} + 2")
    history = [r for r in stage_history(metrics.path.parent, STAGE) if r["step"] <= run.step]  # resumed: so far
    monitor = Monitor(Thresholds.of(pc), history)
    print(f"[ppo] {len(prompts)} prompts, {pc.iterations} iterations x {pc.batch_size} rollouts"
          + (f", PPO-ptx γ={pc.ptx_coef}" if ptx_stream is not None else ""))

    def train_step(iteration: int) -> dict:
        timer = PhaseTimer()
        it_rng = random.Random(cfg.seed * 1_000_003 + iteration)  # the same batch again after a resume
        batch_prompts = [prompts[it_rng.randrange(len(prompts))] for _ in range(pc.batch_size)]
        batch_prompts = batch_prompts[distributed.shard_slice(pc.batch_size)]  # this rank's share of the batch

        # 1. rollout: the policy answers the batch (left-padded prompts | right-padded responses)
        policy.eval()
        distributed.unshard(policy, critic)  # FSDP2: whole weights until the scores are in (ranks step unevenly)
        gen = generate(policy, [tokenizer.prompt_ids(p) for p in batch_prompts], max_new_tokens=pc.max_new_tokens,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=pc.temperature,
                       generator=torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed + iteration)))
        tokens, attn = gen.full()
        P, mask, labels = gen.prompt_tokens.size(1), gen.mask.float(), gen.tokens
        timer.lap("generate")

        # 2. score: RM score at each response's EOS; log π_old, log π_ref and V(s_t) per token
        with torch.no_grad(), autocast(device):
            rm_score = score_rollouts(reward_model, gen, tokenizer.eos_id).float()
            # log π_old: generation computed it already, under the sampling temperature; in fp32 (CPU) that is the
            # training forward's number to ~1e-6, so it is reused; under bf16 autocast (CUDA) it is recomputed
            reuse = device.type == "cpu"
            old_logprobs = (gen.logprobs if reuse else response_logprobs(policy, tokens, attn, P, pc.temperature)) * mask
            ref_logprobs = response_logprobs(reference, tokens, attn, P, pc.temperature) * mask
            old_values = response_values(critic, tokens, attn, P) * mask
        distributed.reshard(policy, critic)
        timer.lap("score")

        # 3. rewards: r_t = −β·KL_t on every token; RM score (+ truncation penalty) on the last
        lengths = gen.lengths.cpu()
        rewards = bookkeeping.per_token_rewards(
            old_logprobs.cpu(), ref_logprobs.cpu(), rm_score.cpu(), lengths, kl_ctl.value,
            truncated=gen.truncated.cpu(), truncation_penalty=pc.truncation_penalty, reward_clip=pc.reward_clip)
        # 4. advantages: GAE(γ, λ) per sequence over its true length; returns = A + V (the critic's target)
        advantages, returns = bookkeeping.gae(rewards, old_values.cpu(), lengths, pc.gamma, pc.lam)
        mean = var = None  # whitening with this batch's own statistics
        if distributed.active():  # the whole batch's, over every rank's share: all-reduced sums (two passes)
            mean, var = bookkeeping.masked_mean_var(advantages, lengths, all_reduce=distributed.all_reduce)
            raw_adv_mean, raw_adv_std = mean, var ** 0.5
        else:
            raw_adv_mean, raw_adv_std = _masked_mean_std(advantages, mask.cpu())
        if pc.whiten_advantages:  # advantage normalisation (Huang et al. 2022, detail 7), batch level
            advantages = bookkeeping.whiten(advantages, lengths, mean=mean, var=var)
        advantages, returns = advantages.to(device), returns.to(device)
        timer.lap("bookkeeping")

        # 5. PPO epochs over shuffled minibatches
        policy.train()
        critic.train()
        stats: dict[str, list[float]] = {k: [] for k in (
            "pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy", "ratio_mean", "ratio_max")
            + (("ptx_loss",) if ptx_stream is not None else ())}
        early_stop = False
        ptx_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)  # PPO-ptx windows, same on resume
        for epoch in range(pc.ppo_epochs):
            mb_seed = (cfg.seed * 1_000_003 + iteration) * 97 + epoch  # reshuffled every epoch, same on resume
            for idx in rollout.minibatches(len(batch_prompts), pc.minibatch_size // distributed.size(), mb_seed):
                idx = torch.as_tensor(idx, device=device)
                # the minibatch without the columns that are padding in all its rows
                cols, resp, mb_P = _unpadded(gen.prompt_mask[idx], gen.lengths[idx], P)
                mb_tokens, mb_attn = tokens[idx][:, cols], attn[idx][:, cols]
                mb_mask, mb_labels, mb_old = mask[idx][:, resp], labels[idx][:, resp], old_logprobs[idx][:, resp]
                with autocast(device):
                    logits = response_logits(views["model"], mb_tokens, mb_attn, mb_P)
                    # clipped surrogate objective L^CLIP (Schulman et al. 2017, eq. 7), token mean, one fused
                    # kernel over the logits: ratio = π/π_old, pg_loss = max(−A·ratio, −A·clip(ratio, 1 ± ε))
                    pg_loss, ps = ppo_loss(logits, mb_labels, mb_old, advantages[idx][:, resp], mb_mask,
                                           clip_eps=pc.clip_eps, temperature=pc.temperature)
                    if pc.entropy_coef > 0:  # entropy bonus (Schulman et al. 2017, eq. 9)
                        _, entropy = token_logprobs(logits, mb_labels, pc.temperature, return_entropy=True)
                        pg_loss = pg_loss - pc.entropy_coef * masked_mean(entropy, mb_mask)
                    values = response_values(views["critic"], mb_tokens, mb_attn, mb_P)
                    vf_loss, vf_clipfrac = value_loss(values, old_values[idx][:, resp], returns[idx][:, resp], mb_mask,
                                                      pc.value_clip)
                    losses = {"pg_loss": pg_loss, "vf_loss": vf_loss}
                    if ptx_stream is not None:  # PPO-ptx: + γ · LM loss on pretraining text (InstructGPT eq. 2)
                        x, y = random_windows(ptx_stream, pc.ptx_batch_size, cfg.pretrain.seq_len, ptx_rng)
                        (x, w), (y, _) = distributed.shard(x), distributed.shard(y)  # this rank's windows
                        ptx = ptx_loss(views["model"], x.to(device), y.to(device))
                        losses["ptx_loss"] = pc.ptx_coef * distributed.share(ptx, len(x) * w, pc.ptx_batch_size)
                        stats["ptx_loss"].append(float(ptx.detach()))
                optim.step(optimizer, [policy, critic], losses, pc.grad_clip)
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("approx_kl", ps.approx_kl),
                             ("clipfrac", ps.clipfrac), ("vf_clipfrac", vf_clipfrac), ("entropy", ps.entropy),
                             ("ratio_mean", ps.ratio_mean), ("ratio_max", ps.ratio_max)):
                    stats[k].append(float(v.detach()))
                # (approx-KL averaged over the ranks' minibatches: every rank stops at the same one)
                if pc.max_approx_kl is not None and distributed.average_value(ps.approx_kl) > pc.max_approx_kl:
                    early_stop = True  # the policy moved too far from the one that collected the data
                    break
            if early_stop:
                break
        timer.lap("update")

        # 6. adaptive KL coefficient: the controller sees this batch's KL to the reference (the whole
        # batch's mean over every rank's rollouts: the same β on every rank)
        kl_to_ref = distributed.mean_of(((old_logprobs - ref_logprobs) * mask).sum(1))
        kl_ctl.update(kl_to_ref, pc.batch_size)

        row = {k: sum(v) / len(v) for k, v in stats.items() if k != "ratio_max"}
        row.update(ratio_max=distributed.maximum(max(stats["ratio_max"])), kl_to_ref=kl_to_ref, kl_coef=kl_ctl.value,
                   rm_score=distributed.mean_of(rm_score), advantages_mean=raw_adv_mean, advantages_std=raw_adv_std,
                   returns_mean=masked_mean(returns, mask).item(),
                   explained_variance=explained_variance(old_values, returns, mask),
                   response_len=distributed.mean_of(gen.lengths.float()),
                   truncated_frac=distributed.mean_of(gen.truncated.float()), early_stop=float(early_stop),
                   **timer.laps)
        local = [k for k in stats if k != "ratio_max"] + ["returns_mean", "explained_variance"]
        row.update(distributed.average({k: row[k] for k in local}))  # rank-local diagnostics, averaged over ranks
        if evaluate is not None and pc.eval_every is not None and (
                (iteration + 1) % pc.eval_every == 0 or iteration + 1 == pc.iterations):
            last_eval.update(evaluate(policy))
            if "gold_mean" in last_eval:
                row["gold"], row["gold_se"] = last_eval["gold_mean"], last_eval["gold_se"]
        # the over-optimisation monitor (minirlhf/monitor.py): KL growth, repeats, warnings
        row.update(monitor.observe(iteration + 1, row, gen.tokens, gen.mask, tokenizer.eos_id))
        return row

    iteration = loop.loop(STAGE, run.step, pc.iterations, train_step, run.save, metrics, save_every=pc.save_every,
                          show=("rm_score", "kl_to_ref", "kl_coef", "gold", "warning"))
    info = {"iterations": iteration, "kl_coef": kl_ctl.value, "wall_s": round(time.time() - t0, 1)}
    loop.finish(out_dir, run.save, iteration, info, stage=STAGE)
    print(f"[ppo] done in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir


def _unpadded(prompt_mask, lengths, P: int):
    """(columns, response columns, prompt width) of a minibatch without its all-padding columns:
    the leading prompt columns no row uses and the response columns past its longest response."""
    first = int((~prompt_mask).all(0).sum())  # prompts are left-padded: a prefix of empty columns
    R = int(lengths.max())
    return slice(first, P + R), slice(0, R), P - first


def _masked_mean_std(x, mask) -> tuple[float, float]:
    v = x[mask.bool()].double()
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


class PhaseTimer:
    """Wall time of each phase of an iteration, as time/<phase> seconds (synchronising CUDA)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[f"time/{phase}"] = now - self.t
        self.t = now
