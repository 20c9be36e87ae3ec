"""Damaged or misplaced files in a run directory, and data options naming something that is not a
file: a one-line error naming the path (or, for the torn last line a killed run leaves in
metrics.jsonl, a note and on we go), never a traceback or a hang."""
import json
import os
import shutil
import signal

import pytest

from minirlhf import files
from minirlhf.cli import main
from minirlhf.metrics import METRICS_FILE, Metrics, read_metrics, stage_history
from minirlhf.pipeline import RUN_DIRS, RUN_FILES, _read_wall, check_run_files

ROWS = [{"stage": "ppo", "step": 0, "event": "start"}, {"stage": "ppo", "step": 1, "reward": 0.5},
        {"stage": "ppo", "step": 2, "reward": 0.25}]


def _write_rows(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if "it/s" not in line and line.strip()]


# ---------------------------------------------------------------- metrics.jsonl
@pytest.mark.parametrize("tail", [b'{"stage": "ppo", "st', b"{", b'{"stage": "ppo", "step": 3, "time": 1.5, "rew'])
def test_a_torn_last_line_is_dropped_once_and_the_next_row_starts_on_its_own_line(tmp_path, capsys, tail):
    path = tmp_path / METRICS_FILE
    _write_rows(path)
    with open(path, "ab") as f:
        f.write(tail)  # what a kill mid-write leaves
    assert read_metrics(tmp_path) == ROWS
    assert stage_history(tmp_path, "ppo") == ROWS[1:]
    err = _err_lines(capsys)
    assert err == [f"[metrics] note: {path}: dropped its torn last line ({len(tail)} bytes without a newline, "
                   f"what a run killed mid-write leaves)"]
    Metrics(tmp_path).log("ppo", 2, event="start")  # a resumed stage's first row
    Metrics(tmp_path).log("ppo", 3, reward=1.0)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["step"] for x in lines[:-1]] == [0, 1, 2, 2, 3]
    assert [(r["step"], r.get("reward")) for r in stage_history(tmp_path, "ppo")] == [(1, 0.5), (2, 0.25), (3, 1.0)]
    assert _err_lines(capsys) == []  # said once per file


def test_a_whole_last_row_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + json.dumps(ROWS[2]))
    assert read_metrics(tmp_path) == ROWS
    Metrics(tmp_path).log("rm", 1, loss=0.5)
    assert [r["stage"] for r in read_metrics(tmp_path)] == ["ppo", "ppo", "ppo", "rm"]


@pytest.mark.parametrize("content, message", [
    (b'{"stage": "ppo", "step": 1}\n{"stage": "ppo", "st\n{"stage": "ppo", "step": 2}\n',
     ":2: Unterminated string starting at column 18"),  # a torn line in the middle is damage
    (b'{"stage": "ppo", "step": 1}\n\xd5\x01\xff\n', ":2: not UTF-8 text"),
    (b'\xd5\x01\xff\x00garbage', ":1: not UTF-8 text"),  # no newline, but not a row of ours cut short
    (b'{"stage": "ppo", "step": 1}\n[1, 2]\n', ':2: expected a JSON object with "stage" (a string) and "step"'),
    (b'{"stage": "ppo", "step": "1"}\n', ':1: expected a JSON object with "stage"'),
    (b'{"stage": "ppo", "step": 1}\n' + b'[' * 100000 + b'\n', ":2: nested too deeply"),
])
def test_other_damage_is_one_line_naming_file_and_line(tmp_path, content, message):
    (tmp_path / METRICS_FILE).write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_metrics(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / METRICS_FILE}{message}") and "\n" not in str(e.value)
    if not content.endswith(b"\n"):  # the writer neither cuts it off nor appends to it
        with pytest.raises(ValueError, match=f"^{tmp_path / METRICS_FILE}{message}"):
            Metrics(tmp_path).log("ppo", 1)
        assert (tmp_path / METRICS_FILE).read_bytes() == content


def test_a_metrics_path_that_is_not_a_file_is_refused_unread(tmp_path):
    (tmp_path / METRICS_FILE).mkdir()
    message = f"{tmp_path / METRICS_FILE}: a directory, not the metrics file (JSON lines); move it away"
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="a directory, not the metrics file"):
        Metrics(tmp_path).log("ppo", 1)
    os.rmdir(tmp_path / METRICS_FILE)
    os.mkfifo(tmp_path / METRICS_FILE)  # would hang a reader with no writer
    with pytest.raises(ValueError, match=r"a FIFO \(named pipe\), not the metrics file"):
        read_metrics(tmp_path)


def test_train_on_a_finished_run_with_a_torn_metrics_line_reports(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    with open(run / METRICS_FILE, "ab") as f:
        f.write(b'{"stage": "ppo", "st')
    assert main(["train", "--preset", "tiny", "--out", str(run)]) == 0
    err = _err_lines(capsys)
    assert [line for line in err if "metrics" in line] == [
        f"[metrics] note: {run / METRICS_FILE}: dropped its torn last line (20 bytes without a newline, what a run "
        f"killed mid-write leaves)"]
    assert json.loads((run / "summary.json").read_text())["monitor_warnings"] is not None


# ---------------------------------------------------------------- wall_times.json
@pytest.mark.parametrize("content, message", [
    ("[\n", ": line 2: Expecting value at column 1"),
    ("[1]", ": expected a JSON object, got list"),
    ('{"pretrain": "3.5"}', ': pretrain: expected a number of seconds, got "3.5"'),
    ('{"pretrain": true}', ": pretrain: expected a number of seconds, got true"),
])
def test_wall_times_are_read_with_a_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "wall_times.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        _read_wall(path)
    assert str(e.value) == f"{path}{message}"
    path.write_text('{"pretrain": 3.5, "sft": 2}')
    assert _read_wall(path) == {"pretrain": 3.5, "sft": 2}
    assert _read_wall(tmp_path / "none.json") == {}


def test_train_names_a_corrupt_wall_times_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wall_times.json").write_text("[\n")
    (run / METRICS_FILE).write_text("")  # a run directory (cli.check_run_dir)
    assert main(["train", "--preset", "tiny", "--out", str(run)]) == 2
    assert _err_lines(capsys)[-1] == f"error: {run / 'wall_times.json'}: line 2: Expecting value at column 1"
    assert not (run / "pretrain").exists()


# ---------------------------------------------------------------- the run directory's own names
@pytest.mark.parametrize("name", [*RUN_DIRS, "pretrain.old", "ppo.tmp"])
def test_a_file_where_a_stage_checkpoint_goes_is_refused(tmp_path, name):
    (tmp_path / name).write_text("x\n")  # `echo x > runs/cz/pretrain`
    with pytest.raises(ValueError) as e:
        check_run_files(tmp_path)
    assert str(e.value) == (f"{tmp_path / name}: a regular file, where this run writes a directory (a stage's "
                            f"checkpoint); move it away or use another --out")
    assert (tmp_path / name).read_text() == "x\n"  # left as it was


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_directory_or_fifo_where_a_run_file_goes_is_refused(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=f"^{tmp_path / name}: a directory, where this run writes a file; move it "
                                         f"away or use another --out$"):
        check_run_files(tmp_path)
    (tmp_path / name).rmdir()
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match=r": a FIFO \(named pipe\), where this run writes a file"):
        check_run_files(tmp_path, "--out")


def test_a_run_directory_of_the_right_kinds_passes(tiny_run, tmp_path):
    check_run_files(tiny_run[0])
    check_run_files(tmp_path / "not-made-yet")
    (tmp_path / "sft").symlink_to(tiny_run[0] / "sft")  # a link counts as what it points to
    (tmp_path / "notes.txt").mkdir()  # names the run does not write are the user's business
    check_run_files(tmp_path)
    (tmp_path / "rm").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"/rm: a symbolic link to nothing, where this run writes a directory"):
        check_run_files(tmp_path)


# ---------------------------------------------------------------- the lock file
def _lock_line(d, kind):
    return (f"--out {d}: {d / files.LOCK_FILE} is {kind}, not the lock file minirlhf keeps there; move it away, "
            f"or use another --out")


@pytest.mark.parametrize("make, kind", [
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: p.symlink_to(p), "a symbolic link"),  # a loop: `Too many levels of symbolic links` before
    (lambda p: p.symlink_to(p.with_name("elsewhere")), "a symbolic link"),
    (os.mkfifo, "a FIFO (named pipe)"),
])
def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path, make, kind):
    make(tmp_path / files.LOCK_FILE)
    lock = files.DirLock(tmp_path)
    with pytest.raises(ValueError) as e:
        lock.acquire()
    assert str(e.value) == _lock_line(tmp_path, kind)
    with pytest.raises(ValueError) as e:
        check_run_files(tmp_path)  # the same line, from the check before any compute
    assert str(e.value) == _lock_line(tmp_path, kind)
    assert not (tmp_path / "elsewhere").exists()


def test_train_refuses_a_lock_directory_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / files.LOCK_FILE).mkdir(parents=True)
    assert main(["train", "--preset", "tiny", "--out", str(run)]) == 2
    assert _err_lines(capsys) == ["error: " + _lock_line(run, "a directory")]


# ---------------------------------------------------------------- an OSError escaping a command
def test_an_os_error_escaping_a_command_is_one_line_naming_the_path(tmp_path, capsys):
    out = tmp_path / "data"
    (out / "sft.jsonl").mkdir(parents=True)  # write_jsonl's rename onto it fails
    assert main(["data", "export", str(out), "--preset", "tiny"]) == 1
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith(f" -> {out / 'sft.jsonl'}: Is a directory")


def test_keyboard_interrupt_and_value_error_keep_their_handling(monkeypatch, capsys):
    from minirlhf import cli

    for exc, code, line in ((KeyboardInterrupt(), 130, "interrupted: finished stages are kept"),
                            (ValueError("x.jsonl:3: prompt: missing"), 2, "error: x.jsonl:3: prompt: missing"),
                            (PermissionError(13, "Permission denied", "/a/b"), 1, "error: /a/b: Permission denied"),
                            (OSError(28, "No space left on device"), 1, "error: No space left on device")):
        def boom(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "cmd_data", boom)
        assert main(["data", "export", "somewhere"]) == code
        assert line in capsys.readouterr().err


# ---------------------------------------------------------------- --data.* options naming a FIFO or a device
class _Hung(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hung("the reader hung")


@pytest.mark.parametrize("option", ["corpus", "corpus_heldout", "sft", "rm_prompts", "ppo_prompts", "eval_prompts",
                                    "preferences"])
def test_a_data_option_naming_a_fifo_is_refused_not_waited_on(tmp_path, capsys, option):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)  # no writer: opening it for reading would wait for ever
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), f"--data.{option}", str(fifo)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 2
    assert _err_lines(capsys) == [f"error: {fifo}:0: file: a FIFO (named pipe), not a regular file; give a file"]
    assert not (tmp_path / "run" / "pretrain").exists()


def test_a_data_file_that_is_a_device_or_directory_is_refused(tmp_path):
    from minirlhf.data import read_prompts

    with pytest.raises(ValueError, match=r"^/dev/null:0: file: a character device, not a regular file; give a file$"):
        read_prompts("/dev/null")
    with pytest.raises(ValueError, match=r":0: file: a directory, not a regular file; give a file$"):
        read_prompts(tmp_path)
