"""Stage 2 — supervised fine-tuning on demonstrations (InstructGPT §3.5, "SFT").

The loss is next-token cross-entropy on the response tokens only (prompt tokens are
context, not targets), averaged over the response tokens of a batch. Held-out loss on
demonstrations not trained on picks the best step: training stops early after
`patience` evaluations without improvement and the best weights are kept.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, distributed, loop, optim
from ..config import RunConfig
from ..device import autocast, resolve_device
from ..metrics import Metrics, Throughput
from ..model import Transformer
from ..tokenizer import frame_batch

STAGE = "sft"


def response_loss(model: Transformer, tokens, attn, resp, reduction: str = "mean"):
    """Cross-entropy of predicting each response token from everything before it.

    tokens, attn, resp: (B, T) long / bool / bool (tokenizer.frame_batch). "mean": the mean
    over response tokens (nats/token); "sum": (sum, number of response tokens)."""
    logits = model(tokens, attn)[:, :-1].float()
    targets, weight = tokens[:, 1:], resp[:, 1:].float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(weight)
    total = (ce * weight).sum()
    return total / weight.sum().clamp(min=1) if reduction == "mean" else (total, weight.sum())


@torch.no_grad()
def heldout_loss(model, tokenizer, pairs, batch_size, max_len, device) -> float:
    """Mean response-token cross-entropy (nats/token) on held-out demonstrations."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    mine = pairs[distributed.shard_slice(len(pairs))]  # this rank's share; the sums are added over the ranks
    with distributed.gathered(model):
        for i in range(0, len(mine), batch_size):
            tokens, attn, resp = (t.to(device) for t in frame_batch(tokenizer, mine[i:i + batch_size], max_len))
            with autocast(device):
                s, n = response_loss(model, tokens, attn, resp, reduction="sum")
            total, count = total + s.item(), count + n.item()
    total, count = distributed.all_sum(total, count)
    model.train(was_training)
    return total / max(count, 1)


def run_sft(cfg: RunConfig, out_dir, *, base_dir, demos: list[tuple], demos_heldout: list[tuple],
            metrics: Metrics, resume: bool = False) -> Path:
    """Fine-tune the base checkpoint on (prompt, response) demonstrations; returns the SFT directory."""
    out_dir, sc = Path(out_dir), cfg.sft
    device = resolve_device(cfg.device)
    t0 = time.time()
    tokenizer = checkpoint.load_tokenizer(base_dir)
    max_len = cfg.model.max_seq_len

    demos = list(demos)
    random.Random(cfg.seed).shuffle(demos)
    if sc.samples is not None:
        demos = demos[:sc.samples]  # light SFT: a few hundred demonstrations instead of all
    steps_per_epoch = math.ceil(len(demos) / sc.batch_size)
    total_steps = sc.epochs * steps_per_epoch

    # early stopping on held-out loss: the best weights so far, and evaluations since they improved
    best = {"loss": float("inf"), "weights": None, "bad_evals": 0}
    run = loop.open_stage(out_dir, STAGE, resume=resume, device=device, tokenizer=tokenizer,
                          init=lambda: {"model": checkpoint.load_model_from(base_dir, device=device)},
                          optimizers=lambda m: {"model": optim.make_optimizer(m["model"], sc.lr, sc.weight_decay)},
                          extra_state=lambda: {"best": best})
    model, opt, train_model = run.models["model"], run.optimizers["model"], run.views["model"]
    if run.state is not None:
        best.update(run.state["best"])

    print(f"[sft] {len(demos)} demonstrations, {len(demos_heldout)} held out, {total_steps} steps")
    model.train()
    speed = Throughput()

    def train_step(step: int) -> dict:
        epoch, i = divmod(step, steps_per_epoch)
        order = list(range(len(demos)))
        random.Random(cfg.seed + epoch).shuffle(order)  # the same order again after a resume
        batch = [demos[j] for j in order[i * sc.batch_size:(i + 1) * sc.batch_size]]
        mine, weight = distributed.shard(batch)  # this rank's demonstrations of the global batch
        tokens, attn, resp = (t.to(device) for t in frame_batch(tokenizer, mine, max_len))
        lr = optim.lr_at(step, total_steps, sc.lr, sc.warmup_steps)
        optim.set_lr(opt, lr)
        with autocast(device):
            total, count = response_loss(train_model, tokens, attn, resp, reduction="sum")
            loss = total / count.clamp(min=1)  # the mean over response tokens
        n_tokens = int(attn.sum())
        if distributed.active():  # this rank's share of the global batch's token mean; logged: the global mean
            count_all, total_all, n_tokens = distributed.all_sum(count * weight, total.item() * weight,
                                                                  n_tokens * weight)
            loss, global_loss = distributed.share(loss, count * weight, count_all), total_all / count_all
        grad_norm = optim.step(opt, model, loss, sc.grad_clip)
        speed.add(n_tokens)
        row = {"loss": global_loss if distributed.active() else loss.item(), "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": speed.rate()}
        if (step + 1) % sc.eval_every == 0 or step + 1 == total_steps:
            ev = heldout_loss(model, tokenizer, demos_heldout, 64, max_len, device) if demos_heldout else row["loss"]
            row["eval_loss"] = ev
            if ev < best["loss"] - 1e-4:
                best.update(loss=ev, bad_evals=0, weights=distributed.full_state_dict(model))
            else:
                best["bad_evals"] += 1
                row["stop"] = sc.patience is not None and best["bad_evals"] >= sc.patience  # early stopping
        return row

    end = loop.loop(STAGE, run.step, total_steps, train_step, run.save, metrics, save_every=sc.save_every,
                    show=("loss", "eval_loss", "tokens_per_s"))
    stopped_early = end < total_steps
    if best["weights"] is not None:
        distributed.load_full_state_dict(model, best["weights"])
    info = {"eval_loss": best["loss"], "steps": end, "stopped_early": stopped_early, "demos": len(demos),
            "wall_s": round(time.time() - t0, 1)}
    loop.finish(out_dir, run.save, end, info, stage=STAGE)
    print(f"[sft] done: best held-out loss {best['loss']:.3f} after {end} steps"
          f"{' (early stop)' if stopped_early else ''} in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir
