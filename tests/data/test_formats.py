"""JSONL readers: every validation error, with its exact one-line message, and round trips."""
import json

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
    ('{"prompt": null, "response": "r"}', read_sft, "1: prompt: expected a string or an array of messages, got null"),
    ('{"prompt": ""}', read_prompts, "1: prompt: empty string"),
    ('', read_prompts, "0: file: empty, expected one JSON object per line"),
    ('\n\n', read_prompts, "0: file: empty, expected one JSON object per line"),
    (b'{"text": "a"}\n{"text": "caf\xe9"}', read_corpus, "2: file: not valid UTF-8 (byte 14 of the line)"),
    # preferences
    ('{"prompt": "p", "chosen": "a"}', read_preferences, "1: rejected: missing"),
    ('{"chosen": "a", "rejected": "b"}', read_preferences,
     '1: prompt: missing (without one, chosen and rejected must be whole conversations: arrays of messages or '
     '"\\n\\nHuman: ... \\n\\nAssistant: ..." text)'),
    ('{"prompt": "p", "chosen": "a", "rejected": 1}', read_preferences, "1: rejected: expected a string or an array holding one assistant message, got number"),
    ('{"prompt": "p"}', read_preferences, "1: responses: missing"),
    ('{"prompt": "p", "responses": ["a", "b"]}', read_preferences,
     "1: ranking: missing (with responses, give ranking or ratings)"),
    ('{"prompt": "p", "responses": "ab", "ranking": [0, 1]}', read_preferences,
     "1: responses: expected an array of responses, got string"),
    ('{"prompt": "p", "responses": ["a"], "ranking": [0]}', read_preferences, "1: responses: 1 given, expected 2 to 9"),
    ('{"prompt": "p", "responses": ["a","b","c","d","e","f","g","h","i","j"], "ranking": [0,1,2,3,4,5,6,7,8,9]}',
     read_preferences, "1: responses: 10 given, expected 2 to 9"),
    ('{"prompt": "p", "responses": ["a", 5], "ranking": [0, 1]}', read_preferences,
     "1: responses[1]: expected a string or an array holding one assistant message, got number"),
    ('{"prompt": "p", "responses": ["a", null], "ranking": [0, 1]}', read_preferences,
     "1: responses[1]: expected a string or an array holding one assistant message, got null"),
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


# ---- issue 9, item 5, and its kind: what a JSON line can hold that later code cannot take ----

SURROGATE = "\\ud83e"   # as written in the file: half of the pair that spells 🦊 (\ud83e\udd8a)


@pytest.mark.parametrize("reader, row, field", [
    (read_corpus, '{"text": "a %s"}', "text"),
    (read_sft, '{"prompt": "p", "response": "the fox %s"}', "response"),
    (read_sft, '{"prompt": "%s", "completion": "r"}', "prompt"),
    (read_sft, '{"prompt": "p", "completion": [{"role": "assistant", "content": "%s"}]}', "completion[0].content"),
    (read_sft, '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "%s"}]}',
     "messages[1].content"),
    (read_prompts, '{"prompt": [{"role": "system", "content": "%s"}, {"role": "user", "content": "q"}]}',
     "prompt[0].content"),
    (read_preferences, '{"prompt": "p", "chosen": "a", "rejected": "%s"}', "rejected"),
    (read_preferences, '{"prompt": "p", "responses": ["a", "%s"], "ranking": [0, 1]}', "responses[1]"),
    (read_preferences, '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: %s", "rejected": "\\n\\nHuman: q\\n\\nAssistant: b"}',
     "chosen"),
])
def test_lone_surrogates_are_refused_where_read(tmp_path, reader, row, field):
    msg = error(reader, write(tmp_path, row % SURROGATE))
    assert msg.startswith(f"1: {field}: not valid Unicode (lone surrogate \\ud83e at character ")


def test_the_issue_example_and_what_the_tokenizer_takes(tmp_path):
    from minirlhf.tokenizer import Tokenizer
    tok = Tokenizer.train(["the fox eats berries", "Lima is in Peru"] * 20, vocab_size=400)
    # the reference failure: a lone surrogate cannot cross into SentencePiece's C++
    with pytest.raises(Exception):
        tok.encode("\ud83e")
    assert error(read_sft, write(tmp_path, '{"prompt": "p", "response": "\\ud83e"}')) == \
        "1: response: not valid Unicode (lone surrogate \\ud83e at character 1)"
    # what is accepted round-trips: a pair of escapes is one character, NUL and control
    # characters are valid Unicode (escaped in the file, as JSON requires)
    p = write(tmp_path, '{"prompt": "\\ud83e\\udd8a and \\u0000 \\u0007 \\t", "response": "caf\\u00e9 \\u2028 狐"}')
    ((prompt, response),) = read_sft(p)
    assert (prompt, response) == ("🦊 and \x00 \x07 \t", "café \u2028 狐")
    for text in (prompt, response):
        assert tok.decode(tok.encode(text)) == text


def test_json_extensions_and_repeats_are_refused_where_read_and_ignored_elsewhere(tmp_path):
    # Python's json reads NaN/Infinity; a repeated key keeps its last value in Python but the
    # first in other parsers. In fields we ignore, neither matters
    p = write(tmp_path, '{"text": "a", "score": NaN, "id": 1, "id": 2, "meta": {"x": Infinity, "x": -Infinity}}')
    assert read_corpus(p) == ["a"]
    cases = [
        ('{"text": "a", "text": "b"}', read_corpus, "1: text: given twice in one object"),
        ('{"prompt": "p", "responses": ["a", "b"], "ratings": [NaN, 1]}', read_preferences,
         "1: ratings: expected an array of integers, got [NaN, 1]"),
        ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, Infinity]}', read_preferences,
         "1: ranking: expected an array of integers, got [0, Infinity]"),
        ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1e400]}', read_preferences,
         "1: ranking: expected an array of integers, got [0, Infinity]"),
        ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1.0]}', read_preferences,
         "1: ranking: expected an array of integers, got [0, 1.0]"),
        ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 18446744073709551617]}', read_preferences,
         "1: ranking: [0, 18446744073709551617] is not a permutation of 0..1"),
        ('{"prompt": "p", "responses": ["a", "b"], "ratings": [1, -9223372036854775809]}', read_preferences,
         "1: ratings[1]: -9223372036854775809 is outside 1..7"),
        ('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, %s]}' % ("9" * 5000), read_preferences,
         "1: json: Exceeds the limit (4300 digits) for integer string conversion"),
        ('{"text": %s"a"%s}' % ("[" * 100_000, "]" * 100_000), read_corpus, "1: json: nested too deeply"),
        ('{"text": "a\tb"}', read_corpus, "1: json: not valid JSON (Invalid control character at column 12)"),
        ('{"text": "a"}\r{"text": "b"}\r', read_corpus, "1: json: not valid JSON (Extra data at column 15)"),
        ('{"text": {"text": "a"}}', read_corpus, "1: text: expected a string, got object"),
        ('"text"', read_corpus, "1: row: expected a JSON object, got string"),
        ('null', read_corpus, "1: row: expected a JSON object, got null"),
    ]
    for content, reader, message in cases:
        assert error(reader, write(tmp_path, content)) == message, content


def test_values_quoted_in_messages():
    from minirlhf.data.formats.jsonl import show
    deep = []
    for _ in range(100_000):   # deeper than json.dumps can recurse: named by its type instead
        deep = [deep]
    assert show(deep) == "array"
    assert show(list(range(100))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16..."   # 57 + 3 characters
    assert show("café") == '"café"'


def test_byte_order_marks_and_line_ends(tmp_path):
    # a UTF-8 BOM may start any line (`cat a.jsonl b.jsonl` keeps b's); U+2028 inside a string
    # is not a line end (str.splitlines would break there); CRLF is
    p = write(tmp_path, b'\xef\xbb\xbf{"text": "a"}\r\n\xef\xbb\xbf{"text": "b\xe2\x80\xa8c"}\r\n \t\r\n')
    assert read_corpus(p) == ["a", "b\u2028c"]
    # blank means JSON's whitespace only: a line of no-break spaces is not skipped as blank
    assert error(read_corpus, write(tmp_path, '{"text": "a"}\n\u00a0\n')) == \
        "2: json: not valid JSON (Expecting value at column 1)"
    for encoding, bom in [("utf-16-le", "FF FE"), ("utf-16-be", "FE FF"), ("utf-32-le", "FF FE 00 00"), ("utf-32-be", "00 00 FE FF")]:
        p = write(tmp_path, "\ufeff" .encode(encoding) + '{"text": "a"}\n'.encode(encoding))
        name = encoding[:6].upper()
        assert error(read_corpus, p) == f"0: file: {name} text (byte order mark {bom}); save it as UTF-8"


def test_messages_stay_one_line_whatever_the_file_holds(tmp_path):
    # a value quoted back in a message may hold line breaks JSON does not escape, and a
    # surrogate that would make printing the message fail
    p = write(tmp_path, '{"prompt": "p", "responses": ["a", "b"], "ranking": ["\u2028\\ud83e", 1]}')
    msg = error(read_preferences, p)
    assert len(msg.splitlines()) == 1 and msg.encode("utf-8")
    assert msg == '1: ranking: expected an array of integers, got ["\\u2028\\ud83e", 1]'
    name = tmp_path / "odd\nname.jsonl"
    name.write_text("")
    msg = str(pytest.raises(DataError, read_corpus, name).value)
    assert msg == f"{tmp_path}/odd\\x0aname.jsonl:0: file: empty, expected one JSON object per line"


# ---- .jsonl.gz ----

def test_gzip_files_for_every_reader(tmp_path):
    import gzip
    files = {
        read_corpus: ([{"text": "a"}], ["a"]),
        read_sft: ([{"prompt": "p", "completion": "r"}], [("p", "r")]),
        read_prompts: ([{"prompt": "p"}], ["p"]),
        read_preferences: ([{"prompt": "p", "chosen": "a", "rejected": "b"}], [Comparison("p", ["a", "b"], [(0, 1)])]),
    }
    for reader, (rows, expected) in files.items():
        path = tmp_path / f"{reader.__name__}.jsonl.gz"
        write_jsonl(path, rows)
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert gzip.decompress(path.read_bytes()).decode().splitlines() == [json.dumps(r) for r in rows]
        assert reader(path) == expected
        # recognised by its bytes whatever the name; gzip -c of a concatenation works too
        other = write(tmp_path, gzip.compress(b'\n') + path.read_bytes(), name="renamed.jsonl")
        assert reader(other) == expected
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "a"}])
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "read_corpus.jsonl.gz").read_bytes()  # mtime 0


@pytest.mark.parametrize("damage, message", [
    (lambda gz: gz[:-4], "0: file: corrupt gzip data (Compressed file ended before the end-of-stream marker was reached)"),
    (lambda gz: gz[:-8] + bytes(4) + gz[-4:], "0: file: corrupt gzip data (CRC check failed)"),
    (lambda gz: gz[:10] + b"\xff" + gz[11:], "0: file: corrupt gzip data (Error -3 while decompressing data: invalid block type)"),
    (lambda gz: gz + b"junk", "0: file: corrupt gzip data (Not a gzipped file (b'ju'))"),
    (lambda gz: b"\x1f\x8b", "0: file: corrupt gzip data (Compressed file ended before the end-of-stream marker was reached)"),
    (lambda gz: b'{"text": "a"}\n', "0: file: not gzip data, although the name ends in .gz"),
    (lambda gz: __import__("gzip").compress(b""), "0: file: empty, expected one JSON object per line"),
    (lambda gz: __import__("gzip").compress(b'{"text": "a"}\n{"text": 1}\n'), "2: text: expected a string, got number"),
])
def test_corrupt_gzip_is_one_line(tmp_path, damage, message):
    import gzip
    gz = gzip.compress(b'{"text": "The fox eats berries."}\n' * 50)
    msg = error(read_corpus, write(tmp_path, damage(gz), name="c.jsonl.gz"))
    assert msg.startswith(message)


def test_row_lines_name_the_line_of_each_row(tmp_path):
    import gzip
    from minirlhf.data import row_lines
    text = '\ufeff{"prompt": "a"}\n\n \t\r\n{"prompt": "b"}\r\n\n{"prompt": "c"}'
    for name, data in [("p.jsonl", text.encode()), ("p.jsonl.gz", gzip.compress(text.encode()))]:
        p = write(tmp_path, data, name=name)
        assert row_lines(p) == [1, 4, 6]
        assert read_prompts(p) == ["a", "b", "c"]
