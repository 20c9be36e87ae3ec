"""The labels file: one JSON row per judgement, durable before the next prompt is shown.

    store = LabelFile(path)        # creates it, or reads what an earlier run wrote
    store.rows                     # [(row_id, dict)] in file order
    row_id = store.append(row)     # one write(2) of the whole line, then fsync
    store.remove(row_id)           # undo: the file without that row, swapped in atomically
    store.close()

Durability: `append` returns only after the line is on disk (os.fsync; the directory is
fsynced once when the file is created), so a server killed at any point (Ctrl-C,
kill -9, power loss) loses at most the judgement whose request was still in flight. A
line cut short by such a kill has no trailing newline; the next run drops it (and says
so) and continues. `remove` writes the remaining rows to `.NAME.undo.tmp` beside the
file, fsyncs it and renames it over the file, so a crash leaves the old or the new
file, never a mix. An exclusive flock keeps a second label server off the same file.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .sampling import DataError, fsync


class LabelFile:
    """Append-only JSONL of judgement rows (see the module docstring); not thread-safe:
    the caller serialises calls (LabelState holds one lock around every change)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.undo.tmp")
        self.notes: list[str] = []  # what recovery did, for the CLI to print
        if self.path.is_dir():
            raise ValueError(f"--out {self.path}: is a directory, expected a .jsonl file")
        if not self.path.parent.is_dir():
            raise ValueError(f"--out {self.path}: directory {self.path.parent} does not exist")
        created = not self.path.exists()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"--out {self.path}: cannot open for writing ({e.strerror or e})") from None
        try:
            self._lock()
            if created:
                fsync(self.path.parent)
            if self.tmp.exists():  # debris of a crash mid-undo: the file itself is intact
                self.tmp.unlink()
            self._next_id = 0
            self.rows: list[tuple[int, dict]] = []
            self._lines: dict[int, bytes] = {}
            self.line_of: dict[int, int] = {}
            self._read()
        except BaseException:
            os.close(self._fd)
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {self.path}: another label server is writing this file") from None

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a last line without its newline: cut short by a kill, or hand-written
            tail = data[end:]
            try:
                whole = isinstance(json.loads(tail.decode("utf-8")), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                whole = False
            if whole:
                os.write(self._fd, b"\n")
                data += b"\n"
            else:
                os.ftruncate(self._fd, end)
                data = data[:end]
                self.notes.append(f"{self.path}: dropped an unfinished last line ({len(tail)} bytes), "
                                  f"the judgement in flight when the server stopped")
            os.fsync(self._fd)
        for i, raw in enumerate(data.split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{self.path}:{i}: json: not valid JSON ({e}); not a file `label` wrote, "
                                f"use another --out") from None
            if not isinstance(obj, dict):
                raise DataError(f"{self.path}:{i}: row: expected a JSON object; use another --out")
            self._add(obj, raw + b"\n", line=i)

    def _add(self, obj: dict, raw: bytes, line: int = 0) -> int:
        row_id = self._next_id
        self._next_id += 1
        self.line_of[row_id] = line  # for error messages about rows an earlier run wrote
        self.rows.append((row_id, obj))
        self._lines[row_id] = raw
        return row_id

    def append(self, row: dict) -> int:
        """Write one row and fsync; returns its id (for `remove`)."""
        raw = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        n = os.write(self._fd, raw)
        if n != len(raw):  # a full disk: cut the partial line, keep the file well formed
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - n)
            raise OSError(f"{self.path}: short write ({n} of {len(raw)} bytes)")
        os.fsync(self._fd)
        return self._add(dict(row), raw)

    def remove(self, row_id: int) -> None:
        """Rewrite the file without row `row_id`: temp file, fsync, rename, fsync the directory."""
        keep = [rid for rid, _ in self.rows if rid != row_id]
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = memoryview(b"".join(self._lines[rid] for rid in keep))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.tmp.unlink()
            raise
        os.close(fd)
        fd = os.open(self.tmp, os.O_RDWR | os.O_APPEND)
        os.replace(self.tmp, self.path)
        fsync(self.path.parent)
        old, self._fd = self._fd, fd
        self._lock()
        os.close(old)
        self.rows = [(rid, obj) for rid, obj in self.rows if rid != row_id]
        del self._lines[row_id], self.line_of[row_id]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
