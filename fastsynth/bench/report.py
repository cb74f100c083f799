"""Markdown report of a benchmark CSV (``fastsynth bench --report docs/BENCHMARKS.md``): the
exact command, the machine and versions, one table per kernel, geometric-mean speed-ups per
provider, and links to the PNGs."""
from __future__ import annotations

import os

from .harness import geomean
from .runner import COLUMNS, OPTIONAL_COLUMNS, is_eager_provider, read_csv

_META_KEYS = ["date", "command", "commit", "worktree", "device", "gpu", "processor", "cores", "torch_threads", "torch",
              "triton", "python", "build_info", "read_GBps", "copy_GBps", "bw_ref_GBps", "quick", "kernels",
              "failed", "seconds"]


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return ""
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def markdown(csv_path: str, pngs: list[str] | None = None, doc_dir: str | None = None,
             title: str = "Benchmarks") -> str:
    meta, rows = read_csv(csv_path)
    doc_dir = doc_dir or os.path.dirname(os.path.abspath(csv_path))
    out = [f"# {title}", "", "Produced by:", "", f"    {meta.get('command', 'fastsynth bench')}", "",
           f"CSV: `{os.path.relpath(csv_path, doc_dir)}`", "", "| | |", "|---|---|"]
    out += [f"| {k} | {meta[k]} |" for k in _META_KEYS if k in meta]
    out += ["", "`bw_frac` is the achieved GB/s over the bandwidth measured in the same run "
            f"({meta.get('bw_ref_GBps', '?')} GB/s); speed-ups are against the eager upstream "
            "formulation and torch.compile of it, measured side by side in this run.", ""]
    kernels = []
    for r in rows:
        if r.get("kernel") not in kernels:
            kernels.append(r.get("kernel"))
    for k in kernels:
        krows = [r for r in rows if r.get("kernel") == k]
        cols = [c for c in COLUMNS + OPTIONAL_COLUMNS if c != "kernel" and any(r.get(c, "") != "" for r in krows)]
        cols += [c for c in krows[0] if c not in cols and c != "kernel" and any(r.get(c, "") != "" for r in krows)]
        out += [f"## {k}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in krows]
        provs = []
        for r in krows:
            if r.get("provider") not in provs and not is_eager_provider(str(r.get("provider"))):
                provs.append(r.get("provider"))
        gm = []
        for p in provs:
            e = [r["speedup_vs_eager"] for r in krows if r.get("provider") == p and isinstance(r.get("speedup_vs_eager"), float)]
            c = [r["speedup_vs_compile"] for r in krows if r.get("provider") == p and isinstance(r.get("speedup_vs_compile"), float)]
            if e or c:
                gm.append(f"{p}: {geomean(e):.2f}x vs eager, {geomean(c):.2f}x vs compile" if c else
                          f"{p}: {geomean(e):.2f}x vs eager")
        if gm:
            out += ["", "Geometric mean over the cases: " + "; ".join(gm) + "."]
        for png in pngs or []:
            if f"speedup_{k}" in os.path.basename(png):
                out += ["", f"![{k} speed-up]({os.path.relpath(png, doc_dir)})"]
        out.append("")
    for png in pngs or []:
        if os.path.basename(png).endswith("roofline.png"):
            out += ["## Achieved bandwidth", "", f"![roofline]({os.path.relpath(png, doc_dir)})", ""]
    if not rows:
        out += ["No kernel benchmark ran (none of the modules was present).", ""]
    return "\n".join(out)


def write(csv_path: str, path: str, pngs: list[str] | None = None) -> str:
    text = markdown(csv_path, pngs, doc_dir=os.path.dirname(os.path.abspath(path)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path
