"""Benchmark of the BatchNorm-statistics loss: forward + backward of one layer's loss.

Shapes: the BatchNorm inputs of a CIFAR ResNet-34 at batch 256 (recorded from
fastsynth.models.resnet34 on the meta device) and of an ImageNet ResNet-50 (torchvision layout,
stride in the 3x3 conv) at batch 32, each distinct shape once, with the number of BN layers that
see it. Providers, measured side by side:

  eager      the upstream hook's formulation (mean, permute().contiguous().var, two norms)
  compile    torch.compile of that function
  fastsynth  fastsynth.ops.bn_stat_loss (backend cpu on CPU; cuda and triton on a GPU)

Timed: loss and torch.autograd.grad(loss, x) (median). Bytes: the floor of a fused op, one read
of x forward, one read of x and one write of dL/dx backward (3 * numel * element size);
bw_frac = achieved GB/s / measured read bandwidth of this machine.

    python benchmarks/bench_bn_stat_loss.py [--quick] [--device cpu|cuda] [--csv PATH]
"""
from __future__ import annotations

import argparse
import os

import torch

from . import harness

RESNET50_BN_INPUTS = [  # (C, H, W) of every BatchNorm2d input of an ImageNet ResNet-50, with counts
    ((64, 112, 112), 1),                                   # stem
    ((64, 56, 56), 6), ((256, 56, 56), 4),                 # layer1 (3 blocks + downsample)
    ((128, 56, 56), 1), ((128, 28, 28), 7), ((512, 28, 28), 5),       # layer2 (4 blocks)
    ((256, 28, 28), 1), ((256, 14, 14), 11), ((1024, 14, 14), 7),     # layer3 (6 blocks)
    ((512, 14, 14), 1), ((512, 7, 7), 5), ((2048, 7, 7), 4),          # layer4 (3 blocks)
]


def cifar_resnet34_bn_inputs(batch: int) -> list[tuple[tuple[int, ...], int]]:
    """Distinct BN input shapes of fastsynth.models.resnet34 at ``batch`` (recorded on meta)."""
    from ..models import resnet34

    with torch.device("meta"):
        net = resnet34(num_classes=10)
        shapes = []
        hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
                 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        net(torch.empty(batch, 3, 32, 32))
        for h in hooks:
            h.remove()
    counts: dict = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    return list(counts.items())


def eager_hook_loss(x, running_mean, running_var):
    """The upstream hook's computation of one layer's loss."""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def cases(quick: bool):
    if quick:
        return ([("cifar-r34", (16,) + s[1:], n) for s, n in cifar_resnet34_bn_inputs(16)[:2]]
                + [("imagenet-r50", (2,) + c, n) for c, n in RESNET50_BN_INPUTS[:2]])
    return ([("cifar-r34", s, n) for s, n in cifar_resnet34_bn_inputs(256)]
            + [("imagenet-r50", (32,) + c, n) for c, n in RESNET50_BN_INPUTS])


def run(quick: bool = False, device: str = "cpu", compile_provider: bool | None = None) -> list[dict]:
    from ..ops.bn_stat_loss import bn_stat_loss

    dev = torch.device(device)
    compile_provider = (not quick) if compile_provider is None else compile_provider
    bw = harness.measure_bandwidth(64 * 2**20 if quick else 256 * 2**20, device=device)
    reps, warmup = (3, 1) if quick else (7, 2)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(eager_hook_loss, dynamic=False) if compile_provider else None
    providers = [("eager", eager_hook_loss)]
    if compiled is not None:
        providers.append(("compile", compiled))
    if dev.type == "cpu":
        providers.append(("fastsynth-cpu", lambda x, rm, rv: bn_stat_loss(x, rm, rv, backend="cpu")[0]))
    else:
        providers.append(("fastsynth-cuda", lambda x, rm, rv: bn_stat_loss(x, rm, rv, backend="cuda")[0]))
        providers.append(("fastsynth-triton", lambda x, rm, rv: bn_stat_loss(x, rm, rv, backend="triton")[0]))

    rows = []
    for net, shape, count in cases(quick):
        x = torch.randn(shape, device=dev).requires_grad_()
        C = shape[1]
        rm = torch.randn(C, device=dev)
        rv = torch.rand(C, device=dev) + 0.5
        nbytes = 3 * x.numel() * x.element_size()
        times = {}
        for name, fn in providers:
            def step(fn=fn):
                loss = fn(x, rm, rv)
                return torch.autograd.grad(loss, x)
            times[name] = harness.median_time(step, warmup=warmup, reps=reps, device=device)
        for name, _ in providers:
            t = times[name]
            rows.append({
                "kernel": "bn_stat_loss", "case": f"{net} {tuple(shape)} x{count}", "provider": name,
                "median_ms": t * 1e3,
                "speedup_vs_eager": times["eager"] / t,
                "speedup_vs_compile": times["compile"] / t if "compile" in times else float("nan"),
                "bytes": nbytes, "GBps": nbytes / t / 1e9, "bw_frac": nbytes / t / 1e9 / bw["read_GBps"],
            })
        del x
    for r in rows:
        r["read_GBps_measured"] = bw["read_GBps"]
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for p in dict.fromkeys(r["provider"] for r in rows):
        sel = [r for r in rows if r["provider"] == p]
        out.append({"provider": p,
                    "geomean_speedup_vs_eager": harness.geomean(r["speedup_vs_eager"] for r in sel),
                    "geomean_speedup_vs_compile": harness.geomean(r["speedup_vs_compile"] for r in sel),
                    "geomean_bw_frac": harness.geomean(r["bw_frac"] for r in sel)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, no torch.compile provider (seconds)")
    ap.add_argument("--compile", action="store_true", help="include torch.compile also in --quick mode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default=os.path.join("benchmarks", "results", "bn_stat_loss.csv"))
    args = ap.parse_args(argv)
    rows = run(quick=args.quick, device=args.device, compile_provider=True if args.compile else None)
    harness.print_table(rows, ["case", "provider", "median_ms", "speedup_vs_eager", "speedup_vs_compile", "GBps",
                               "bw_frac"])
    print()
    harness.print_table(summary(rows))
    path = harness.write_csv(rows, args.csv, harness.machine_info(args.device))
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
