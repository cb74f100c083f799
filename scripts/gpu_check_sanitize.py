"""scripts/gpu_check.sh: small launches of every fastsynth CUDA kernel path, for compute-sanitizer (memcheck / racecheck /
synccheck) and ncu. Paths: bn_stats plane (vectorised, multi-chunk, generic strides, C=1), rows
(channels_last, partial 32-channel block, (N, C) maps); fused_bn multi-split merge, channels_last,
sliced, with and without ReLU/statistics/weight grads; logit rows warp-per-row (vector and scalar)
and block-per-row (C > 1024, vector and scalar), partial last block; reinit > 64 tensors, mixed dtypes.
SAN_BACKENDS=cuda,triton adds the Triton kernels."""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.getcwd())
warnings.simplefilter("ignore")
from fastsynth.ops.bn_stat_loss import bn_stat_loss_multi  # noqa: E402
from fastsynth.ops.fused_bn import fused_bn  # noqa: E402
from fastsynth.ops.logit_losses import js_divergence, kd_loss, synthesis_logit_loss  # noqa: E402
from fastsynth.ops.reinit import make_seed, reinit_  # noqa: E402

dev = os.environ.get("SAN_DEVICE", "cuda")
torch.manual_seed(0)
failures = []


def cl(x):
    return x.contiguous(memory_format=torch.channels_last)


def attempt(label, fn):
    try:
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        print("ok  ", label, flush=True)
    except Exception as e:  # noqa: BLE001
        failures.append(label)
        print("FAIL", label, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}", flush=True)


for be in os.environ.get("SAN_BACKENDS", "cuda").split(","):
    for dt in (torch.float32, torch.float16, torch.float64):
        sdt = torch.float64 if dt == torch.float64 else torch.float32

        def bn():
            xs = [torch.randn(4, 3, 70, 70, device=dev, dtype=dt),            # plane, 2 chunks, vectorised
                  cl(torch.randn(4, 40, 20, 20, device=dev, dtype=dt)),        # rows, 40 = 32 + 8 channels, 2 chunks
                  torch.randn(1100, 33, device=dev, dtype=dt),                 # (N, C) rows
                  torch.randn(8, 1, 5, 5, device=dev, dtype=dt),               # C = 1
                  torch.randn(3, 5, 9, 14, device=dev, dtype=dt)[..., ::2]]    # generic strides
            xs = [x.detach().requires_grad_() for x in xs]
            rms = [torch.randn(x.shape[1], device=dev, dtype=sdt) for x in xs]
            rvs = [torch.rand(x.shape[1], device=dev, dtype=sdt) + 0.5 for x in xs]
            loss, _, _ = bn_stat_loss_multi(xs, rms, rvs, backend=be)
            torch.autograd.grad(loss, xs)

        def fbn():
            for x in (torch.randn(8, 4, 40, 40, device=dev, dtype=dt), cl(torch.randn(8, 36, 9, 9, device=dev, dtype=dt)),
                      torch.randn(8, 4, 40, 80, device=dev, dtype=dt)[..., ::2]):
                C = x.shape[1]
                for relu, stats, wgrad in ((True, True, True), (False, False, False), (True, False, True)):
                    xr = x.detach().requires_grad_()
                    w = torch.randn(C, device=dev, dtype=sdt).requires_grad_(wgrad)
                    b = torch.randn(C, device=dev, dtype=sdt).requires_grad_(wgrad)
                    y, mean, var = fused_bn(xr, w, b, torch.randn(C, device=dev, dtype=sdt),
                                            torch.rand(C, device=dev, dtype=sdt) + 0.5, 1e-5, relu, stats, backend=be)
                    loss = y.float().sum() + (mean.sum() + var.sum() if stats else 0)
                    torch.autograd.grad(loss, [xr] + ([w, b] if wgrad else []))

        def logits():
            for n, c in ((37, 10), (37, 9), (5, 1536), (3, 1031)):
                t = torch.randn(n, c, device=dev, dtype=dt).requires_grad_()
                s = torch.randn(n, c, device=dev, dtype=dt).requires_grad_()
                y = torch.randint(0, c, (n,), device=dev)
                if be != "reference":
                    y[0] = c + 5  # out-of-range target: clamped load, NaN CE (documented)
                loss = synthesis_logit_loss(t, s, y, oh=0.5, adv=1.3, backend=be)[0]
                loss = loss + kd_loss(s, t, 4.0, backend=be) + js_divergence(s, t, 3.0, backend=be)
                torch.autograd.grad(loss, [t, s])

        attempt(f"bn_stat_loss[{be},{dt}]", bn)
        attempt(f"fused_bn[{be},{dt}]", fbn)
        attempt(f"logit_losses[{be},{dt}]", logits)

    def ri():
        ts = [torch.empty(s, device=dev, dtype=d) for s, d in
              [((3, 5), torch.float32), ((1030, 7), torch.float16), ((1,), torch.float64)] + [((2, 3), torch.bfloat16)] * 70]
        reinit_(ts, make_seed(7, dev), "normal", 0.0, 1.0, backend=be)
        reinit_(ts, make_seed(8, dev), "uniform", -1.0, 1.0, backend=be)

    attempt(f"reinit[{be}]", ri)

print("driver done; failures:", failures)
sys.exit(1 if failures else 0)
