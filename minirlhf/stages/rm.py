"""Stage 3b — the reward model, trained on rankings (InstructGPT §3.5, "RM").

The RM is the SFT model with its scalar head read at the EOS that ends the exchange
(minirlhf/reward.py holds that convention, shared with PPO and evaluation). All K responses
of a prompt go through the model in one batch, and the loss is

    loss = −1/C(K,2) · Σ_{(better, worse) pairs} log σ(r(x, y_better) − r(x, y_worse))

averaged over prompts — every pair of a ranking, each prompt weighted once (not once per
pair), which is what keeps InstructGPT's K-way rankings from overfitting. Pairwise data
is K=2; ratings become the pairs with different ratings (ties dropped). A pair whose two
responses are the same token sequence after framing carries no preference: it is dropped
from the loss and from held-out accuracy, and counted.

After training the scores are shifted so the mean over the training responses is 0, so
PPO's RM score starts centred, as in InstructGPT.
"""
from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, distributed, loop, optim
from ..config import RunConfig
from ..data import Comparison
from ..device import autocast, resolve_device
from ..metrics import Metrics
from ..reward import informative_pairs, pairwise_accuracy, score_texts, scores
from ..tokenizer import frame_batch

STAGE = "rm"


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                 group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """−mean over prompts of mean over that prompt's pairs of log σ(r_better − r_worse).

    rewards (N,): one score per response of the batch; better/worse (P,): response
    indices of each pair; group (P,): which prompt each pair belongs to (0..n_groups-1)."""
    pair_loss = -F.logsigmoid(rewards[better] - rewards[worse])
    pairs_per_group = torch.zeros(n_groups, device=rewards.device).index_add_(0, group, torch.ones_like(pair_loss))
    return (pair_loss / pairs_per_group[group]).sum() / n_groups


def batch_tensors(tokenizer, comparisons: list[Comparison], max_len: int):
    """All responses of the batch's comparisons framed together, and the pair index tensors:
    (tokens, attn, last, better, worse, group)."""
    texts, better, worse, group = [], [], [], []
    for g, c in enumerate(comparisons):
        base = len(texts)
        texts += [(c.prompt, r) for r in c.responses]
        for b, w in c.pairs:
            better.append(base + b)
            worse.append(base + w)
            group.append(g)
    tokens, attn, _ = frame_batch(tokenizer, texts, max_len)
    last = attn.long().sum(1) - 1  # the EOS that ends each exchange (reward.py)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return tokens, attn, last, as_long(better), as_long(worse), as_long(group)


def drop_tied_pairs(tokenizer, comparisons: list[Comparison], max_len: int) -> tuple[list[Comparison], int]:
    """The comparisons with their uninformative pairs removed (reward.informative_pairs);
    comparisons left with no pair are dropped. Returns (comparisons, pairs dropped)."""
    kept, dropped = [], 0
    for c in comparisons:
        pairs, n = informative_pairs(tokenizer, c, max_len)
        dropped += n
        if pairs:
            kept.append(Comparison(c.prompt, c.responses, pairs))
    return kept, dropped


def heldout_split(comparisons: list[Comparison], fraction: float, seed: int):
    """(heldout, train): a seeded shuffle, then max(1, fraction · n) comparisons held out (none if fraction is 0)."""
    comparisons = list(comparisons)
    random.Random(seed).shuffle(comparisons)
    n_held = max(1, int(len(comparisons) * fraction)) if fraction > 0 else 0
    return comparisons[:n_held], comparisons[n_held:]


def combine_accuracies(parts: list[dict]) -> dict:
    """reward.pairwise_accuracy's results on disjoint shares of the comparisons, as one result:
    the counts added, each accuracy averaged weighted by its number of pairs."""
    out = {k: sum(p[k] for p in parts) for k in ("pairs", "tied_pairs", "gold_pairs") if k in parts[0]}
    for acc, n in (("acc_vs_labels", "pairs"), ("acc_vs_gold", "gold_pairs")):
        if acc in parts[0]:
            hits = sum(p[acc] * p[n] for p in parts if p[acc] is not None)
            out[acc] = hits / out[n] if out[n] else None
    return out


def run_rm(cfg: RunConfig, out_dir, *, sft_dir, comparisons: list[Comparison], metrics: Metrics,
           gold_score=None, resume: bool = False) -> Path:
    """Train the reward model on comparisons; returns its checkpoint directory.

    gold_score(prompt, response) -> float | None: only for the held-out accuracy against gold
    (None for prompts the gold function does not know)."""
    out_dir, rc = Path(out_dir), cfg.rm
    device = resolve_device(cfg.device)
    t0 = time.time()
    tokenizer = checkpoint.load_tokenizer(sft_dir)
    max_len = cfg.model.max_seq_len

    heldout, train = heldout_split(comparisons, rc.heldout_fraction, cfg.seed)
    train, tied = drop_tied_pairs(tokenizer, train, max_len)
    if tied:
        print(f"[rm] warning: {tied} training pair(s) have identical responses after framing (same text, or "
              f"cut to the same tokens by model.max_seq_len={max_len}); dropped from the loss", file=sys.stderr)
    if not train:
        raise ValueError("rm: no informative comparisons left to train on (every pair is a tie)")
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total_steps = rc.epochs * steps_per_epoch

    run = loop.open_stage(out_dir, STAGE, resume=resume, device=device, tokenizer=tokenizer,
                          init=lambda: {"model": checkpoint.load_model_from(sft_dir, device=device)},
                          optimizers=lambda m: {"model": optim.make_optimizer(m["model"], rc.lr, rc.weight_decay)})
    model, opt, train_model = run.models["model"], run.optimizers["model"], run.views["model"]

    print(f"[rm] {len(train)} comparisons for training, {len(heldout)} held out, {total_steps} steps")
    model.train()

    def train_step(step: int) -> dict:
        epoch, i = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(cfg.seed + epoch).shuffle(order)
        batch = [train[j] for j in order[i * rc.batch_size:(i + 1) * rc.batch_size]]
        mine, weight = distributed.shard(batch)  # this rank's prompts, each with all K of its responses
        tokens, attn, last, better, worse, group = (t.to(device) for t in batch_tensors(tokenizer, mine, max_len))
        lr = optim.lr_at(step, total_steps, rc.lr, rc.warmup_steps)
        optim.set_lr(opt, lr)
        with autocast(device):
            r = scores(train_model, tokens, attn, last)
        loss = ranking_loss(r, better, worse, group, len(mine))
        if distributed.active():  # this rank's share of the mean over the global batch's prompts; logged: global
            n, hits = len(mine) * weight, (r[better] > r[worse]).sum().item() * weight
            loss_sum, n_all, hits, pairs = distributed.all_sum(loss.item() * n, n, hits, len(better) * weight)
            loss, global_loss, acc = distributed.share(loss, n, n_all), loss_sum / n_all, hits / pairs
        grad_norm = optim.step(opt, model, loss, rc.grad_clip)
        if not distributed.active():
            acc, global_loss = (r[better] > r[worse]).float().mean().item(), loss.item()
        return {"loss": global_loss, "acc": acc, "lr": lr, "grad_norm": grad_norm}

    step = loop.loop(STAGE, run.step, total_steps, train_step, run.save, metrics, save_every=rc.save_every,
                     show=("loss", "acc"))

    # centre the RM: mean score 0 over the training responses (a shift of the head's bias only)
    mine = train[distributed.shard_slice(len(train))]  # this rank's share, the scores gathered in order
    with distributed.gathered(model):
        raw = score_texts(model, tokenizer, [c.prompt for c in mine for _ in c.responses],
                          [y for c in mine for y in c.responses], max_len)
    if distributed.active():
        raw = torch.tensor(distributed.gather(raw.tolist()))
    with torch.no_grad():
        if distributed.strategy() == "fsdp" and distributed.active():  # each rank shifts its shard of the bias
            model.scalar_head.bias.sub_(raw.mean().item())
        else:
            model.scalar_head.bias -= raw.mean().to(model.scalar_head.bias)
    info = {"score_mean_before_shift": raw.mean().item(), "score_std": raw.std().item(),
            "comparisons": len(train), "tied_pairs_dropped": tied, "wall_s": round(time.time() - t0, 1)}

    def evaluate() -> dict:  # after the save: an error here cannot lose the trained RM
        if not heldout:
            acc = {}
        elif distributed.active():  # each rank its share of the held-out comparisons, the accuracies combined
            with distributed.gathered(model):
                part = pairwise_accuracy(model, tokenizer, heldout[distributed.shard_slice(len(heldout))], max_len,
                                         gold_score)
            acc = combine_accuracies(distributed.gather([part]))
        else:
            acc = pairwise_accuracy(model, tokenizer, heldout, max_len, gold_score)
        metrics.log(STAGE, step, **{f"heldout_{k}": v for k, v in acc.items() if v is not None})
        return acc

    info = loop.finish(out_dir, run.save, step, info, evaluate=evaluate, stage=STAGE)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in info.items() if k.startswith("acc") and v is not None)
    print(f"[rm] done: held-out {shown or 'accuracy n/a'} in {info['wall_s']:.0f}s -> {out_dir}")
    return out_dir
