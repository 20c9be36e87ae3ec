"""Stage 3a — comparison data (InstructGPT §3.5): K responses per prompt sampled from the SFT
policy, ranked best to worst by the (simulated) annotator.

The rankings are written as preference JSONL (`{"prompt", "responses", "ranking"}` rows, the
format a user can supply instead with --data.preferences). Prompts are processed in chunks;
each chunk is sampled with its own seeded generator and ranked with its own seeded annotator,
and its rows are appended to `<out>.partial` and fsynced before the next chunk starts. A
killed run resumes at the first unfinished chunk and ends with the same file as an unbroken
run; when all chunks are done the file is renamed to `<out>`.

Under torchrun the chunks are dealt out: in each round rank r samples and ranks chunk
`first + r` (the K responses of a prompt stay together, on one rank), the rows are gathered
and rank 0 appends them in chunk order — the same file as one process writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import checkpoint, distributed, loop
from ..config import RunConfig
from ..data import Annotator, Comparison, read_preferences
from ..device import resolve_device
from ..files import write_json
from ..generate import sample_responses
from ..metrics import Metrics

STAGE = "rankings"


def _done_chunks(partial: Path, chunk: int) -> tuple[int, list[str]]:
    """Complete chunks already in the partial file, and their lines (a torn last line is dropped)."""
    if not partial.exists():
        return 0, []
    lines = []
    for line in partial.read_text(encoding="utf-8").split("\n"):
        try:
            json.loads(line)
            lines.append(line)
        except json.JSONDecodeError:
            break  # the line being written when the run was killed
    n = len(lines) // chunk
    return n, lines[:n * chunk]


def run_rankings(cfg: RunConfig, out_path, *, sft_dir, prompts: list, gold_score, annotator_seed: int,
                 metrics: Metrics, resume: bool = False) -> list[Comparison]:
    """Sample cfg.rm.k responses per prompt from the SFT checkpoint, rank them with the simulated
    annotator (gold + Plackett–Luce noise), write out_path; returns the comparisons."""
    out_path = Path(out_path)
    rc = cfg.rm
    device = resolve_device(cfg.device)
    partial = out_path.with_name(out_path.name + ".partial")
    chunk = max(1, rc.sample_batch_size // rc.k)  # prompts per chunk: one generation batch
    n_chunks = -(-len(prompts) // chunk)
    # what the partial rows were made with: a resume must continue with the same, or the file would mix them
    made_with = {"rm.k": rc.k, "rm.temperature": rc.temperature, "rm.max_new_tokens": rc.max_new_tokens,
                 "rm.sample_batch_size": rc.sample_batch_size, "seed": cfg.seed, "prompts": len(prompts)}
    sidecar = partial.with_name(partial.name + ".json")
    if resume and sidecar.exists():
        before = json.loads(sidecar.read_text())
        for k, v in made_with.items():
            if before.get(k) != v:
                raise ValueError(f"{partial}: started with {k}={before.get(k)!r}, this run asks for {v!r}; resume with "
                                 f"the same, or delete {partial} to sample the rankings again")
    done, lines = _done_chunks(partial, chunk) if resume else (0, [])
    distributed.barrier()  # every rank has read the partial file
    if distributed.is_main():
        write_json(sidecar, made_with, indent=None)
        partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")  # drop a torn tail
    model = checkpoint.load_model_from(sft_dir, device=device)
    tokenizer = checkpoint.load_tokenizer(sft_dir)
    print(f"[rankings] {len(prompts)} prompts x {rc.k} responses from {sft_dir}"
          + (f", resuming at chunk {done + 1}/{n_chunks}" if done else ""))

    def rank_chunk(c: int) -> list[dict]:
        """Chunk c, sampled and ranked with its own seeds: the same rows on any rank."""
        batch = prompts[c * chunk:(c + 1) * chunk]
        if not batch:
            return []
        responses = sample_responses(model, tokenizer, batch, n=rc.k, max_new_tokens=rc.max_new_tokens,
                                     temperature=rc.temperature, batch_size=rc.sample_batch_size,
                                     seed=cfg.seed * 1_000_003 + c)
        annotator = Annotator(gold_score, cfg.task.annotator_noise, annotator_seed * 1_000_003 + c)
        return [{"prompt": p, "responses": r, "ranking": annotator.rank(p, r)} for p, r in zip(batch, responses)]

    world = distributed.size()

    def train_step(step: int) -> dict:  # step: the round that starts at chunk done + (step − done)·N
        first = done + (step - done) * world
        rows = distributed.gather(rank_chunk(first + distributed.rank()))  # chunks first.. first+N−1, in order
        if distributed.is_main():
            with open(partial, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())
        return {"prompts": float(len(rows))}

    with torch.no_grad():
        loop.loop(STAGE, done, done + -(-(n_chunks - done) // world), train_step, save=lambda *a, **k: None,
                  metrics=metrics, save_every=None, show=())
    if distributed.is_main():
        partial.replace(out_path)  # a finished file or none
        sidecar.unlink(missing_ok=True)
    distributed.barrier()
    comparisons = read_preferences(out_path)
    print(f"[rankings] {len(comparisons)} prompts ranked -> {out_path}")
    return comparisons

