"""CPU: one PPO iteration of the quick preset on 2 processes x 1 thread (torchrun, DDP, gloo)
against 1 process x 2 threads — whichever wins.

Both run the real command line (`python -m minirlhf ppo`, under torchrun for the 2 processes)
on the same checkpoints: the quick preset's model, randomly initialised (seed 0) as policy,
reference, reward model and critic, with a tokenizer trained on the quick corpus. A random
policy rarely emits EOS, so every response runs to max_new_tokens (32): the generation-heavy
end of PPO. Each launch runs MINIRLHF_BENCH_ITERS iterations (default 4); an iteration's time is
the sum of its phases as rank 0 logs them (time/generate, time/score, time/bookkeeping,
time/update: the ranks meet at every all-reduce, so rank 0's iteration is the iteration), the
first iteration is dropped (warm-up), the median of the rest is reported with its phases.
pytest-benchmark times each whole launch (start-up, loading, iterations) once.

What to expect (see README, Many devices): 2 processes each generate, score and train on half
of the batch with one thread; 1 process runs the whole batch on two threads. Generation is a
sequence of small matmuls (batch x dim, 32 steps), where a second thread helps little and a
second process helps fully; the update adds one gradient all-reduce per minibatch (two models
of ~1M parameters, over gloo on loopback). Results go to bench/results/dist-<machine>.json
(name the machine with MINIRLHF_BENCH_MACHINE).

    pytest bench/test_dist_bench.py
"""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
ITERS = int(os.environ.get("MINIRLHF_BENCH_ITERS", "4"))
PHASES = ("generate", "score", "bookkeeping", "update")
GROUP = "PPO iteration, quick preset, CPU: 2 processes x 1 thread vs 1 process x 2 threads"
CONFIGS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}

_measured: dict[str, dict] = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """sft/ and rm/ checkpoints of the quick preset's model (random weights) and tokenizer."""
    from minirlhf import checkpoint
    from minirlhf.config import PRESETS
    from minirlhf.data import build_task
    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

    cfg = PRESETS["quick"]()
    tokenizer = Tokenizer.train(build_task(cfg.task).corpus, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
    root = tmp_path_factory.mktemp("dist_bench")
    torch.manual_seed(0)
    for stage in ("sft", "rm"):
        checkpoint.save(root / stage, stage=stage, model=Transformer(cfg.model), tokenizer=tokenizer, step=0,
                        finished=True)
    return root


def _launch(root: Path, processes: int, threads: int) -> float:
    out = root / f"run-{processes}x{threads}"
    args = ["-m", "minirlhf", "ppo", "--preset", "quick", "--from", str(root / "sft"), "--rm", str(root / "rm"),
            "--out", str(out), "--ppo.iterations", str(ITERS), "--ppo.eval_every", "none", "--ppo.save_every",
            str(ITERS), "--dist.threads", str(threads)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIRLHF_") or k == "MINIRLHF_BENCH_MACHINE"}
    env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "ppo" and "pg_loss" in r]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.benchmark(group=GROUP)
def test_ppo_iteration(benchmark, checkpoints, name):
    processes, threads = CONFIGS[name]
    rows = benchmark.pedantic(_launch, (checkpoints, processes, threads), rounds=1, iterations=1)
    assert len(rows) == ITERS
    timed = rows[1:] if len(rows) > 1 else rows  # the first iteration warms up
    phases = {p: statistics.median(r[f"time/{p}"] for r in timed) for p in PHASES}
    iteration = statistics.median(sum(r[f"time/{p}"] for p in PHASES) for r in timed)
    _measured[name] = {"iteration_s": iteration, "phases_s": phases, "iterations_timed": len(timed)}
    benchmark.extra_info.update(processes=processes, threads=threads, iteration_median_s=round(iteration, 3),
                                **{f"{p}_median_s": round(t, 3) for p, t in phases.items()})


def _machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {"cpu": model.group(1).strip() if model else platform.machine(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if len(_measured) < len(CONFIGS):
        return  # a partial run (-k ...) does not overwrite the results
    machine = _machine()
    name = os.environ.get("MINIRLHF_BENCH_MACHINE") or f"{machine['cpu']}-{machine['cpus']}cpu"
    one, two = (_measured[n]["iteration_s"] for n in CONFIGS)
    result = {"benchmark": GROUP, "iterations_per_launch": ITERS, "machine": machine,
              "median_s": {n: {"iteration": round(m["iteration_s"], 3),
                               **{p: round(t, 3) for p, t in m["phases_s"].items()}} for n, m in _measured.items()},
              "two_processes_time_vs_one": round(two / one, 3),
              "faster": "2 processes x 1 thread" if two < one else "1 process x 2 threads"}
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    (RESULTS / f"dist-{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + json.dumps(result["median_s"], indent=1) + f"\n2 processes take {two / one:.2f}x the time of 1")
