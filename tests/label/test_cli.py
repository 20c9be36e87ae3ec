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
    capsys.readouterr()
    assert _run(monkeypatch, [*argv, "--k", "3"], _judge_first) == 0
    printed = capsys.readouterr().out
    assert "--k 3: 1 of 4 prompts were judged by an earlier run on 2 responses and keep them" in printed
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
