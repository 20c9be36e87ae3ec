"""JSON files on disk: read with one-line errors naming the file, written whole or not at all.

Every small JSON file the package writes (a run's config.json and summary.json, stage keys,
wall times, experiment records, checkpoint info) goes through write_json: the text is written
to `NAME.tmp` beside it, fsynced, and renamed over NAME, so a crash or a kill leaves either the
old file or the new one, never half of one (the rename is atomic on POSIX filesystems; the
fsync of the directory makes it durable).

Also here: the usual permissions for what tempfile and safetensors create private
(give_usual_mode), and the one wording of a JSON syntax error (json_error).
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

LOCK_FILE = ".minirlhf.lock"


def fsync(path) -> None:
    """fsync a file or a directory by path (a directory: so a rename or a new file in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_mode(*paths) -> None:
    """chmod each path to what a plain create gives: a directory 0777, a file 0666, less the
    umask. tempfile.mkdtemp / mkstemp make 0700 / 0600, and so does safetensors' save_file,
    which would leave a checkpoint or an export unreadable to another account."""
    mask = umask()
    for p in paths:
        os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)


def json_error(e: Exception) -> str:
    """What json.loads found wrong, as one phrase; the caller names the file and line. A syntax
    error (JSONDecodeError) with its column: "Expecting value at column 6", "Unterminated string
    starting at column 7" (the json module's messages for a string and a control character end
    in "at" already); RecursionError: "nested too deeply"; another ValueError (an integer longer
    than sys.get_int_max_str_digits()): its first clause."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg.removesuffix(' at')} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(":")[0]


def write_json(path, obj, indent: int | None = 1, **dumps_kw) -> None:
    """obj as JSON into path, atomically (write_atomic).

    dumps_kw go to json.dumps (sort_keys, ensure_ascii, ...). Raises what json.dumps raises
    (TypeError for an object JSON cannot hold) before anything is written, and OSError from the
    file system (the temp file is removed then)."""
    write_atomic(path, json.dumps(obj, indent=indent, **dumps_kw).encode("utf-8"))


def write_atomic(path, data: bytes) -> None:
    """data into path: temp file beside it, fsync, rename over path, fsync the directory; OSError
    from the file system (the temp file is removed then, path is as it was)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        fsync(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISREG, "a regular file"))


def kind_of(mode: int) -> str:
    """What an st_mode says a path is, as a phrase for messages: "a regular file", "a directory",
    "a symbolic link", "a FIFO (named pipe)", "a socket", "a character device", "a block device"."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def file_kind(path, follow: bool = True) -> str | None:
    """kind_of(path's mode), or None when nothing is there. follow=False: a symbolic link is one
    (lstat); follow=True: its target is (stat), and a link to nothing is "a symbolic link to
    nothing". Other OSErrors (no permission on the directory) propagate."""
    try:
        return kind_of((os.stat if follow else os.lstat)(path).st_mode)
    except FileNotFoundError:
        if follow and os.path.islink(path):
            return "a symbolic link to nothing"
        return None


def _not_a_lock(directory: Path, option: str, kind: str) -> ValueError:
    return ValueError(f"{option} {directory}: {Path(directory) / LOCK_FILE} is {kind}, not the lock file minirlhf "
                      f"keeps there; move it away, or use another {option}")


def check_lock_path(directory, option: str = "--out") -> None:
    """ValueError in one line when DIRECTORY/.minirlhf.lock is there and is not a regular file
    (a directory, a symbolic link, a FIFO, ...): DirLock would fail on it, or hang on a FIFO."""
    kind = file_kind(Path(directory) / LOCK_FILE, follow=False)
    if kind not in (None, "a regular file"):
        raise _not_a_lock(Path(directory), option, kind)


class DirLock:
    """An exclusive lock on a directory a command writes into (`train --out`, a stage's --out,
    `experiment --out`): flock(2) on DIR/.minirlhf.lock, held until release() or the process
    ends (the kernel drops it on any exit, kill -9 included, so a stale lock cannot stay).

    acquire() raises ValueError in one line when another process holds it: two runs writing
    the same checkpoints, metrics and summaries at once would each spoil the other's results.
    The lock file keeps the holder's pid, for the message; it is left in place (removing it
    would let a third process lock a new file while the second still holds the old one).
    A lock path that is not a regular file (a directory, a symbolic link, a FIFO, ...) is refused
    with a ValueError in one line too: nothing there is minirlhf's, so it is not removed."""

    def __init__(self, directory, option: str = "--out"):
        self.directory, self.option = Path(directory), option
        self._fd = -1

    def acquire(self) -> None:
        path = self.directory / LOCK_FILE
        check_lock_path(self.directory, self.option)
        try:  # O_NOFOLLOW, O_NONBLOCK and the fstat: what was swapped in since the lstat is refused too, unopened
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError:
            check_lock_path(self.directory, self.option)
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise _not_a_lock(self.directory, self.option, kind_of(mode))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{self.option} {self.directory}: another minirlhf process (pid {holder}) is writing "
                             f"there; wait for it to finish, or use another {self.option}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def read_text(path) -> str:
    """The UTF-8 text of path; ValueError in one line naming the file: `path: not UTF-8 text`,
    or `path: cannot read it (reason)` (missing, a directory, no permission)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_json(path):
    """The parsed JSON of path; ValueError in one line naming the file: `path: line N: what at
    column C`, `path: nested too deeply`, an over-long integer (json_error), or read_text's."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: {json_error(e)}") from None
    except (RecursionError, ValueError) as e:
        raise ValueError(f"{path}: {json_error(e)}") from None


def read_json_object(path) -> dict:
    """read_json, which must be a JSON object (a dict); ValueError naming the file otherwise."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
