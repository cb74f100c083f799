"""PNG charts of a benchmark CSV (``fastsynth bench --plot`` / ``fastsynth plot CSV``).

- ``speedup_<kernel>.png``: speed-up over the eager upstream formulation per case (shape),
  one bar per provider, log scale, with the 1x line;
- ``roofline.png``: achieved bandwidth of every row with a byte count against the bandwidth
  measured in the same run (the horizontal ceiling), over the bytes each case moves.

The data preparation (``speedup_series``, ``roofline_points``) is plain Python so it is tested
without matplotlib; only ``plot_csv`` needs it (the optional extra ``fastsynth[plot]``).
"""
from __future__ import annotations

import os
import re

from .runner import is_eager_provider, read_csv


def _missing_matplotlib() -> RuntimeError:
    return RuntimeError(
        "fastsynth plot: matplotlib is not installed; install the optional extra with "
        "`pip install \"fastsynth[plot]\"` (or `pip install matplotlib`)")


def speedup_series(rows: list[dict]) -> dict[str, dict]:
    """Per kernel: {"cases": [case...], "providers": {provider: [speed-up or None per case]}}.

    The eager baseline itself (1x by definition) is left out.
    """
    out: dict[str, dict] = {}
    for r in rows:
        kernel, case, prov = str(r.get("kernel", "")), str(r.get("case", "")), str(r.get("provider", ""))
        s = r.get("speedup_vs_eager")
        if is_eager_provider(prov) or not isinstance(s, (int, float)):
            continue
        k = out.setdefault(kernel, {"cases": [], "providers": {}})
        if case not in k["cases"]:
            k["cases"].append(case)
            for vals in k["providers"].values():
                vals.append(None)
        vals = k["providers"].setdefault(prov, [None] * len(k["cases"]))
        vals[k["cases"].index(case)] = float(s)
    return out


def roofline_points(rows: list[dict]) -> list[dict]:
    """Rows with a byte count and a bandwidth: {"label", "kernel", "provider", "bytes", "GBps"}."""
    pts = []
    for r in rows:
        b, g = r.get("bytes"), r.get("GBps")
        if isinstance(b, (int, float)) and isinstance(g, (int, float)) and b > 0 and g > 0:
            pts.append({"label": f"{r.get('kernel')}/{r.get('case')}", "kernel": str(r.get("kernel")),
                        "provider": str(r.get("provider")), "bytes": float(b), "GBps": float(g)})
    return pts


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "kernel"


def plot_csv(csv_path: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs of one benchmark CSV; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise _missing_matplotlib() from exc

    meta, rows = read_csv(csv_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    title_sfx = f"{meta.get('device', '')} {meta.get('processor', '')} commit {meta.get('commit', '?')}"
    written = []

    for kernel, series in speedup_series(rows).items():
        cases, provs = series["cases"], series["providers"]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cases) * max(1, len(provs)) + 2), 4.5))
        width = 0.8 / max(1, len(provs))
        for j, (prov, vals) in enumerate(provs.items()):
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=prov)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speed-up vs eager upstream (x)")
        ax.set_title(f"{kernel}: speed-up per shape\n{title_sfx}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-speedup_{_safe(kernel)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    pts = roofline_points(rows)
    if pts:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        provs = sorted({p["provider"] for p in pts})
        markers = "os^vD<>px*"
        for j, prov in enumerate(provs):
            sel = [p for p in pts if p["provider"] == prov]
            ax.scatter([p["bytes"] for p in sel], [p["GBps"] for p in sel], marker=markers[j % len(markers)],
                       label=prov, alpha=0.8)
        bw = meta.get("bw_ref_GBps")
        try:
            bw = float(bw)
        except (TypeError, ValueError):
            bw = None
        if bw:
            ax.axhline(bw, color="r", ls="--", lw=1.2, label=f"measured bandwidth {bw:.1f} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved per call (model of the minimal traffic)")
        ax.set_ylabel("achieved GB/s")
        ax.set_title(f"achieved bandwidth vs measured peak\n{title_sfx}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-roofline.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
