"""Metrics as JSON lines in the run directory, and one progress bar per stage.

metrics.jsonl is appended to, a row per write. A run killed mid-write leaves a torn last line
(no newline at its end): the reader drops it, the writer cuts it off before its first row, and
each says so once on stderr. Any other damage is a ValueError of one line `path:line: what`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .distributed import is_main
from .files import file_kind, json_error

METRICS_FILE = "metrics.jsonl"
_ROW_START = b'{"stage": "'  # how every row Metrics.log writes begins (json.dumps, ASCII)
_told: set[str] = set()  # metrics files whose torn last line was already reported


def _tell_torn(path: Path, size: int, what: str) -> None:
    if str(path) not in _told:
        _told.add(str(path))
        print(f"[metrics] note: {path}: {what} its torn last line ({size} bytes without a newline, what a run "
              f"killed mid-write leaves)", file=sys.stderr)


def _check_regular(path: Path) -> None:
    """ValueError in one line when path is there but is not a regular file (reading a FIFO would hang)."""
    kind = file_kind(path)
    if kind not in (None, "a regular file"):
        raise ValueError(f"{path}: {kind}, not the metrics file (JSON lines); move it away")


def _row(path: Path, i: int, raw: bytes) -> dict:
    """Line i (bytes, without its newline) as a metrics row; ValueError `path:i: what` otherwise."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{i}: not UTF-8 text") from None
    except (RecursionError, ValueError) as e:
        raise ValueError(f"{path}:{i}: {json_error(e)}") from None
    if not (isinstance(row, dict) and isinstance(row.get("stage"), str) and isinstance(row.get("step"), int)
            and not isinstance(row["step"], bool)):
        raise ValueError(f'{path}:{i}: expected a JSON object with "stage" (a string) and "step" (an integer)')
    return row


def _last_line(path: Path, i: int, raw: bytes) -> dict | None:
    """The last line when no newline ends it: its row when it is one whole (a crash just before
    the newline, or a file edited by hand); None for a row of ours cut short by a kill (an ASCII
    prefix of one, without control characters); otherwise _row's ValueError (damage, not a kill)."""
    try:
        return _row(path, i, raw)
    except ValueError:
        if (raw.startswith(_ROW_START) or _ROW_START.startswith(raw)) and raw.isascii() and min(raw) >= 0x20:
            return None
        raise


class Metrics:
    """Appends {"stage", "step", "time", **values} per call to run_dir/metrics.jsonl, flushed at once
    (under torchrun by rank 0 only: the values a stage logs are those of the whole batch)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mended = False

    def log(self, stage: str, step: int, **values) -> None:
        if not is_main():
            return
        row = {"stage": stage, "step": step, "time": round(time.time(), 3),
               **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}}
        if not self._mended:  # once per run: a row appended to a torn line would make both unreadable
            self._mend()
            self._mended = True
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _mend(self) -> None:
        """Before the first append: end the file with a newline. A torn last row (read_metrics drops
        it) is cut off; a whole one without its newline gets it; other damage raises ValueError."""
        _check_regular(self.path)
        try:
            f = open(self.path, "rb+")
        except FileNotFoundError:
            return
        with f:
            size = end = f.seek(0, os.SEEK_END)
            while end > 0:  # back from the end, a block at a time, to the last newline
                start = max(0, end - 65536)
                f.seek(start)
                nl = f.read(end - start).rfind(b"\n")
                if nl >= 0:
                    end = start + nl + 1
                    break
                end = start
            if end == size:
                return
            f.seek(end)
            tail = f.read()
            f.seek(0)
            line = f.read(end).count(b"\n") + 1
            if tail.strip() and _last_line(self.path, line, tail) is None:
                f.truncate(end)
                _tell_torn(self.path, size - end, "cut off")
            else:
                f.seek(size)
                f.write(b"\n")


def read_metrics(run_dir, stage: str | None = None) -> list[dict]:
    """The rows of run_dir/metrics.jsonl (of one stage, if given), in file order; [] when there is
    no such file. A torn last line (no newline at its end) is dropped, said once on stderr.
    Raises ValueError in one line: `path: a directory, not the metrics file ...`, `path:N: not
    UTF-8 text`, `path:N: <JSON syntax error> at column C` (files.json_error), `path:N: expected
    a JSON object with "stage" (a string) and "step" (an integer)`."""
    path = Path(run_dir) / METRICS_FILE
    _check_regular(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    rows = [_row(path, i, raw) for i, raw in enumerate(lines[:-1], start=1) if raw.strip()]
    if lines[-1].strip():
        last = _last_line(path, len(lines), lines[-1])
        if last is None:
            _tell_torn(path, len(lines[-1]), "dropped")
        else:
            rows.append(last)
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
