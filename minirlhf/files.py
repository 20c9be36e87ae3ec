"""JSON files on disk: read with one-line errors naming the file, written whole or not at all.

Every small JSON file the package writes (a run's config.json and summary.json, stage keys,
wall times, experiment records, checkpoint info) goes through write_json: the text is written
to `NAME.tmp` beside it, fsynced, and renamed over NAME, so a crash or a kill leaves either the
old file or the new one, never half of one (the rename is atomic on POSIX filesystems; the
fsync of the directory makes it durable).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def fsync(path) -> None:
    """fsync a file or a directory by path (a directory: so a rename or a new file in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj, indent: int | None = 1, **dumps_kw) -> None:
    """obj as JSON into path, atomically (temp file, fsync, rename, fsync the directory).

    dumps_kw go to json.dumps (sort_keys, ensure_ascii, ...). Raises what json.dumps raises
    (TypeError for an object JSON cannot hold) before anything is written, and OSError from the
    file system (the temp file is removed then)."""
    path = Path(path)
    text = json.dumps(obj, indent=indent, **dumps_kw)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def read_json(path):
    """The parsed JSON of path; ValueError in one line naming the file: `path: line N: what`,
    `path: not UTF-8 text`, or `path: cannot read it (reason)` (missing, a directory, no permission)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_json_object(path) -> dict:
    """read_json, which must be a JSON object (a dict); ValueError naming the file otherwise."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
