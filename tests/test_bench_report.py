"""bench/conftest.py's same-run ratios and `minirlhf bench-report`'s tables, on hand-made results."""

import importlib.util
import json
from pathlib import Path

import pytest

from minirlhf import bench_report

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


BENCHMARKS = [
    bench("linear_ppo_loss", "kernels", True, 2.0, 2.5, peak=64 << 20),
    bench("linear_ppo_loss", "liger", False, 4.0, 5.0, peak=128 << 20),
    bench("linear_ppo_loss", "naive", False, 8.0, 10.0, peak=1 << 30),
    # an external process timed itself: time_s wins over pytest-benchmark's stats
    bench("ppo_iteration", "trl-1.12.0", False, 1e-6, 1e-6, time_s=3.0, gc_collect_s=0.25),
    bench("ppo_iteration", "minirlhf", True, 1.5, 1.6, generate_s=0.5),
    {"group": None, "fullname": "bench/y.py::test_plain", "extra_info": {}, "stats": {"min": 1.0}},
]


def test_same_run_ratios():
    groups = bench_conftest().comparisons(BENCHMARKS)
    assert set(groups) == {"linear_ppo_loss", "ppo_iteration"}
    r = groups["linear_ppo_loss"]["ratios"]
    assert r["kernels/liger"] == pytest.approx({"time": 0.5, "time_median": 0.5, "memory": 0.5})
    assert r["kernels/naive"] == pytest.approx({"time": 0.25, "time_median": 0.25, "memory": 1 / 16})
    assert groups["ppo_iteration"]["ratios"]["minirlhf/trl-1.12.0"] == pytest.approx(
        {"time": 0.5, "time_median": 1.6 / 3.0})


def write_results(folder, name="cpu-test-cpu.json"):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"benchmarks": BENCHMARKS, "comparisons": bench_conftest().comparisons(BENCHMARKS),
            "minirlhf": {"device": "cpu", "device_name": "Test CPU", "torch": "2.13.0", "triton": "3.9.0",
                         "torch_threads": 2, "cpu_count": 2, "date": "2026-01-02", "sizes": "cpu"}}
    (folder / name).write_text(json.dumps(data))


def test_report_tables(tmp_path, capsys):
    write_results(tmp_path / "results")
    (tmp_path / "results" / "rollout-old.json").write_text('{"meta": {}}')
    assert bench_report.main(["--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "### CPU: Test CPU (`cpu-test-cpu.json`)" in out
    assert "Measured 2026-01-02, 2 torch threads of 2 CPUs; torch 2.13.0, triton 3.9.0." in out
    # ours / this: time, then memory; "—" against itself
    assert "| liger | 4.00 s | 5.00 s | 128.0 MiB | 0.50× | 0.50× |  |" in out
    assert "| naive | 8.00 s | 10.00 s | 1.00 GiB | 0.25× | 0.06× |  |" in out
    assert "| kernels (ours) | 2.00 s | 2.50 s | 64.0 MiB | — | — |  |" in out
    assert "| trl-1.12.0 | 3.00 s | 3.00 s | — | 0.50× | — | gc.collect() 0.250 s |" in out
    assert "| minirlhf (ours) | 1.50 s | 1.60 s | — | — | — | generate 0.500 s |" in out
    assert "### GPU: not yet measured" in out
    assert "rollout-old.json" in out  # listed as skipped


def test_report_one_device_to_a_file(tmp_path):
    write_results(tmp_path / "r")
    write_results(tmp_path / "r", "cuda-test-gpu.json")
    out = tmp_path / "perf.md"
    assert bench_report.main(["--results", str(tmp_path / "r"), "--device", "cpu-test-cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "cpu-test-cpu.json" in text and "cuda-test-gpu.json" not in text


def test_report_errors_are_one_line(tmp_path, capsys):
    assert bench_report.main(["--results", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "bad.json").write_text("{not json")
    assert bench_report.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: not JSON" in err
    assert bench_report.main(["--results", str(tmp_path), "--device", "cuda-none"]) == 2
