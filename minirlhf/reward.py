"""Reward-model scoring, one convention everywhere (RM training, PPO, evaluation).

The reward model is the policy's transformer with its scalar head read at the EOS that
ends the exchange: (prompt, response) is framed by the tokenizer as prompt ids, response
ids, EOS — exactly how the RM is trained on rankings — and the score is the head's output
at that EOS (InstructGPT §3.5; Stiennon et al. 2020). A rollout that hit max_new_tokens
without EOS (`truncated`) gets the EOS appended before it is scored, so PPO's reward for a
response is the score the RM gives that response anywhere else; PPO adds its truncation
penalty on top (stages/ppo.py).

An exchange longer than max_len is cut on the left (tokenizer.frame_batch): the end of
the prompt and the whole response are kept.
"""
from __future__ import annotations

import torch

from .data import Comparison
from .device import autocast
from .model import Transformer
from .tokenizer import frame_batch


def scores(model: Transformer, tokens, attn, last) -> torch.Tensor:
    """(B,) fp32: the scalar head of each sequence at column last[b] (its EOS).

    tokens, attn: (B, T) long / bool; last: (B,) long."""
    return model.scalars(tokens, attn).gather(1, last[:, None]).squeeze(1)


def score_rollouts(model: Transformer, gen, eos_id: int) -> torch.Tensor:
    """(B,) fp32: the RM score of each generated response (minirlhf.generate.Generation).

    The layout is [left-padded prompt | right-padded response]: a finished response ends in
    EOS at column P + length − 1; a truncated one gets EOS written at column P + length (one
    column is added for it) and is read there."""
    tokens, attn = gen.full()
    B, P = gen.prompt_tokens.shape
    pad = torch.zeros((B, 1), dtype=tokens.dtype, device=tokens.device)
    tokens = torch.cat([tokens, pad], 1)
    attn = torch.cat([attn, torch.zeros_like(attn[:, :1])], 1)
    rows = torch.arange(B, device=tokens.device)
    eos_col = P + gen.lengths - 1 + gen.truncated.long()
    tokens[rows, eos_col] = torch.where(gen.truncated, eos_id, tokens[rows, eos_col])
    attn[rows, eos_col] = True
    width = int(eos_col.max()) + 1  # drop the added column when no response needed it
    return scores(model, tokens[:, :width], attn[:, :width], eos_col)


@torch.no_grad()
def score_texts(model: Transformer, tokenizer, prompts: list, responses: list[str], max_len: int,
                batch_size: int = 128) -> torch.Tensor:
    """(N,) fp32 CPU: the RM score of each (prompt, response) text pair, framed by the tokenizer."""
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


def framed_ids(tokenizer, prompt, response: str, max_len: int) -> tuple[int, ...]:
    """The token ids the RM sees for one exchange (after left truncation to max_len)."""
    return tuple(tokenizer.frame(prompt, response)[0][-max_len:])


def informative_pairs(tokenizer, comparison: Comparison, max_len: int) -> tuple[list[tuple[int, int]], int]:
    """(pairs, n_dropped): the comparison's (better, worse) pairs whose two responses differ
    after framing. A pair whose sides are identical token sequences (the same text twice, or
    texts that differ only past what truncation keeps) carries no preference: it is dropped
    from the loss and from accuracy."""
    ids = [framed_ids(tokenizer, comparison.prompt, r, max_len) for r in comparison.responses]
    kept = [(b, w) for b, w in comparison.pairs if ids[b] != ids[w]]
    return kept, len(comparison.pairs) - len(kept)


@torch.no_grad()
def pairwise_accuracy(model: Transformer, tokenizer, comparisons: list[Comparison], max_len: int,
                      gold_score=None) -> dict:
    """Held-out accuracy: the fraction of labelled pairs the RM orders like the labels.

    Pairs identical after framing are left out (see informative_pairs) and counted as
    `tied_pairs`. With gold_score(prompt, response) -> float or None (None: a prompt the
    gold function does not know), also the accuracy against gold over every pair of
    distinct responses whose gold scores differ, on the prompts gold knows."""
    prompts = [c.prompt for c in comparisons for _ in c.responses]
    responses = [r for c in comparisons for r in c.responses]
    r = score_texts(model, tokenizer, prompts, responses, max_len).tolist()
    hits = total = tied = g_hits = g_total = 0
    base = 0
    for c in comparisons:
        pairs, dropped = informative_pairs(tokenizer, c, max_len)
        tied += dropped
        for b, w in pairs:
            hits += r[base + b] > r[base + w]
            total += 1
        gold = [gold_score(c.prompt, y) for y in c.responses] if gold_score is not None else None
        if gold is not None and None not in gold:
            for i in range(len(c.responses)):
                for j in range(i + 1, len(c.responses)):
                    if gold[i] != gold[j]:
                        g_hits += (r[base + i] > r[base + j]) == (gold[i] > gold[j])
                        g_total += 1
        base += len(c.responses)
    out = {"acc_vs_labels": hits / total if total else None, "pairs": total, "tied_pairs": tied}
    if gold_score is not None:
        out.update(acc_vs_gold=g_hits / g_total if g_total else None, gold_pairs=g_total)
    return out
