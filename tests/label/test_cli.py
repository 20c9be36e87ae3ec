"""`python -m minirlhf label` as a user runs it: mistakes are one line and exit 2 before any
sampling; a real checkpoint is sampled, labelled over HTTP, stopped with Ctrl-C, and the
reward model trains on the file; kill -9 and a restart lose nothing but the request in
flight; --compare writes its win rate; --agreement reports it; a non-loopback host needs
the token."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from minirlhf.cli import main
from minirlhf.data import read_preferences
from minirlhf.label import sampling
from minirlhf.label.state import Item

from .helpers import Client, read_rows, running

PROMPTS = ["What does the fox eat?", "Where is Lima?", "Name two facts about the owl.", "Is the sky blue?"]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    responses = _write(tmp_path / "responses.jsonl",
                       [{"prompt": p, "responses": [f"{p} one", f"{p} two", f"{p} three"]} for p in PROMPTS])
    return tmp_path, prompts, responses


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("sampled before reporting the mistake")
    monkeypatch.setattr(sampling, "sample", refuse)


def _mistake(capsys, argv) -> str:
    assert main(["label", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_user_mistakes_are_one_line_exit_2_before_sampling(files, tiny_ckpt, capsys, no_sampling):
    d, prompts, responses = files
    ck, out = str(tiny_ckpt), str(d / "labels.jsonl")
    bad_json = d / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert "missing.jsonl:0: file: cannot read" in _mistake(capsys, ["--ckpt", ck, "--prompts", str(d / "missing.jsonl")])
    assert "bad.jsonl:2: json: not valid JSON" in _mistake(capsys, ["--ckpt", ck, "--prompts", str(bad_json)])
    assert "bad.jsonl:1: responses: expected an array" in _mistake(capsys, ["--responses", str(bad_json)])
    assert "no finished checkpoint" in _mistake(capsys, ["--ckpt", str(d), "--prompts", str(prompts)])
    assert "no finished checkpoint" in _mistake(capsys, ["--compare", ck, str(d), "--prompts", str(prompts)])
    assert "--overlap 1.5" in _mistake(capsys, ["--responses", str(responses), "--overlap", "1.5"])
    assert "--k 9" in _mistake(capsys, ["--ckpt", ck, "--prompts", str(prompts), "--k", "9"])
    assert "--k goes with --ckpt" in _mistake(capsys, ["--responses", str(responses), "--k", "3"])
    assert "give one of" in _mistake(capsys, ["--ckpt", ck, "--responses", str(responses)])
    assert "give one of" in _mistake(capsys, [])
    assert "needs --prompts" in _mistake(capsys, ["--ckpt", ck])
    assert "does not exist" in _mistake(capsys, ["--responses", str(responses), "--out", str(d / "no" / "x.jsonl")])
    assert "is a directory" in _mistake(capsys, ["--responses", str(responses), "--out", str(d)])
    _mistake(capsys, ["--responses", str(responses), "--port", "nope"])  # argparse's own error, one line too
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        err = _mistake(capsys, ["--ckpt", ck, "--prompts", str(prompts), "--out", out, "--port", port])
        assert f"--port {port}: address already in use" in err
    # an --out written for other prompts
    _write(d / "other.jsonl", [{"prompt": "another run", "responses": ["a", "b"], "ranking": [0, 1], "item": 0,
                                "annotator": "someone-else", "shown": [0, 1]}])
    err = _mistake(capsys, ["--ckpt", ck, "--prompts", str(prompts), "--out", str(d / "other.jsonl")])
    assert "other.jsonl:1: prompt: differs from prompt 0" in err
    assert "no prompt was judged by two" in _mistake(capsys, ["--agreement", str(d / "other.jsonl")])
    assert "annotator: missing" in _mistake(capsys, ["--agreement", str(_write(
        d / "plain.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]))])


class Server:
    """`python -m minirlhf label ...` in a subprocess; `url` is the one it printed."""

    started: list[Server] = []

    def __init__(self, argv, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "minirlhf", "label", "--port", "0", *argv], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        Server.started.append(self)
        self.lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"label exited {self.proc.wait()}: {''.join(self.lines)}")
            self.lines.append(line)
            if "open http" in line:
                self.url = line.split("open ")[1].split()[0]
                self.port = urlsplit(self.url).port
                return
        raise AssertionError("no URL printed")

    def client(self, **kw) -> Client:
        return Client(self, **kw)

    def stop(self, sig=signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, "".join(self.lines) + out


@pytest.fixture(autouse=True)
def _no_server_left_running():
    yield
    while Server.started:
        s = Server.started.pop()
        if s.proc.poll() is None:  # a test failed before stopping it
            s.proc.kill()
        s.proc.communicate()


@pytest.mark.slow  # a subprocess: a few seconds
def test_label_a_checkpoint_then_train_the_reward_model_on_the_file(files, tiny_ckpt):
    d, prompts, _ = files
    out = d / "labels.jsonl"
    srv = Server(["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--k", "3", "--max-new-tokens", "8",
                  "--out", str(out)], cwd=d)
    c = srv.client()
    view = c.next()
    sampled = {}
    while view["item"]:
        shown = view["item"]["responses"]
        assert len(shown) == 3
        sampled[view["item"]["prompt"]] = shown
        status, view = c.post("/api/judge", {"item": view["item"]["id"], "ranking": [2, 0, 1],
                                             "ties": [False, False]})
        assert status == 200, view
    rc, printed = srv.stop()
    assert rc == 0, printed
    assert "4 of 4 judgements in" in printed
    rows = read_rows(out)
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:  # display position 2 best, then 0, then 1: mapped back through "shown"
        assert r["ranking"] == [r["shown"][2], r["shown"][0], r["shown"][1]]
        assert sorted(r["responses"]) == sorted(sampled[r["prompt"]])
    assert len(read_preferences(out)) == 4
    # the reward model trains on the file as it is
    assert main(["rm", "--preset", "tiny", "--from", str(tiny_ckpt), "--data.preferences", str(out),
                 "--out", str(d / "run")]) == 0
    meta = json.loads((d / "run" / "rm" / "config.json").read_text())
    assert meta["finished"] and meta["stage"] == "rm"


@pytest.mark.slow  # a subprocess: a few seconds
def test_kill_9_loses_nothing_written_and_a_restart_continues(files):
    d, _, responses = files
    out = d / "labels.jsonl"
    srv = Server(["--responses", str(responses), "--out", str(out)], cwd=d)
    c = srv.client()
    view = c.next()
    for _ in range(2):
        status, view = c.post("/api/judge", {"item": view["item"]["id"], "ranking": [0, 1, 2]})
        assert status == 200
    srv.proc.kill()  # SIGKILL: no handler, no flush
    srv.proc.wait()
    assert len(read_rows(out)) == 2
    srv = Server(["--responses", str(responses), "--out", str(out)], cwd=d)
    assert "2 of 4 judgements already in" in "".join(srv.lines)
    c = srv.client(session=c.session)
    view = c.next()
    assert view["item"]["id"] == 2 and view["progress"]["judged"] == 2
    status, view = c.post("/api/skip", {"item": 2})
    rc, printed = srv.stop(signal.SIGTERM)
    assert rc == 0 and "3 of 4 judgements" in printed
    assert [r["item"] for r in read_rows(out)] == [0, 1, 2]


@pytest.mark.slow  # a subprocess: a few seconds
def test_compare_two_checkpoints_writes_the_win_rate(files, tiny_ckpt):
    d, prompts, _ = files
    a, b = str(tiny_ckpt), str(tiny_ckpt) + "/"
    srv = Server(["--compare", a, b, "--prompts", str(prompts), "--max-new-tokens", "6"], cwd=d)
    c = srv.client()
    view = c.next()
    actions = [([0, 1], [False]), ([1, 0], [False]), ([0, 1], [True]), None]  # left, right, tie, skip
    for action in actions:
        assert len(view["item"]["responses"]) == 2 and "result" not in view  # blind until the end
        if action is None:
            status, view = c.post("/api/skip", {"item": view["item"]["id"]})
        else:
            status, view = c.post("/api/judge", {"item": view["item"]["id"], "ranking": action[0], "ties": action[1]})
        assert status == 200, view
    assert view["item"] is None
    result = view["result"]
    rc, printed = srv.stop()
    assert rc == 0
    rows = read_rows(d / "compare.jsonl")
    # what each judgement meant, recomputed from the shown order: left (display 0) is response shown[0]
    expected = []
    for row, (ranking, ties) in zip(rows, actions[:3]):
        expected.append("tie" if ties[0] else "AB"[row["shown"][ranking[0]]])
    assert [r.get("winner") for r in rows] == expected + [None]
    assert rows[3]["skipped"]
    n_a = expected.count("A") + expected.count("tie") / 2
    assert result["win_rate_a"] == pytest.approx(n_a / 3) and result["judgements"] == 3
    on_disk = json.loads((d / "compare.result.json").read_text())
    assert on_disk == result and on_disk["model_a"] == os.path.normpath(a)
    assert f"A wins {n_a / 3:.1%}" in printed
    assert len(read_preferences(d / "compare.jsonl")) == 2  # the tie and the skip carry no pair


@pytest.mark.slow  # a subprocess: a few seconds
def test_a_non_loopback_host_needs_the_printed_token(files):
    d, _, responses = files
    srv = Server(["--responses", str(responses), "--host", "0.0.0.0", "--out", str(d / "l.jsonl")], cwd=d)
    try:
        token = parse_qs(urlsplit(srv.url).query)["token"][0]
        assert len(token) >= 20
        assert srv.client().post("/api/next")[0] == 403
        status, headers, _ = srv.client().raw("GET", f"/?token={token}")
        assert status == 200
        c = srv.client(headers={"Cookie": headers["Set-Cookie"].split(";")[0]})
        assert c.next()["item"]["id"] == 0
    finally:
        srv.stop()


def test_agreement_over_two_annotators(tmp_path, capsys):
    items = [Item(f"prompt {i}?", ("a", "b", "c")) for i in range(4)]
    out = tmp_path / "labels.jsonl"
    with running(out, items, overlap=0.5, seed=1) as server:
        one, two = Client(server), Client(server)
        for c, order in ((one, ["a", "b", "c"]), (two, ["a", "c", "b"])):
            view = c.next()
            while view["item"]:
                status, view = c.judge_by_text(view, order)
    rows = read_rows(out)
    shared = {r["item"] for r in rows if r["annotator"] == two.session} & {r["item"] for r in rows
                                                                           if r["annotator"] == one.session}
    assert len(shared) == 2
    assert main(["label", "--agreement", str(out)]) == 0
    printed = capsys.readouterr().out
    # on each shared prompt: a > b and a > c agree, b vs c disagrees: 4 of 6 pairs; tau = 1/3
    assert "2 prompts judged by two or more annotators (2 annotators)" in printed
    assert f"pairwise agreement {4 / 6:.3f} over 6 response pairs" in printed
    assert f"Kendall's tau-b {1 / 3:.3f}" in printed
