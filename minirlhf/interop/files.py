"""Reading the JSON files of a model directory, with one-line errors naming the file."""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path):
    """The parsed JSON of path; ValueError `path: line N: what` or `path: not UTF-8 text`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_json_object(path: Path) -> dict:
    """read_json, which must be a JSON object (a dict); ValueError naming the file otherwise."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
