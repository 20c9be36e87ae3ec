"""Metrics as JSON lines in the run directory, and one progress bar per stage."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .distributed import is_main

METRICS_FILE = "metrics.jsonl"


class Metrics:
    """Appends {"stage", "step", "time", **values} per call to run_dir/metrics.jsonl, flushed at once
    (under torchrun by rank 0 only: the values a stage logs are those of the whole batch)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, stage: str, step: int, **values) -> None:
        if not is_main():
            return
        row = {"stage": stage, "step": step, "time": round(time.time(), 3),
               **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(run_dir, stage: str | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r["stage"] == stage]


def stage_history(run_dir, stage: str) -> list[dict]:
    """The rows of a stage's latest run. Each run of a stage logs a start row: a fresh
    start (step 0) drops the rows of earlier runs, a resume from step k drops the rows
    logged after that checkpoint by the run that was killed."""
    rows: list[dict] = []
    for r in read_metrics(run_dir, stage):
        if r.get("event") == "start":
            rows = [x for x in rows if x["step"] <= r["step"]]
        else:
            rows.append(r)
    return rows


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar on stderr; it redraws rarely when stderr is not a terminal (CI logs)."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 15.0, leave=True)


class Throughput:
    """Tokens per second since the last call."""

    def __init__(self):
        self.t, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return r
