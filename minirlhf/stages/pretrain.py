"""Stage 1 — pretraining: train the tokenizer on the corpus, then next-token prediction.

The corpus is packed into one token stream (bos doc eos bos doc eos ...) and each step
trains on random windows of it, so no token is wasted on padding. Held-out loss and
perplexity are measured on fixed windows of the held-out text.
"""
from __future__ import annotations

import math
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

STAGE = "pretrain"


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    ids = [t for doc in tokenizer.encode_batch(texts) for t in [tokenizer.bos_id, *doc, tokenizer.eos_id]]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    """(inputs, targets), each (batch, seq_len): windows at random offsets, targets shifted by one."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = stream[idx]
    return w[:, :-1], w[:, 1:]


def heldout_windows(stream: torch.Tensor, n: int, seq_len: int):
    """Up to n non-overlapping windows from the start of the held-out stream."""
    n = max(1, min(n, (len(stream) - 1) // seq_len))
    w = stream[: n * seq_len + 1]
    return w[:-1].view(n, seq_len), w[1:].view(n, seq_len)


@torch.no_grad()
def stream_loss(model: Transformer, stream: torch.Tensor, seq_len: int, max_windows: int, batch: int,
                device) -> float:
    """Mean next-token cross-entropy (nats/token) of the model on a held-out token stream."""
    was_training = model.training
    model.eval()
    x, y = heldout_windows(stream, max_windows, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        with autocast(device):
            logits = model(xb)
        total += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum").item()
        count += yb.numel()
    model.train(was_training)
    return total / count


def run_pretrain(cfg: RunConfig, out_dir, *, corpus: list[str], corpus_heldout: list[str],
                 metrics: Metrics, resume: bool = False) -> Path:
    """Train a base model from scratch; returns its checkpoint directory."""
    out_dir, pc = Path(out_dir), cfg.pretrain
    device = resolve_device(cfg.device)
    t0 = time.time()

    if resume and checkpoint.exists(out_dir):
        tokenizer = checkpoint.load_tokenizer(out_dir)
        model = checkpoint.load_model_from(out_dir, device=device)
        state = checkpoint.load_state(out_dir)
    else:
        tokenizer = Tokenizer.train(corpus, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model).to(device)
        state = None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, more than model.vocab_size={cfg.model.vocab_size}")
    train_stream = token_stream(tokenizer, corpus)
    eval_stream = token_stream(tokenizer, corpus_heldout)
    if len(train_stream) <= pc.seq_len + 1:
        raise ValueError(f"corpus: {len(train_stream)} tokens, fewer than one window of pretrain.seq_len={pc.seq_len}")

    opt = optim.make_optimizer(model, pc.lr, pc.weight_decay)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        data_rng.set_state(state["data_rng"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]

    def save(finished: bool, info=None):
        checkpoint.save(out_dir, stage=STAGE, model=model, tokenizer=tokenizer, step=step, finished=finished,
                        state={"optimizer": opt.state_dict(), "data_rng": data_rng.get_state()}, info=info)

    n_params = model.num_params()
    print(f"[pretrain] {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
          f"{len(train_stream):,} training tokens, {len(eval_stream):,} held-out tokens")
    metrics.log(STAGE, step, event="start")
    model.train()
    bar, speed = progress(pc.steps, "pretrain", initial=step), Throughput()
    eval_loss = float("nan")
    while step < pc.steps:
        lr = optim.lr_at(step, pc.steps, pc.lr, pc.warmup_steps, pc.min_lr_ratio)
        optim.set_lr(opt, lr)
        x, y = random_windows(train_stream, pc.batch_size, pc.seq_len, data_rng)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        grad_norm = optim.step(opt, model, loss, pc.grad_clip)
        step += 1
        speed.add(x.numel())
        row = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm}
        if step % pc.eval_every == 0 or step == pc.steps:
            eval_loss = stream_loss(model, eval_stream, pc.seq_len, pc.eval_batches * pc.batch_size,
                                    pc.batch_size, device)
            row.update(eval_loss=eval_loss, eval_ppl=math.exp(eval_loss))
        if step % 10 == 0 or "eval_loss" in row:
            row["tokens_per_s"] = speed.rate()
            metrics.log(STAGE, step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", eval=f"{eval_loss:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        bar.update(1)
        if step % pc.save_every == 0 and step < pc.steps:
            save(finished=False)
    bar.close()
    info = {"eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss), "wall_s": round(time.time() - t0, 1),
            "params": n_params}
    save(finished=True, info=info)
    print(f"[pretrain] done: held-out loss {eval_loss:.3f} (perplexity {math.exp(eval_loss):.2f}) "
          f"in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir
