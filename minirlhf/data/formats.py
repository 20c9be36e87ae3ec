"""JSONL data files: read and validate everything before any compute starts.

One JSON object per line, UTF-8; blank lines are skipped and fields not named here
are ignored (ids, metadata). Texts, prompts and demonstrations must be non-empty; a
response in a preference row may be "" (a sampled policy can answer nothing at all).

    corpus       {"text": str}
    sft          {"prompt": str, "response": str}
    prompts      {"prompt": str}
    preferences  {"prompt": str, "chosen": str, "rejected": str}
                 {"prompt": str, "responses": [str] * K, "ranking": [int] * K}   best first
                 {"prompt": str, "responses": [str] * K, "ratings": [int] * K}   1..7, 7 best
                 with K = 2..9.

A bad file raises DataError (a ValueError) with one line `file:line: field: what is
wrong`; line 0 stands for the file as a whole (unreadable, empty).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

K_MIN, K_MAX = 2, 9
RATING_MIN, RATING_MAX = 1, 7


class DataError(ValueError):
    """A data file is malformed; the message is `file:line: field: what is wrong`."""


@dataclass
class Comparison:
    """Responses to one prompt and the preferences among them.

    pairs holds (better, worse) indices into responses: all C(K, 2) pairs of a ranking,
    [(0, 1)] for chosen/rejected (responses = [chosen, rejected]), and for ratings every
    pair with strictly different ratings (ties carry no preference and are dropped).
    """
    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]


def pairs_from_ranking(ranking: list[int]) -> list[tuple[int, int]]:
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def pairs_from_ratings(ratings: list[int]) -> list[tuple[int, int]]:
    k = len(ratings)
    return [(i, j) for i in range(k) for j in range(k) if ratings[i] > ratings[j]]


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]


def _show(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= limit else s[: limit - 3] + "..."


_FROM_ROW = object()  # text(): look the value up in the row


class _Row:
    """One parsed line, with the checks that turn a mistake into a DataError."""

    def __init__(self, path: str, line: int, obj: dict):
        self.path, self.line, self.obj = path, line, obj

    def error(self, field: str, what: str) -> DataError:
        return DataError(f"{self.path}:{self.line}: {field}: {what}")

    def has(self, key: str) -> bool:
        return key in self.obj

    def text(self, key: str, value: Any = _FROM_ROW, label: str | None = None, empty_ok: bool = False) -> str:
        label = label or key
        if value is _FROM_ROW:
            if key not in self.obj:
                raise self.error(label, "missing")
            value = self.obj[key]
        if not isinstance(value, str):
            raise self.error(label, f"expected a string, got {_json_type(value)}")
        if not empty_ok and not value.strip():
            raise self.error(label, "empty string")
        return value

    def ints(self, key: str) -> list[int]:
        value = self.obj[key]
        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # JSON true is no index
        if not isinstance(value, list) or not all(map(is_int, value)):
            raise self.error(key, f"expected an array of integers, got {_show(value)}")
        return value

    def responses(self) -> list[str]:
        if "responses" not in self.obj:
            raise self.error("responses", "missing")
        value = self.obj["responses"]
        if not isinstance(value, list):
            raise self.error("responses", f"expected an array of strings, got {_json_type(value)}")
        if not K_MIN <= len(value) <= K_MAX:
            raise self.error("responses", f"{len(value)} given, expected {K_MIN} to {K_MAX}")
        return [self.text("responses", r, f"responses[{i}]", empty_ok=True) for i, r in enumerate(value)]


def _rows(path: str | os.PathLike) -> Iterator[_Row]:
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}:0: file: cannot read ({e.strerror or e})") from None
    n = 0
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: file: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: json: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: row: expected a JSON object, got {_json_type(obj)}")
        n += 1
        yield _Row(path, i, obj)
    if n == 0:
        raise DataError(f"{path}:0: file: empty, expected one JSON object per line")


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Documents of a corpus file: rows {"text": str}."""
    return [row.text("text") for row in _rows(path)]


def read_sft(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, response) demonstrations: rows {"prompt": str, "response": str}."""
    return [(row.text("prompt"), row.text("response")) for row in _rows(path)]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts: rows {"prompt": str}."""
    return [row.text("prompt") for row in _rows(path)]


def _comparison(row: _Row) -> Comparison:
    prompt = row.text("prompt")
    if row.has("chosen") or row.has("rejected"):
        if row.has("responses"):
            raise row.error("responses", "give either chosen/rejected or responses, not both")
        chosen, rejected = row.text("chosen", empty_ok=True), row.text("rejected", empty_ok=True)
        return Comparison(prompt, [chosen, rejected], [(0, 1)])
    responses = row.responses()
    k = len(responses)
    if row.has("ranking") and row.has("ratings"):
        raise row.error("ranking", "give either ranking or ratings, not both")
    if row.has("ranking"):
        ranking = row.ints("ranking")
        if sorted(ranking) != list(range(k)):
            raise row.error("ranking", f"{_show(ranking)} is not a permutation of 0..{k - 1}")
        return Comparison(prompt, responses, pairs_from_ranking(ranking))
    if row.has("ratings"):
        ratings = row.ints("ratings")
        if len(ratings) != k:
            raise row.error("ratings", f"{len(ratings)} ratings for {k} responses")
        for i, r in enumerate(ratings):
            if not RATING_MIN <= r <= RATING_MAX:
                raise row.error(f"ratings[{i}]", f"{r} is outside {RATING_MIN}..{RATING_MAX}")
        return Comparison(prompt, responses, pairs_from_ratings(ratings))
    raise row.error("ranking", "missing (with responses, give ranking or ratings)")


def read_preferences(path: str | os.PathLike) -> list[Comparison]:
    """Comparisons from a preference file (any mix of the three row shapes). Rows whose
    ratings are all tied carry no preference and are left out."""
    return [c for c in map(_comparison, _rows(path)) if c.pairs]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL (UTF-8), atomically: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
