"""The label server over HTTP: the file holds exactly the judgements sent, undo, restart,
concurrent sessions and --overlap, access control, and bad requests that change nothing."""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
from pathlib import Path

import pytest

from minirlhf.data import read_preferences
from minirlhf.label.server import MAX_BODY
from minirlhf.label.state import Item
from minirlhf.label.store import LabelFile

from .helpers import ITEMS, Client, read_rows, running


def _judge_all(client: Client, plan: dict[str, tuple]):
    """Judge every prompt the server offers, by `plan[prompt] = (best-first texts, ties)`;
    `None` skips. Checks after each answer that the row is already on disk."""
    out = []
    view = client.next()
    while view["item"] is not None:
        prompt = view["item"]["prompt"]
        if plan[prompt] is None:
            status, view = client.post("/api/skip", {"item": view["item"]["id"]})
        else:
            status, view = client.judge_by_text(view, *plan[prompt])
        assert status == 200, view
        out.append(prompt)
    return out


PLAN = {
    ITEMS[0].prompt: (["The fox eats berries.", "berries", "The fox eats fish."], None),
    ITEMS[1].prompt: (["Lima is in Peru.", "Peru", "Lima is in Chile.", "I like trains."], [True, False, False]),
    ITEMS[2].prompt: None,
    ITEMS[3].prompt: ([ITEMS[3].responses[2], ITEMS[3].responses[0], ITEMS[3].responses[1]], [False, True]),
    ITEMS[4].prompt: (["good morning", "hello", "hi"], None),
}


def test_the_file_holds_the_judgements_sent(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        client = Client(server)
        assert _judge_all(client, PLAN) == [it.prompt for it in ITEMS]
        view = client.next()
        assert view["item"] is None and view["progress"]["done"] == view["progress"]["total"] == 5
    rows = read_rows(out)
    # hand-worked: the best-first texts as indices into each prompt's responses
    assert rows[0]["ranking"] == [1, 0, 2]
    assert rows[1]["ratings"] == [7, 7, 6, 5] and "ranking" not in rows[1]  # Peru tied with "Lima is in Peru."
    assert rows[2]["skipped"] is True and rows[2]["ratings"] == [4, 4, 4]
    assert rows[3]["ratings"] == [6, 6, 7]
    assert rows[4]["ranking"] == [2, 0, 1]
    for row, item in zip(rows, ITEMS):
        assert row["prompt"] == item.prompt and row["responses"] == list(item.responses)
        assert row["annotator"] == client.session and sorted(row["shown"]) == list(range(len(item.responses)))
        assert row["seconds"] >= 0 and row["time"].endswith("+00:00")
    # the shown orders are shuffled (position bias must not become preference)
    assert any(row["shown"] != sorted(row["shown"]) for row in rows)
    # the reward model's reader: ties and the skip carry no pairs
    prefs = read_preferences(out)
    assert [c.prompt for c in prefs] == [ITEMS[i].prompt for i in (0, 1, 3, 4)]
    assert sorted(prefs[1].pairs) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert sorted(prefs[2].pairs) == [(2, 0), (2, 1)]


def test_undo_takes_the_row_out_and_shows_the_prompt_again(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        a, b = Client(server), Client(server)
        va = a.next()
        vb = b.next()
        assert va["item"]["id"] == 0 and vb["item"]["id"] == 1
        status, va2 = a.judge_by_text(va, list(PLAN[ITEMS[0].prompt][0]))
        assert status == 200 and va2["can_undo"]
        status, _ = b.judge_by_text(vb, list(PLAN[ITEMS[1].prompt][0]))
        assert status == 200
        b_line = out.read_bytes().splitlines()[1]
        # a's row is not the last one: the file is rewritten without it, b's row byte for byte
        status, again = a.post("/api/undo")
        assert status == 200
        assert again["item"] == va["item"] and not again["can_undo"]  # same prompt, same order
        assert out.read_bytes().splitlines() == [b_line]
        assert again["progress"]["done"] == 1
        status, err = a.post("/api/undo")
        assert status == 400 and "nothing to undo" in err["error"]
        status, _ = a.judge_by_text(again, ["The fox eats fish.", "berries", "The fox eats berries."])
        assert status == 200
    rows = read_rows(out)
    assert [(r["item"], r["annotator"]) for r in rows] == [(1, b.session), (0, a.session)]
    assert rows[1]["ranking"] == [2, 0, 1]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_restart_continues_where_it_stopped(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        a = Client(server)
        view = a.next()
        for _ in range(2):
            status, view = a.judge_by_text(view, list(view["item"]["responses"]))
        status, view = a.post("/api/skip", {"item": view["item"]["id"]})
        assert view["item"]["id"] == 3
    before = out.read_bytes()
    # a kill -9 in the middle of the next append leaves half a line: the restart drops it
    with open(out, "ab") as f:
        f.write(b'{"prompt": "Name two facts about the owl.", "respo')
    with running(out) as server:
        assert out.read_bytes() == before
        again = Client(server, session=a.session)
        view = again.next()
        assert view["item"]["id"] == 3 and view["can_undo"]
        assert view["progress"]["done"] == 3 and view["progress"]["skipped"] == 1
        other = Client(server).next()
        assert other["item"]["id"] == 4  # 0-2 judged, 3 held
        status, view = again.post("/api/undo")  # undo reaches a row of the earlier run
        assert status == 200 and view["item"]["id"] == 2
    assert [r["item"] for r in read_rows(out)] == [0, 1]


def test_a_row_of_another_run_is_refused(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        c = Client(server)
        c.judge_by_text(c.next(), ["berries", "The fox eats berries.", "The fox eats fish."])
    changed = [Item("Something else?", ITEMS[0].responses)] + ITEMS[1:]
    with pytest.raises(ValueError, match=r"labels.jsonl:1: prompt: differs from prompt 0"):
        with running(out, changed):
            pass
    with pytest.raises(ValueError, match=r"labels.jsonl:1: models: "):
        with running(out, mode="compare", models=["a", "b"]):
            pass


def test_a_second_server_on_the_same_file_is_refused(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out):
        with pytest.raises(ValueError, match="another label server is writing"):
            LabelFile(out)


@pytest.mark.parametrize("overlap", [0.0, 0.4])
def test_concurrent_sessions_get_distinct_prompts_unless_overlapped(tmp_path, overlap):
    items = [Item(f"prompt {i}?", (f"a{i}", f"b{i}", f"c{i}")) for i in range(20)]
    out = tmp_path / "labels.jsonl"
    with running(out, items, overlap=overlap, seed=3) as server:
        clients = [Client(server) for _ in range(5)]
        first = [c.next()["item"]["id"] for c in clients]
        if overlap == 0:
            assert len(set(first)) == 5  # all held at once, none twice
        errors = []

        def work(c):
            try:
                view = c.next()
                while view["item"] is not None:
                    status, view = c.judge_by_text(view, sorted(view["item"]["responses"]))
                    assert status == 200, view
            except Exception as e:  # surfaced below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    rows = read_rows(out)
    by_item: dict[int, list[str]] = {}
    for r in rows:
        by_item.setdefault(r["item"], []).append(r["annotator"])
    assert sorted(by_item) == list(range(20))
    counts = sorted(len(v) for v in by_item.values())
    assert counts == [1] * (20 - round(overlap * 20)) + [2] * round(overlap * 20)
    assert all(len(set(v)) == len(v) for v in by_item.values())  # never twice to one person


def test_a_hold_left_for_too_long_goes_to_another_session(tmp_path):
    now = [0.0]
    with running(tmp_path / "labels.jsonl", ITEMS[:1], hold_seconds=60, clock=lambda: now[0]) as server:
        idle, busy = Client(server), Client(server)
        view = idle.next()
        assert busy.next()["item"] is None  # held by the idle tab
        now[0] = 61.0
        taken = busy.next()["item"]
        assert taken == {**view["item"], "responses": taken["responses"]}
        status, err = idle.judge_by_text(view, list(view["item"]["responses"]))
        assert status == 400 and "not the prompt this session holds" in err["error"]


def test_token_required_off_loopback(tmp_path):
    with running(tmp_path / "labels.jsonl", token="s3cret-token") as server:
        c = Client(server)
        for path in ("/", "/static/label.js", "/?token=wrong"):
            status, _, body = c.raw("GET", path)
            assert status == 403, path
        status, headers, _ = c.raw("GET", "/?token=s3cret-token")
        assert status == 200
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert c.post("/api/next")[0] == 403
        with_cookie = Client(server, headers={"Cookie": cookie.split(";")[0]})
        assert with_cookie.raw("GET", "/static/label.css")[0] == 200
        assert with_cookie.next()["item"]["id"] == 0
        wrong = Client(server, headers={"Cookie": f"{server.cookie}=s3cret-tokeX"})
        assert wrong.post("/api/next")[0] == 403


def test_loopback_checks_the_host_header(tmp_path):
    with running(tmp_path / "labels.jsonl") as server:
        c = Client(server)
        assert c.raw("GET", "/", headers={"Host": f"localhost:{server.port}"})[0] == 200
        # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own name
        assert c.raw("GET", "/", headers={"Host": f"evil.example:{server.port}"})[0] == 403
        assert c.post("/api/next", headers={"Host": "evil.example"})[0] == 403


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_requests_get_400_and_change_nothing(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        a, b = Client(server), Client(server)
        view = a.next()
        b.next()
        a.judge_by_text(view, list(PLAN[ITEMS[0].prompt][0]))
        view = a.next()  # holds item 2 (b holds item 1)
        assert view["item"]["id"] == 2
        before = out.read_bytes()
        item = view["item"]["id"]
        bad = [
            {"item": item, "ranking": [0, 1]},                      # too short
            {"item": item, "ranking": [0, 1, 1]},                   # not a permutation
            {"item": item, "ranking": [0, 1, 3]},
            {"item": item, "ranking": [True, False, 2]},            # booleans are no positions
            {"item": item, "ranking": ["0", "1", "2"]},
            {"item": item, "ranking": "012"},
            {"item": item, "ranking": [0, 1, 2], "ties": [True]},
            {"item": item, "ranking": [0, 1, 2], "ties": [1, 0]},
            {"item": item, "ranking": [0, 1, 2], "extra": 1},
            {"item": 1, "ranking": [0, 1, 2, 3]},                   # b's prompt
            {"item": 0, "ranking": [0, 1, 2]},                      # judged already
            {"item": True, "ranking": [0, 1, 2]},
            {"ranking": [0, 1, 2]},
            {"item": item, "ranking": [0, 1, 2], "session": "x"},   # not a session id
            {"item": item, "ranking": [0, 1, 2], "session": "../../etc/passwd"},
        ]
        for body in bad:
            status, err = a.post("/api/judge", body)
            assert status == 400 and err["error"], body
        assert a.post("/api/skip", {"item": 1})[0] == 400
        assert a.post("/api/skip", {"item": item, "ranking": [0, 1, 2]})[0] == 400
        assert a.post("/api/undo", {"item": item})[0] == 400
        assert a.post("/api/next", {"item": item})[0] == 400
        assert Client(server).post("/api/undo")[0] == 400           # a new session has nothing to undo
        j = json.dumps({"session": a.session, "item": item, "ranking": [0, 1, 2]}).encode()
        for body, headers in [(b"{not json", {}), (b"[1, 2]", {}), (b"\xff\xfe", {}),
                              (j, {"Content-Type": "text/plain"}),
                              (j, {"Content-Type": "application/x-www-form-urlencoded"}),
                              (b'{"session": "' + b"a" * MAX_BODY + b'"}', {})]:
            status, _, data = a.raw("POST", "/api/judge", body, {"Content-Type": "application/json", **headers})
            assert status == 400 and json.loads(data)["error"], body[:40]
        host = f"Host: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n".encode()
        for request in [b"POST /api/judge HTTP/1.1\r\n" + host + b"\r\n",
                        b"POST /api/judge HTTP/1.1\r\n" + host + b"Content-Length: -5\r\n\r\n",
                        b"GET / HTTP/x.y\r\n\r\n"]:
            reply = _raw_http(server.port, request)
            # http.server answers a request line it cannot parse in HTTP/0.9 style: no status line
            assert reply.startswith(b"HTTP/1.0 400 ") or b"Error code: 400" in reply, reply[:80]
        # no request names a file: traversal finds nothing
        for path in ("/../labels.jsonl", "/static/../store.py", "/static/%2e%2e/store.py", "/static/",
                     "/labels.jsonl", "//etc/passwd", "/static/label.js/../../cli.py"):
            assert a.raw("GET", path)[0] == 404, path
        assert a.post("/api/nothing")[0] == 404
        assert a.raw("PUT", "/api/judge", j)[0] == 405
        assert out.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]
        # ...and the session is still where it was
        again = a.next()
        assert again["item"] == view["item"]


def test_the_page_is_static_and_text_only_reaches_it_as_json(tmp_path):
    with running(tmp_path / "labels.jsonl") as server:
        c = Client(server)
        status, headers, page = c.raw("GET", "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert b"fox" not in page
        js = c.raw("GET", "/static/label.js")[2].decode()
        assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
        status, headers, data = c.raw("POST", "/api/next", b"{}", {"Content-Type": "application/json"})
        assert headers["Content-Type"] == "application/json"


def test_every_static_file_ships_as_package_data():
    """pyproject's package-data must cover every file of static/, or a normal (non-editable)
    install serves a page without it."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import minirlhf.label

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["minirlhf.label"]
    static = Path(minirlhf.label.__file__).parent / "static"
    files = [f"static/{p.name}" for p in static.iterdir()]
    assert {"static/index.html", "static/label.js", "static/label.css"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f


# ---- a wrong --out is never touched; a symlinked one stays a link ----

_LABEL_ROW = {"prompt": ITEMS[0].prompt, "responses": list(ITEMS[0].responses), "ranking": [0, 1, 2], "item": 0,
              "annotator": "someone-else", "shown": [2, 0, 1]}


@pytest.mark.parametrize("data", [
    struct.pack("<Q", 30) + b'{"__metadata__":{"a":"b"}}    ' + bytes(range(256)) * 3,  # a model.safetensors
    b"notes: buy milk\nand eggs",                                  # text without its last newline
    b"one line, no newline",
    b'{"prompt": "x", "chosen": "a", "rejected": "b"}',             # a whole preference row, no newline
    b'{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "y", "cho',  # ... cut short
    b'{"prompt": "x"',                                              # the start of a row, and nothing else
    json.dumps({**_LABEL_ROW, "prompt": "another run's"}).encode() + b'\n{"prompt": "Wh',  # label's, other prompts
], ids=["safetensors", "notes", "one-line", "whole-row", "cut-row", "only-a-start", "other-run"])
def test_a_file_that_is_not_this_runs_labels_is_refused_and_left_byte_for_byte(tmp_path, data):
    out = tmp_path / "wrong.jsonl"
    out.write_bytes(data)
    with pytest.raises(ValueError, match=r"wrong.jsonl:\d+: "):
        with running(out):
            pass
    assert out.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.jsonl"]


def test_only_a_labels_file_is_repaired(tmp_path):
    """The counterpart: a file `label` wrote, cut mid-row or missing its last newline, is finished."""
    out = tmp_path / "labels.jsonl"
    row = json.dumps(_LABEL_ROW).encode()
    out.write_bytes(row)  # the newline alone is missing: the row counts
    with running(out) as server:
        assert Client(server).next()["item"]["id"] == 1
    assert out.read_bytes() == row + b"\n"
    out.write_bytes(row + b'\n{"prompt": "Where is Li')
    with running(out):
        assert out.read_bytes() == row + b"\n"


def test_undo_through_a_symlinked_out_rewrites_its_file_and_keeps_the_link(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "labels-2024.jsonl"
    link = tmp_path / "labels.jsonl"
    link.symlink_to(target)
    with running(link) as server:
        c = Client(server)
        view = c.next()
        status, view = c.judge_by_text(view, list(view["item"]["responses"]))
        status, view = c.judge_by_text(view, list(view["item"]["responses"]))
        assert status == 200
        status, view = c.post("/api/undo")
        assert status == 200 and view["item"]["id"] == 1
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert [r["item"] for r in read_rows(target)] == [0]
        status, view = c.judge_by_text(view, list(view["item"]["responses"]))  # after the undo: still the target
        assert status == 200
    assert link.is_symlink() and [r["item"] for r in read_rows(target)] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["labels-2024.jsonl"]


# ---- a rejected request changes nothing; every invalid one is a JSON 4xx, quietly ----

def _state_of(server) -> tuple:
    s = server.state
    return (s.summary(), {sid: (list(x.rows), x.hold and (x.hold.item, list(x.hold.order)))
                          for sid, x in s.sessions.items()}, [set(h) for h in s.holders])


def test_rejected_requests_change_no_state(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        a = Client(server)
        view = a.next()
        a.judge_by_text(view, list(view["item"]["responses"]))
        before, file_before = _state_of(server), out.read_bytes()
        for n in range(50):  # made-up, well-formed session ids, each request wrong in its own way
            sid = f"made-up-session-{n:03d}"
            for path, body in [("/api/judge", {"session": sid, "item": 1, "ranking": [0, 1, 2, 3]}),
                               ("/api/skip", {"session": sid, "item": 1}),
                               ("/api/undo", {"session": sid}),
                               ("/api/next", {"session": sid, "extra": 1})]:
                status, err = Client(server).post(path, body)
                assert status == 400 and err["error"], (path, body)
        assert _state_of(server) == before and out.read_bytes() == file_before
        assert server.state.summary()["sessions"] == 1


def _raw_reply(port: int, request: bytes) -> tuple[int, dict, bytes]:
    status_line, _, rest = _raw_http(port, request).partition(b"\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n") if line)
    return int(status_line.split()[1]), headers, body


def test_malformed_requests_get_json_4xx_with_the_security_headers_and_a_quiet_terminal(tmp_path, capfd):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        a = Client(server)
        view = a.next()
        item, sid = view["item"]["id"], a.session
        before = out.read_bytes()
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()

        def post(body: bytes, extra: bytes = b"") -> bytes:
            return (b"POST /api/judge HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n" + extra
                    + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

        session = f'{{"session": "{sid}", '.encode()
        deep = b"[" * 5000 + b"]" * 5000
        requests = {
            "item 1.0": post(session + b'"item": ' + f"{item}.0".encode() + b', "ranking": [0, 1, 2]}'),
            "item of 5000 digits": post(session + b'"item": ' + b"1" * 5000 + b', "ranking": [0, 1, 2]}'),
            "nested too deeply": post(session + b'"item": ' + deep + b"}"),
            "nested deep in a field": post(session + b'"item": ' + b"[" * 900 + b"]" * 900 + b"}"),
            "a field name of 10 KB": post(session + b'"' + b"x" * 10000 + b'": 1}'),
            "Content-Length of 5000 digits": (b"POST /api/judge HTTP/1.1\r\n" + host + b"Content-Type: "
                                              b"application/json\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"),
            "Content-Length in other digits": (b"POST /api/judge HTTP/1.1\r\n" + host + b"Content-Type: "
                                               b"application/json\r\nContent-Length: \xd9\xa3\r\n\r\n{}"),
            "a request line it cannot parse": b"GET / HTTP/x.y\r\n\r\n",
            "a header line too long": b"GET / HTTP/1.1\r\n" + host + b"X-Long: " + b"x" * 70000 + b"\r\n\r\n",
        }
        for method in ("PUT", "OPTIONS", "DELETE", "PATCH", "FOO", "get"):
            requests[method] = f"{method} /api/judge HTTP/1.1\r\n".encode() + host + b"Content-Length: 0\r\n\r\n"
        for what, request in requests.items():
            status, headers, body = _raw_reply(server.port, request)
            assert 400 <= status < 500, (what, status, body[:200])
            assert headers["Content-Type"] == "application/json", what
            assert json.loads(body)["error"], what
            for k in ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options"):
                assert k in headers, (what, k)
        status, headers, body = _raw_reply(server.port, b"HEAD / HTTP/1.1\r\n" + host + b"\r\n")
        assert status == 405 and body == b"" and headers["Allow"] == "GET, POST" and "X-Frame-Options" in headers
        # every method passes the access checks first: a foreign Host is 403 whatever the method
        for method in ("PUT", "OPTIONS", "HEAD"):
            status, headers, _ = _raw_reply(server.port, f"{method} / HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
            assert status == 403 and "Content-Security-Policy" in headers, method
        # a client that goes away mid-body (here: resets the connection)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(post(session + b'"item": 0, "ranking": [0, 1, 2]}')[:-20])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert a.next()["item"] == view["item"]  # still serving, nothing changed
        assert out.read_bytes() == before
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


# ---- --out must be a regular file; a refused undo leaves no debris ----

@pytest.mark.parametrize("kind", ["fifo", "dev-null", "dev-full", "dir", "link-to-fifo"])
def test_an_out_that_is_not_a_regular_file_is_refused_before_anything(tmp_path, kind):
    path = tmp_path / "labels.jsonl"
    if kind in ("fifo", "link-to-fifo"):
        os.mkfifo(tmp_path / "pipe")
        if kind == "fifo":
            path = tmp_path / "pipe"
        else:
            path.symlink_to(tmp_path / "pipe")
    elif kind == "dir":
        path.mkdir()
    else:
        path = Path("/dev/null" if kind == "dev-null" else "/dev/full")
        if not path.exists():
            pytest.skip(f"{path} is absent on this machine")
    want = {"fifo": "is a FIFO (named pipe)", "link-to-fifo": "is a FIFO (named pipe)",
            "dir": "is a directory"}.get(kind, "is a device")
    with pytest.raises(ValueError, match=re.escape(f"--out {path}: {want}, expected a regular file")):
        LabelFile(path)


def test_a_refused_undo_leaves_the_file_no_temp_and_no_open_fd(tmp_path, monkeypatch):
    out = tmp_path / "labels.jsonl"

    def fds() -> list[str]:  # the files under tmp_path this process holds open (sockets come and go with
        held = []            # the client's connections, so they are not what this test is about)
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed between listdir and readlink
                continue
            if target.startswith(str(tmp_path)):
                held.append(target)
        return sorted(held)
    with running(out) as server:
        c = Client(server)
        view = c.next()
        status, view = c.judge_by_text(view, list(view["item"]["responses"]))
        assert status == 200
        before, open_before, state_before = out.read_bytes(), fds(), _state_of(server)

        def refuse(src, dst):  # as on an append-only (chattr +a) file
            raise PermissionError(1, "Operation not permitted", str(dst))
        monkeypatch.setattr(os, "replace", refuse)
        status, err = c.post("/api/undo")
        assert status == 500 and "Operation not permitted" in err["error"]
        assert out.read_bytes() == before
        assert not list(tmp_path.glob(".*"))  # no .labels.jsonl.undo.tmp
        assert fds() == open_before  # no descriptor of the labels file or a temp file leaked
        assert _state_of(server) == state_before
        monkeypatch.undo()  # the rename works again: so does the undo, and the file stays writable
        status, view = c.post("/api/undo")
        assert status == 200 and view["item"]["id"] == 0 and out.read_bytes() == b""
        status, view = c.judge_by_text(view, list(view["item"]["responses"]))
        assert status == 200
    assert [r["item"] for r in read_rows(out)] == [0]


# ---- --compare stays blind until every judgement is in; holds of sessions that judged nothing ----

def test_compare_reveals_the_result_only_once_the_whole_comparison_is_done(tmp_path):
    pairs = [Item(f"prompt {i}?", (f"A says {i}", f"B says {i}")) for i in range(3)]
    now = [0.0]
    with running(tmp_path / "c.jsonl", pairs, mode="compare", models=["/runs/a", "/runs/b"],
                 clock=lambda: now[0]) as server:
        one, two, three = Client(server), Client(server), Client(server)
        v1, v2, v3 = one.next(), two.next(), three.next()
        assert [v["item"]["id"] for v in (v1, v2, v3)] == [0, 1, 2]
        late = Client(server).next()  # nothing left for a new session, nothing judged by it
        assert late["item"] is None and "result" not in late
        assert late["held_by_others"] == 3 and late["first_free_in"] == 600
        assert late["session"] not in server.state.sessions  # a session that got nothing is not kept
        status, v1 = one.post("/api/judge", {"item": 0, "ranking": [0, 1], "ties": [False]})
        assert status == 200 and v1["item"] is None and "result" not in v1  # done, but the others are not
        assert v1["held_by_others"] == 2
        status, v2 = two.post("/api/skip", {"item": 1})
        now[0] = 601.0  # three's hold (a session that judged nothing) may go to another session now
        assert v2["item"] is None and "result" not in v2
        taker = Client(server)
        assert taker.next()["item"]["id"] == 2
        status, err = three.post("/api/judge", {"item": 2, "ranking": [0, 1], "ties": [False]})
        assert status == 400
        status, done = taker.post("/api/judge", {"item": 2, "ranking": [1, 0], "ties": [False]})
        assert status == 200 and done["item"] is None
        rows = read_rows(tmp_path / "c.jsonl")
        a_wins = sum(r.get("winner") == "A" for r in rows)
        expected = {"model_a": "/runs/a", "model_b": "/runs/b", "judgements": 2, "a_wins": a_wins,
                    "b_wins": 2 - a_wins, "ties": 0, "skipped": 1, "win_rate_a": a_wins / 2}
        for view in (done, one.next(), Client(server).next()):  # everyone, once nothing is left
            assert {k: view["result"][k] for k in expected} == expected


def test_a_session_that_has_judged_holds_its_prompt_for_the_full_hour(tmp_path):
    now = [0.0]
    with running(tmp_path / "labels.jsonl", ITEMS[:2], clock=lambda: now[0]) as server:
        worker = Client(server)
        view = worker.next()
        status, view = worker.judge_by_text(view, list(view["item"]["responses"]))
        assert view["item"]["id"] == 1
        now[0] = 3000.0  # past the first hold of 600 s, within the hour
        other = Client(server).next()
        assert other["item"] is None and other["held_by_others"] == 1 and other["first_free_in"] == 600
        now[0] = 3600.0
        assert Client(server).next()["item"]["id"] == 1


def test_ambiguous_framing_headers_are_refused_and_change_nothing(tmp_path):
    out = tmp_path / "labels.jsonl"
    with running(out) as server:
        a = Client(server)
        view = a.next()
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
        body = json.dumps({"session": a.session, "item": view["item"]["id"], "ranking": [0, 1, 2]}).encode()
        n = str(len(body)).encode()
        start = b"POST /api/judge HTTP/1.1\r\nContent-Type: application/json\r\n"
        requests = {
            "Content-Length twice": start + host + b"Content-Length: " + n + b"\r\nContent-Length: 0\r\n\r\n" + body,
            "Content-Length twice, equal": start + host + b"Content-Length: " + n + b"\r\nContent-Length: " + n
            + b"\r\n\r\n" + body,
            "Host twice": start + host + b"Host: evil.example\r\nContent-Length: " + n + b"\r\n\r\n" + body,
            "Transfer-Encoding and Content-Length": start + host + b"Transfer-Encoding: chunked\r\nContent-Length: "
            + n + b"\r\n\r\n" + body,
            "Transfer-Encoding alone": start + host + b"Transfer-Encoding: chunked\r\n\r\n"
            + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
            "GET with Host twice": b"GET / HTTP/1.1\r\n" + host + host + b"\r\n",
        }
        for what, request in requests.items():
            status, headers, reply = _raw_reply(server.port, request)
            assert status == 400, (what, status, reply[:200])
            assert json.loads(reply)["error"] and "X-Frame-Options" in headers, what
        assert not out.exists() or out.read_bytes() == b""
        assert a.next()["item"] == view["item"]  # nothing judged
        # the same judgement framed once is taken
        status, _, reply = _raw_reply(server.port, start + host + b"Content-Length: " + n + b"\r\n\r\n" + body)
        assert status == 200, reply
    assert [r["item"] for r in read_rows(out)] == [view["item"]["id"]]


# ---- a complete --compare is final; every row continued must be one the preference reader takes ----

def test_a_complete_comparison_refuses_undo_also_after_a_restart(tmp_path):
    """Once the win rate is shown, nobody may re-judge knowing it: no undo, on this server or
    on a restarted one. Before that, undo is an ordinary correction; ranking keeps its undo."""
    pairs = [Item(f"prompt {i}?", (f"A says {i}", f"B says {i}")) for i in range(2)]
    out = tmp_path / "c.jsonl"
    changes = []
    kw = dict(mode="compare", models=["/runs/a", "/runs/b"], on_change=lambda state: changes.append(1))
    with running(out, pairs, **kw) as server:
        c = Client(server)
        view = c.next()
        status, view = c.post("/api/judge", {"item": 0, "ranking": [0, 1], "ties": [False]})
        assert status == 200 and view["can_undo"]  # not complete: still blind, undo allowed
        status, view = c.post("/api/undo")
        assert status == 200 and view["item"]["id"] == 0
        for item in (0, 1):
            status, view = c.post("/api/judge", {"item": item, "ranking": [1, 0], "ties": [False]})
            assert status == 200
        assert view["item"] is None and view["result"]["judgements"] == 2 and view["can_undo"] is False
        before, n_changes = out.read_bytes(), len(changes)
        status, err = c.post("/api/undo")
        assert status == 400 and "judgements are final" in err["error"]
        assert out.read_bytes() == before and len(changes) == n_changes  # the result was not rewritten
        assert c.next()["can_undo"] is False
    with running(out, pairs, **kw) as server:  # a restart of the completed comparison
        again = Client(server, session=c.session)
        view = again.next()
        assert view["item"] is None and view["result"]["judgements"] == 2 and view["can_undo"] is False
        status, err = again.post("/api/undo")
        assert status == 400 and "judgements are final" in err["error"]
    assert out.read_bytes() == before
    with running(tmp_path / "labels.jsonl", ITEMS[:1]) as server:  # ranking: the last judgement can be undone
        c = Client(server)
        status, view = c.judge_by_text(c.next(), list(ITEMS[0].responses))
        assert view["item"] is None and view["can_undo"]
        assert c.post("/api/undo")[0] == 200


def _row(item: int, **change) -> dict:
    row = {"prompt": ITEMS[item].prompt, "responses": list(ITEMS[item].responses),
           "ranking": list(range(len(ITEMS[item].responses))), "item": item, "annotator": "someone-else",
           "shown": list(range(len(ITEMS[item].responses)))}
    return {k: v for k, v in {**row, **change}.items() if v is not None}


@pytest.mark.parametrize("line", [
    json.dumps(_row(1, ranking=[0, 0, 1, 2])),                              # the tester's: not a permutation
    json.dumps(_row(1, ranking=[0, 1, 2])),                                 # one index short
    json.dumps(_row(1, ranking=[0, 1, 2, True])),                           # true is no index
    json.dumps(_row(1, ranking=None, ratings=[7, 8, 6, 5])),                # a rating out of 1..7
    json.dumps(_row(1, ranking=None, ratings=[7, 6, 5])),                   # 3 ratings for 4 responses
    json.dumps(_row(1, ratings=[7, 6, 5, 4])),                              # ranking and ratings
    json.dumps(_row(1, ranking=None)),                                      # neither
    json.dumps(_row(1, responses=list(ITEMS[1].responses[:3]) + [7])),      # a response that is no text
    json.dumps(_row(1))[:-1] + ', "ranking": [3, 2, 1, 0]}',                # a field given twice
], ids=["not-a-permutation", "short", "true", "rating-8", "ratings-length", "both", "neither", "response-7",
        "twice"])
def test_a_row_the_preference_reader_refuses_is_refused_with_its_message(tmp_path, line):
    """`rm` and `--agreement` read the file label continues: a row they would refuse is refused at
    start with the message they give (read_preferences is the reference), and left as it was."""
    from minirlhf.data import DataError

    out = tmp_path / "labels.jsonl"
    for end in ("\n", ""):  # also as a last line that lost its newline (a kill -9)
        out.write_text(json.dumps(_row(0)) + "\n" + line + end)
        before = out.read_bytes()
        with pytest.raises(DataError) as reader:
            read_preferences(out)
        with pytest.raises(ValueError) as label:
            with running(out):
                pass
        assert str(label.value) == str(reader.value) and str(label.value).startswith(f"{out}:2: ")
        assert out.read_bytes() == before
    out.write_text(json.dumps(_row(0)) + "\n" + json.dumps(_row(1)) + "\n")  # the counterpart: valid rows continue
    with running(out) as server:
        assert Client(server).next()["item"]["id"] == 2
