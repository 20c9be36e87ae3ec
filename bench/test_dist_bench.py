"""CPU: one PPO iteration of a preset on 2 processes x 1 thread (torchrun, DDP, gloo) against
1 process x 2 threads -- whichever wins.

Group "ppo_iteration_dist" (conventions in bench/conftest.py; sizes["dist"]: the `quick`
preset, 3 iterations per launch on CPU; smoke: `tiny`, 1 iteration). Both sides run the
real command line (`python -m minirlhf ppo --device cpu`, under torchrun for the 2
processes) on the same checkpoints: the preset's model, randomly initialised (seed 0) as
policy, reference, reward model and critic, with a tokenizer trained on the preset's corpus.
A random policy rarely emits EOS, so every response runs to max_new_tokens: the
generation-heavy end of PPO. An iteration's time is the sum of its phases as rank 0 logs them
(time/generate, time/score, time/bookkeeping, time/update: the ranks meet at every
all-reduce, so rank 0's iteration is the iteration); the first iteration is dropped (warm-up)
when there are more, and the median of the rest is the time (convention 5: each launch
reports its own time, start-up and loading excluded), with its phases as generate_s,
score_s, bookkeeping_s, update_s. "2 processes x 1 thread" is ours (the distributed path);
the ratio ours / reference below 1 means the two processes win.

What to expect (see README, Many devices): 2 processes each generate, score and train on half
of the batch with one thread; 1 process runs the whole batch on two threads. Generation is a
sequence of small matmuls (batch x dim, one step per token), where a second thread helps
little and a second process helps fully; the update adds one gradient all-reduce per
minibatch (two models of ~1M parameters, over gloo on loopback).

    pytest bench/test_dist_bench.py
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import measure

PHASES = ("generate", "score", "bookkeeping", "update")
GROUP = "ppo_iteration_dist"
CONFIGS = {"2_processes_x_1_thread": (2, 1), "1_process_x_2_threads": (1, 2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sizes):
    """sft/ and rm/ checkpoints of the preset's model (random weights) and tokenizer."""
    from minirlhf import checkpoint
    from minirlhf.config import PRESETS
    from minirlhf.data import build_task
    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

    cfg = PRESETS[sizes["dist"]["preset"]]()
    tokenizer = Tokenizer.train(build_task(cfg.task).corpus, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
    root = tmp_path_factory.mktemp("dist_bench")
    torch.manual_seed(0)
    for stage in ("sft", "rm"):
        checkpoint.save(root / stage, stage=stage, model=Transformer(cfg.model), tokenizer=tokenizer, step=0,
                        finished=True)
    return root


def _launch(root: Path, preset: str, iterations: int, processes: int, threads: int) -> list[dict]:
    """The PPO metrics rows of one launch of `python -m minirlhf ppo`."""
    out = root / f"run-{processes}x{threads}"
    args = ["-m", "minirlhf", "ppo", "--preset", preset, "--device", "cpu", "--from", str(root / "sft"),
            "--rm", str(root / "rm"), "--out", str(out), "--ppo.iterations", str(iterations),
            "--ppo.eval_every", "none", "--ppo.save_every", str(iterations), "--dist.threads", str(threads)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIRLHF_")}
    env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "ppo" and "pg_loss" in r]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ppo_iteration(benchmark, checkpoints, sizes, name):
    processes, threads = CONFIGS[name]
    preset, iterations = sizes["dist"]["preset"], sizes["dist"]["iterations"]
    rows = _launch(checkpoints, preset, iterations, processes, threads)
    assert len(rows) == iterations
    timed = rows[1:] if len(rows) > 1 else rows  # the first iteration warms up
    phases = {p: statistics.median(r[f"time/{p}"] for r in timed) for p in PHASES}
    iteration = statistics.median(sum(r[f"time/{p}"] for p in PHASES) for r in timed)
    measure(benchmark, lambda: None, group=GROUP, impl=name, ours=processes > 1, memory=False, rounds=1,
            time_s=iteration, processes=processes, threads_per_process=threads, preset=preset, timed_iterations=len(timed),
            iteration_s=[sum(r[f"time/{p}"] for p in PHASES) for r in timed],
            **{f"{p}_s": t for p, t in phases.items()})
