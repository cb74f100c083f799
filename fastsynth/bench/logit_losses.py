"""Benchmark of the fused logit losses against the upstream eager formulation and torch.compile
of it: median forward+backward time and ATen ops dispatched per call.

Kernels:
  synthesis  oh * CE(t, y) + adv * L_adv with the agreement mask (FastDFKD/NAYER synthesizer
             loss), gradients w.r.t. both logits;
  kd         T^2 KL(p_t(T) || p_s(T)) with a detached teacher (student training), T = 20.
Cases: N = 256 with C in {10, 100, 1000}, N = 64 with C = 21843.

    python benchmarks/bench_logit_losses.py [--quick] [--device cpu|cuda] [--csv PATH]

``--quick`` runs one small case without torch.compile (seconds). ``bytes`` is the traffic of the
fused path (forward reads t, s and writes both gradients; backward reads and writes them once
more: 8 N C elements), used for the GB/s of every provider.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from fastsynth import ops
from fastsynth.bench import harness
from fastsynth.bench.reference_loops import ref_adv, upstream_kldiv

CASES = [(256, 10), (256, 100), (256, 1000), (64, 21843)]
QUICK_CASES = [(256, 100)]
KERNELS = ("synthesis", "kd")
OH, ADV, KD_T = 0.5, 1.33, 20.0


# ---- the upstream formulation (FastDFKD / NAYER synthesizers, DataFree criterions) ----------

def upstream_synthesis_loss(t_out, s_out, targets):
    return OH * F.cross_entropy(t_out, targets) + ADV * ref_adv(s_out, t_out)


def upstream_kd_loss(s_out, t_out):
    return upstream_kldiv(s_out, t_out.detach(), T=KD_T)


def fused_synthesis_loss(backend):
    def fn(t_out, s_out, targets):
        return ops.synthesis_logit_loss(t_out, s_out, targets, oh=OH, adv=ADV, backend=backend)[0]

    return fn


def fused_kd_loss(backend):
    def fn(s_out, t_out):
        return ops.kd_loss(s_out, t_out.detach(), KD_T, backend=backend)

    return fn


# ---- one measured call: forward + backward --------------------------------------------------

def _make_step(kernel, loss_fn, t, s, y):
    if kernel == "synthesis":
        def step():
            return torch.autograd.grad(loss_fn(t, s, y), [t, s])
    else:
        def step():
            return torch.autograd.grad(loss_fn(s, t), [s])
    return step


def _providers(kernel, device, with_compile):
    up = upstream_synthesis_loss if kernel == "synthesis" else upstream_kd_loss
    fused = fused_synthesis_loss if kernel == "synthesis" else fused_kd_loss
    out = [("upstream-eager", up)]
    if with_compile:
        out.append(("upstream-compile", torch.compile(up, fullgraph=True, dynamic=False)))
    if device.type == "cuda":
        out.append(("fastsynth-cuda", fused("cuda")))
        out.append(("fastsynth-triton", fused("triton")))
    else:
        out.append(("fastsynth-cpu", fused("cpu")))
    return out


def run(quick: bool = False, device: str = "cpu", with_compile: bool | None = None,
        kernels=KERNELS) -> list[dict]:
    device = torch.device(device)
    with_compile = (not quick) if with_compile is None else with_compile
    cases = QUICK_CASES if quick else CASES
    reps = 5 if quick else 20
    bw = harness.measure_bandwidth(16 * 2**20 if quick else 256 * 2**20, device=device, reps=3)
    rows = []
    for kernel in kernels:
        for n, c in cases:
            torch.manual_seed(0)
            t = (torch.randn(n, c, device=device) * 3).requires_grad_()
            s = (0.6 * t.detach() + torch.randn(n, c, device=device) * 3).requires_grad_()
            y = torch.randint(0, c, (n,), device=device)
            nbytes = 8 * n * c * t.element_size()
            case_rows = []
            for name, loss_fn in _providers(kernel, device, with_compile):
                step = _make_step(kernel, loss_fn, t, s, y)
                sec = harness.median_time(step, warmup=3, reps=reps, device=device, min_time=0.0 if quick else 0.3)
                aten = "" if name.endswith("compile") else harness.count_aten_ops(step)
                case_rows.append({
                    "kernel": kernel, "case": f"N={n} C={c}", "provider": name, "median_ms": sec * 1e3,
                    "bytes": nbytes, "GBps": nbytes / sec / 1e9, "bw_frac": nbytes / sec / 1e9 / bw["read_GBps"],
                    "aten_ops": aten,
                })
            eager = next(r["median_ms"] for r in case_rows if r["provider"] == "upstream-eager")
            comp = next((r["median_ms"] for r in case_rows if r["provider"] == "upstream-compile"), None)
            for r in case_rows:
                r["speedup_vs_eager"] = eager / r["median_ms"]
                r["speedup_vs_compile"] = comp / r["median_ms"] if comp else ""
            rows += case_rows
    return rows


COLUMNS = ["kernel", "case", "provider", "median_ms", "speedup_vs_eager", "speedup_vs_compile", "aten_ops",
           "bytes", "GBps", "bw_frac"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small case, no torch.compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    p.add_argument("--compile", dest="with_compile", action="store_true", default=None,
                   help="include torch.compile also with --quick")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick, device=args.device, with_compile=args.with_compile,
               kernels=[k for k in args.kernels.split(",") if k])
    rows = [{k: r.get(k, "") for k in COLUMNS} for r in rows]
    print(harness.machine_info(args.device))
    harness.print_table(rows, COLUMNS)
    if args.csv:
        harness.write_csv(rows, args.csv, meta=harness.machine_info(args.device))
        print(f"wrote {os.path.abspath(args.csv)}")
    return rows


if __name__ == "__main__":
    main()
