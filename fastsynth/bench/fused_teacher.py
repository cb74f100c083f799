"""Benchmark: teacher forward+backward with the BatchNorm-statistics loss (DeepInversion), CIFAR
ResNet-34 at batch 64 and 256 (``--quick``: ResNet-18, batch 16).

Providers, measured side by side in one run (teacher in eval mode, teacher parameters frozen as
in synthesis, the input requires grad like a generator output; loss = cross-entropy + BN loss):
  plain          teacher forward + cross-entropy + backward, no BN loss (the floor)
  upstream_hooks forward hook per BatchNorm2d computing mean and the permute().contiguous()
                 variance of its input and ||rv - var|| + ||rm - mean|| (DeepInversionHook)
  upstream_hooks_compile  the same step under torch.compile
  separate_stats hooks keep the BN inputs; statistics by torch.var_mean per layer, loss by the
                 vectorised loss_from_stats (the statistics computed apart from the teacher pass)
  fused          fastsynth.fuse_teacher (ReLUs folded into the BN pass) + bn_statistics +
                 loss_from_stats
  fused_no_relu  fuse_teacher(fuse_relu=False)
Reported: median ms per step, overhead over ``plain``, speedup over the upstream hooks and over
their compiled form, ATen ops per step, and the bytes the BN-loss work adds per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fuse import bn_statistics, fuse_teacher
from ..models import resnet18, resnet34
from ..ops.bn_stat_loss import loss_from_stats
from .harness import count_aten_ops, machine_info, print_table, write_csv


def _teacher(name: str, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = {"resnet18": resnet18, "resnet34": resnet34}[name]()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # trained-looking running statistics
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _UpstreamHook:
    """The DeepInversion hook as written upstream (mean, permute/contiguous variance, norms)."""

    def __init__(self, module: nn.Module):
        self.handle = module.register_forward_hook(self.hook)
        self.r_feature = None

    def hook(self, module, inputs, output):
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)

    def remove(self):
        self.handle.remove()


class _InputStash:
    def __init__(self, module: nn.Module):
        self.handle = module.register_forward_hook(self.hook)
        self.module = module
        self.input = None

    def hook(self, module, inputs, output):
        self.input = inputs[0]

    def remove(self):
        self.handle.remove()


def _bn_input_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(m, i, o):
        nonlocal total
        total += i[0].numel() * i[0].element_size()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total


def _providers(name: str, compile_upstream: bool):
    plain = _teacher(name)

    def step_plain(x, y):
        x = x.detach().requires_grad_(True)
        F.cross_entropy(plain(x), y).backward()
        return x.grad

    hooked = _teacher(name)
    hooks = [_UpstreamHook(m) for m in hooked.modules() if isinstance(m, nn.BatchNorm2d)]

    def upstream_step(x, y):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(hooked(x), y) + sum(h.r_feature for h in hooks)
        loss.backward()
        return x.grad

    stashed = _teacher(name)
    stashes = [_InputStash(m) for m in stashed.modules() if isinstance(m, nn.BatchNorm2d)]

    def step_separate(x, y):
        x = x.detach().requires_grad_(True)
        logits = stashed(x)
        stats = [torch.var_mean(s.input, dim=(0, 2, 3), correction=0) for s in stashes]
        bn = loss_from_stats([m for _, m in stats], [v for v, _ in stats],
                             [s.module.running_mean for s in stashes], [s.module.running_var for s in stashes])
        (F.cross_entropy(logits, y) + bn).backward()
        return x.grad

    fused = fuse_teacher(_teacher(name))
    fused_nr = fuse_teacher(_teacher(name), fuse_relu=False)

    def make_fused_step(model):
        def step(x, y):
            x = x.detach().requires_grad_(True)
            logits = model(x)
            (F.cross_entropy(logits, y) + loss_from_stats(*bn_statistics(model))).backward()
            return x.grad
        return step

    providers = {
        "plain": step_plain,
        "upstream_hooks": upstream_step,
        "separate_stats": step_separate,
        "fused": make_fused_step(fused),
        "fused_no_relu": make_fused_step(fused_nr),
    }
    if compile_upstream:
        compiled = torch.compile(upstream_step)
        providers["upstream_hooks_compile"] = compiled
    return providers, plain


def run(quick: bool = False, device: str = "cpu", compile_upstream: bool = True, reps: int | None = None,
        model: str | None = None, batches: list[int] | None = None) -> list[dict]:
    if device != "cpu":
        raise ValueError("this benchmark runs the CPU backend (device='cpu')")
    name = model or ("resnet18" if quick else "resnet34")
    cases = [(name, b) for b in (batches or ([16] if quick else [64, 256]))]
    rows = []
    for name, batch in cases:
        providers, plain = _providers(name, compile_upstream)
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        bn_bytes = _bn_input_bytes(plain, x)
        # correctness gate: the fused gradient equals the upstream one
        g_up = providers["upstream_hooks"](x, y)
        g_fused = providers["fused"](x, y)
        rel = float((g_fused - g_up).norm() / g_up.norm())
        if rel > 1e-3:
            raise RuntimeError(f"fused teacher gradient differs from the upstream hooks: rel err {rel:.3g}")
        # extra bytes the BN loss adds per step (model; A = BN input bytes of all layers):
        # upstream: fwd mean(1R) + permute/contiguous (1R+1W) + var (1R); bwd of var/mean/copy
        #           (~5 passes) + accumulation into the BN input gradient (2R+1W)
        # separate: fwd var_mean (1R); bwd (x - mean) * coef (1R+1W) + accumulation (2R+1W)
        # fused:    fwd 0 (statistics ride on the BN read); bwd +1R of x in the BN backward pass
        extra_bytes = {"plain": 0, "upstream_hooks": 12 * bn_bytes, "upstream_hooks_compile": 3 * bn_bytes,
                       "separate_stats": 6 * bn_bytes, "fused": bn_bytes, "fused_no_relu": bn_bytes}
        # providers are timed round-robin (one step of each per round) so that load drifting on
        # a shared machine hits every provider alike; median over the rounds
        r = reps if reps is not None else (3 if batch >= 256 else 5)
        for pname, fn in providers.items():
            for _ in range(2 if "compile" in pname else 1):
                fn(x, y)  # warm-up
        samples = {p: [] for p in providers}
        for _ in range(r):
            for pname, fn in providers.items():
                t0 = time.perf_counter()
                fn(x, y)
                samples[pname].append(time.perf_counter() - t0)
        times = {p: statistics.median(v) for p, v in samples.items()}
        # ATen ops per step do not depend on the batch: counted on a batch of 2
        x2, y2 = x[:2].clone(), y[:2].clone()
        ops = {p: count_aten_ops(lambda: fn(x2, y2)) for p, fn in providers.items() if "compile" not in p}
        for pname, t in times.items():
            rows.append({
                "kernel": "fused_teacher", "case": f"{name}/b{batch}", "provider": pname,
                "median_ms": t * 1e3,
                "overhead_vs_plain": t / times["plain"] - 1.0,
                "speedup_vs_eager": times["upstream_hooks"] / t,
                "speedup_vs_compile": (times["upstream_hooks_compile"] / t) if "upstream_hooks_compile" in times else "",
                "bytes": extra_bytes[pname], "bn_input_MB": bn_bytes / 2**20,
                "aten_ops": ops.get(pname, ""),
            })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default="benchmarks/results/fused_teacher.csv")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the upstream hooks")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--model", choices=["resnet18", "resnet34"], default=None)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; --quick 16)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    rows = run(quick=args.quick, device=args.device, compile_upstream=not args.no_compile, reps=args.reps,
               model=args.model, batches=batches)
    print_table(rows, ["case", "provider", "median_ms", "overhead_vs_plain", "speedup_vs_eager", "speedup_vs_compile",
                       "bytes", "aten_ops"])
    write_csv(rows, args.csv, machine_info(args.device))
    print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
