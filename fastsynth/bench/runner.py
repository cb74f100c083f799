"""The benchmark suite behind ``fastsynth bench``: registry of kernel benchmarks, one run over
them, consistent derived columns, one CSV per run.

Every kernel benchmark is a module ``fastsynth/bench/<name>.py`` with
``run(quick=False, device="cpu") -> list[dict]`` (rows with the columns of ``COLUMNS``; see
docs/DEVELOPING.md). This runner

- imports the registered modules (an unknown name is an error; an import error inside a
  module propagates),
- measures the machine's memory bandwidth in the same run (a large read and a large copy),
- fills what a module left empty: ``GBps`` from ``bytes`` and ``median_ms``, the speed-up
  columns from the eager and torch.compile providers of the same case, and ``bw_frac``
  against the bandwidth measured here, so that every row of a CSV uses one reference,
- writes ONE CSV per run with the machine, versions and commit as ``# key: value`` lines.

``main(argv)`` is ``fastsynth bench`` (the CLI delegates to it) and ``python -m fastsynth.bench``;
it imports neither the CLI nor anything beyond the benchmark modules it runs.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import platform
import sys
import time
import traceback
from typing import Callable, Iterable

import torch

from . import harness

# registry name -> module path. Order = order of the run (cheap kernels first).
REGISTRY: dict[str, str] = {
    "bn_stat_loss": "fastsynth.bench.bn_stat_loss",
    "logit_losses": "fastsynth.bench.logit_losses",
    "noisy_layers": "fastsynth.bench.noisy_layers",
    "fused_teacher": "fastsynth.bench.fused_teacher",
    "winograd": "fastsynth.bench.winograd",
    "synthesis": "fastsynth.bench.synthesis",
}

COLUMNS = [
    "kernel", "case", "provider", "median_ms", "speedup_vs_eager", "speedup_vs_compile",
    "bytes", "GBps", "bw_frac",
]
OPTIONAL_COLUMNS = ["aten_ops", "peak_mem_MB"]


class BenchmarkNotFound(LookupError):
    """A kernel benchmark named on the command line is not registered."""


# ---------------------------------------------------------------------------------------------
# module loading
# ---------------------------------------------------------------------------------------------
def load_benchmark(name: str, registry: dict[str, str] | None = None):
    """The benchmark module of ``name``. Every registered module ships with fastsynth, so any
    import error (a missing dependency included) is a bug and propagates."""
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise BenchmarkNotFound(f"unknown kernel benchmark {name!r}; registered: {', '.join(registry)}")
    mod = importlib.import_module(registry[name])
    if not callable(getattr(mod, "run", None)):
        raise BenchmarkNotFound(f"{registry[name]} has no run(quick, device) function")
    return mod


# ---------------------------------------------------------------------------------------------
# derived columns
# ---------------------------------------------------------------------------------------------
def _num(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def is_eager_provider(provider: str) -> bool:
    p = provider.lower()
    return ("eager" in p or "upstream" in p) and "compile" not in p


def is_compile_provider(provider: str) -> bool:
    p = provider.lower()
    return "compile" in p and ("eager" in p or "upstream" in p or p in ("compile", "torch.compile", "torch_compile"))


def finalize_rows(rows: Iterable[dict], bandwidth_GBps: float) -> list[dict]:
    """Give every row every column of ``COLUMNS`` and fill the derived ones consistently.

    - ``GBps`` = bytes / median time where the module gave ``bytes`` but no ``GBps``;
    - ``bw_frac`` = GBps / ``bandwidth_GBps`` (the bandwidth measured in this run) for every row
      with a GBps, so all rows of one CSV share one reference;
    - ``speedup_vs_eager`` / ``speedup_vs_compile`` where empty: the median time of the eager
      (upstream) provider, resp. torch.compile of it, of the same kernel and case divided by the
      row's time.
    """
    rows = [dict(r) for r in rows]
    baselines: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = (r.get("kernel"), r.get("case"))
        t = _num(r.get("median_ms"))
        prov = str(r.get("provider", ""))
        if t is None or t <= 0:
            continue
        if is_eager_provider(prov):
            baselines.setdefault(key, {}).setdefault("eager", t)
        elif is_compile_provider(prov):
            baselines.setdefault(key, {}).setdefault("compile", t)
    out = []
    for r in rows:
        for c in COLUMNS:
            r.setdefault(c, "")
        t = _num(r["median_ms"])
        nbytes = _num(r["bytes"])
        if _num(r["GBps"]) is None and nbytes is not None and t:
            r["GBps"] = nbytes / (t * 1e-3) / 1e9
        gbps = _num(r["GBps"])
        if gbps is not None and bandwidth_GBps > 0:
            r["bw_frac"] = gbps / bandwidth_GBps
        base = baselines.get((r["kernel"], r["case"]), {})
        for col, which in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "compile")):
            if _num(r[col]) is None and which in base and t:
                r[col] = base[which] / t
        ordered = {c: r[c] for c in COLUMNS}
        ordered.update({k: v for k, v in r.items() if k not in ordered})
        out.append(ordered)
    return out


# ---------------------------------------------------------------------------------------------
# one run of the suite
# ---------------------------------------------------------------------------------------------
def run_suite(
    kernels: list[str] | None = None,
    *,
    device: str = "cpu",
    quick: bool = False,
    out_dir: str = "bench_results",
    registry: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    bandwidth_bytes: int | None = None,
    command: str | None = None,
) -> dict:
    """Run the kernel benchmarks; returns {"rows", "csv", "meta", "failed", "bandwidth"}.

    A benchmark whose run() raises is reported (traceback on the log, name and error in the
    CSV metadata and in "failed") and the others still run.

    ``kernels``: registry names (None: all); an unknown name raises ``BenchmarkNotFound``
    before anything is timed.
    """
    registry = REGISTRY if registry is None else registry
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = list(kernels) if kernels else list(registry)
    modules = {name: load_benchmark(name, registry) for name in names}

    if bandwidth_bytes is None:
        bandwidth_bytes = (64 if quick else 256) * 2**20
        if torch.device(device).type == "cuda":
            bandwidth_bytes = (256 if quick else 1024) * 2**20
    log(f"fastsynth bench: measuring memory bandwidth ({bandwidth_bytes / 2**20:.0f} MiB read and copy on {device})")
    bw = harness.measure_bandwidth(bandwidth_bytes, device=device, reps=3 if quick else 5)
    bw_ref = max(bw["read_GBps"], bw["copy_GBps"])
    log(f"fastsynth bench: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s")

    rows: list[dict] = []
    failed: dict[str, str] = {}
    t_start = time.perf_counter()
    for i, (name, mod) in enumerate(modules.items(), 1):
        log(f"[{i}/{len(modules)}] {name} ({'quick' if quick else 'full'}, {device}) ...")
        t0 = time.perf_counter()
        try:
            got = list(mod.run(quick=quick, device=device))
        except Exception as exc:  # one broken or inapplicable benchmark must not lose the others
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"[{i}/{len(modules)}] {name}: FAILED after {time.perf_counter() - t0:.1f} s\n"
                + traceback.format_exc())
            continue
        for r in got:
            r.setdefault("kernel", name)
        rows.extend(got)
        log(f"[{i}/{len(modules)}] {name}: {len(got)} rows in {time.perf_counter() - t0:.1f} s")
    rows = finalize_rows(rows, bw_ref)

    meta = harness.machine_info(device)
    meta.update({
        "python": platform.python_version(),
        "command": command or "fastsynth bench",
        "quick": quick,
        "kernels": ",".join(modules) or "none",
        "failed": "; ".join(f"{k} ({v})" for k, v in failed.items()).replace("\n", " ") or "none",
        "read_GBps": f"{bw['read_GBps']:.2f}",
        "copy_GBps": f"{bw['copy_GBps']:.2f}",
        "bw_ref_GBps": f"{bw_ref:.3f}",
        "bw_frac_reference": "max(read, copy) bandwidth measured in this run",
        "seconds": f"{time.perf_counter() - t_start:.1f}",
    })
    meta["worktree"] = _worktree_state()
    try:
        import fastsynth

        meta["build_info"] = " ".join(f"{k}={v}" for k, v in fastsynth.build_info().items())
    except Exception as exc:  # the table is still worth writing
        meta["build_info"] = f"unavailable ({exc!r})"

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"bench-{torch.device(device).type}-{'quick-' if quick else ''}{stamp}.csv")
    harness.write_csv(rows, path, meta)
    if not rows:  # keep the header so the file still says what it would hold
        with open(path, "a") as f:
            f.write(",".join(COLUMNS) + "\n")
    return {"rows": rows, "csv": path, "meta": meta, "failed": failed, "bandwidth": bw}


def _worktree_state() -> str:
    """'clean' or 'modified' (uncommitted changes: the commit alone does not reproduce the run)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                      stderr=subprocess.DEVNULL, text=True)
    except Exception:
        return "unknown"
    return "modified" if out.strip() else "clean"


def read_csv(path: str) -> tuple[dict, list[dict]]:
    """(metadata, rows) of a CSV written by ``run_suite``; numbers come back as floats."""
    import csv

    meta: dict[str, str] = {}
    lines = []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                key, _, value = line[1:].strip().partition(":")
                meta[key.strip()] = value.strip()
            elif line.strip():
                lines.append(line)
    rows = []
    for r in csv.DictReader(lines):
        rows.append({k: (_num(v) if _num(v) is not None else v) for k, v in r.items()})
    return meta, rows


TABLE_COLUMNS = COLUMNS + OPTIONAL_COLUMNS


def table_columns(rows: list[dict]) -> list[str]:
    return [c for c in TABLE_COLUMNS if any(r.get(c, "") != "" for r in rows)] or COLUMNS


# ---------------------------------------------------------------------------------------------
# command line: ``fastsynth bench`` and ``python -m fastsynth.bench``
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, prog: str = "fastsynth bench") -> int:
    """Run the benchmarks named in ``argv`` (all by default), print a table, write one CSV.
    Exit status: 0, 1 when a benchmark failed, 2 for a usage error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=prog, description="Run the kernel benchmarks and write one CSV.")
    p.add_argument("kernels", nargs="*", metavar="kernel",
                   help=f"kernels to run (default: all registered: {', '.join(REGISTRY)})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shape sets and few repetitions")
    p.add_argument("--out", default="bench_results", help="folder for the CSV (and PNGs) (default bench_results)")
    p.add_argument("--plot", action="store_true", help="also draw PNGs (needs matplotlib: fastsynth[plot])")
    p.add_argument("--report", metavar="MD", default=None,
                   help="also write a markdown report of this run (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--model", action="store_true",
                   help="regenerate the GPU performance model docs/PERF_MODEL.md instead of timing")
    p.add_argument("--list", action="store_true", help="list the registered kernels and their modules")
    a = p.parse_args(argv)

    if a.list:
        for name, path in REGISTRY.items():
            print(f"{name:16s} {path}")
        return 0
    if a.model:
        from . import perf_model

        return perf_model.main([])
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog} --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if a.plot:  # fail before timing anything, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"{prog} --plot: matplotlib is not installed; "
                  "pip install \"fastsynth[plot]\" (or matplotlib)", file=sys.stderr)
            return 2
    command = (prog + " " + " ".join(argv)).strip()
    try:
        res = run_suite(a.kernels or None, device=a.device, quick=a.quick, out_dir=a.out, command=command)
    except BenchmarkNotFound as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    rows = res["rows"]
    if rows:
        harness.print_table(rows, table_columns(rows))
    else:
        print(f"{prog}: no rows (every benchmark failed)")
    print(f"\nbandwidth: read {res['bandwidth']['read_GBps']:.1f} GB/s, copy {res['bandwidth']['copy_GBps']:.1f} GB/s"
          f" (bw_frac is relative to {res['meta']['bw_ref_GBps']} GB/s)")
    if res["failed"]:
        print(f"FAILED: {'; '.join(f'{k}: {v}' for k, v in res['failed'].items())}")
    print(f"csv: {res['csv']}")
    pngs = []
    if a.plot:
        from .plot import plot_csv

        pngs = plot_csv(res["csv"], a.out)
        for path in pngs:
            print(f"png: {path}")
    if a.report:
        from . import report

        print(f"report: {report.write(res['csv'], a.report, pngs)}")
    return 1 if res["failed"] else 0
