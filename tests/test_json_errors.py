"""A JSON syntax error reads the same wherever a file is parsed: what is wrong "at column C",
said once — the json module's messages for a string and a control character end in "at"
already ("Unterminated string starting at"), which was printed "starting at at column 34"."""
import pytest

from minirlhf import bench_report, files
from minirlhf.data.formats.jsonl import rows
from minirlhf.experiments.arms import _metrics_row

# one line of each kind of syntax error the json module reports, and its message, worked out
# by hand (columns count from 1)
KINDS = [
    ('{"text": "abc', "Unterminated string starting at column 10"),
    ('{"text": "a\tb"}', "Invalid control character at column 12"),
    ('{"text": }', "Expecting value at column 10"),
    ('{"text" "a"}', "Expecting ':' delimiter at column 9"),
    ('{"text": "a" "b"}', "Expecting ',' delimiter at column 14"),
    ('{text: "a"}', "Expecting property name enclosed in double quotes at column 2"),
    ('{"text": "a\\qb"}', "Invalid \\escape at column 12"),
    ('{"text": "\\u12G4"}', "Invalid \\uXXXX escape at column 12"),  # json points at the u
    ('{"text": "a"} x', "Extra data at column 15"),
]


@pytest.mark.parametrize("line, message", KINDS)
def test_every_kind_of_json_error_is_worded_once(tmp_path, line, message):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "first line fine"}\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        list(rows(f))
    assert str(e.value) == f"{f}:2: json: not valid JSON ({message})"

    f = tmp_path / "x.json"
    f.write_text("\n" + line)
    with pytest.raises(ValueError) as e:
        files.read_json(f)
    assert str(e.value) == f"{f}: line 2: {message}"
    with pytest.raises(ValueError) as e:
        bench_report.load(f)
    assert str(e.value) == f"{f}: not JSON ({message} of line 2)"

    with pytest.raises(ValueError) as e:
        _metrics_row(f, line)
    assert str(e.value) == f"{f}: a line that is not JSON ({message})"


def test_json_that_is_too_deep_or_too_long_names_the_file(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("[" * 100_000)
    with pytest.raises(ValueError, match=r"x\.json: nested too deeply$"):
        files.read_json(f)
    f.write_text("1" * 5000)
    with pytest.raises(ValueError, match=r"x\.json: Exceeds the limit \(4300 digits\) for integer string conversion$"):
        files.read_json(f)
