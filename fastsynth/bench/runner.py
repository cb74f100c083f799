"""The benchmark suite behind ``fastsynth bench``: registry of kernel benchmarks, one run over
them, consistent derived columns, one CSV per run.

Every kernel benchmark is a module ``fastsynth/bench/<name>.py`` with
``run(quick=False, device="cpu") -> list[dict]`` (rows with the columns of ``COLUMNS``; see
docs/DEVELOPING.md). This runner

- imports the registered modules (a module that is not there yet is reported and skipped; a
  kernel named explicitly on the command line that is not there is an error),
- measures the machine's memory bandwidth in the same run (a large read and a large copy),
- fills what a module left empty: ``GBps`` from ``bytes`` and ``median_ms``, the speed-up
  columns from the eager and torch.compile providers of the same case, and ``bw_frac``
  against the bandwidth measured here, so that every row of a CSV uses one reference,
- writes ONE CSV per run with the machine, versions and commit as ``# key: value`` lines.
"""
from __future__ import annotations

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
    """A kernel benchmark named explicitly is not registered or its module is absent."""


# ---------------------------------------------------------------------------------------------
# module loading
# ---------------------------------------------------------------------------------------------
def load_benchmark(name: str, registry: dict[str, str] | None = None):
    """The benchmark module of ``name``, or None when its module does not exist (yet).

    Only a missing module of that exact name counts as absent: an import error inside an
    existing benchmark module (a bug) propagates.
    """
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise BenchmarkNotFound(f"unknown kernel benchmark {name!r}; registered: {', '.join(registry)}")
    path = registry[name]
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == path or path.startswith(exc.name + ".")):
            return None
        raise


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
    """Run the kernel benchmarks; returns {"rows", "csv", "meta", "skipped", "failed", "bandwidth"}.

    A benchmark whose run() raises is reported (traceback on the log, name and error in the
    CSV metadata and in "failed") and the others still run.

    ``kernels``: registry names (None: all). Named kernels must exist; with None, absent
    modules are reported and skipped.
    """
    registry = REGISTRY if registry is None else registry
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    explicit = bool(kernels)
    names = list(kernels) if kernels else list(registry)

    modules, skipped = {}, []
    for name in names:
        mod = load_benchmark(name, registry)
        if mod is None:
            if explicit:
                raise BenchmarkNotFound(
                    f"kernel benchmark {name!r}: module {registry[name]} is not in this installation")
            skipped.append(name)
            log(f"fastsynth bench: {name}: no benchmark module {registry[name]} yet, skipped")
            continue
        if not callable(getattr(mod, "run", None)):
            raise BenchmarkNotFound(f"{registry[name]} has no run(quick, device) function")
        modules[name] = mod

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
        "skipped": ",".join(skipped) or "none",
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
    return {"rows": rows, "csv": path, "meta": meta, "skipped": skipped, "failed": failed, "bandwidth": bw}


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
