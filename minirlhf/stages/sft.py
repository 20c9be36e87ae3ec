"""Stage 2 — supervised fine-tuning on demonstrations.

The loss is next-token cross-entropy on the response tokens only (prompt tokens are
context, not targets), averaged over the response tokens of a batch. Held-out loss on
demonstrations not trained on picks the best step: training stops early after
`patience` evaluations without improvement and the best weights are kept.
"""
from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, optim
from ..config import RunConfig
from ..device import autocast, resolve_device
from ..metrics import Metrics, Throughput, progress
from ..model import Transformer
from ..tokenizer import Tokenizer

STAGE = "sft"


def frame_batch(tokenizer: Tokenizer, pairs: list[tuple[str, str]], max_len: int):
    """(tokens, attention_mask, response_mask), each (B, T), right-padded; long pairs are cut at max_len."""
    framed = [tokenizer.frame(p, r) for p, r in pairs]
    T = min(max_len, max(len(ids) for ids, _ in framed))
    tokens = torch.full((len(framed), T), tokenizer.pad_id, dtype=torch.long)
    attn = torch.zeros((len(framed), T), dtype=torch.bool)
    resp = torch.zeros((len(framed), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(framed):
        n = min(T, len(ids))
        tokens[i, :n] = torch.tensor(ids[:n])
        attn[i, :n] = True
        resp[i, :n] = torch.tensor(mask[:n], dtype=torch.bool)
    return tokens, attn, resp


def response_loss(model: Transformer, tokens, attn, resp, reduction: str = "mean"):
    """Cross-entropy of predicting each response token from everything before it."""
    logits = model(tokens, attn)[:, :-1].float()
    targets, weight = tokens[:, 1:], resp[:, 1:].float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(weight)
    total = (ce * weight).sum()
    return total / weight.sum().clamp(min=1) if reduction == "mean" else (total, weight.sum())


@torch.no_grad()
def heldout_loss(model, tokenizer, pairs, batch_size, max_len, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        tokens, attn, resp = (t.to(device) for t in frame_batch(tokenizer, pairs[i:i + batch_size], max_len))
        with autocast(device):
            s, n = response_loss(model, tokens, attn, resp, reduction="sum")
        total, count = total + s.item(), count + n.item()
    model.train(was_training)
    return total / max(count, 1)


def run_sft(cfg: RunConfig, out_dir, *, base_dir, demos: list[tuple[str, str]],
            demos_heldout: list[tuple[str, str]], metrics: Metrics, resume: bool = False) -> Path:
    """Fine-tune the base checkpoint on demonstrations; returns the SFT checkpoint directory."""
    out_dir, sc = Path(out_dir), cfg.sft
    device = resolve_device(cfg.device)
    t0 = time.time()
    tokenizer = checkpoint.load_tokenizer(base_dir)
    max_len = cfg.model.max_seq_len

    demos = list(demos)
    random.Random(cfg.seed).shuffle(demos)
    if sc.samples is not None:
        if sc.samples > len(demos):
            raise ValueError(f"sft.samples={sc.samples}: only {len(demos)} demonstrations are available")
        demos = demos[:sc.samples]  # light SFT: a few hundred demonstrations instead of all
    if not demos:
        raise ValueError("sft: no demonstrations to train on")
    steps_per_epoch = math.ceil(len(demos) / sc.batch_size)
    total_steps = sc.epochs * steps_per_epoch

    resuming = resume and checkpoint.exists(out_dir)
    model = checkpoint.load_model_from(out_dir if resuming else base_dir, device=device)
    opt = optim.make_optimizer(model, sc.lr, sc.weight_decay)
    step, best, best_state, bad_evals = 0, float("inf"), None, 0
    if resuming:
        state = checkpoint.load_state(out_dir)
        opt.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        step, best, bad_evals = state["step"], state["best"], state["bad_evals"]
        best_state = state["best_state"]

    def save(finished: bool, info=None):
        checkpoint.save(out_dir, stage=STAGE, model=model, tokenizer=tokenizer, step=step, finished=finished,
                        state={"optimizer": opt.state_dict(), "best": best, "best_state": best_state,
                               "bad_evals": bad_evals}, info=info)

    print(f"[sft] {len(demos)} demonstrations, {len(demos_heldout)} held out, {total_steps} steps")
    metrics.log(STAGE, step, event="start")
    model.train()
    bar, speed = progress(total_steps, "sft", initial=step), Throughput()
    stopped_early = False
    while step < total_steps and not stopped_early:
        epoch, i = divmod(step, steps_per_epoch)
        order = list(range(len(demos)))
        random.Random(cfg.seed + epoch).shuffle(order)  # the same order again after a resume
        batch = [demos[j] for j in order[i * sc.batch_size:(i + 1) * sc.batch_size]]
        tokens, attn, resp = (t.to(device) for t in frame_batch(tokenizer, batch, max_len))
        lr = optim.lr_at(step, total_steps, sc.lr, sc.warmup_steps)
        optim.set_lr(opt, lr)
        with autocast(device):
            loss = response_loss(model, tokens, attn, resp)
        optim.step(opt, model, loss, sc.grad_clip)
        step += 1
        speed.add(int(attn.sum()))
        row = {"loss": loss.item(), "lr": lr}
        if step % sc.eval_every == 0 or step == total_steps:
            ev = heldout_loss(model, tokenizer, demos_heldout, 64, max_len, device) if demos_heldout else loss.item()
            row["eval_loss"] = ev
            if ev < best - 1e-4:
                best, bad_evals = ev, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                bad_evals += 1
                stopped_early = bad_evals >= sc.patience  # early stopping on held-out loss
            save(finished=False)
        row["tokens_per_s"] = speed.rate()
        metrics.log(STAGE, step, **row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", best=f"{best:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        bar.update(1)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    info = {"eval_loss": best, "steps": step, "stopped_early": stopped_early, "demos": len(demos),
            "wall_s": round(time.time() - t0, 1)}
    save(finished=True, info=info)
    print(f"[sft] done: best held-out loss {best:.3f} after {step} steps"
          f"{' (early stop)' if stopped_early else ''} in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir
