"""kernels/ against the naive torch composition (and Liger-Kernel on CUDA where installed).

    pytest bench/test_kernels_bench.py            # CPU cases; CUDA cases too on a GPU

Every number is fwd+bwd of one op on one input, the fused and the reference measured in
the same run; the ratios (of the fastest of KERNELS_BENCH_ROUNDS=5 rounds, medians too) go
to bench/results/kernels-<device>-<name>.json.

- CPU: N=4096 tokens, V=32000, float32. Peak extra memory is the torch CPU allocator's
  high-water mark during fwd+bwd above what was live before (the profiler's
  "Total Allocated" track); it counts every tensor the op allocates, the gradient of
  the logits included. Targets: fused/naive time <= 1.0, peak memory <= 0.5.
- CUDA: bfloat16, N=16384, V=128256 (H=4096 for the fused-linear case); peak memory from
  torch.cuda.max_memory_allocated. Achieved bandwidth counts the floor traffic of the op,
  3 * N * V * 2 bytes (read the logits forward, read them and write the gradient
  backward), against the card's HBM bandwidth. Targets: fwd+bwd >= 3x faster than naive,
  >= 80% of the bandwidth floor; fused-linear peak memory <= 1/8 of naive, no slower.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

import kernels
from kernels.logprobs import token_logprobs_reference
from kernels.ppo import ppo_loss_reference

RESULTS_DIR = Path(__file__).parent / "results"
ROUNDS = int(os.environ.get("KERNELS_BENCH_ROUNDS", "5"))
_results: dict[str, dict] = {}  # device -> {"meta": ..., "cases": {case: {impl: {...}}}}

CPU_N, CPU_V, CPU_H = 4096, 32000, 128
GPU_N, GPU_V, GPU_H = 16384, 128256, 4096

# HBM bandwidth (bytes/s) by device-name fragment, for cards whose properties lack it.
HBM_BANDWIDTH = {
    "H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
    "L40S": 0.864e12, "A10G": 0.6e12, "RTX 4090": 1.008e12,
}


def _slug(name: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", ""))).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hbm_bandwidth(props) -> float | None:
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8  # double data rate
    for fragment, bw in HBM_BANDWIDTH.items():
        if fragment in props.name:
            return bw
    return None


# --------------------------------------------------------------------------- measuring


def cpu_peak_extra_bytes(fn) -> int:
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # "Total Allocated" is the allocator's running total since the profiler started.
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0, *totals])


def cuda_peak_extra_bytes(fn) -> int:
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(benchmark, device: str, case: str, impl: str, fn, extra: dict | None = None):
    """Times fn (fwd+bwd) through pytest-benchmark and records time and peak memory."""
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    times: list[float] = []

    def timed():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)

    peak = (cpu_peak_extra_bytes if device == "cpu" else cuda_peak_extra_bytes)(fn)  # also a warm-up
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1 if device != "cpu" else 0)
    if not times:  # --benchmark-disable runs the target once
        timed()
    entry = {"time_s_median": statistics.median(times), "time_s_min": min(times), "rounds": len(times),
             "peak_extra_bytes": int(peak), **(extra or {})}
    benchmark.extra_info.update(entry)
    _device_entry(device)["cases"].setdefault(case, {})[impl] = entry
    return entry


def _device_entry(device: str) -> dict:
    if device not in _results:
        if device == "cpu":
            meta = {"device": f"CPU: {cpu_model()}", "torch_threads": torch.get_num_threads(),
                    "cores_visible": os.cpu_count(), "N": CPU_N, "V": CPU_V, "H_linear": CPU_H, "dtype": "float32"}
        else:
            props = torch.cuda.get_device_properties(0)
            meta = {"device": f"CUDA: {props.name}", "hbm_bandwidth_Bps": hbm_bandwidth(props),
                    "N": GPU_N, "V": GPU_V, "H_linear": GPU_H, "dtype": "bfloat16"}
        meta.update(torch=torch.__version__, python=platform.python_version(),
                    date=datetime.date.today().isoformat())
        _results[device] = {"meta": meta, "cases": {}}
    return _results[device]


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    for device, entry in _results.items():
        summary = {}
        for case, impls in entry["cases"].items():
            if "naive" not in impls or "fused" not in impls:
                continue
            naive, fused = impls["naive"], impls["fused"]
            # the minimum over rounds: on a shared machine interference only ever adds time
            s = {"time_ratio_fused_over_naive": fused["time_s_min"] / naive["time_s_min"],
                 "time_ratio_fused_over_naive_medians": fused["time_s_median"] / naive["time_s_median"],
                 "speedup_vs_naive": naive["time_s_min"] / fused["time_s_min"],
                 "peak_memory_ratio_fused_over_naive": fused["peak_extra_bytes"] / max(1, naive["peak_extra_bytes"])}
            if "liger" in impls and "time_s_median" in impls["liger"]:
                s["time_ratio_fused_over_liger"] = fused["time_s_min"] / impls["liger"]["time_s_min"]
            if "floor_bytes" in fused:
                s["achieved_GBps"] = fused["floor_bytes"] / fused["time_s_min"] / 1e9
                bw = entry["meta"].get("hbm_bandwidth_Bps")
                if bw:
                    s["fraction_of_hbm_bandwidth"] = fused["floor_bytes"] / fused["time_s_min"] / bw
            s.update(_targets(device, case, s))
            summary[case] = s
        entry["summary"] = summary
        if hasattr(os, "getloadavg"):
            entry["meta"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
        name = entry["meta"]["device"].split(":", 1)[1]
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"kernels-{device}-{_slug(name)}.json"
        path.write_text(json.dumps(entry, indent=2) + "\n")


def _targets(device: str, case: str, s: dict) -> dict:
    if device == "cpu":
        return {"target": "time <= 1.0x naive, peak memory <= 0.5x naive",
                "target_met": s["time_ratio_fused_over_naive"] <= 1.0
                and s["peak_memory_ratio_fused_over_naive"] <= 0.5}
    if case.startswith("linear"):
        return {"target": "peak memory <= 1/8 naive, time <= 1.0x naive",
                "target_met": s["peak_memory_ratio_fused_over_naive"] <= 0.125
                and s["time_ratio_fused_over_naive"] <= 1.0}
    met = s["speedup_vs_naive"] >= 3.0
    if "fraction_of_hbm_bandwidth" in s:
        met = met and s["fraction_of_hbm_bandwidth"] >= 0.8
    return {"target": ">= 3x faster than naive, >= 80% of the HBM bandwidth floor", "target_met": met}


# --------------------------------------------------------------------------- inputs


def make_inputs(N, V, dtype, device, H=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    to = dict(device=device)
    labels = torch.randint(0, V, (N,), generator=g).to(**to)
    mask = (torch.rand(N, generator=g) > 0.1).to(**to)
    old = (torch.randn(N, generator=g) * 0.5 - 8.0).to(**to)
    adv = torch.randn(N, generator=g).to(**to)
    ref = (old.cpu() + 0.1 * torch.randn(N, generator=g)).to(**to)
    out = dict(labels=labels, mask=mask, old=old, adv=adv, ref=ref)
    if H is None:
        out["logits"] = (torch.randn(N, V, generator=g) * 2).to(dtype=dtype, **to)
    else:
        out["hidden"] = torch.randn(N, H, generator=g).to(dtype=dtype, **to)
        out["weight"] = (torch.randn(V, H, generator=g) / H**0.5).to(dtype=dtype, **to)
    return out


PPO_KW = dict(clip_eps=0.2, kl_coef=0.05, kl_estimator="k3")


def logprobs_fn(impl, d):
    x = d["logits"]
    op = {"naive": token_logprobs_reference, "fused": kernels.token_logprobs}[impl]

    def run():
        leaf = x.detach().requires_grad_()
        op(leaf, d["labels"]).sum().backward()

    return run


def ppo_fn(impl, d):
    x = d["logits"]
    op = {"naive": ppo_loss_reference, "fused": kernels.ppo_loss}[impl]

    def run():
        leaf = x.detach().requires_grad_()
        loss, _ = op(leaf, d["labels"], d["old"], d["adv"], d["mask"], ref_logprobs=d["ref"], **PPO_KW)
        loss.backward()

    return run


def linear_ppo_fn(impl, d):
    def run():
        h = d["hidden"].detach().requires_grad_()
        w = d["weight"].detach().requires_grad_()
        args = (d["labels"], d["old"], d["adv"], d["mask"])
        if impl == "naive":
            loss, _ = ppo_loss_reference(h @ w.t(), *args, ref_logprobs=d["ref"], **PPO_KW)
        else:
            loss, _ = kernels.linear_ppo_loss(h, w, *args, ref_logprobs=d["ref"], **PPO_KW)
        loss.backward()

    return run


# --------------------------------------------------------------------------- CPU


@pytest.fixture(scope="module")
def cpu_logits():
    return make_inputs(CPU_N, CPU_V, torch.float32, "cpu")


@pytest.fixture(scope="module")
def cpu_linear():
    return make_inputs(CPU_N, CPU_V, torch.float32, "cpu", H=CPU_H)


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_cpu_token_logprobs(benchmark, cpu_logits, impl):
    measure(benchmark, "cpu", "token_logprobs", impl, logprobs_fn(impl, cpu_logits))


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_cpu_ppo_loss(benchmark, cpu_logits, impl):
    measure(benchmark, "cpu", "ppo_loss", impl, ppo_fn(impl, cpu_logits))


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_cpu_linear_ppo_loss(benchmark, cpu_linear, impl):
    measure(benchmark, "cpu", "linear_ppo_loss", impl, linear_ppo_fn(impl, cpu_linear))


# --------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_logits():
    return make_inputs(GPU_N, GPU_V, torch.bfloat16, "cuda")


@pytest.fixture(scope="module")
def gpu_linear():
    return make_inputs(GPU_N, GPU_V, torch.bfloat16, "cuda", H=GPU_H)


def _liger(name):
    try:
        import liger_kernel.transformers as lt
    except Exception as e:  # not installed, or no build for this platform
        pytest.skip(f"Liger-Kernel not importable: {e}")
    return getattr(lt, name)


def _floor_bytes(d):
    return 3 * d["logits"].numel() * d["logits"].element_size()


@cuda_only
@pytest.mark.parametrize("impl", ["naive", "fused", "liger"])
def test_cuda_token_logprobs(benchmark, gpu_logits, impl):
    if impl == "liger":
        ce = _liger("LigerCrossEntropyLoss")(reduction="none")  # -log p per token: the same op

        def fn():
            leaf = gpu_logits["logits"].detach().requires_grad_()
            (-ce(leaf, gpu_logits["labels"])).sum().backward()
    else:
        fn = logprobs_fn(impl, gpu_logits)
    measure(benchmark, "cuda", "token_logprobs", impl, fn, {"floor_bytes": _floor_bytes(gpu_logits)})


@cuda_only
@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_cuda_ppo_loss(benchmark, gpu_logits, impl):
    measure(benchmark, "cuda", "ppo_loss", impl, ppo_fn(impl, gpu_logits), {"floor_bytes": _floor_bytes(gpu_logits)})


@cuda_only
@pytest.mark.parametrize("impl", ["naive", "fused", "liger"])
def test_cuda_linear_ppo_loss(benchmark, gpu_linear, impl):
    if impl == "liger":
        flce = _liger("LigerFusedLinearCrossEntropyLoss")()  # its fused-linear loss, for scale

        def fn():
            h = gpu_linear["hidden"].detach().requires_grad_()
            w = gpu_linear["weight"].detach().requires_grad_()
            flce(w, h, gpu_linear["labels"]).backward()
    else:
        fn = linear_ppo_fn(impl, gpu_linear)
    measure(benchmark, "cuda", "linear_ppo_loss", impl, fn)
