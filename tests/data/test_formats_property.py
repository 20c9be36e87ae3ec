"""Property tests of the JSONL readers (issue 9): random bytes, random JSON and random
near-valid rows give every reader either a result that satisfies the data model (checked
here against the spec, restated independently) or a DataError of one line
`file:line: field: what is wrong` — never another exception. And any value of the data
model, written in any accepted shape, reads back as itself."""
import gzip
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minirlhf.data import Comparison, DataError, read_corpus, read_preferences, read_prompts, read_sft

READERS = (read_corpus, read_sft, read_prompts, read_preferences)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELD = r"[A-Za-z_]+(\[\d+\])*(\.[a-z]+)?(\[\d+\])*(\.[a-z]+)?"


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---- the data model, restated from the spec ----

def is_text(s, blank_ok=False):
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return blank_ok or bool(s.strip())


def is_prompt(p):
    if isinstance(p, str):
        return is_text(p)
    if not isinstance(p, list) or not p:
        return False
    if not all(isinstance(m, dict) and set(m) == {"role", "content"} and is_text(m["content"], blank_ok=True) for m in p):
        return False
    roles = " ".join(m["role"] for m in p)
    if not re.fullmatch(r"(system )?(user assistant )*user", roles):
        return False
    if len(p) == 1:   # a lone user turn collapses to its string
        return False
    return all(m["content"].strip() for m in p if m["role"] == "user")


def check_result(reader, out):
    assert isinstance(out, list) and out
    for item in out:
        if reader is read_corpus:
            assert is_text(item)
        elif reader is read_sft:
            prompt, response = item
            assert is_prompt(prompt) and is_text(response)
        elif reader is read_prompts:
            assert is_prompt(item)
        else:
            assert isinstance(item, Comparison) and is_prompt(item.prompt)
            k = len(item.responses)
            assert 2 <= k <= 9 and all(is_text(r, blank_ok=True) for r in item.responses)
            assert item.pairs and all(0 <= a < k and 0 <= b < k and a != b for a, b in item.pairs)


def read_all(path, n_lines):
    """Every reader on one file: a valid result or a one-line DataError; anything else fails."""
    for reader in READERS:
        try:
            out = reader(path)
        except DataError as e:
            msg = str(e)
            assert isinstance(e, ValueError)
            assert len(msg.splitlines()) == 1, msg
            msg.encode("utf-8")   # printable
            m = re.fullmatch(re.escape(str(path)) + rf":(\d+): ({FIELD}): (.+)", msg)
            assert m, msg
            assert int(m[1]) <= n_lines
        else:
            check_result(reader, out)


# ---- strategies ----

KEYS = ["text", "prompt", "response", "completion", "messages", "chosen", "rejected", "responses", "ranking",
        "ratings", "role", "content", "id"]
WORDS = ["user", "assistant", "system", "tool", "", " ", "q", "\ud83e", "a\x00b", "\n\nHuman: q\n\nAssistant: a",
         "\n\nHuman: q", "Human: q\n\nAssistant:", "\n\nAssistant: a", "\u2028", "\ufeff"]
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)   # surrogates included
leaves = (st.none() | st.booleans() | st.integers(-3, 12) | st.integers() | st.floats()
          | st.sampled_from(WORDS) | any_text)
json_values = st.recursive(leaves, lambda c: st.lists(c, max_size=5)
                           | st.dictionaries(st.sampled_from(KEYS) | any_text, c, max_size=5), max_leaves=25)


def render(value, draw):
    """JSON text of value, with now and then a key repeated in an object (JSON allows it)."""
    if isinstance(value, dict):
        pairs = list(value.items())
        if pairs and draw(st.integers(0, 4)) == 0:
            pairs.insert(draw(st.integers(0, len(pairs))), (draw(st.sampled_from(pairs))[0], draw(leaves)))
        return "{" + ", ".join(f"{json.dumps(k)}: {render(v, draw)}" for k, v in pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render(v, draw) for v in value) + "]"
    return json.dumps(value, ensure_ascii=draw(st.booleans()))


words = st.text(st.sampled_from("abc xyz.?\n"), min_size=1, max_size=8).filter(str.strip)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": words})
valid_rows = st.one_of(
    st.fixed_dictionaries({"text": words}),
    st.fixed_dictionaries({"prompt": words | st.lists(message, min_size=1, max_size=4),
                           "response": words | st.lists(message, max_size=2)}),
    st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=5)}),
    st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words}),
    st.fixed_dictionaries({"chosen": st.lists(message, min_size=2, max_size=4),
                           "rejected": st.lists(message, min_size=2, max_size=4)}),
    st.fixed_dictionaries({"chosen": st.sampled_from(WORDS[9:12]), "rejected": st.sampled_from(WORDS[9:12])}),
    st.fixed_dictionaries({"prompt": words, "responses": st.lists(words, min_size=1, max_size=10),
                           "ranking": st.lists(st.integers(-1, 10), max_size=10)}),
    st.fixed_dictionaries({"prompt": words, "responses": st.lists(words, min_size=2, max_size=4),
                           "ratings": st.lists(st.integers(0, 8), min_size=2, max_size=4)}),
)


def positions(value, out):
    """Every (container, key) in a JSON tree."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((value, k))
        positions(v, out)
    return out


@st.composite
def near_valid_rows(draw):
    row = draw(valid_rows)
    for _ in range(draw(st.integers(0, 3))):
        spots = positions(row, [])
        if not spots:
            break
        container, key = draw(st.sampled_from(spots))
        how = draw(st.sampled_from(["replace", "delete", "insert"]))
        if how == "insert" and isinstance(container[key], str):   # a character later code may choke on
            text, i = container[key], draw(st.integers(0, len(container[key])))
            container[key] = text[:i] + draw(st.sampled_from(["\ud83e", "\udd8a", "\x00", "\u2028", "\ufeff"])) + text[i:]
        elif how != "delete":
            container[key] = draw(json_values)
        elif isinstance(container, dict):
            del container[key]
        else:
            container.pop(key)
    return render(row, draw)


def write_lines(path, lines, compress):
    data = "\n".join(lines).encode("utf-8", "surrogatepass")   # a raw surrogate is invalid UTF-8
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


@SETTINGS
@given(data=st.binary(max_size=200), gz=st.sampled_from(["none", "whole", "cut"]))
def test_random_bytes(workdir, data, gz):
    path = workdir / ("b.jsonl.gz" if gz != "none" else "b.jsonl")
    if gz != "none":
        data = gzip.compress(data)
        data = data[: len(data) // 2] if gz == "cut" else data
    path.write_bytes(data)
    read_all(path, max(1, data.count(b"\n") + 1) if gz == "none" else 10**6)


@SETTINGS
@given(values=st.lists(st.tuples(json_values, st.sampled_from([0, 0, 0, 3, 5000])), min_size=1, max_size=4),
       compress=st.booleans(), data=st.data())
def test_random_json(workdir, values, compress, data):
    # now and then nested deeper than any parser's recursion limit
    lines = ['{"text": ' * depth + render(v, data.draw) + "}" * depth for v, depth in values]
    write_lines(workdir / "j.jsonl", lines, compress)
    read_all(workdir / "j.jsonl", len(lines))


@SETTINGS
@given(lines=st.lists(near_valid_rows(), min_size=1, max_size=4), compress=st.booleans())
def test_near_valid_rows(workdir, lines, compress):
    write_lines(workdir / "n.jsonl", lines, compress)
    read_all(workdir / "n.jsonl", len(lines))


# ---- round trips: the data model in every accepted shape reads back as itself ----

# texts of any Unicode, with a bias towards what a careless parser would trim or split at
content = st.text(st.sampled_from(" \n\t\r\x00\u2028\ufeffé🦊") | st.characters(codec="utf-8"), max_size=10)
said = content.filter(str.strip)   # a user turn must say something
history = st.lists(st.tuples(said, content), max_size=2)


@st.composite
def prompts(draw, system_ok=True):
    """A prompt of the data model: a str, or a conversation longer than one user turn."""
    system = [{"role": "system", "content": draw(content)}] if system_ok and draw(st.booleans()) else []
    turns = [m for u, a in draw(history) for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    messages = system + turns + [{"role": "user", "content": draw(said)}]
    return messages[0]["content"] if len(messages) == 1 else messages


def as_list(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def hh_text(messages):
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(prompts(), said), min_size=1, max_size=3), data=st.data())
def test_sft_round_trip(workdir, pairs, data):
    rows = []
    for prompt, response in pairs:
        shape = data.draw(st.sampled_from(["response", "completion", "trl", "messages"]))
        p = data.draw(st.sampled_from([prompt, as_list(prompt)]))
        rows.append({"response": {"prompt": p, "response": response}, "completion": {"prompt": p, "completion": response},
                     "trl": {"prompt": p, "completion": [{"role": "assistant", "content": response}]},
                     "messages": {"messages": as_list(prompt) + [{"role": "assistant", "content": response}]}}[shape])
    text = "".join(json.dumps(r, ensure_ascii=data.draw(st.booleans())) + "\n" for r in rows).encode()
    path = workdir / "s.jsonl"
    path.write_bytes(gzip.compress(text) if data.draw(st.booleans()) else text)
    assert read_sft(path) == pairs
    if all("prompt" in r for r in rows):
        assert read_prompts(path) == [p for p, _ in pairs]


no_hh_marker = lambda s: "\n\nHuman:" not in s and "\n\nAssistant:" not in s


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_preference_round_trip(workdir, data):
    shape = data.draw(st.sampled_from(["strings", "trl", "implicit", "hh", "ranking", "ratings"]))
    prompt = data.draw(prompts(system_ok=shape != "hh"))
    k = 2 if shape in ("strings", "trl", "implicit", "hh") else data.draw(st.integers(2, 9))
    responses = data.draw(st.lists(content, min_size=k, max_size=k))
    msgs = as_list(prompt)
    if shape == "hh":
        texts = [m["content"] for m in msgs] + responses
        if not all(map(no_hh_marker, texts)):
            return   # not expressible in HH's text form
    assistant = lambda r: [{"role": "assistant", "content": r}]
    if shape == "strings":
        row, pairs = {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}, [(0, 1)]
    elif shape == "trl":
        row, pairs = {"prompt": as_list(prompt), "chosen": assistant(responses[0]), "rejected": assistant(responses[1])}, [(0, 1)]
    elif shape == "implicit":
        row, pairs = {"chosen": msgs + assistant(responses[0]), "rejected": msgs + assistant(responses[1])}, [(0, 1)]
    elif shape == "hh":
        row = {"chosen": hh_text(msgs + assistant(responses[0])), "rejected": hh_text(msgs + assistant(responses[1]))}
        pairs = [(0, 1)]
    elif shape == "ranking":
        ranking = data.draw(st.permutations(range(k)))
        row = {"prompt": prompt, "responses": responses, "ranking": ranking}
        pairs = [(ranking[i], ranking[j]) for i in range(k) for j in range(k) if i < j]
    else:
        ratings = data.draw(st.lists(st.integers(1, 7), min_size=k, max_size=k))
        row = {"prompt": prompt, "responses": responses, "ratings": ratings}
        pairs = [(i, j) for i in range(k) for j in range(k) if ratings[i] > ratings[j]]
    path = workdir / "p.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=data.draw(st.booleans())) + "\n", encoding="utf-8")
    assert read_preferences(path) == ([Comparison(prompt, responses, pairs)] if pairs else [])


# ---- one fault in an otherwise valid row: refused by name, or kept exactly ----

@st.composite
def valid_rows_for(draw):
    """(reader, row) with a valid row in which every key is one the reader reads."""
    prompt = draw(prompts())
    responses = draw(st.lists(said, min_size=2, max_size=4))
    msgs = as_list(prompt)
    assistant = lambda r: [{"role": "assistant", "content": r}]
    return draw(st.sampled_from([
        (read_corpus, {"text": responses[0]}),
        (read_sft, {"prompt": prompt, "response": responses[0]}),
        (read_sft, {"prompt": msgs, "completion": assistant(responses[0])}),
        (read_sft, {"messages": msgs + assistant(responses[0])}),
        (read_prompts, {"prompt": msgs}),
        (read_preferences, {"prompt": msgs, "chosen": responses[0], "rejected": assistant(responses[1])}),
        (read_preferences, {"chosen": msgs + assistant(responses[0]), "rejected": msgs + assistant(responses[1])}),
        (read_preferences, {"prompt": prompt, "responses": responses, "ranking": list(range(len(responses)))}),
    ]))


def string_leaves(value, out):
    """(container, key) of every string value that is a text (not a role)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(v, str) and k != "role":
            out.append((value, k))
        string_leaves(v, out)
    return out


def strings_in(value):
    if isinstance(value, Comparison):
        value = [value.prompt, value.responses]
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from strings_in(v)


@settings(max_examples=200, deadline=None)
@given(case=valid_rows_for(), char=st.sampled_from(["\ud83e", "\udd8a", "\x00", "\x07", "\u2028", "\x85", "\ufeff"]),
       data=st.data())
def test_a_character_injected_in_a_text(workdir, case, char, data):
    reader, row = case
    container, key = data.draw(st.sampled_from(string_leaves(row, [])))
    i = data.draw(st.integers(0, len(container[key])))
    container[key] = container[key][:i] + char + container[key][i:]
    path = workdir / "c.jsonl"
    path.write_text(json.dumps(row) + "\n")   # ensure_ascii: a surrogate is written as a \u escape
    if 0xD800 <= ord(char) <= 0xDFFF:
        with pytest.raises(DataError, match=r":1: [^ ]+: not valid Unicode \(lone surrogate \\u"):
            reader(path)
    else:
        out = reader(path)
        check_result(reader, out)
        assert any(char in s for s in strings_in(out))


@settings(max_examples=100, deadline=None)
@given(case=valid_rows_for(), data=st.data())
def test_a_read_key_given_twice(workdir, case, data):
    reader, row = case
    objects = [c for c, _ in positions(row, []) if isinstance(c, dict)] + [row]
    obj = data.draw(st.sampled_from(objects))
    twice = data.draw(st.sampled_from(sorted(obj)))

    def dumps(v):   # JSON with the key repeated in obj (same value: still refused)
        if isinstance(v, dict):
            pairs = list(v.items()) + ([(twice, v[twice])] if v is obj else [])
            return "{" + ", ".join(f"{json.dumps(k)}: {dumps(x)}" for k, x in pairs) + "}"
        return "[" + ", ".join(map(dumps, v)) + "]" if isinstance(v, list) else json.dumps(v)
    text = dumps(row)
    path = workdir / "d.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(DataError, match=rf":1: [^ ]*{re.escape(twice)}: given twice in one object"):
        reader(path)
