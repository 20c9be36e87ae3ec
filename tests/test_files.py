"""minirlhf/files.py: JSON written whole or not at all, and read with one line naming the file."""
import json
import os

import pytest

from minirlhf import files


def test_write_json_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json(path, {"a": 1})
    files.write_json(path, {"b": [1.5, "é"]}, indent=2, sort_keys=True)
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": [1.5, "é"]}
    assert path.read_text() == json.dumps({"b": [1.5, "é"]}, indent=2, sort_keys=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_an_object_json_cannot_hold_leaves_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    files.write_json(path, {"kept": True})
    with pytest.raises(TypeError):
        files.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "wall_times.json"
    files.write_json(path, {"sft": 1.0})

    def refuse(self, target):  # as on a full disk or a read-only mount at the last step
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(path), "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        files.write_json(path, {"sft": 2.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"sft": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wall_times.json"]


def test_the_text_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    path, synced = tmp_path / "keys.json", []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    files.write_json(path, {"k": 1})
    assert synced == [str(tmp_path / "keys.json.tmp"), str(tmp_path)]  # the temp file, then the directory


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1,\n"b": }', r"x\.json: line 2: Expecting value"),
    (b'\xff\xfe{}', r"x\.json: not UTF-8 text"),
    (b"[1, 2]", r"x\.json: expected a JSON object, got list"),
])
def test_read_json_object_says_what_is_wrong_in_one_line(tmp_path, content, message):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        files.read_json_object(tmp_path / "x.json")


def test_an_unreadable_path_is_one_line_too(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.json: cannot read it \(No such file or directory\)"):
        files.read_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r": cannot read it \(Is a directory\)"):
        files.read_json(tmp_path)


def test_a_second_process_on_a_locked_directory_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys
    import textwrap

    first = files.DirLock(tmp_path, "--out")
    first.acquire()
    try:  # another process (flock is per open file: the kernel, not this module, decides)
        code = textwrap.dedent(f"""
            from minirlhf.files import DirLock
            try:
                DirLock({str(tmp_path)!r}).acquire()
            except ValueError as e:
                print(e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == (f"--out {tmp_path}: another minirlhf process (pid {os.getpid()}) is writing there; "
                               f"wait for it to finish, or use another --out")
    finally:
        first.release()
    again = files.DirLock(tmp_path)  # released: free again
    again.acquire()
    again.release()


def test_train_and_experiment_refuse_an_out_another_run_holds(tmp_path, capsys):
    from minirlhf.cli import main

    for argv, out in ((["train", "--preset", "tiny"], tmp_path / "run"),
                      (["experiment", "ptx", "--smoke"], tmp_path / "exp")):
        out.mkdir()
        held = files.DirLock(out)
        held.acquire()
        try:
            assert main([*argv, "--out", str(out)]) == 2
        finally:
            held.release()
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --out {out}: another minirlhf process (pid {os.getpid()}) is writing there; "
                       f"wait for it to finish, or use another --out"]
        assert not (out / "config.json").exists() and not (out / "pretrain").exists()
