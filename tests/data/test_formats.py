"""JSONL readers: every validation error, with its exact one-line message, and round trips."""
import pytest

from minirlhf.data import (Comparison, DataError, read_corpus, read_preferences, read_prompts, read_sft,
                           write_jsonl)


def write(tmp_path, text, name="f.jsonl"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def error(reader, path):
    with pytest.raises(DataError) as e:
        reader(path)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:")
    return msg[len(str(path)) + 1:]


def test_round_trip(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "The fox eats berries."}, {"text": "Lima is in Peru. ✓"}])
    assert read_corpus(tmp_path / "c.jsonl") == ["The fox eats berries.", "Lima is in Peru. ✓"]
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r", "id": 3}])
    assert read_sft(tmp_path / "s.jsonl") == [("p", "r")]
    write_jsonl(tmp_path / "sub" / "p.jsonl", [{"prompt": "What does the fox eat?"}])
    assert read_prompts(tmp_path / "sub" / "p.jsonl") == ["What does the fox eat?"]
    rows = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "ratings": [3, 7, 3, 1]},
        {"prompt": "p", "responses": ["a", "b"], "ratings": [5, 5]},   # all tied: dropped
        {"prompt": "p", "chosen": "a", "rejected": ""},                # a sampled policy may answer nothing
    ]
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert read_preferences(tmp_path / "prefs.jsonl") == [
        Comparison("p", ["good", "bad"], [(0, 1)]),
        Comparison("p", ["a", "b", "c"], [(2, 0), (2, 1), (0, 1)]),
        Comparison("p", ["a", "b", "c", "d"], [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]),
        Comparison("p", ["a", ""], [(0, 1)]),
    ]


def test_blank_lines_and_crlf_are_fine(tmp_path):
    p = write(tmp_path, '\n{"text": "a"}\r\n\n  \n{"text": "b"}')
    assert read_corpus(p) == ["a", "b"]


def test_ranking_gives_all_pairs(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": list("abcdefghi"), "ranking": list(range(9))}])
    (c,) = read_preferences(tmp_path / "r.jsonl")
    assert len(c.pairs) == 36 and all(i < j for i, j in c.pairs)


@pytest.mark.parametrize("content, reader, message", [
    ('{"text": "ok"}\n{"text": "a"', read_corpus, "2: json: not valid JSON (Expecting ',' delimiter at column 13)"),
    ('["text"]', read_corpus, "1: row: expected a JSON object, got array"),
    ('{"text": "a"}\n{"txt": "b"}', read_corpus, "2: text: missing"),
    ('{"text": 3}', read_corpus, "1: text: expected a string, got number"),
    ('{"text": "  "}', read_corpus, "1: text: empty string"),
    ('{"prompt": "p"}', read_sft, "1: response: missing"),
    ('{"prompt": null, "response": "r"}', read_sft, "1: prompt: expected a string, got null"),
    ('{"prompt": ""}', read_prompts, "1: prompt: empty string"),
    ('', read_prompts, "0: file: empty, expected one JSON object per line"),
    ('\n\n', read_prompts, "0: file: empty, expected one JSON object per line"),
    (b'{"text": "a"}\n{"text": "caf\xe9"}', read_corpus, "2: file: not valid UTF-8 (byte 14 of the line)"),
    # preferences
    ('{"prompt": "p", "chosen": "a"}', read_preferences, "1: rejected: missing"),
    ('{"chosen": "a", "rejected": "b"}', read_preferences, "1: prompt: missing"),
    ('{"prompt": "p", "chosen": "a", "rejected": 1}', read_preferences, "1: rejected: expected a string, got number"),
    ('{"prompt": "p"}', read_preferences, "1: responses: missing"),
    ('{"prompt": "p", "responses": ["a", "b"]}', read_preferences,
     "1: ranking: missing (with responses, give ranking or ratings)"),
    ('{"prompt": "p", "responses": "ab", "ranking": [0, 1]}', read_preferences,
     "1: responses: expected an array of strings, got string"),
    ('{"prompt": "p", "responses": ["a"], "ranking": [0]}', read_preferences, "1: responses: 1 given, expected 2 to 9"),
    ('{"prompt": "p", "responses": ["a","b","c","d","e","f","g","h","i","j"], "ranking": [0,1,2,3,4,5,6,7,8,9]}',
     read_preferences, "1: responses: 10 given, expected 2 to 9"),
    ('{"prompt": "p", "responses": ["a", 5], "ranking": [0, 1]}', read_preferences,
     "1: responses[1]: expected a string, got number"),
    ('{"prompt": "p", "responses": ["a", null], "ranking": [0, 1]}', read_preferences,
     "1: responses[1]: expected a string, got null"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', read_preferences,
     "1: ranking: [0, 0] is not a permutation of 0..1"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}', read_preferences,
     "1: ranking: [1, 2] is not a permutation of 0..1"),
    ('{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}', read_preferences,
     "1: ranking: [0, 1] is not a permutation of 0..2"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1.5]}', read_preferences,
     "1: ranking: expected an array of integers, got [0, 1.5]"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [true, false]}', read_preferences,
     "1: ranking: expected an array of integers, got [true, false]"),
    ('{"prompt": "p", "responses": ["a", "b"], "ratings": [1, 2, 3]}', read_preferences, "1: ratings: 3 ratings for 2 responses"),
    ('{"prompt": "p", "responses": ["a", "b"], "ratings": [1, 8]}', read_preferences, "1: ratings[1]: 8 is outside 1..7"),
    ('{"prompt": "p", "responses": ["a", "b"], "ratings": [0, 3]}', read_preferences, "1: ratings[0]: 0 is outside 1..7"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "ratings": [1, 2]}', read_preferences,
     "1: ranking: give either ranking or ratings, not both"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "responses": ["a", "b"]}', read_preferences,
     "1: responses: give either chosen/rejected or responses, not both"),
])
def test_validation_errors(tmp_path, content, reader, message):
    assert error(reader, write(tmp_path, content)) == message


def test_missing_file(tmp_path):
    assert error(read_corpus, tmp_path / "nope.jsonl") == "0: file: cannot read (No such file or directory)"


def test_errors_come_before_any_row_is_returned(tmp_path):
    # the error in the last line aborts the whole read: no partial data reaches a stage
    p = write(tmp_path, '{"text": "a"}\n' * 1000 + '{"text": ""}')
    assert error(read_corpus, p) == "1001: text: empty string"


def test_write_jsonl_is_atomic(tmp_path):
    def rows():
        yield {"text": "a"}
        raise RuntimeError("crash")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "old"}])
    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "c.jsonl", rows())
    assert read_corpus(tmp_path / "c.jsonl") == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]
