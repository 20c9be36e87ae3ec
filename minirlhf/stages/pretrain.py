"""Stage 1 — pretraining: next-token prediction on the corpus.

The corpus is packed into one token stream (bos doc eos bos doc eos ...) and each step
trains on random windows of it, so no token is wasted on padding. Held-out loss and
perplexity are measured on fixed windows of the held-out text. The tokenizer is trained on
the same corpus before this stage (pipeline.py), so every input can be checked against the
token budget before any model trains.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed, loop, optim
from ..config import RunConfig
from ..device import autocast, resolve_device
from ..evaluate import stream_loss
from ..metrics import Metrics, Throughput
from ..model import Transformer
from ..tokenizer import random_windows, token_stream

STAGE = "pretrain"


def run_pretrain(cfg: RunConfig, out_dir, *, tokenizer, corpus: list[str], corpus_heldout: list[str],
                 metrics: Metrics, resume: bool = False) -> Path:
    """Train a base model from scratch on the corpus; returns its checkpoint directory."""
    out_dir, pc = Path(out_dir), cfg.pretrain
    device = resolve_device(cfg.device)
    t0 = time.time()

    def init():
        torch.manual_seed(cfg.seed)
        # the model's vocabulary is the tokenizer's: a small corpus may give fewer pieces than model.vocab_size,
        # and a model with more outputs than the tokenizer has ids would sample ids nothing can decode
        if tokenizer.vocab_size != cfg.model.vocab_size:
            print(f"[pretrain] note: the tokenizer has {tokenizer.vocab_size} pieces (model.vocab_size="
                  f"{cfg.model.vocab_size}); the model's vocabulary follows the tokenizer")
        return {"model": Transformer(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)).to(device)}

    data_rng = torch.Generator().manual_seed(cfg.seed)  # the windows' offsets
    run = loop.open_stage(out_dir, STAGE, resume=resume, device=device, tokenizer=tokenizer, init=init,
                          optimizers=lambda m: {"model": optim.make_optimizer(m["model"], pc.lr, pc.weight_decay)},
                          extra_state=lambda: {"data_rng": data_rng.get_state()})
    model, opt, train_model = run.models["model"], run.optimizers["model"], run.views["model"]
    if run.state is not None:
        data_rng.set_state(run.state["data_rng"])
    train_stream = token_stream(tokenizer, corpus)
    eval_stream = token_stream(tokenizer, corpus_heldout)

    n_params = model.num_params()
    print(f"[pretrain] {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
          f"{len(train_stream):,} training tokens, {len(eval_stream):,} held-out tokens")
    model.train()
    speed = Throughput()
    last_eval = {"eval_loss": float("nan")}

    def train_step(step: int) -> dict:
        lr = optim.lr_at(step, pc.steps, pc.lr, pc.warmup_steps, pc.min_lr_ratio)
        optim.set_lr(opt, lr)
        x, y = random_windows(train_stream, pc.batch_size, pc.seq_len, data_rng)  # the global batch
        (x, weight), (y, _) = distributed.shard(x), distributed.shard(y)  # this rank's rows
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = train_model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # next-token prediction
        tokens = x.numel()
        if distributed.active():  # this rank's share of the global batch's mean; logged: the global mean
            n = tokens * weight
            loss_sum, tokens = distributed.all_sum(loss.item() * n, n)
            loss, global_loss = distributed.share(loss, n, tokens), loss_sum / tokens
        grad_norm = optim.step(opt, model, loss, pc.grad_clip)
        speed.add(tokens)
        row = {"loss": global_loss if distributed.active() else loss.item(), "lr": lr, "grad_norm": grad_norm, "tokens_per_s": speed.rate()}
        if (step + 1) % pc.eval_every == 0 or step + 1 == pc.steps:
            eval_loss = stream_loss(model, eval_stream, pc.seq_len, pc.eval_batches * pc.batch_size,
                                    pc.batch_size, device)
            row.update(eval_loss=eval_loss, eval_ppl=math.exp(eval_loss))
            last_eval.update(row)
        return row

    step = loop.loop(STAGE, run.step, pc.steps, train_step, run.save, metrics, save_every=pc.save_every,
                     show=("loss", "eval_loss", "tokens_per_s"))
    eval_loss = last_eval["eval_loss"]
    if math.isnan(eval_loss):  # resumed past the last evaluation step
        eval_loss = stream_loss(model, eval_stream, pc.seq_len, pc.eval_batches * pc.batch_size, pc.batch_size,
                                device)
    info = {"eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss), "wall_s": round(time.time() - t0, 1),
            "params": n_params}
    loop.finish(out_dir, run.save, step, info, stage=STAGE)
    print(f"[pretrain] done: held-out loss {eval_loss:.3f} (perplexity {math.exp(eval_loss):.2f}) "
          f"in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir
