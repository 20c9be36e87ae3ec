"""The labels file: one JSON row per judgement, durable before the next prompt is shown.

    store = LabelFile(path)        # reads what an earlier run wrote, if anything; writes nothing
    store.rows                     # [(row_id, dict)] in file order, each a valid preference row
                                   # (read_preferences' checks); the caller checks they are its run's
    store.start()                  # creates the file, or repairs an unfinished last line
    row_id = store.append(row)     # one write(2) of the whole line, then fsync
    store.remove(row_id)           # undo: the file without that row, swapped in atomically
    store.close()
    ResultFile(result_path(out), models).write(result)   # --compare's derived win rate

Nothing is written before `start()`, which the caller reaches only once every check has
passed (the rows are this run's, the port is free, the prompts fit): a file that is
refused is left byte for byte as it was.

Durability: `append` returns only after the line is on disk (os.fsync; the directory is
fsynced once when the file is created), so a server killed at any point (Ctrl-C,
kill -9, power loss) loses at most the judgement whose request was still in flight. A
line cut short by such a kill has no trailing newline. `start` drops it (and says so)
only when the file is one `label` wrote: every complete line a row the caller accepted
and the cut line the start of a row as `label` writes them (`{"prompt": `); any other
file with an unfinished last line (a model, notes) is refused and not touched. `remove`
writes the remaining rows to `.NAME.undo.tmp` beside the file, fsyncs it and renames it
over the file, so a crash leaves the old or the new file, never a mix; a refused write or
rename (a full disk, an append-only file) leaves the file as it was and no temp file. An exclusive
flock keeps a second label server off the same file.

A symlink is resolved once, when the store is made: every read, append and undo goes to
the file it points to (an undo replaces that file, the link stays a link).
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

from ..files import fsync
from .sampling import DataError, check_preference_line

ROW_START = b'{"prompt": '  # how every row `label` writes begins (state.py puts "prompt" first)


def _check_regular(path: Path, what: str, mode: int | None = None) -> None:
    """ValueError unless `path` is a regular file or does not exist yet (`mode`: its st_mode
    when already known, from fstat of an open fd). A directory, a FIFO, a device (/dev/null,
    /dev/full), a socket cannot hold rows that are read back, undone and renamed over."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as e:
            raise ValueError(f"{what}: cannot read ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise ValueError(f"{what}: is {kind}, expected a regular file (or a path where one can be created)")


class LabelFile:
    """Append-only JSONL of judgement rows (see the module docstring); not thread-safe:
    the caller serialises calls (LabelState holds one lock around every change). Every row
    read must pass the checks the preference reader (`rm`, `label --agreement`) applies, so
    a file `label` continues is one they read; a row that fails gets their `file:line` error.

    path: --out as the user gave it (for messages); real: the file written (symlinks resolved).
    Raises ValueError (DataError for the contents: `file:line: field: what`) for an --out
    that is not a regular file (a directory, a FIFO, a device such as /dev/null), in a missing
    directory, locked by another server, or not a labels file."""

    def __init__(self, path):
        self.path = Path(path)
        self.real = Path(os.path.realpath(self.path))
        self.tmp = self.real.with_name(f".{self.real.name}.undo.tmp")
        self.notes: list[str] = []  # what start() did, for the CLI to print
        _check_regular(self.real, f"--out {self.path}")
        if not self.real.parent.is_dir():
            raise ValueError(f"--out {self.path}: directory {self.real.parent} does not exist")
        self._fd = -1
        self._created = self._started = False
        self._next_id = 0
        self.rows: list[tuple[int, dict]] = []
        self._lines: dict[int, bytes] = {}
        self.line_of: dict[int, int] = {}
        self._cut = None   # (offset, bytes) of an unfinished last line to drop at start()
        self._newline = False  # the last row lacks its newline: add it at start()
        self.repaired = False  # start() finished or dropped an unfinished last line
        if self.real.exists():
            self._open(os.O_RDWR | os.O_APPEND)
            try:
                self._read()
            except BaseException:
                self.close()
                raise

    def _open(self, flags: int) -> None:
        try:  # O_NONBLOCK: a FIFO put there since the check must not hang the open
            self._fd = os.open(self.real, flags | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise ValueError(f"--out {self.path}: cannot open for writing ({e.strerror or e})") from None
        try:
            _check_regular(self.real, f"--out {self.path}", os.fstat(self._fd).st_mode)
            os.set_blocking(self._fd, True)
            self._lock()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {self.path}: another label server is writing this file") from None

    def _read(self) -> None:
        """Parse the file into rows; no write. An unfinished last line is remembered for start()."""
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        tail = data[end:]
        for i, raw in enumerate(lines, start=1):
            if raw.strip():
                self._add(self._parse(raw, i), raw + b"\n", line=i)
        if not tail:
            return
        n = len(lines) + 1
        try:
            whole = json.loads(tail.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, an over-long integer, nested too deeply
            whole = None
        if isinstance(whole, dict):  # the newline alone is missing: a row like any other
            check_preference_line(self.path, n, tail.decode("utf-8"))
            self._add(whole, tail + b"\n", line=n)
            self._newline = True
        elif self.rows and (tail.startswith(ROW_START) or ROW_START.startswith(tail)):
            self._cut = (end, tail)
        else:
            raise DataError(f"{self.path}:{n}: row: an unfinished last line that `label` did not write; "
                            f"not a labels file, use another --out")

    def _parse(self, raw: bytes, i: int) -> dict:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            what = e if isinstance(e, ValueError) else "nested too deeply"
            raise DataError(f"{self.path}:{i}: json: not valid JSON ({what}); not a file `label` wrote, "
                            f"use another --out") from None
        if not isinstance(obj, dict):
            raise DataError(f"{self.path}:{i}: row: expected a JSON object; use another --out")
        # every row a preference row as `rm` and `--agreement` read it (a ranking that is no
        # permutation, a rating out of range, ...): refused with the message they would give
        check_preference_line(self.path, i, raw.decode("utf-8"))
        return obj

    def _add(self, obj: dict, raw: bytes, line: int = 0) -> int:
        row_id = self._next_id
        self._next_id += 1
        self.line_of[row_id] = line  # for error messages about rows an earlier run wrote
        self.rows.append((row_id, obj))
        self._lines[row_id] = raw
        return row_id

    def start(self) -> None:
        """Make the file writable: create it (fsyncing its directory), or finish what a killed
        run left (its last line without the newline, or cut short: dropped, said in notes).
        Call only once the rows are checked as this run's (check_rows)."""
        if self._started:
            return
        if self._fd < 0:
            self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT)
            self._created = os.fstat(self._fd).st_size == 0
            if self._created:
                fsync(self.real.parent)
        if self._cut is not None:
            end, tail = self._cut
            os.ftruncate(self._fd, end)
            self.notes.append(f"{self.path}: dropped an unfinished last line ({len(tail)} bytes), "
                              f"the judgement in flight when the server stopped")
        elif self._newline:
            os.write(self._fd, b"\n")
        if self._cut is not None or self._newline:
            os.fsync(self._fd)
            self.repaired = True
        if self.tmp.exists():  # debris of a crash mid-undo: the file itself is intact
            self.tmp.unlink()
        self._started = True

    def append(self, row: dict) -> int:
        """Write one row and fsync; returns its id (for `remove`)."""
        if not self._started:
            raise RuntimeError("LabelFile.start() first")
        raw = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        n = os.write(self._fd, raw)
        if n != len(raw):  # a full disk: cut the partial line, keep the file well formed
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - n)
            raise OSError(f"{self.path}: short write ({n} of {len(raw)} bytes)")
        os.fsync(self._fd)
        return self._add(dict(row), raw)

    def remove(self, row_id: int) -> None:
        """Rewrite the file without row `row_id`: temp file, fsync, rename, fsync the directory."""
        if not self._started:
            raise RuntimeError("LabelFile.start() first")
        keep = [rid for rid, _ in self.rows if rid != row_id]
        # the fd the store keeps once the temp file is renamed over --out: locked before the
        # rename, so no second server can take the new file in between
        fd = os.open(self.tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data = memoryview(b"".join(self._lines[rid] for rid in keep))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            os.replace(self.tmp, self.real)
        except BaseException:  # refused (a full disk, an append-only file): --out is as it was
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self.rows = [(rid, obj) for rid, obj in self.rows if rid != row_id]
        del self._lines[row_id], self.line_of[row_id]
        fsync(self.real.parent)  # the rename, durable

    def close(self) -> None:
        """Release the file; one this store created and never wrote a row to is removed (a run
        that stopped before its first judgement leaves nothing behind)."""
        if self._fd >= 0:
            if self._created and os.fstat(self._fd).st_size == 0:
                self.real.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


RESULT_KEYS = frozenset({"model_a", "model_b", "judgements", "a_wins", "b_wins", "ties", "skipped", "win_rate_a",
                         "ci95"})  # what LabelState.result() returns: the file's whole shape


def result_path(out) -> Path:
    """Where --compare writes its result: compare.jsonl -> compare.result.json, beside --out as given."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".result.json")


class ResultFile:
    """--compare's result (the win rate, LabelState.result()), derived from the labels file
    and rewritten after every change: temp file beside it, fsync, rename.

    Checked when made, as --out is: it must be a regular file or a new path, and a file
    already there must be a result `label --compare` wrote for the same two checkpoints
    (same_checkpoints); else ValueError, and nothing is written. `write` never raises an
    OSError: the rows are what counts and are on disk already, the result is derived from
    them (a rerun with the same --out writes it again), so a failed write returns the
    error, leaves no temp file, and `current` says whether the file holds the latest result."""

    def __init__(self, path, models: list[str]):
        from .state import changed_models, same_checkpoints  # state.py does not import this module

        self.path = Path(path)
        self.real = Path(os.path.realpath(self.path))  # a symlink stays one: its file is replaced
        self.tmp = self.real.with_name(f".{self.real.name}.tmp")
        self.current = False  # the file holds the result of this run's latest change
        self.error: str | None = None  # what the last write() could not do
        what = f"--compare result {self.path} (beside --out)"
        _check_regular(self.real, what)
        if not self.real.exists():
            return
        try:
            obj = json.loads(self.real.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{what}: not a result `label --compare` wrote "
                             f"({getattr(e, 'strerror', None) or type(e).__name__}); move it away or use "
                             f"another --out") from None
        if not isinstance(obj, dict) or set(obj) != RESULT_KEYS:
            raise ValueError(f"{what}: not a result `label --compare` wrote (expected the keys "
                             f"{', '.join(sorted(RESULT_KEYS))}); move it away or use another --out")
        given = [obj["model_a"], obj["model_b"]]
        if not all(isinstance(m, str) for m in given):
            raise ValueError(f"{what}: not a result `label --compare` wrote (model_a, model_b: expected paths); "
                             f"move it away or use another --out")
        if not same_checkpoints(given, models):
            raise ValueError(f"{what}: the result of another comparison: {changed_models(given, models)}; "
                             f"move it away or use another --out")

    def write(self, result: dict) -> str | None:
        """Replace the file with `result`; None when done, else what went wrong (nothing raised)."""
        data = (json.dumps(result, indent=1) + "\n").encode("utf-8")
        try:  # O_NOFOLLOW: a link planted at the temp name is not followed out of the directory
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            return self._failed(e)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(self.tmp, self.real)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            self.tmp.unlink(missing_ok=True)
            return self._failed(e)
        self.current, self.error = True, None
        return None

    def _failed(self, e: OSError) -> str:
        self.current, self.error = False, f"{self.path}: {e.strerror or e}"
        return self.error
