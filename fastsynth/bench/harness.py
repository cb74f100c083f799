"""Timing, bandwidth, op counting and CSV output shared by every benchmark.

Benchmarks are scripts, not tests: warm up, repeat, report the median, and compare providers
side by side in one run (these machines are shared and noisy, so ratios measured together are
what counts).
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, device=None,
                min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds (device events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    on_gpu = device is not None and torch.device(device).type == "cuda"
    start_total = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_total) < min_time:
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 10 * max(reps, 1):
            break
    return statistics.median(times)


def interleaved_median_times(fns: dict, *, warmup: int = 2, reps: int = 5, device=None) -> dict:
    """Median wall time in seconds of each function of ``fns`` (name -> callable), timed in
    alternation (a, b, a, b, ...) so that a drifting machine state (another tenant, frequency)
    weighs on every provider alike: the ratio of two medians is then a same-conditions ratio.
    CPU wall clock; on a GPU each call is synchronised before the clock is read."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_bandwidth(nbytes: int = 256 * 2**20, device="cpu", reps: int = 5) -> dict:
    """Measured memory bandwidth of this machine, in GB/s: one read pass (sum) and one copy."""
    n = nbytes // 4
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    t_read = median_time(lambda: x.sum(), warmup=2, reps=reps, device=device)
    t_copy = median_time(lambda: y.copy_(x), warmup=2, reps=reps, device=device)
    return {"read_GBps": nbytes / t_read / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9}


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block (about one GPU kernel
    launch each). Custom fastsynth ops count as one op each."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_aten_ops(fn: Callable[[], object]) -> int:
    with AtenOpCounter() as counter:
        fn()
    return counter.total


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def machine_info(device="cpu") -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_csv(rows: Iterable[dict], path: str, meta: dict | None = None) -> str:
    """Write ``rows`` (dicts, same keys) to ``path``; ``meta`` goes into '#' comment lines."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        for k, v in (meta or {}).items():
            f.write(f"# {k}: {v}\n")
        if rows:
            fields = list(rows[0].keys())
            for r in rows[1:]:
                fields += [k for k in r if k not in fields]
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        return
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0]
    if not vals:
        return float("nan")
    return float(torch.tensor(vals, dtype=torch.float64).log().mean().exp())
