"""`python -m minirlhf label` as a user runs it: mistakes are one line and exit 2 before any
sampling; a real checkpoint is sampled, labelled over HTTP, stopped with Ctrl-C, and the
reward model trains on the file; kill -9 and a restart lose nothing but the request in
flight; --compare writes its win rate; --agreement reports it; a non-loopback host needs
the token."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from minirlhf.cli import main
from minirlhf.data import read_preferences
from minirlhf.label import sampling
from minirlhf.label.server import LabelServer
from minirlhf.label.state import Item
from minirlhf.label.stats import win_rate

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


@pytest.fixture(autouse=True)
def _never_serve_in_process(monkeypatch):
    """A run in this process that should have stopped at a mistake fails instead of serving
    forever (`_run` serves on purpose; the subprocess tests are other processes)."""
    def refuse(self, *a, **kw):
        raise AssertionError("the server started: the mistake was not reported")
    monkeypatch.setattr(LabelServer, "serve_forever", refuse)


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
    assert "bad.jsonl:1: responses: missing" in _mistake(capsys, ["--responses", str(bad_json)])
    assert "no finished checkpoint" in _mistake(capsys, ["--ckpt", str(d), "--prompts", str(prompts)])
    assert "no finished checkpoint" in _mistake(capsys, ["--compare", ck, str(d), "--prompts", str(prompts)])
    assert "--overlap: 1.5 must be" in _mistake(capsys, ["--responses", str(responses), "--overlap", "1.5"])
    assert "--k: 9 must be" in _mistake(capsys, ["--ckpt", ck, "--prompts", str(prompts), "--k", "9"])
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
                                     env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     # Ctrl-C as in a terminal, even where pytest itself runs in the background
                                     # (a shell's background job inherits SIGINT ignored, and so would the server)
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
def test_compare_two_checkpoints_writes_the_win_rate(files, tiny_ckpt, tiny_ckpt_b):
    d, prompts, _ = files
    a, b = str(tiny_ckpt), str(tiny_ckpt_b) + "/"
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


def test_agreement_over_two_annotators(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(LabelServer, "serve_forever", _SERVE_FOREVER)  # this test serves on purpose
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


# ---- in-process runs: the server serves while `act` runs, then stops as Ctrl-C stops it ----

_SERVE_FOREVER = LabelServer.serve_forever


def _run(monkeypatch, argv, act=None) -> int:
    """`main(["label", "--port", "0", *argv])` with the server stopped once `act(client)` returns."""
    real = _SERVE_FOREVER

    def serve(self, poll_interval=0.5):
        thread = threading.Thread(target=real, args=(self,), daemon=True)
        thread.start()
        try:
            if act is not None:
                act(Client(self))
        finally:
            self.shutdown()
            thread.join()
    monkeypatch.setattr(LabelServer, "serve_forever", serve)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's SIGTERM alone
    return main(["label", "--port", "0", *argv])


@pytest.fixture
def fake_sampling(monkeypatch):
    """sampling.sample without a model: "<prompt> #j" texts; each call's arguments are kept."""
    calls = []

    def sample(ckpt, prompts, *, n, **kw):
        calls.append({"ckpt": ckpt, "prompts": prompts, "n": n, **kw})
        return [[f"{p} #{j}" for j in range(n)] for p in prompts]
    monkeypatch.setattr(sampling, "sample", sample)
    return calls


def _judge_first(c: Client) -> None:
    view = c.next()
    k = len(view["item"]["responses"])
    assert c.post("/api/judge", {"item": view["item"]["id"], "ranking": list(range(k))})[0] == 200


@pytest.mark.parametrize("option,value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--temperature", "-inf"),
    ("--max-new-tokens", "0"), ("--max-new-tokens", "1.5"), ("--batch-size", "0"), ("--k", "1"), ("--k", "9"),
    ("--overlap", "nan"), ("--overlap", "-0.1"), ("--overlap", "inf"), ("--port", "70000"), ("--port", "-1"),
    ("--seed", "-1"), ("--seed", "4294967296"), ("--seed", "18446744073709551616"),
])
def test_every_numeric_option_has_its_range_and_a_line_naming_it(files, tiny_ckpt, capsys, no_sampling, option,
                                                                  value):
    d, prompts, _ = files
    err = _mistake(capsys, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(d / "l.jsonl"),
                            "--port", "0", f"{option}={value}"])
    assert f"argument {option}: " in err and value in err
    others = {"--temperature", "--max-new-tokens", "--batch-size", "--k", "--overlap", "--port", "--seed"} - {option}
    assert not any(o in err for o in others), err
    assert not (d / "l.jsonl").exists()


def test_a_responses_file_gets_the_checks_of_every_data_file(files, capsys, monkeypatch):
    d, _, responses = files
    surrogate = d / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q", "responses": ["a", "\\ud83e"]}\n')
    err = _mistake(capsys, ["--responses", str(surrogate), "--port", "0"])
    assert "surrogate.jsonl:2: responses[1]: not valid Unicode" in err
    twice = d / "twice.jsonl"
    twice.write_text('{"prompt": "p", "responses": ["a", "b"], "prompt": "q"}\n')
    assert "twice.jsonl:1: prompt: given twice" in _mistake(capsys, ["--responses", str(twice), "--port", "0"])
    nine = d / "nine.jsonl"
    nine.write_text(json.dumps({"prompt": "p", "responses": list("abcdefghi")}) + "\n")
    err = _mistake(capsys, ["--responses", str(nine), "--port", "0"])
    assert "nine.jsonl:1: responses: 9 given, expected 2 to 8" in err
    # gzip, as every reader takes it, and a conversation prompt
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Lima?"}]
    gz = d / "responses.jsonl.gz"
    gz.write_bytes(gzip.compress(responses.read_bytes() + json.dumps({"prompt": chat, "responses": ["Peru", "Chile"]})
                                 .encode() + b"\n"))
    seen = []

    def act(c):
        view = c.next()
        while view["item"]:
            seen.append(view["item"]["prompt"])
            status, view = c.post("/api/skip", {"item": view["item"]["id"]})
    assert _run(monkeypatch, ["--responses", str(gz), "--out", str(d / "gz.jsonl")], act) == 0
    assert seen == PROMPTS + [chat]
    assert [r["prompt"] for r in read_rows(d / "gz.jsonl")] == PROMPTS + [chat]


def _long_prompts(d: Path, tokenizer, at_least: int) -> tuple[Path, int]:
    """A prompts file whose third line is a prompt of at least `at_least` tokens; (file, its tokens)."""
    long = "Tell me about the fox"
    while len(tokenizer.prompt_ids(long)) < at_least:
        long += " and the owl"
    return _write(d / "long.jsonl", [{"prompt": p} for p in PROMPTS[:2] + [long] + PROMPTS[2:]]), \
        len(tokenizer.prompt_ids(long))


def test_a_prompt_over_its_token_budget_is_named_before_sampling(files, tiny_ckpt, tiny_ckpt_b, capsys,
                                                                 no_sampling):
    from minirlhf import checkpoint

    d, _, _ = files
    tokenizer, L = checkpoint.load_tokenizer(tiny_ckpt), checkpoint.read_meta(tiny_ckpt)["model"]["max_seq_len"]
    prompts, n = _long_prompts(d, tokenizer, L - 8)
    out = d / "labels.jsonl"
    err = _mistake(capsys, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--max-new-tokens", "8",
                            "--out", str(out), "--port", "0"])
    assert f"long.jsonl:3: prompt: {n} tokens, but model.max_seq_len={L}" in err
    assert f"leaves {L - 8 - 1} for a prompt next to --max-new-tokens=8" in err
    # a --max-new-tokens no prompt fits next to: the option is named, not a negative room
    for big in (str(L - 1), "99999999999999999999"):
        err = _mistake(capsys, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--max-new-tokens", big,
                                "--out", str(out), "--port", "0"])
        assert f"--max-new-tokens {big}: exceeds model.max_seq_len={L} of {tiny_ckpt}, which holds at most {L - 2}" \
            in err and "leaves -" not in err
    # with the default --max-new-tokens, a prompt that leaves no room at all
    prompts, n = _long_prompts(d, tokenizer, L)
    err = _mistake(capsys, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(out), "--port", "0"])
    assert f"long.jsonl:3: prompt: {n} tokens, but model.max_seq_len={L}" in err and "leaves no room" in err
    err = _mistake(capsys, ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts), "--out",
                            str(out), "--port", "0"])
    assert f"long.jsonl:3: prompt: {n} tokens" in err
    assert not out.exists()


def test_the_readme_command_works_on_a_tiny_checkpoint(files, tiny_ckpt, capsys, monkeypatch):
    """`label --ckpt CKPT --prompts FILE --k 4 --out labels.jsonl` with the default --max-new-tokens,
    a checkpoint of 96 tokens and a prompt of 50 (the tiny task's own prompts reach 50): the
    default shrinks to what the longest prompt leaves, and says so; real sampling."""
    from minirlhf import checkpoint

    d, _, _ = files
    tokenizer, L = checkpoint.load_tokenizer(tiny_ckpt), checkpoint.read_meta(tiny_ckpt)["model"]["max_seq_len"]
    prompts, n = _long_prompts(d, tokenizer, 50)
    assert n + 48 > L  # what the default of 48 tokens could not hold
    monkeypatch.chdir(d)
    got = []

    def act(c):
        view = c.next()
        got.append(view["item"]["responses"])
        _judge_first(c)
    assert _run(monkeypatch, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--k", "4", "--out",
                              "labels.jsonl"], act) == 0
    printed = capsys.readouterr().out
    assert f"--max-new-tokens {L - 1 - n}: the default 48 less what the longest prompt (" in printed
    assert f"long.jsonl:3, {n} tokens)" in printed
    assert f"x 4 responses from {tiny_ckpt} (stage pretrain)" in printed
    assert len(got[0]) == 4 and len(read_rows(d / "labels.jsonl")) == 1


def test_sampling_uses_the_budget_it_checked(files, tiny_ckpt, monkeypatch, fake_sampling):
    from minirlhf import checkpoint

    d, _, _ = files
    tokenizer, L = checkpoint.load_tokenizer(tiny_ckpt), checkpoint.read_meta(tiny_ckpt)["model"]["max_seq_len"]
    prompts, n = _long_prompts(d, tokenizer, 60)
    assert _run(monkeypatch, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(d / "a.jsonl")]) == 0
    assert _run(monkeypatch, ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(d / "b.jsonl"),
                              "--max-new-tokens", "20"]) == 0
    assert [c["max_new_tokens"] for c in fake_sampling] == [L - 1 - n, 20]


def test_a_reward_model_checkpoint_is_refused(files, tiny_ckpt, capsys, no_sampling, tmp_path):
    d, prompts, _ = files
    rm = tmp_path / "run" / "rm"
    shutil.copytree(tiny_ckpt, rm)
    meta = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**meta, "stage": "rm"}))
    err = _mistake(capsys, ["--ckpt", str(rm), "--prompts", str(prompts)])
    assert f"{rm}: a reward model's checkpoint (stage rm)" in err
    assert "(stage rm)" in _mistake(capsys, ["--compare", str(tiny_ckpt), str(rm), "--prompts", str(prompts)])


def test_a_port_in_use_or_any_refusal_leaves_out_as_it_was(files, tiny_ckpt, capsys, no_sampling):
    d, prompts, responses = files
    out = d / "new.jsonl"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv in (["--ckpt", str(tiny_ckpt), "--prompts", str(prompts)], ["--responses", str(responses)]):
            assert "address already in use" in _mistake(capsys, [*argv, "--out", str(out), "--port", port])
            assert not out.exists()


def test_an_out_that_is_not_a_regular_file_is_one_line_before_sampling(files, tiny_ckpt, tiny_ckpt_b, capsys,
                                                                        no_sampling):
    d, prompts, responses = files
    os.mkfifo(d / "pipe")
    for out, kind in ((d / "pipe", "a FIFO (named pipe)"), (Path("/dev/null"), "a device"),
                      (Path("/dev/full"), "a device")):
        if not out.exists():
            continue
        for argv in (["--responses", str(responses)], ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts)],
                     ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts)]):
            err = _mistake(capsys, [*argv, "--out", str(out), "--port", "0"])
            assert f"--out {out}: is {kind}, expected a regular file" in err


def test_a_file_that_is_not_a_labels_file_is_refused_untouched(files, capsys):
    d, _, responses = files
    notes = d / "notes.txt"
    notes.write_bytes(b"my notes, one line without its newline")
    err = _mistake(capsys, ["--responses", str(responses), "--out", str(notes), "--port", "0"])
    assert "notes.txt:1: row: an unfinished last line that `label` did not write" in err
    assert notes.read_bytes() == b"my notes, one line without its newline"


def test_compare_continues_with_the_checkpoints_spelt_another_way(files, tiny_ckpt, tiny_ckpt_b, monkeypatch,
                                                                   fake_sampling, capsys):
    d, prompts, _ = files
    monkeypatch.chdir(tiny_ckpt.parent)
    rel = os.path.relpath(tiny_ckpt)
    out = str(d / "compare.jsonl")
    assert _run(monkeypatch, ["--compare", rel, str(tiny_ckpt_b), "--prompts", str(prompts), "--out", out],
                _judge_first) == 0
    monkeypatch.chdir(d)
    (d / "b-link").symlink_to(tiny_ckpt_b)
    assert _run(monkeypatch, ["--compare", str(tiny_ckpt) + "/", "b-link", "--prompts", str(prompts), "--out", out],
                _judge_first) == 0
    assert "2 of 4 judgements in" in capsys.readouterr().out
    assert [r["models"] for r in read_rows(Path(out))] == [[str(tiny_ckpt), str(tiny_ckpt_b)],
                                                          [str(tiny_ckpt), str(d / "b-link")]]


def test_compare_refuses_one_checkpoint_twice_and_names_a_swap(files, tiny_ckpt, tiny_ckpt_b, monkeypatch,
                                                               fake_sampling, capsys):
    d, prompts, _ = files
    (d / "same").symlink_to(tiny_ckpt)
    err = _mistake(capsys, ["--compare", str(tiny_ckpt), str(d / "same"), "--prompts", str(prompts), "--port", "0"])
    assert f"both are the checkpoint {tiny_ckpt}; compare two different ones" in err
    assert fake_sampling == []
    out = str(d / "compare.jsonl")
    assert _run(monkeypatch, ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts), "--out", out],
                _judge_first) == 0
    capsys.readouterr()
    err = _mistake(capsys, ["--compare", str(tiny_ckpt_b), str(tiny_ckpt), "--prompts", str(prompts), "--out", out,
                            "--port", "0"])
    assert (f"compare.jsonl:1: models: A and B are swapped: this --out compares A = {tiny_ckpt} and "
            f"B = {tiny_ckpt_b}") in err
    third = d / "a-much-longer-directory-name-so-that-the-paths-do-not-fit-in-sixty-characters" / "ckpt"
    shutil.copytree(tiny_ckpt, third)
    err = _mistake(capsys, ["--compare", str(tiny_ckpt), str(third), "--prompts", str(prompts), "--out", out,
                            "--port", "0"])
    assert f"compare.jsonl:1: models: B was {tiny_ckpt_b}, this run has B = {third}" in err


def test_a_rerun_with_another_k_says_judged_prompts_keep_theirs(files, tiny_ckpt, monkeypatch, fake_sampling, capsys):
    d, prompts, _ = files
    out = str(d / "labels.jsonl")
    argv = ["--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--out", out]
    assert _run(monkeypatch, [*argv, "--k", "2"], _judge_first) == 0
    printed = capsys.readouterr().out
    assert "(1 session)" in printed  # not "1 sessions"
    assert _run(monkeypatch, [*argv, "--k", "3"], _judge_first) == 0
    printed = capsys.readouterr().out
    assert "--k 3: 1 of 4 prompts was judged by an earlier run on 2 responses and keeps them" in printed
    # the line says what is served: not "4 prompts x 3 responses" when one keeps 2
    assert f"rank: 4 prompts: 1 with 2 responses, 3 with 3 from {tiny_ckpt} (stage pretrain); 1 of 4 judgements" \
        in printed
    assert "2 of 4 judgements in" in printed and "(2 sessions)" in printed
    assert [len(r["responses"]) for r in read_rows(Path(out))] == [2, 3]
    assert [c["n"] for c in fake_sampling] == [2, 3] and len(fake_sampling[1]["prompts"]) == 3


def test_agreement_reads_gzip_and_conversations(tmp_path, capsys):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Lima?"}]
    rows = [{"prompt": chat, "responses": ["a", "b", "c"], "ranking": r, "annotator": who}
            for r, who in (([0, 1, 2], "ann-one-1"), ([1, 0, 2], "ann-two-2"))]
    gz = tmp_path / "labels.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert main(["label", "--agreement", str(gz)]) == 0
    assert f"pairwise agreement {2 / 3:.3f} over 3 response pairs" in capsys.readouterr().out


# ---- --compare's result file: checked up front, derived, never a failed judgement ----

def test_a_result_path_label_did_not_write_is_refused_untouched(files, tiny_ckpt, tiny_ckpt_b, capsys, no_sampling):
    d, prompts, _ = files
    argv = ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts), "--out", str(d / "c.jsonl"),
            "--port", "0"]
    (d / "c.result.json").mkdir()
    assert f"--compare result {d / 'c.result.json'} (beside --out): is a directory" in _mistake(capsys, argv)
    (d / "c.result.json").rmdir()
    for text in ("my notes\n", '{"win_rate_a": 0.5}\n', "[1, 2]\n", "\xff"):
        (d / "c.result.json").write_text(text, encoding="latin-1")
        assert "not a result `label --compare` wrote" in _mistake(capsys, argv)
        assert (d / "c.result.json").read_text(encoding="latin-1") == text
    other = {"model_a": "/runs/x/sft", "model_b": "/runs/x/ppo", "judgements": 0, "a_wins": 0, "b_wins": 0,
             "ties": 0, "skipped": 0, "win_rate_a": None, "ci95": None}
    _write(d / "c.result.json", [other])
    assert (f"the result of another comparison: A was /runs/x/sft, this run has A = {tiny_ckpt}, B was /runs/x/ppo, "
            f"this run has B = {tiny_ckpt_b}; move it away") in _mistake(capsys, argv)
    assert not (d / "c.jsonl").exists()


def test_a_result_that_cannot_be_written_is_reported_once_and_judging_goes_on(files, tiny_ckpt, tiny_ckpt_b,
                                                                            monkeypatch, fake_sampling, capsys):
    d, prompts, _ = files
    out, res = d / "c.jsonl", d / "c.result.json"
    argv = ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts), "--out", str(out)]
    views = []

    def act(c):
        res.mkdir()  # after the checks: the result cannot be renamed into place
        view = c.next()
        for _ in range(2):
            status, view = c.post("/api/judge", {"item": view["item"]["id"], "ranking": [0, 1], "ties": [False]})
            assert status == 200, view  # the row is on disk: the judgement succeeded
            views.append(view)
    assert _run(monkeypatch, argv, act) == 0
    assert [v["item"]["id"] for v in views] == [1, 2]  # the session moved on
    assert [r["item"] for r in read_rows(out)] == [0, 1]
    assert res.is_dir() and not list(d.glob(".*"))  # no .c.result.json.tmp left
    printed = capsys.readouterr()
    assert printed.err.count("could not write the result") == 1, printed.err
    assert "written to" not in printed.out and f"could not write {res}: Is a directory" in printed.out
    # the result is derived from the rows: once it can be written, a rerun writes it at stop
    res.rmdir()
    assert _run(monkeypatch, argv) == 0
    assert f"written to {res}" in capsys.readouterr().out
    rows = read_rows(out)
    wins = sum(r["winner"] == "A" for r in rows)
    assert json.loads(res.read_text()) == {
        "model_a": str(tiny_ckpt), "model_b": str(tiny_ckpt_b), "judgements": 2, "a_wins": wins,
        "b_wins": 2 - wins, "ties": 0, "skipped": 0, "win_rate_a": wins / 2,
        "ci95": win_rate(rows)["ci95"]}  # Wilson's interval: tests/label/test_stats.py checks it


def test_a_compare_run_without_a_judgement_claims_no_result_file(files, tiny_ckpt, tiny_ckpt_b, monkeypatch,
                                                                fake_sampling, capsys):
    d, prompts, _ = files
    assert _run(monkeypatch, ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts),
                              "--out", str(d / "c.jsonl")], lambda c: c.next()) == 0
    printed = capsys.readouterr().out
    assert "no judgements yet; nothing judged, no result file written" in printed and "written to" not in printed
    assert not (d / "c.result.json").exists() and not (d / "c.jsonl").exists()


def test_ranking_rows_record_their_checkpoint_and_another_one_cannot_continue_them(files, tiny_ckpt, tiny_ckpt_b,
                                                                                    monkeypatch, fake_sampling, capsys):
    d, prompts, responses = files
    out = d / "labels.jsonl"
    (d / "link").symlink_to(tiny_ckpt)
    argv = ["--prompts", str(prompts), "--out", str(out)]
    assert _run(monkeypatch, ["--ckpt", str(d / "link"), *argv], _judge_first) == 0
    assert [(r["model"], r["stage"]) for r in read_rows(out)] == [(str(tiny_ckpt), "pretrain")]
    assert _run(monkeypatch, ["--ckpt", str(tiny_ckpt) + "/", *argv], _judge_first) == 0  # the same, spelt another way
    assert len(read_rows(out)) == 2
    before = out.read_bytes()
    capsys.readouterr()
    err = _mistake(capsys, ["--ckpt", str(tiny_ckpt_b), *argv, "--port", "0"])
    assert (f"labels.jsonl:1: model: the responses were sampled from {tiny_ckpt}, this run samples from "
            f"{tiny_ckpt_b}; continuing would mix two policies' responses") in err
    # the same directory, trained again into another stage
    meta = json.loads((tiny_ckpt_b / "config.json").read_text())
    retrained = d / "retrained"
    shutil.copytree(tiny_ckpt_b, retrained)
    _write(d / "first.jsonl", [{**read_rows(out)[0], "model": str(retrained)}])
    (retrained / "config.json").write_text(json.dumps({**meta, "stage": "sft"}))
    err = _mistake(capsys, ["--ckpt", str(retrained), *argv[:2], "--out", str(d / "first.jsonl"), "--port", "0"])
    assert f'first.jsonl:1: stage: {retrained} was stage "pretrain" when the responses were sampled, it is stage "sft"' \
        in err
    # rows of --responses continued with --ckpt
    assert _run(monkeypatch, ["--responses", str(responses), "--out", str(d / "r.jsonl")], _judge_first) == 0
    assert "model" not in read_rows(d / "r.jsonl")[0]
    err = _mistake(capsys, ["--ckpt", str(tiny_ckpt), *argv[:2], "--out", str(d / "r.jsonl"), "--port", "0"])
    assert "r.jsonl:1: model: missing: the rows are of --responses or of an older `label`" in err
    assert out.read_bytes() == before and len(fake_sampling) == 2


# ---- options a mode would ignore, an --out that names no file, a stop before serving ----

@pytest.mark.parametrize("option", [["--temperature", "0.5"], ["--temperature", "1.0"], ["--max-new-tokens", "8"],
                                    ["--device", "cpu"], ["--device", "auto"], ["--batch-size", "4"]])
def test_sampling_options_with_responses_are_refused(files, capsys, option):
    """--responses are sampled already: a sampling option given with them (even at its default
    value) would be ignored, so it is refused, as --k is."""
    d, _, responses = files
    err = _mistake(capsys, ["--responses", str(responses), "--out", str(d / "l.jsonl"), "--port", "0", *option])
    assert f"error: {option[0]}: sampling options, for --ckpt or --compare" in err
    assert not (d / "l.jsonl").exists()


def test_seed_and_overlap_still_go_with_responses(files, monkeypatch):
    d, _, responses = files
    assert _run(monkeypatch, ["--responses", str(responses), "--seed", "3", "--overlap", "0.5", "--out",
                              str(d / "l.jsonl")], _judge_first) == 0
    assert len(read_rows(d / "l.jsonl")) == 1


@pytest.mark.parametrize("options", [["--out", "x.jsonl"], ["--port", "0"], ["--port", "8765"], ["--overlap", "0.5"],
                                     ["--host", "0.0.0.0"], ["--seed", "1"], ["--temperature", "0"],
                                     ["--batch-size", "2"], ["--max-new-tokens", "3"], ["--device", "cpu"],
                                     ["--out", "x.jsonl", "--port", "0"]])
def test_agreement_refuses_the_options_it_would_ignore(tmp_path, capsys, options):
    labels = _write(tmp_path / "labels.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": r,
                                                 "annotator": who} for r, who in (([0, 1], "ann-one-1"),
                                                                                  ([1, 0], "ann-two-2"))])
    err = _mistake(capsys, ["--agreement", str(labels), *options])
    named = ", ".join(o for o in options if o.startswith("--"))
    assert f"error: {named}: not used by --agreement" in err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("out", ["", "newdir/", "q.jsonl/", ".", "sub/..", "newdir/."])
def test_an_out_that_names_no_file_is_refused(files, tiny_ckpt, tiny_ckpt_b, capsys, monkeypatch, no_sampling, out):
    """pathlib reads `q.jsonl/` as `q.jsonl` and "" fell back to the default: a path that names a
    directory by its spelling, or none, is refused before anything is read or written."""
    d, prompts, responses = files
    monkeypatch.chdir(d)
    before = sorted(os.listdir(d))
    compare = ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts)]
    for argv, default in ((["--responses", str(responses)], "labels.jsonl"), (compare, "compare.jsonl")):
        err = _mistake(capsys, [*argv, "--out", out, "--port", "0"])
        if out:
            assert f"error: --out {out}: names a directory" in err and os.path.join(out, default) in err
        else:
            assert f'error: --out "": an empty path; give a file (or leave --out out for {default})' == err
    assert sorted(os.listdir(d)) == before


def test_an_undo_after_a_complete_comparison_is_refused_also_after_a_restart(files, tiny_ckpt, tiny_ckpt_b,
                                                                             monkeypatch, fake_sampling):
    """The tester's run: every prompt judged, the win rate shown, then an undo (the page's
    button or U) to judge again knowing the score. Refused; neither file changes."""
    d, prompts, _ = files
    out, res = d / "c.jsonl", d / "c.result.json"
    argv = ["--compare", str(tiny_ckpt), str(tiny_ckpt_b), "--prompts", str(prompts), "--out", str(out)]
    sessions = []

    def judge_all_then_undo(c):
        view = c.next()
        while view["item"]:
            status, view = c.post("/api/judge", {"item": view["item"]["id"], "ranking": [0, 1], "ties": [False]})
            assert status == 200, view
        assert view["result"]["judgements"] == 4 and view["can_undo"] is False
        before = (out.read_bytes(), res.read_bytes())
        status, err = c.post("/api/undo")
        assert status == 400 and "judgements are final" in err["error"]
        assert (out.read_bytes(), res.read_bytes()) == before
        sessions.append(c.session)
    assert _run(monkeypatch, argv, judge_all_then_undo) == 0
    before = (out.read_bytes(), res.read_bytes())

    def after_a_restart(c):
        c.session = sessions[0]
        view = c.next()
        assert view["item"] is None and view["can_undo"] is False and view["result"]["judgements"] == 4
        assert c.post("/api/undo")[0] == 400
    assert _run(monkeypatch, argv, after_a_restart) == 0
    assert (out.read_bytes(), res.read_bytes()) == before


def _save_again(ckpt: Path) -> str:
    """Train `ckpt` again in place as a stage does (same path, same stage, new weights): the new
    save id, read from its config.json."""
    import torch

    from minirlhf import checkpoint

    meta = json.loads((ckpt / "config.json").read_text())
    model = checkpoint.load_model_from(ckpt)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    checkpoint.save(ckpt, stage=meta["stage"], model=model, tokenizer=checkpoint.load_tokenizer(ckpt),
                    step=meta["step"] + 1, finished=True)
    now = json.loads((ckpt / "config.json").read_text())
    assert now["stage"] == meta["stage"] and now["save_id"] != meta["save_id"]
    return now["save_id"]


def test_a_checkpoint_saved_again_in_place_cannot_continue_its_rows(files, tiny_ckpt, monkeypatch, fake_sampling,
                                                                    capsys):
    d, prompts, _ = files
    ck = Path(shutil.copytree(tiny_ckpt, d / "run" / "sft"))
    first = json.loads((ck / "config.json").read_text())["save_id"]
    out = d / "labels.jsonl"
    argv = ["--ckpt", str(ck), "--prompts", str(prompts), "--out", str(out)]
    assert _run(monkeypatch, argv, _judge_first) == 0
    assert _run(monkeypatch, argv, _judge_first) == 0  # the same save: continues
    assert [r["model_save_id"] for r in read_rows(out)] == [first, first]
    now = _save_again(ck)
    before = out.read_bytes()
    capsys.readouterr()
    err = _mistake(capsys, [*argv, "--port", "0"])
    assert (f'labels.jsonl:1: model_save_id: {ck} was saved again since the responses were sampled (save id '
            f'"{first}" then, "{now}" now): it holds other weights; continuing would mix two policies\' responses'
            in err)
    assert out.read_bytes() == before and len(fake_sampling) == 2
    # rows of a `label` from before save ids continue as before (nothing to compare them with)
    _write(out, [{k: v for k, v in r.items() if k != "model_save_id"} for r in read_rows(out)])
    assert _run(monkeypatch, argv, _judge_first) == 0
    assert [r.get("model_save_id") for r in read_rows(out)] == [None, None, now]


def test_compare_refuses_a_checkpoint_saved_again_in_place(files, tiny_ckpt, tiny_ckpt_b, monkeypatch, fake_sampling,
                                                           capsys):
    d, prompts, _ = files
    a, b = (Path(shutil.copytree(c, d / name / "sft")) for c, name in ((tiny_ckpt, "a"), (tiny_ckpt_b, "b")))
    ids = [json.loads((c / "config.json").read_text())["save_id"] for c in (a, b)]
    out = d / "compare.jsonl"
    argv = ["--compare", str(a), str(b), "--prompts", str(prompts), "--out", str(out)]
    assert _run(monkeypatch, argv, _judge_first) == 0
    assert read_rows(out)[0]["model_save_ids"] == ids
    now = _save_again(b)
    capsys.readouterr()
    err = _mistake(capsys, [*argv, "--port", "0"])
    assert f'compare.jsonl:1: model_save_ids: B: {b} was saved again since the responses were sampled (save id ' \
           f'"{ids[1]}" then, "{now}" now)' in err
    assert len(fake_sampling) == 2  # A and B, once


def test_agreement_says_why_it_has_no_figure(tmp_path, capsys):
    """The tester's three files: every shared prompt tied by one annotator (no figure, and why),
    an annotator that is a number, and shared prompts that were skipped."""
    resp = ["a", "b", "c"]
    tied = [{"prompt": f"p{i}", "responses": resp, "ratings": [5, 5, 5], "annotator": f"ann-tied-{i}"}
            for i in range(3)]
    strict = [{"prompt": f"p{i}", "responses": resp, "ranking": [0, 1, 2], "annotator": "ann-strict"}
              for i in range(3)]
    ovtie = _write(tmp_path / "ovtie.jsonl", tied + strict)
    assert main(["label", "--agreement", str(ovtie)]) == 0
    printed = capsys.readouterr().out
    # 3 prompts x C(3, 2) pairs, each tied by the annotator who tied all three responses
    assert f"{ovtie}: 3 prompts judged by two or more annotators (4 annotators)" in printed
    assert "no pairwise agreement: each of the 9 response pairs that two annotators judged was tied by one or both" \
        in printed
    assert "no Kendall's tau-b: on every shared prompt one annotator or both tied all the responses" in printed

    number = _write(tmp_path / "number.jsonl", [{**strict[0], "annotator": 5}])
    err = _mistake(capsys, ["--agreement", str(number)])
    assert err == f"error: {number}:1: annotator: expected a string, got number 5"

    def skip(row, who):
        return {"prompt": row["prompt"], "responses": resp, "ratings": [4, 4, 4], "skipped": True, "annotator": who}
    # p0: judged by one, skipped by another; p1: skipped by both
    skipped = _write(tmp_path / "skipped.jsonl", [strict[0], skip(strict[0], "x-2"), skip(strict[1], "x-3"),
                                                  skip(strict[1], "x-4")])
    err = _mistake(capsys, ["--agreement", str(skipped)])
    assert (f"error: {skipped}: no prompt was judged by two annotators: the 2 prompts shown to two or more were "
            f"skipped by all of them or all but one (a skip carries no ordering)") == err


SLOW_SAMPLING = """
import sys, time
from minirlhf.label import sampling
def sample(*a, **kw):
    print("[test] sampling", flush=True)
    time.sleep(120)
sampling.sample = sample
from minirlhf.cli import main
sys.exit(main(["label", *sys.argv[1:]]))
"""


@pytest.mark.slow  # a subprocess: a few seconds
@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_while_sampling_says_so_writes_nothing_and_exits_128_plus_the_signal(files, tiny_ckpt, sig, code,
                                                                                      name):
    """Ctrl-C or `kill` while the responses are sampled: one line saying so, --out as it was (a
    new one not created, an earlier run's rows untouched), exit 130 / 143 as a shell reports a
    command a signal ended. (Stopping the server once it serves is the ordinary stop: exit 0.)"""
    d, prompts, _ = files
    out = d / "labels.jsonl"
    if sig == signal.SIGTERM:  # an earlier run's row, of this checkpoint: the other prompts are sampled
        meta = json.loads((tiny_ckpt / "config.json").read_text())
        _write(out, [{"prompt": PROMPTS[0], "responses": ["x", "y"], "ranking": [0, 1], "model": str(tiny_ckpt),
                      "stage": meta["stage"], "model_save_id": meta["save_id"], "item": 0, "annotator": "ann-one-1",
                      "shown": [1, 0]}])
    before = out.read_bytes() if out.exists() else None
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAMPLING, "--ckpt", str(tiny_ckpt), "--prompts", str(prompts),
                             "--max-new-tokens", "8", "--port", "0", "--out", str(out)], cwd=d,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith("[test] sampling"):
                break
        else:
            raise AssertionError(f"never sampled: {proc.communicate()}")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == \
        [f"interrupted ({name}): sampling was stopped; nothing was written to {out}"]
    assert (out.read_bytes() if out.exists() else None) == before
