"""Stage 3 — comparison data and the reward model (InstructGPT §3.5).

Comparison data: for each prompt, K responses are sampled from the SFT policy and the
(simulated) annotator ranks them. The rankings are saved as preference JSONL in the run
directory, in the same format a user can supply instead.

Reward model: the SFT model with its scalar head read at the last response token (the
EOS). All K responses of a prompt go through the model in one batch, and the loss is

    loss = −1/C(K,2) · Σ_{(better, worse) pairs} log σ(r(x, y_better) − r(x, y_worse))

averaged over prompts — every pair of a ranking, each prompt weighted once (not once per
pair), which is what keeps InstructGPT's K-way rankings from overfitting. Pairwise data
is K=2; ratings become the pairs with different ratings (ties dropped).

After training the scores are shifted so the mean over SFT samples is 0, so PPO's RM
score starts centred, as in InstructGPT.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, optim
from ..config import RunConfig
from ..data import Comparison, pairs_from_ranking, write_jsonl
from ..device import autocast, resolve_device
from ..generate import sample_responses
from ..metrics import Metrics, progress
from ..model import Transformer
from ..tokenizer import Tokenizer
from .sft import frame_batch

STAGE = "rm"


# ---------------------------------------------------------------- comparison data
def collect_rankings(cfg: RunConfig, sft_dir, prompts: list[str], annotator, out_path) -> list[Comparison]:
    """Sample K responses per prompt from the SFT policy; the annotator ranks them; save as JSONL."""
    device = resolve_device(cfg.device)
    model = checkpoint.load_model_from(sft_dir, device=device)
    tokenizer = checkpoint.load_tokenizer(sft_dir)
    k = cfg.rm.k
    responses = sample_responses(model, tokenizer, prompts, n=k, max_new_tokens=cfg.rm.max_new_tokens,
                                 temperature=cfg.rm.temperature, batch_size=256, seed=cfg.seed,
                                 desc="rm: sampling")
    rows, comparisons = [], []
    for prompt, resp in zip(prompts, responses):
        ranking = annotator.rank(prompt, resp)
        rows.append({"prompt": prompt, "responses": resp, "ranking": ranking})
        comparisons.append(Comparison(prompt, resp, pairs_from_ranking(ranking)))
    tmp = Path(str(out_path) + ".tmp")
    write_jsonl(tmp, rows)
    tmp.replace(out_path)  # a finished file or none: a crash never leaves half a dataset
    return comparisons


# ---------------------------------------------------------------- the loss
def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                 group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """−mean over prompts of mean over that prompt's pairs of log σ(r_better − r_worse).

    rewards (N,): one score per response of the batch; better/worse (P,): response
    indices of each pair; group (P,): which prompt each pair belongs to."""
    pair_loss = -F.logsigmoid(rewards[better] - rewards[worse])
    pairs_per_group = torch.zeros(n_groups, device=rewards.device).index_add_(0, group, torch.ones_like(pair_loss))
    return (pair_loss / pairs_per_group[group]).sum() / n_groups


def batch_tensors(tokenizer: Tokenizer, comparisons: list[Comparison], max_len: int):
    """All responses of the batch's comparisons framed together, and the pair index tensors."""
    texts, better, worse, group = [], [], [], []
    for g, c in enumerate(comparisons):
        base = len(texts)
        texts += [(c.prompt, r) for r in c.responses]
        for b, w in c.pairs:
            better.append(base + b)
            worse.append(base + w)
            group.append(g)
    tokens, attn, _ = frame_batch(tokenizer, texts, max_len)
    last = attn.long().sum(1) - 1  # the score is read at the last token: EOS, or the cut-off end
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return tokens, attn, last, as_long(better), as_long(worse), as_long(group)


def scores(model: Transformer, tokens, attn, last):
    """The reward of each sequence: the scalar head at its last token."""
    return model.scalars(tokens, attn).gather(1, last[:, None]).squeeze(1)


@torch.no_grad()
def score_texts(model: Transformer, tokenizer: Tokenizer, prompts: list[str], responses: list[str],
                max_len: int, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    device = model.embed.weight.device
    for i in range(0, len(prompts), batch_size):
        tokens, attn, _ = frame_batch(tokenizer, list(zip(prompts[i:i + batch_size], responses[i:i + batch_size])),
                                      max_len)
        last = attn.long().sum(1) - 1
        with autocast(device):
            out.append(scores(model, tokens.to(device), attn.to(device), last.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, comparisons: list[Comparison], max_len: int, gold_score=None) -> dict:
    """Fraction of pairs the RM orders like the labels; with gold_score, also like the gold function
    (pairs whose gold scores tie are skipped)."""
    prompts = [c.prompt for c in comparisons for _ in c.responses]
    responses = [r for c in comparisons for r in c.responses]
    r = score_texts(model, tokenizer, prompts, responses, max_len).tolist()
    hits = total = g_hits = g_total = 0
    base = 0
    for c in comparisons:
        for b, w in c.pairs:
            hits += r[base + b] > r[base + w]
            total += 1
        if gold_score is not None:
            gold = [gold_score(c.prompt, y) for y in c.responses]
            for i in range(len(c.responses)):
                for j in range(i + 1, len(c.responses)):
                    if gold[i] != gold[j]:
                        g_hits += (r[base + i] > r[base + j]) == (gold[i] > gold[j])
                        g_total += 1
        base += len(c.responses)
    out = {"acc_vs_labels": hits / max(total, 1), "pairs": total}
    if gold_score is not None:
        out.update(acc_vs_gold=g_hits / max(g_total, 1), gold_pairs=g_total)
    return out


# ---------------------------------------------------------------- the stage
def run_rm(cfg: RunConfig, out_dir, *, sft_dir, comparisons: list[Comparison], metrics: Metrics,
           gold_score=None, resume: bool = False) -> Path:
    """Train the reward model on comparisons; returns its checkpoint directory."""
    out_dir, rc = Path(out_dir), cfg.rm
    device = resolve_device(cfg.device)
    t0 = time.time()
    tokenizer = checkpoint.load_tokenizer(sft_dir)
    max_len = cfg.model.max_seq_len

    comparisons = list(comparisons)
    random.Random(cfg.seed).shuffle(comparisons)
    n_held = max(1, int(len(comparisons) * rc.heldout_fraction)) if len(comparisons) > 1 else 0
    heldout, train = comparisons[:n_held], comparisons[n_held:]
    if not train:
        raise ValueError("rm: no comparisons left to train on")
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total_steps = rc.epochs * steps_per_epoch

    resuming = resume and checkpoint.exists(out_dir)
    model = checkpoint.load_model_from(out_dir if resuming else sft_dir, device=device)
    opt = optim.make_optimizer(model, rc.lr, rc.weight_decay)
    step = 0
    if resuming:
        state = checkpoint.load_state(out_dir)
        opt.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]

    def save(finished: bool, info=None):
        checkpoint.save(out_dir, stage=STAGE, model=model, tokenizer=tokenizer, step=step, finished=finished,
                        state={"optimizer": opt.state_dict()}, info=info)

    print(f"[rm] {len(train)} comparisons for training, {len(heldout)} held out, {total_steps} steps")
    metrics.log(STAGE, step, event="start")
    model.train()
    bar = progress(total_steps, "rm", initial=step)
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(cfg.seed + epoch).shuffle(order)
        batch = [train[j] for j in order[i * rc.batch_size:(i + 1) * rc.batch_size]]
        tokens, attn, last, better, worse, group = (t.to(device) for t in batch_tensors(tokenizer, batch, max_len))
        lr = optim.lr_at(step, total_steps, rc.lr, rc.warmup_steps)
        optim.set_lr(opt, lr)
        with autocast(device):
            r = scores(model, tokens, attn, last)
        loss = ranking_loss(r, better, worse, group, len(batch))
        optim.step(opt, model, loss, rc.grad_clip)
        step += 1
        acc = (r[better] > r[worse]).float().mean().item()
        metrics.log(STAGE, step, loss=loss.item(), acc=acc, lr=lr)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        bar.update(1)
        if step % 100 == 0 and step < total_steps:
            save(finished=False)
    bar.close()

    # centre the RM: mean score 0 over the SFT samples it was trained on (bias shift only)
    prompts = [c.prompt for c in train for _ in c.responses]
    responses = [y for c in train for y in c.responses]
    raw = score_texts(model, tokenizer, prompts, responses, max_len)
    with torch.no_grad():
        model.scalar_head.bias -= raw.mean().to(model.scalar_head.bias)
    acc = pairwise_accuracy(model, tokenizer, heldout, max_len, gold_score) if heldout else {}
    info = {**acc, "score_mean_before_shift": raw.mean().item(), "score_std": raw.std().item(),
            "comparisons": len(train), "wall_s": round(time.time() - t0, 1)}
    metrics.log(STAGE, step, **{f"heldout_{k}": v for k, v in acc.items()})
    save(finished=True, info=info)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k.startswith("acc"))
    print(f"[rm] done: held-out {shown} in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir
