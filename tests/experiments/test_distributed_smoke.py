"""`experiment` under torchrun (2 processes, gloo, one thread each), against one process.

The cheapest set that takes every path that writes an experiment's files: `iterate` (round 2
links round 1's finished stages, its new rankings are sampled over the ranks and merged with
round 1's, both arms' arm.json and the report), then `best-of-n` (its one arm links every
stage of iterate's round 1; the best-of-n pools are sampled over the ranks and gathered),
then `iterate` again (every arm reused). Each launch runs this file as the script under
torchrun: the CLI, with a Python audit hook on every process that logs each file it opens
for writing, renames or hard-links under the experiments' directory (sys.addaudithook, PEP
578: the events `open`, `os.rename` — os.replace's too — and `os.link`). So the tests read,
rather than assume, that rank 1 writes nothing and rank 0 writes each bookkeeping file once.
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT


def _trace_writes(root: Path, log_path: Path) -> None:
    """Log to log_path each write, rename target and hard-link target of this process under root,
    one JSON line {"op", "path" (relative to root)} each."""
    root = str(root.resolve())
    log = open(log_path, "a", buffering=1)  # opened before the hook: its own writes are not events

    def rel(p):
        if isinstance(p, int) or p is None:
            return None
        p = os.path.abspath(os.fsdecode(os.fspath(p)))
        return os.path.relpath(p, root) if p.startswith(root + os.sep) else None

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            op, target = ("write" if writing else None), path
        elif event in ("os.rename", "os.link"):
            op, target = event[3:], args[1]
        else:
            return
        where = rel(target) if op else None
        if where is not None:
            log.write(json.dumps({"op": op, "path": where}) + "\n")

    sys.addaudithook(hook)


def _launch(root: Path, traces: Path, *args: str):
    """`torchrun --nproc_per_node 2 THIS_FILE experiment ARGS --smoke --out root`, each rank's
    writes logged into traces/rank<r>.jsonl; returns (the launch's result, {rank: [events]})."""
    from tests.distributed.launch import torchrun

    traces.mkdir(parents=True)
    r = torchrun(Path(__file__), "experiment", *args, "--smoke", "--out", root,
                 env={"TRACE_ROOT": str(root), "TRACE_DIR": str(traces)})
    events = {}
    for rank in (0, 1):
        path = traces / f"rank{rank}.jsonl"
        events[rank] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None
    return r, events


def _linked(events: list[dict]) -> dict[str, set[str]]:
    """arm directory -> the stage outputs hard-linked into it (built under NAME.linking, then renamed)."""
    out: dict[str, set[str]] = {}
    for e in events:
        if e["op"] == "link":
            parts = e["path"].split("/")
            out.setdefault("/".join(parts[:3]), set()).add(parts[3].removesuffix(".linking"))
    return out


def _writes(events: list[dict], path: str) -> int:
    """How many times the file at path was written: opened for writing itself, or renamed onto."""
    return sum(1 for e in events if e["path"] == path and e["op"] in ("write", "rename"))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The three launches on 2 processes: {"root", "iterate", "best-of-n", "again": (result, events)},
    and "first": iterate's experiment.json as the first launch left it."""
    from tests.distributed.launch import ok

    root, traces = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("traces")
    out = {"root": root}
    out["iterate"] = _launch(root, traces / "iterate", "iterate")
    ok(out["iterate"][0])
    out["first"] = json.loads((root / "iterate" / "experiment.json").read_text())
    out["best-of-n"] = _launch(root, traces / "best-of-n", "best-of-n")
    ok(out["best-of-n"][0])
    out["again"] = _launch(root, traces / "again", "iterate")
    ok(out["again"][0])
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The same two experiments in one process (no torchrun): root."""
    from minirlhf.cli import main

    root = tmp_path_factory.mktemp("one")
    for name in ("iterate", "best-of-n"):
        assert main(["experiment", name, "--smoke", "--out", str(root)]) == 0
    return root


def test_rank_1_writes_nothing_and_rank_0_each_file_once(two):
    for launch in ("iterate", "best-of-n", "again"):
        r, events = two[launch]
        assert events[1] == [], (launch, events[1][:5])  # traced, and nothing under the experiments' root
        assert "[dist] 2 processes (gloo)" in r.stdout
    _, first = two["iterate"]
    first = first[0]
    assert _writes(first, "iterate/experiment.json") == 1 and _writes(first, "iterate/experiment.md") == 1
    for arm in ("round1-s0", "round2-s0"):
        for name in ("arm.json", "config.json", "prefix.json"):
            assert _writes(first, f"iterate/arms/{arm}/{name}") == 1, (arm, name)
    merged = "iterate/arms/round2-s0/comparisons_rounds_1-2.jsonl"
    assert _writes(first, merged) == 1 and _writes(first, "iterate/arms/round2-s0/rankings_round2.jsonl") == 1
    # round 2 starts from round 1's base and SFT: hard links, made once
    assert _linked(first) == {"iterate/arms/round2-s0": {"pretrain", "sft"}}

    bon = two["best-of-n"][1][0]
    assert _writes(bon, "best-of-n/experiment.json") == 1
    assert _writes(bon, "best-of-n/arms/recipe-s0/best_of_n.json") == 1
    assert _writes(bon, "best-of-n/arms/recipe-s0/arm.json") == 1
    assert _linked(bon) == {"best-of-n/arms/recipe-s0": {"pretrain", "sft", "preferences.jsonl", "rm", "ppo"}}

    again = two["again"][1][0]
    assert _writes(again, "iterate/experiment.json") == 1
    assert not [e for e in again if e["path"].endswith(("arm.json", ".jsonl")) or e["op"] == "link"]


def test_a_second_launch_reuses_the_finished_arms(two):
    r, _ = two["again"]
    assert r.stdout.count("finished earlier, reused") == 2 and "running" not in r.stdout
    doc = json.loads((two["root"] / "iterate" / "experiment.json").read_text())
    assert all(a["reused"] for a in doc["arms"])
    assert [a["numbers"] for a in doc["arms"]] == [a["numbers"] for a in two["first"]["arms"]]
    assert doc["wall_s"] == two["first"]["wall_s"]


def _shape(x):
    """x with every number replaced by "number" (and strings by "str"): the structure of a document."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):  # a list of words (the monitor's warnings) as long as that run's
        return ["str"] if x and all(isinstance(v, str) for v in x) else [_shape(v) for v in x]
    if isinstance(x, bool) or x is None:
        return x
    return "number" if isinstance(x, (int, float)) else type(x).__name__


def _numbers(x):
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


@pytest.mark.parametrize("name", ["iterate", "best-of-n"])
def test_the_numbers_are_finite_and_shaped_as_in_one_process(two, one, name):
    doc2, doc1 = (json.loads((root / name / "experiment.json").read_text()) for root in (two["root"], one))
    assert doc2["processes"] == [2] and doc1["processes"] == [1]  # the process counts the arms ran under
    assert [a["processes"] for a in doc2["arms"]] == [2] * len(doc2["arms"])
    for doc in (doc1, doc2):
        doc["arms"] = [{**a, "reused": False} for a in doc["arms"]]  # iterate's second launch reused its arms
    assert _shape(doc2) == _shape(doc1)
    for doc in (doc1, doc2):
        assert all(math.isfinite(v) for v in _numbers(doc)), name
    if name == "iterate":  # what does not depend on the sampling: the counts, round 1's very rankings
        assert [a["numbers"]["comparisons"] for a in doc2["arms"]] == [a["numbers"]["comparisons"]
                                                                        for a in doc1["arms"]]
        rankings = [root / "iterate" / "arms" / "round1-s0" / "preferences.jsonl" for root in (two["root"], one)]
        assert rankings[0].read_bytes() == rankings[1].read_bytes()
    else:
        bon2, bon1 = (d["arms"][0]["numbers"] for d in (doc2, doc1))
        assert bon2["best_of_n_prompts"] == bon1["best_of_n_prompts"]
        assert [p["kl"] for p in bon2["best_of_n"]] == [p["kl"] for p in bon1["best_of_n"]]
        rm = [p["rm_mean"] for p in bon2["best_of_n"]]
        assert all(b >= a - 1e-6 for a, b in zip(rm, rm[1:]))  # the gathered pools: more samples, a higher best


def test_a_mistake_found_by_rank_0_ends_every_rank_in_one_line(two, tmp_path):
    """The arm's directory holds another configuration: rank 0 finds it (it alone reads the arm's
    files) and every rank stops with it, none waiting for the others."""
    r, events = _launch(two["root"], tmp_path / "traces", "iterate", "--ppo.kl_coef", "0.5")
    assert r.returncode != 0 and r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert "the arm's directory holds a run of another configuration (ppo.kl_coef: 0.3 there, 0.5 now)" in r.stderr
    assert events == {0: [], 1: []}  # found before anything was written


if __name__ == "__main__":  # one rank of a launch above: the CLI, its writes traced
    from minirlhf.cli import main

    _trace_writes(Path(os.environ["TRACE_ROOT"]), Path(os.environ["TRACE_DIR"]) / f"rank{os.environ['RANK']}.jsonl")
    sys.exit(main(sys.argv[1:]))
