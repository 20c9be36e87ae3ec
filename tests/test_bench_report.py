"""bench/conftest.py's same-run ratios and `minirlhf bench-report`'s markdown, on hand-made results."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from minirlhf import bench_report, cli

REPO = Path(__file__).resolve().parents[1]


def bench_conftest():
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", REPO / "bench" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(group, impl, ours, t_min, t_median, peak=None, **extra):
    info = {"impl": impl, "ours": ours, **extra}
    if peak is not None:
        info["peak_bytes"] = peak
    return {"group": group, "fullname": f"bench/x.py::test[{group}-{impl}]", "extra_info": info,
            "stats": {"min": t_min, "median": t_median, "rounds": 3}}


PHASES = dict(generate_s=0.5, score_s=0.125, bookkeeping_s=0.0625, update_s=0.75)
BENCHMARKS = [
    bench("linear_ppo_loss", "kernels", True, 2.0, 2.5, peak=64 << 20, tokens=4096, hidden=256, vocab_size=32000,
          dtype="float32"),
    bench("linear_ppo_loss", "liger", False, 4.0, 5.0, peak=128 << 20),
    bench("linear_ppo_loss", "naive", False, 8.0, 10.0, peak=1 << 30),
    # an external process timed itself: time_s wins over pytest-benchmark's stats
    bench("ppo_iteration", "trl-1.12.0", False, 1e-6, 1e-6, time_s=3.0, gc_collect_s=0.25),
    bench("ppo_iteration", "minirlhf", True, 1e-6, 1e-6, time_s=1.5, policy_parameters=1_310_000, prompts=16,
          new_tokens=32, ppo_epochs=1, **PHASES),
    bench("ppo_update", "naive", False, 0.4, 0.5, peak=1 << 30, vocab_size=4096, tokens=64),
    bench("ppo_update", "linear_ppo_loss", True, 0.2, 0.25, peak=1 << 29, vocab_size=4096, tokens=64),
    {"group": None, "fullname": "bench/y.py::test_plain", "extra_info": {}, "stats": {"min": 1.0}},
]
FACTS = {"device": "cpu", "device_name": "Test CPU", "torch": "2.13.0", "triton": "3.9.0", "torch_threads": 2,
         "cpu_count": 2, "date": "2026-01-02", "sizes": "cpu"}


def results(benchmarks=BENCHMARKS, facts=FACTS):
    return {"benchmarks": benchmarks, "comparisons": bench_conftest().comparisons(benchmarks), "minirlhf": facts}


def write_results(folder, name="cpu-test-cpu.json", data=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(results() if data is None else data))
    return folder / name


def report(folder, *args):
    return bench_report.main(["--results", str(folder), *args])


def table_row(text, impl):
    return next(line for line in text.splitlines() if line.startswith(f"| {impl} "))


# --------------------------------------------------------------------------- the ratios


def test_same_run_ratios_are_ours_over_reference():
    groups = bench_conftest().comparisons(BENCHMARKS)
    assert set(groups) == {"linear_ppo_loss", "ppo_iteration", "ppo_update"}
    r = groups["linear_ppo_loss"]["ratios"]
    assert r["kernels/liger"] == pytest.approx({"time": 0.5, "time_median": 0.5, "memory": 0.5})
    assert r["kernels/naive"] == pytest.approx({"time": 0.25, "time_median": 0.25, "memory": 1 / 16})
    assert groups["ppo_iteration"]["ratios"] == {"minirlhf/trl-1.12.0": pytest.approx({"time": 0.5,
                                                                                     "time_median": 0.5})}
    # conftest stores the report's function: one definition of the ratio
    assert bench_conftest().comparisons is bench_report.comparisons


def test_every_size_set_sizes_every_bench_file():
    sizes = bench_conftest().SIZES
    assert set(sizes) == {"cpu", "cuda", "smoke"}
    for kind in sizes["cpu"]:
        for name, sset in sizes.items():
            assert kind in sset, f"SIZES[{name!r}] lacks {kind!r}"
            assert set(sset[kind]) == set(sizes["cpu"][kind]), (name, kind)
    smoke = sizes["smoke"]
    assert smoke["dist"] == {"preset": "tiny", "iterations": 1}
    assert smoke["rollout"]["B"] * smoke["rollout"]["T"] < sizes["cpu"]["rollout"]["B"] * sizes["cpu"]["rollout"]["T"]


def test_no_bench_file_writes_results_of_its_own():
    """Convention: --benchmark-json is the only output; every comparison goes through measure()."""
    for path in sorted((REPO / "bench").glob("test_*.py")):
        text = path.read_text()
        assert "measure(" in text, path.name
        assert not re.search(r"write_text\(|json\.dump\(|RESULTS", text), f"{path.name} writes a file of its own"


# --------------------------------------------------------------------------- the markdown


def test_report_tables(tmp_path, capsys):
    write_results(tmp_path / "results")
    assert report(tmp_path / "results") == 0
    out = capsys.readouterr().out
    assert out.startswith("### CPU: Test CPU (`cpu-test-cpu.json`)\n\n"
                          "Measured 2026-01-02, 2 torch threads of 2 CPUs; torch 2.13.0, triton 3.9.0.\n")
    # ours / this: time, then memory; "—" against itself
    assert table_row(out, "liger") == "| liger | 4.00 s | 5.00 s | 128.0 MiB | 0.50× | 0.50× |"
    assert table_row(out, "naive") == "| naive | 8.00 s | 10.00 s | 1.00 GiB | 0.25× | 0.062× |"
    assert table_row(out, "kernels (ours)") == "| kernels (ours) | 2.00 s | 2.50 s | 64.0 MiB | — | — |"
    # a time the process measured itself, no memory: the memory columns are left out; the phase split as notes
    assert "| implementation | time (fastest) | time (median) | minirlhf / this: time | notes |" in out
    assert table_row(out, "trl-1.12.0") == "| trl-1.12.0 | 3.00 s | 3.00 s | 0.50× | gc.collect() 0.250 s |"
    assert table_row(out, "minirlhf (ours)") == ("| minirlhf (ours) | 1.50 s | 1.50 s | — | generate 0.500 s, "
                                                 "score 0.125 s, bookkeeping 0.062 s, update 0.750 s |")
    assert out.endswith(bench_report.GPU_MISSING[0] + "\n\n" + bench_report.GPU_MISSING[2] + "\n")
    # the groups in GROUP_TITLES' order: the PPO iteration first
    assert out.index("one PPO iteration vs TRL") < out.index("linear_ppo_loss") < out.index("PPO policy update")


def test_titles_come_from_the_recorded_sizes(tmp_path, capsys):
    write_results(tmp_path)
    assert report(tmp_path) == 0
    out = capsys.readouterr().out
    assert "**one PPO policy update (forward, loss, backward) at a 4096-token vocabulary, 64 tokens**" in out
    assert "128256-token" not in out
    assert ("N=4096 tokens, H=256, V=32000, float32**" in out)
    assert ("(1.31M parameters in the policy), 16 prompts × 32 new tokens, 1 PPO epoch**") in out
    # an older file without the facts: the title without sizes, never sizes it did not record
    plain = [dict(b, extra_info={k: v for k, v in (b["extra_info"] or {}).items()
                                 if k in ("impl", "ours", "peak_bytes", "time_s")}) for b in BENCHMARKS]
    write_results(tmp_path, data=results(plain))
    assert report(tmp_path) == 0
    assert "**one PPO policy update (forward, loss, backward)**" in capsys.readouterr().out


def test_smoke_sizes_and_missing_machine_facts_are_said_plainly(tmp_path, capsys):
    write_results(tmp_path, data=results(facts=dict(FACTS, sizes="smoke", load_average_1min=3.5)))
    assert report(tmp_path) == 0
    assert ("Measured 2026-01-02, 2 torch threads of 2 CPUs, load average 3.5 at the end, sizes `smoke` (numbers "
            "meaningless: a check that the suite runs); torch 2.13.0, triton 3.9.0.") in capsys.readouterr().out
    write_results(tmp_path, data=results(facts={"device_name": "Bare CPU"}))
    assert report(tmp_path) == 0
    out = capsys.readouterr().out
    assert "### CPU: Bare CPU (`cpu-test-cpu.json`)\n\nMeasurement date not recorded.\n" in out
    assert "None" not in out and "?" not in out
    write_results(tmp_path, data={k: v for k, v in results().items() if k != "minirlhf"})
    assert report(tmp_path) == 0
    assert "Machine facts not recorded" in capsys.readouterr().out


def test_a_null_time_shows_no_ratio(tmp_path, capsys):
    data = results()
    data["comparisons"]["linear_ppo_loss"]["impls"]["liger"]["time_s"] = None  # the stored ratio stays 0.5
    write_results(tmp_path, data=data)
    assert report(tmp_path) == 0
    assert table_row(capsys.readouterr().out, "liger") == "| liger | — | 5.00 s | 128.0 MiB | — | 0.50× |"


def test_report_one_device_to_a_file(tmp_path):
    write_results(tmp_path / "r")
    write_results(tmp_path / "r", "cuda-test-gpu.json", results(facts=dict(FACTS, device="cuda")))
    out = tmp_path / "perf.md"
    assert report(tmp_path / "r", "--device", "cpu-test-cpu", "--out", str(out)) == 0
    text = out.read_text()
    assert "cpu-test-cpu.json" in text and "cuda-test-gpu.json" not in text and "not yet measured" not in text
    assert report(tmp_path / "r", "--out", str(out)) == 0
    text = out.read_text()
    assert "### GPU: Test CPU (`cuda-test-gpu.json`)" in text and "not yet measured" not in text


def test_files_that_are_not_results_are_skipped_with_the_reason(tmp_path, capsys):
    write_results(tmp_path)
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "rollout-old.json").write_text('{"median_ms": {}}')
    assert report(tmp_path) == 0
    captured = capsys.readouterr()
    assert "list.json" not in captured.out and "rollout-old" not in captured.out
    assert captured.err.splitlines() == [
        "note: skipped list.json: a JSON list, not a pytest-benchmark result",
        'note: skipped rollout-old.json: no "comparisons" section: not written by `pytest bench/ --benchmark-json` '
        "with bench/conftest.py's hooks"]
    (tmp_path / "cpu-test-cpu.json").unlink()
    assert report(tmp_path) == 2  # nothing left to report
    err = capsys.readouterr().err
    assert err.startswith("error: no results to report (list.json: a JSON list") and err.count("\n") == 1


# --------------------------------------------------------------------------- user mistakes


def one_line_error(capsys, *fragments):
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.mark.parametrize("field, value, why", [
    ("time_s", "1.0", "expected seconds"),
    ("time_s", float("nan"), "expected seconds"),
    ("time_s", -1.0, "expected seconds"),
    ("peak_bytes", True, "expected bytes"),
    ("ours", "yes", "expected true or false"),
])
def test_a_malformed_field_names_file_and_field(tmp_path, capsys, field, value, why):
    data = results()
    data["comparisons"]["linear_ppo_loss"]["impls"]["liger"][field] = value
    path = write_results(tmp_path, data=data)
    assert report(tmp_path) == 2
    one_line_error(capsys, f"{path}: comparisons.linear_ppo_loss.impls.liger.{field}: {why}")


def test_files_that_cannot_be_read(tmp_path, capsys):
    write_results(tmp_path)
    (tmp_path / "x.json").mkdir()
    assert report(tmp_path) == 2
    one_line_error(capsys, f"{tmp_path / 'x.json'}: a folder, not a results file")
    (tmp_path / "x.json").rmdir()
    (tmp_path / "latin1.json").write_bytes(b'{"comparisons": "caf\xe9"}')
    assert report(tmp_path) == 2
    one_line_error(capsys, f"{tmp_path / 'latin1.json'}: not UTF-8 text (byte 0xe9 at offset 20)")
    (tmp_path / "latin1.json").write_text("{not json")
    assert report(tmp_path) == 2
    one_line_error(capsys, f"{tmp_path / 'latin1.json'}: not JSON (Expecting property name")


def test_bad_folders_and_outputs(tmp_path, capsys):
    write_results(tmp_path / "r")
    assert report(tmp_path / "missing") == 2
    one_line_error(capsys, f"--results {tmp_path / 'missing'}: no such folder")
    assert report(tmp_path / "r" / "cpu-test-cpu.json") == 2
    one_line_error(capsys, "cpu-test-cpu.json: a file; give the folder")
    (tmp_path / "empty").mkdir()
    assert report(tmp_path / "empty") == 2
    one_line_error(capsys, f"--results {tmp_path / 'empty'}: no *.json files")
    assert report(tmp_path / "r", "--device", "cuda-none") == 2
    one_line_error(capsys, "no cuda-none.json")
    assert report(tmp_path / "r", "--out", str(tmp_path)) == 2
    one_line_error(capsys, f"--out {tmp_path}: a folder; give the path of a file")
    assert report(tmp_path / "r", "--out", str(tmp_path / "nowhere" / "perf.md")) == 2
    one_line_error(capsys, f"--out {tmp_path / 'nowhere' / 'perf.md'}: no folder {tmp_path / 'nowhere'}")
    assert report(tmp_path / "r", "--out", "a.md", "--readme", "b.md") == 2
    one_line_error(capsys, "not allowed with argument")
    # the same through `python -m minirlhf`
    assert cli.main(["bench-report", "--results", str(tmp_path / "r"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, f"--out {tmp_path}: a folder")
    assert cli.main(["bench-report", "--results", str(tmp_path / "r"), "--out", "a.md", "--readme", "b.md"]) == 2
    one_line_error(capsys, "not allowed with argument")


# --------------------------------------------------------------------------- --readme


README = """# Project

## Performance

Text the lead writes.

{begin}
old tables
{end}

Where we are slower: text kept.
""".format(begin=bench_report.BEGIN, end=bench_report.END)


def test_readme_block_is_replaced_in_place(tmp_path, capsys):
    write_results(tmp_path / "r")
    assert report(tmp_path / "r") == 0
    tables = capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text(README)
    for _ in range(2):  # idempotent
        assert report(tmp_path / "r", "--readme", str(readme)) == 0
        assert readme.read_text() == README.replace("old tables\n", tables)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("text, why", [
    ("no markers\n", "expected one `<!-- bench-report:begin -->` line and one `<!-- bench-report:end -->` line"),
    (README + bench_report.BEGIN + "\n", "found 2 `<!-- bench-report:begin -->`"),
    ("x\n" + bench_report.END + "\n" + bench_report.BEGIN + "\n", "README.md:2: `<!-- bench-report:end -->` comes "
                                                                  "before `<!-- bench-report:begin -->` (line 3)"),
])
def test_readme_without_one_ordered_block_is_left_alone(tmp_path, capsys, text, why):
    write_results(tmp_path / "r")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert report(tmp_path / "r", "--readme", str(readme)) == 2
    one_line_error(capsys, why)
    assert readme.read_text() == text
    assert report(tmp_path / "r", "--readme", str(tmp_path / "NOPE.md")) == 2
    one_line_error(capsys, f"--readme {tmp_path / 'NOPE.md'}: no such file")


def test_the_readme_shows_what_bench_report_prints_for_the_committed_results(capsys):
    """README.md's Performance block is bench-report's output for bench/results/, verbatim
    (regenerate it with `python -m minirlhf bench-report --readme README.md`)."""
    if not sorted((REPO / "bench" / "results").glob("*.json")):
        pytest.skip("no committed bench/results/*.json")
    assert report(REPO / "bench" / "results") == 0
    tables = capsys.readouterr().out
    text = (REPO / "README.md").read_text()
    block = text.split(bench_report.BEGIN + "\n", 1)[1].split(bench_report.END, 1)[0]
    assert block == tables
