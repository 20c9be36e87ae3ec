"""Peak memory of a piece of work, for the memory benchmarks (bench/) and the kernels' memory tests."""
from __future__ import annotations

import gc
import json
import os
import tempfile

import torch


def peak_allocated_bytes(fn, device: str = "cpu") -> int:
    """The allocator's high-water mark while fn() runs, above what was live before it, in bytes.

    device "cuda": torch.cuda.max_memory_allocated after a reset (exact, CUDA caching
    allocator). device "cpu": the torch profiler's memory events (profile_memory=True), whose
    "Total Allocated" is the CPU allocator's running total since the profiler started; only
    tensors torch allocates count, not Python objects. fn's return value is dropped."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return int(max([0, *totals]))
