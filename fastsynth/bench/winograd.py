"""Benchmark: a frozen-weight 3x3 convolution's forward + input gradient, the ResNet stage shapes
at batch 64 (``--quick``: batch 8), CPU.

Providers, timed in alternation in one run (weights frozen as in synthesis, the input requires
grad like a generator output, one backward with a random output gradient):
  eager_nchw           F.conv2d on NCHW maps (oneDNN; the eager reference)
  eager_channels_last  F.conv2d on channels_last maps and weights (oneDNN's NHWC kernels)
  eager_compile        torch.compile of the eager_nchw step (the convolution stays oneDNN's)
  fastsynth_winograd   fastsynth.cpu.winograd.winograd_conv3x3 (Winograd F(2x2, 3x3))
Reported: median ms, speedups over the eager and the compiled step, bytes moved (input, output,
their gradients and the weight; the floor for a memory-bound kernel, which these are not), and
the FLOPs each method executes (direct: 2 * 9 * C * K per output pixel and direction; Winograd's
GEMMs: 2 * 16 * C * K per 2x2 tile and direction, transforms not counted).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ..cpu import winograd
from .harness import interleaved_median_times, machine_info, print_table, write_csv

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, map side): ResNet stages at 32x32 input


def _step(conv, x, go):
    def fn():
        y = conv(x)
        (gx,) = torch.autograd.grad(y, x, go)
        return gx
    return fn


def run(quick: bool = False, device: str = "cpu", compile_upstream: bool = True, reps: int | None = None,
        batch: int | None = None) -> list[dict]:
    if device != "cpu":
        raise ValueError("this benchmark runs the CPU backend (device='cpu'); on a GPU cuDNN picks its own algorithm")
    n = batch or (8 if quick else 64)
    r = reps or (3 if quick else 9)
    rows = []
    for c, hw in SHAPES:
        g = torch.Generator().manual_seed(c)
        w = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
        x = torch.randn(n, c, hw, hw, generator=g).requires_grad_()
        go = torch.randn(n, c, hw, hw, generator=g)
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        go_cl = go.contiguous(memory_format=torch.channels_last)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        owner = torch.nn.Module()  # holds the transformed weights, as a fused model's conv does
        providers = {
            "eager_nchw": _step(lambda t: F.conv2d(t, w, padding=1), x, go),
            "eager_channels_last": _step(lambda t: F.conv2d(t, w_cl, padding=1), x_cl, go_cl),
            "fastsynth_winograd": _step(lambda t: winograd.winograd_conv3x3(t, w, owner=owner), x_cl, go_cl),
        }
        if compile_upstream:
            providers["eager_compile"] = _step(torch.compile(lambda t: F.conv2d(t, w, padding=1), dynamic=False), x, go)
        # correctness gate against float64 (forward and input gradient)
        ref_y = F.conv2d(x.detach().double(), w.double(), padding=1)
        ref_gx = F.conv2d(go.double(), w.double().transpose(0, 1).flip(-1, -2), padding=1)
        y = winograd.winograd_conv3x3(x_cl.detach(), w, owner=owner)
        gx = providers["fastsynth_winograd"]()
        for name, got, ref in (("output", y, ref_y), ("input gradient", gx, ref_gx)):
            err = float((got.double() - ref).abs().max() / ref.abs().max())
            if err > 4e-6:
                raise RuntimeError(f"winograd {name} differs from float64 at {c} ch {hw}x{hw}: {err:.3g}")
        times = interleaved_median_times(providers, warmup=2, reps=r)
        elems = n * c * hw * hw
        nbytes = 4 * (4 * elems + 9 * c * c)  # x, y, grad_y, grad_x and the weight
        tiles = n * ((hw + 1) // 2) ** 2
        flops_direct = 2 * 2 * 9 * c * c * n * hw * hw
        flops_wino = 2 * 2 * 16 * c * c * tiles
        for p, t in times.items():
            flops = flops_wino if p == "fastsynth_winograd" else flops_direct
            rows.append({
                "kernel": "winograd_conv3x3", "case": f"{c}ch_{hw}x{hw}_b{n}", "provider": p,
                "median_ms": t * 1e3,
                "speedup_vs_eager": times["eager_nchw"] / t,
                "speedup_vs_compile": times["eager_compile"] / t if "eager_compile" in times else "",
                "bytes": nbytes, "GFLOP": flops / 1e9, "GFLOPs_per_s": flops / t / 1e9,
            })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as set)")
    ap.add_argument("--csv", default="benchmarks/results/winograd.csv")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick, device=args.device, compile_upstream=not args.no_compile, reps=args.reps,
               batch=args.batch)
    print_table(rows, ["case", "provider", "median_ms", "speedup_vs_eager", "speedup_vs_compile", "GFLOP",
                       "GFLOPs_per_s"])
    write_csv(rows, args.csv, machine_info(args.device))
    print(f"wrote {args.csv}")
    return rows
