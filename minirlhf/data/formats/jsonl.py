"""JSONL files as rows: bytes (plain or gzip) → UTF-8 lines → JSON objects, and the field
checks every reader shares. Every fault becomes a DataError of one line,
`file:line: field: what is wrong`; line 0 stands for the file as a whole.
"""
from __future__ import annotations

import gzip
import json
import os
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from ...files import give_usual_mode, json_error, kind_of

GZIP_MAGIC = b"\x1f\x8b"
# byte order marks of encodings that are not UTF-8, longest first (UTF-32 LE's starts like UTF-16 LE's)
_OTHER_BOMS = {b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe\x00\x00": "UTF-32", b"\xff\xfe": "UTF-16",
               b"\xfe\xff": "UTF-16"}
# everything str.splitlines() breaks at: a message must stay one line whatever a file holds
_LINE_BREAKS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
                for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}
_JSON_SPACE = " \t\r\n"


class DataError(ValueError):
    """A data file is malformed; the message is one line `file:line: field: what is wrong`.

    Line breaks and lone surrogates that a file name or a quoted value may carry are
    escaped, so the message always prints as exactly one line.
    """

    def __init__(self, message: str):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8").translate(_LINE_BREAKS)
        super().__init__(message)


def json_type(v: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return "string" if isinstance(v, str) else "array" if isinstance(v, list) else "object"


def show(v: Any, limit: int = 60) -> str:
    """A value as JSON, cut to `limit` characters, for messages."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (RecursionError, ValueError):  # nested about as deep as the parser allows
        return json_type(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _Object(dict):
    """A JSON object that remembers which keys it held more than once (JSON allows it, and
    parsers disagree on which value counts: Python's keeps the last, others the first)."""
    repeated: frozenset = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


_FROM_ROW = object()  # Row.text(): look the value up in the row


class Row:
    """One parsed line, with the checks that turn a mistake into a DataError."""

    def __init__(self, path: str, line: int, obj: dict):
        self.path, self.line, self.obj = path, line, obj

    def error(self, field: str, what: str) -> DataError:
        return DataError(f"{self.path}:{self.line}: {field}: {what}")

    def has(self, key: str) -> bool:
        return key in self.obj

    def get(self, key: str, obj: dict | None = None, label: str | None = None) -> Any:
        """obj[key] (obj: the row unless given); an error when missing or given twice."""
        obj = self.obj if obj is None else obj
        if key not in obj:
            raise self.error(label or key, "missing")
        if key in getattr(obj, "repeated", ()):
            raise self.error(label or key, "given twice in one object")
        return obj[key]

    def text(self, key: str, value: Any = _FROM_ROW, label: str | None = None, empty_ok: bool = False) -> str:
        """A string field: present, a string, valid Unicode, and non-blank unless empty_ok."""
        label = label or key
        if value is _FROM_ROW:
            value = self.get(key)
        if not isinstance(value, str):
            raise self.error(label, f"expected a string, got {json_type(value)}")
        self.check_unicode(label, value)
        if not empty_ok and not value.strip():
            raise self.error(label, "empty string")
        return value

    def check_unicode(self, label: str, value: str) -> None:
        """JSON's \\uXXXX escapes can spell half a surrogate pair, which no UTF-8 text (and no
        tokenizer) can hold; refuse it here rather than in the tokenizer mid-run."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.error(label, f"not valid Unicode (lone surrogate \\u{ord(value[e.start]):04x} "
                                    f"at character {e.start + 1})") from None

    def ints(self, key: str) -> list[int]:
        value = self.get(key)
        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # JSON true is no index
        if not isinstance(value, list) or not all(map(is_int, value)):
            raise self.error(key, f"expected an array of integers, got {show(value)}")
        return value


def _file_bytes(path: str) -> bytes:
    """The bytes of a data file, gunzipped. Only a regular file is read: a FIFO or a device would
    hang or never end, and a reader reads its file more than once (row_lines, for messages)."""
    try:  # O_NONBLOCK: opening a FIFO with no writer returns at once, and fstat refuses it unread
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"{path}:0: file: cannot read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{path}:0: file: {kind_of(mode)}, not a regular file; give a file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read()
        except OSError as e:
            raise DataError(f"{path}:0: file: cannot read ({e.strerror or e})") from None
    if path.endswith(".gz") or data.startswith(GZIP_MAGIC):
        if not data.startswith(GZIP_MAGIC):
            raise DataError(f"{path}:0: file: not gzip data, although the name ends in .gz")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}:0: file: corrupt gzip data ({e})") from None
    for bom, name in _OTHER_BOMS.items():
        if data.startswith(bom):
            raise DataError(f"{path}:0: file: {name} text (byte order mark {bom.hex(' ').upper()}); "
                            f"save it as UTF-8")
    return data


def _parse(path: str, i: int, line: str) -> Any:
    try:
        # NaN and Infinity, which Python's json reads, are left to the field checks: no
        # field we read takes a float, and fields we ignore may hold them
        return json.loads(line, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{i}: json: not valid JSON ({json_error(e)})") from None
    except (RecursionError, ValueError) as e:  # too deep; an integer longer than sys.get_int_max_str_digits()
        raise DataError(f"{path}:{i}: json: {json_error(e)}") from None


def rows(path: str | os.PathLike) -> Iterator[Row]:
    """The non-blank lines of a JSONL file (gzip-compressed or not) as Rows of JSON objects."""
    path = str(path)
    n = 0
    for i, raw in enumerate(_file_bytes(path).split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: file: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        # a byte order mark may start any line: `cat a.jsonl b.jsonl` keeps b's
        line = line.removeprefix("\ufeff")
        if not line.strip(_JSON_SPACE):
            continue
        obj = _parse(path, i, line)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: row: expected a JSON object, got {json_type(obj)}")
        n += 1
        yield Row(path, i, obj)
    if n == 0:
        raise DataError(f"{path}:0: file: empty, expected one JSON object per line")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL (UTF-8; gzip-compressed when the name ends in .gz), atomically:
    a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            # mtime=0: the same rows give the same bytes
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.name.endswith(".gz") else raw
            for row in rows:
                out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            if out is not raw:
                out.close()  # writes the gzip trailer; raw stays open
            raw.flush()
            os.fsync(raw.fileno())
        give_usual_mode(tmp)  # mkstemp makes it 0600; a data file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
