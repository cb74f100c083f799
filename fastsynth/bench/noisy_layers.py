"""Benchmark: NAYER's noisy layers, re-initialisation and forward+backward.

Configurations (NAYER's CIFAR scripts: synthesis batch 400, le_size 512 (CLIP), le_emb_size 1000,
nl = number of classes): CIFAR-10 has K = 40 noisy layers of 512x1000, CIFAR-100 K = 4.

re-init (once per synthesised batch):
  upstream          loop over K nn.Linear: nn.init.normal_(weight, 0, 1); nn.init.constant_(bias, 0)
  upstream_compile  torch.compile of that loop
  fastsynth         fastsynth.ops.reinit_([W, b], seed, ["normal", "constant"]): one launch
  write_floor       W.fill_(1); b.zero_(): writing the same bytes once, no random numbers
  philox_uniform    reinit_ of the same tensors with dist="uniform": the Philox4x32-10 stream and the
                    stores without Box-Muller, i.e. what the stream contract costs before any
                    normal transform (a floor for the fused op on this CPU)
  bytes = 4 K (512*1000 + 1000) written.

noisy layers forward + backward (every inner step):
  upstream          ModuleList loop over row blocks of nl rows + torch.cat (NLGenerator.forward)
  upstream_compile  torch.compile of it
  baddbmm           one baddbmm over [K, nl, 512] x [K, 512, 1000] (noisy_linear backend="reference",
                    the CUDA path)
  fastsynth         fastsynth.nn.NoisyLayers: fastsynth.ops.noisy_linear (fused CPU kernels)
  Each step sets the gradients to None first (NAYER's optimizer.zero_grad()), so every
  provider allocates its weight gradient afresh, as in training.
  bytes ~ 3 * 4 K 512*1000 (read W forward, read W for grad_input, write grad_W) + activations,
  FLOPs = 3 * 2 * B * 512 * 1000.

    python benchmarks/bench_noisy_layers.py [--quick] [--device cpu|cuda] [--csv PATH] [--threads N]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn

from ..nn.generators import NoisyLayers
from ..ops.noisy_linear import noisy_linear
from ..ops.reinit import make_seed, reinit_
from . import harness

CONFIGS = {"cifar10": dict(batch=400, nl=10, le_size=512, le_emb_size=1000),
           "cifar100": dict(batch=400, nl=100, le_size=512, le_emb_size=1000)}


def _upstream_layers(k, le_size, le_emb_size, device):
    return nn.ModuleList([nn.Linear(le_size, le_emb_size) for _ in range(k)]).to(device)


def _upstream_reinit(layers):
    for layer in layers:
        nn.init.normal_(layer.weight, mean=0, std=1)
        nn.init.constant_(layer.bias, 0)


def _upstream_forward(layers, le, nl):
    v = None
    for i, layer in enumerate(layers):
        sle = le[i * nl:] if (i + 1) * nl > le.shape[0] else le[i * nl:(i + 1) * nl]
        sv = layer(sle)
        v = sv if v is None else torch.cat((v, sv))
    return v


def _row(kernel, case, provider, t, nbytes, base, base_compile, bw, ops=None, flops=None):
    gbps = nbytes / t / 1e9
    row = {"kernel": kernel, "case": case, "provider": provider, "median_ms": t * 1e3,
           "speedup_vs_eager": base / t if base else float("nan"),
           "speedup_vs_compile": base_compile / t if base_compile else float("nan"),
           "bytes": nbytes, "GBps": gbps, "bw_frac": gbps / bw if bw else float("nan")}
    if ops is not None:
        row["aten_ops"] = ops
    if flops is not None:
        row["GFLOPs"] = flops / t / 1e9
    return row


def run(quick: bool = False, device: str = "cpu", compile_upstream: bool | None = None) -> list[dict]:
    """``compile_upstream``: also time torch.compile of the upstream loops (default: not with quick)."""
    reps, warmup = (2, 1) if quick else (15, 3)
    bw = harness.measure_bandwidth(16 * 2**20 if quick else 256 * 2**20, device=device)["copy_GBps"]
    rows = []
    with_compile = (not quick) if compile_upstream is None else compile_upstream
    for case, cfg in CONFIGS.items():
        b, nl, le_size, emb = cfg["batch"], cfg["nl"], cfg["le_size"], cfg["le_emb_size"]
        k = math.ceil(b / nl)
        case_name = f"{case} K={k} {le_size}x{emb} B={b}"
        torch.manual_seed(0)

        # ---- re-initialisation ----
        layers = _upstream_layers(k, le_size, emb, device)
        noisy = NoisyLayers(k, le_size, emb, nl).to(device)
        nbytes = 4 * k * (le_size * emb + emb)
        times = {}
        with torch.no_grad():
            times["upstream"] = harness.median_time(lambda: _upstream_reinit(layers), warmup=warmup, reps=reps,
                                                    device=device)
            ops = {"upstream": harness.count_aten_ops(lambda: _upstream_reinit(layers))}
            if with_compile:
                try:
                    creinit = torch.compile(_upstream_reinit)
                    times["upstream_compile"] = harness.median_time(lambda: creinit(layers), warmup=warmup,
                                                                    reps=reps, device=device)
                except Exception as exc:  # noqa: BLE001  (report, keep benchmarking)
                    print(f"# upstream_compile re-init failed: {type(exc).__name__}: {exc}")
            times["fastsynth"] = harness.median_time(noisy.re_init, warmup=warmup, reps=reps, device=device)
            ops["fastsynth"] = harness.count_aten_ops(
                lambda: reinit_([noisy.weight, noisy.bias], noisy.seed, ["normal", "constant"], [0.0, 0.0], [1.0, 0.0]))

            def floor():
                noisy.weight.fill_(1.0)
                noisy.bias.zero_()

            times["write_floor"] = harness.median_time(floor, warmup=warmup, reps=reps, device=device)
            times["philox_uniform"] = harness.median_time(
                lambda: reinit_([noisy.weight, noisy.bias], noisy.seed, "uniform", 0.0, 1.0), warmup=warmup,
                reps=reps, device=device)
        base, base_c = times["upstream"], times.get("upstream_compile")
        for prov, t in times.items():
            rows.append(_row("noisy_reinit", case_name, prov, t, nbytes, base, base_c, bw, ops.get(prov)))

        # ---- forward + backward ----
        with torch.no_grad():
            for i, layer in enumerate(layers):  # same weights in both formulations
                layer.weight.copy_(noisy.weight[i].t())
                layer.bias.copy_(noisy.bias[i])
        le = torch.randn(b, le_size, device=device, requires_grad=True)
        grad = torch.randn(b, emb, device=device)
        fb_bytes = 4 * (3 * k * le_size * emb + 3 * b * le_size + 2 * b * emb)
        flops = 3 * 2 * b * le_size * emb

        def fwd_bwd(fn, params):
            # as in NAYER's inner step: gradients set to None (optimizer.zero_grad()), forward, backward
            def step():
                for p in params:
                    p.grad = None
                le.grad = None
                out = fn(le)
                out.backward(grad)
            return step

        up_params = list(layers.parameters())
        up = fwd_bwd(lambda x: _upstream_forward(layers, x, nl), up_params)
        ours = fwd_bwd(noisy, [noisy.weight, noisy.bias])
        bmm = fwd_bwd(lambda x: noisy_linear(x, noisy.weight, noisy.bias, nl, backend="reference"),
                      [noisy.weight, noisy.bias])
        times = {"upstream": harness.median_time(up, warmup=warmup, reps=reps, device=device)}
        if with_compile:
            try:
                cfwd = torch.compile(lambda x: _upstream_forward(layers, x, nl))
                times["upstream_compile"] = harness.median_time(fwd_bwd(cfwd, up_params), warmup=warmup, reps=reps,
                                                                device=device)
            except Exception as exc:  # noqa: BLE001
                print(f"# upstream_compile fwd+bwd failed: {type(exc).__name__}: {exc}")
        times["baddbmm"] = harness.median_time(bmm, warmup=warmup, reps=reps, device=device)
        times["fastsynth"] = harness.median_time(ours, warmup=warmup, reps=reps, device=device)
        base, base_c = times["upstream"], times.get("upstream_compile")
        for prov, t in times.items():
            rows.append(_row("noisy_fwd_bwd", case_name, prov, t, fb_bytes, base, base_c, bw, flops=flops))
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions, no torch.compile providers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers (slow to compile)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU) before measuring")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick, device=args.device, compile_upstream=False if args.no_compile else None)
    harness.print_table(rows, ["kernel", "case", "provider", "median_ms", "speedup_vs_eager", "speedup_vs_compile",
                               "bytes", "GBps", "bw_frac", "aten_ops"])
    if args.csv:
        harness.write_csv(rows, args.csv, meta=harness.machine_info(args.device))
    return rows


if __name__ == "__main__":
    main()
