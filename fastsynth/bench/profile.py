"""``fastsynth profile``: a few synthesis steps under torch.profiler.

Writes ``trace.json`` (Chrome trace: open in https://ui.perfetto.dev or chrome://tracing) and
``top_ops.txt`` (the operators with the most self time), and prints the table. The phases of each inner step (generator, augment, teacher, losses with
student inside it, backward, step) are ``record_function`` ranges in the trace on the CPU and
NVTX ranges for Nsight Systems on a GPU:

    nsys profile -t cuda,nvtx -o synth fastsynth profile --device cuda --steps 5

One ``FastMetaSynthesizer.synthesize()`` round of ``--steps`` inner iterations is profiled
(``--impl synthesizer``; ``auto`` means the same).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def build_runner(impl: str, *, steps: int, batch: int, device: str, out_dir: str,
                 teacher: str = "resnet34", student: str = "resnet18"):
    """A zero-argument callable running ``steps`` synthesis steps, and the impl it uses."""
    from .workloads import CIFAR_MEAN, CIFAR_STD, cifar_config

    nz, num_classes = 256, 10
    teacher, student, generator = cifar_config(nz=nz, num_classes=num_classes, teacher=teacher, student=student)
    if impl == "auto":
        impl = "synthesizer"
    if impl != "synthesizer":
        raise ValueError(f"--impl must be auto or synthesizer, got {impl!r}")
    from fastsynth.synthesis import FastMetaSynthesizer, Normalizer

    dev = torch.device(device)
    # warmup=0: the steady-state step (adversarial term and student forward on from the first round)
    synth = FastMetaSynthesizer(teacher.to(dev).eval(), student.to(dev).eval(), generator.to(dev), nz=nz,
                                num_classes=num_classes, img_size=(3, 32, 32), iterations=steps, lr_g=5e-3,
                                lr_z=0.015, synthesis_batch_size=batch, sample_batch_size=batch, adv=1.33, bn=10,
                                oh=0.5, bn_mmt=0.9, warmup=0, save_dir=os.path.join(out_dir, "synth"),
                                normalizer=Normalizer(CIFAR_MEAN, CIFAR_STD), device=dev)
    if dev.type != "cuda":
        synth._nvtx = "record"  # the phases as torch.profiler ranges (NVTX ranges on a GPU)

    def run_round():
        with torch.profiler.record_function("synthesize"):
            return synth.synthesize()

    return run_round, impl


def profile(steps: int = 3, out_dir: str = "profile_out", *, device: str = "cpu", batch: int | None = None,
            impl: str = "auto", warmup: int = 1, row_limit: int = 25, quiet: bool = False,
            teacher: str = "resnet34", student: str = "resnet18") -> dict:
    """Profile ``steps`` synthesis steps; returns {"trace", "table", "impl", "seconds"}."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("fastsynth profile --device cuda: no CUDA device is available")
    batch = batch or (64 if dev.type == "cuda" else 16)
    os.makedirs(out_dir, exist_ok=True)
    run_steps, impl = build_runner(impl, steps=steps, batch=batch, device=device, out_dir=out_dir,
                                   teacher=teacher, student=student)
    for _ in range(warmup):  # lazy init, Triton JIT, optimiser state outside the trace
        run_steps()
    if dev.type == "cuda":
        torch.cuda.synchronize()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        run_steps()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    trace = os.path.join(out_dir, "trace.json")
    prof.export_chrome_trace(trace)
    sort_by = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    header = (f"fastsynth profile: impl={impl} device={device} teacher={teacher} student={student} "
              f"batch={batch} steps={steps} "
              f"({seconds:.2f} s under the profiler)\n")
    table_path = os.path.join(out_dir, "top_ops.txt")
    with open(table_path, "w") as f:
        f.write(header + table + "\n")
    if not quiet:
        print(header + table)
        print(f"trace: {trace}  (open in https://ui.perfetto.dev)\ntable: {table_path}")
    return {"trace": trace, "table": table_path, "impl": impl, "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastsynth profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="synthesis steps to profile (default 3)")
    p.add_argument("--out", default="profile_out", help="output folder for trace.json and top_ops.txt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="synthesis batch (default 64 on a GPU, 16 on a CPU)")
    p.add_argument("--impl", default="auto", choices=["auto", "synthesizer"])
    p.add_argument("--warmup", type=int, default=1, help="untraced warm-up rounds (default 1)")
    p.add_argument("--rows", type=int, default=25, help="rows of the top-operator table")
    p.add_argument("--teacher", default="resnet34", choices=["resnet18", "resnet34"])
    p.add_argument("--student", default="resnet18", choices=["resnet18", "resnet34"])
    a = p.parse_args(argv)
    profile(a.steps, a.out, device=a.device, batch=a.batch, impl=a.impl, warmup=a.warmup, row_limit=a.rows,
            teacher=a.teacher, student=a.student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
