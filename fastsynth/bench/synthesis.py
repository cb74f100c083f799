"""Benchmark of one FastDFKD synthesis inner step: fastsynth's FastMetaSynthesizer against the
eager upstream-style loop.

Setting (full): CIFAR ResNet-34 teacher, ResNet-18 student (random weights, BN running
statistics set to random values), FastDFKD generator (nz 256, ngf 64, 32x32), batch 64,
g_steps 2, adversarial term on, bn_mmt 0.9, first-order MAML. ``--quick``: a narrow 3-stage
CNN pair at batch 16.

``--models``: the teacher and student as fastsynth.models defines them, the upstream-style
classifiers of fastsynth.models.upstream (what a user of the upstream repositories hands the
synthesizer: ``forward(x, return_features=False)``, in-place residual adds; ``--quick``: CIFAR
ResNet-20 -> ResNet-8 at batch 16), or both (``run()``'s default, what ``fastsynth bench`` runs).
The fastsynth rows carry ``fusion``: what the teacher and student rewrites reached
(``fuse.fusion_stats``).

Providers (measured side by side in one run; ``reference`` and ``fastsynth`` in alternation,
one step of each in turn, so that their ratio is taken under the same machine state):
- ``reference``: the upstream loop body, eagerly (``RefFast`` of fastsynth/bench/reference_loops.py,
  the loop the equivalence tests run against, with upstream's augmentation): forward hooks on
  every teacher BN computing its loss (permute().contiguous() variance), kornia-style
  augmentation (affine grid + grid sample per batch, normaliser tensors built per call),
  separate losses summed in Python, ``.item()`` per step for the loss record and best-image
  tracking, teacher and student parameters requiring grad, per-parameter MAML gradient
  accumulation, Adam; the upstream generator (a plain ``nn.Sequential``: every nearest 2x
  upsample materialised, then its 3x3 convolution);
- ``fastsynth``: ``FastMetaSynthesizer._step`` (one inner step) in eager mode;
- ``fastsynth+compile``: the same with ``compile=True`` (inductor; skipped by ``--no-compile``);
- ``fastsynth+cuda_graph``: on a GPU, the captured step replayed.

Columns: median seconds per inner step, ATen ops per inner step (AtenOpCounter: each op is
about one kernel launch on a GPU), peak extra memory of one step (CUDA: max_memory_allocated;
CPU: the peak of live bytes allocated inside the step, tracked by a dispatch mode), speedup.
``--breakdown``: only the eager fastsynth step's ATen ops by phase and op name (``op_breakdown``).
``--generative``: only the GenerativeSynthesizer rows (``run_generative``). ``--new METHODS``: only
the issue-19 synthesizers (CMI, FastMeta for ImageNet, DeepInversion with NVlabs' ImageNet options,
DAFL) against the eager reference loops of the equivalence tests (fastsynth/bench/reference_loops.py,
fastsynth/bench/reference_cmi.py), per synthesize() call (``run_new``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import harness
from .reference_loops import (RefDeepInv, RefFast, RefFastMetaImageNet, RefGenerative, ReturnFeatures,
                              UpstreamNormalizer, upstream_augment, upstream_kldiv)
from .workloads import CIFAR_MEAN, CIFAR_STD

KERNEL = "synthesis_step"


# ----------------------------------------------------------------------------- models
def _randomise_bn(model: nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _small_cnn(width):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def upstream_generator(gen: nn.Module) -> nn.Module:
    """A copy of a fastsynth generator as upstream computes it: ``conv_blocks`` a plain
    ``nn.Sequential`` of the same modules (no fused upsample + conv), same weights."""
    up = copy.deepcopy(gen)
    up.conv_blocks = nn.Sequential(*up.conv_blocks)
    return up


def build(quick: bool, device, models: str = "fastsynth"):
    """``models="upstream"``: the teacher and student are the upstream-style classifiers of
    ``fastsynth.models.upstream`` (``forward(x, return_features=False)``, in-place residual adds),
    what a user of the upstream repositories hands the synthesizer."""
    from ..models import resnet18, resnet34
    from ..models import upstream
    from ..nn import Generator

    if models not in ("fastsynth", "upstream"):
        raise ValueError(f"models must be 'fastsynth' or 'upstream', got {models!r}")
    if models == "upstream":
        resnet18, resnet34 = upstream.resnet18, upstream.resnet34
    torch.manual_seed(0)
    if quick and models == "upstream":
        teacher, student = upstream.cifar_resnet20(10), upstream.cifar_resnet8(10)
        batch, nz, ngf = 16, 64, 16
    elif quick:
        teacher, student = _small_cnn(16), _small_cnn(8)
        batch, nz, ngf = 16, 64, 16
    else:
        teacher, student = resnet34(10), resnet18(10)
        batch, nz, ngf = 64, 256, 64
    teacher = _randomise_bn(teacher, 1).to(device).eval()
    student = _randomise_bn(student, 2).to(device).train()
    gen = Generator(nz=nz, ngf=ngf, img_size=32, nc=3).to(device)
    return teacher, student, gen, batch, nz


MEAN, STD = CIFAR_MEAN, CIFAR_STD
UPSTREAM_NORMALIZER = UpstreamNormalizer(MEAN, STD)


# ----------------------------------------------------------------------------- reference loop
def reference_in_round(teacher, student, generator, batch, nz, device="cpu", iterations=2):
    """The eager upstream FastMeta loop (``RefFast`` of reference_loops.py, the loop of the equivalence
    tests) with upstream's augmentation and normaliser, after one full round (momentum statistics
    exist, as in a real run) and inside a new one: ``step()`` is one inner iteration."""
    ref = RefFast(teacher, student, generator, nz, 10, iterations, 5e-3, 0.015, batch, adv=1.33, bn=10.0, oh=0.5,
                  normalizer=UPSTREAM_NORMALIZER, warmup=0, bn_mmt=0.9, is_maml=1,
                  aug=upstream_augment(UPSTREAM_NORMALIZER), device=device)
    ref.synthesize()
    ref.begin()
    return ref


# ----------------------------------------------------------------------------- memory
class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated inside the block and still alive (approximate)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set = set()

    def _free(self, ptr, n):
        self.live -= n
        self._seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t) and t.device.type == "cpu":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr and ptr not in self._seen and st.nbytes() > 0:
                    self._seen.add(ptr)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    try:
                        weakref.finalize(t, self._free, ptr, st.nbytes())
                    except TypeError:
                        pass
        return out


def count_launches_profiled(fn) -> int:
    """Top-level operator calls of ``fn`` seen by the profiler: ATen ops not nested in another
    op, plus inductor-generated kernels. Used for compiled code, which a TorchDispatchMode
    counter cannot observe (dynamo refuses to run under a user dispatch mode)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for e in prof.events():
        name = e.name
        is_op = name.startswith("aten::") or "fused" in name or name.startswith("fastsynth::")
        if not is_op:
            continue
        p = e.cpu_parent
        while p is not None and not (p.name.startswith("aten::") or p.name.startswith("fastsynth::")):
            p = p.cpu_parent
        if p is None:
            n += 1
    return n


def _peak_mb(fn, device) -> float:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with _LiveBytes() as m:
        fn()
    return m.peak / 2**20


# ----------------------------------------------------------------------------- providers
def _fastsynth(teacher, student, gen, batch, nz, device, **kw):
    from ..synthesis import FastMetaSynthesizer, Normalizer

    syn = FastMetaSynthesizer(teacher, student, gen, nz=nz, num_classes=10, img_size=(3, 32, 32), iterations=2,
                              lr_g=5e-3, lr_z=0.015, synthesis_batch_size=batch, sample_batch_size=batch,
                              adv=1.33, bn=10.0, oh=0.5, normalizer=Normalizer(MEAN, STD), device=device,
                              warmup=0, bn_mmt=0.9, is_maml=1, **kw)
    syn.synthesize()  # lazy state, momentum statistics, compilation / capture
    syn.synthesize()
    return syn


def _step_fn(syn):
    """One inner step of ``syn`` inside an open round (for timing)."""
    meta = syn._meta and syn.ismaml
    if syn.cuda_graph:
        g = syn._graphs[(True, syn.capture.mmt_active, meta)]
        return g
    return lambda: syn._step(True, meta)


# ----------------------------------------------------------------------------- op breakdown
class _PhaseCounter(harness.AtenOpCounter):
    """AtenOpCounter that also files every op under the phase current when it is dispatched."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.by_phase: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).replace("aten.", "")
        ph = self.by_phase.setdefault(self.phase, {})
        ph[name] = ph.get(name, 0) + 1
        return super().__torch_dispatch__(func, types, args, kwargs)


_FWD_PHASES = {"generator": "fwd generator", "augment": "fwd augment", "teacher": "fwd teacher",
               "student": "fwd student", "losses": "fwd losses", "backward": "bwd losses",
               "step": "MAML accumulation + Adam step"}


def op_breakdown(quick: bool = False, device: str = "cpu") -> tuple[int, dict]:
    """ATen ops of one eager FastMetaSynthesizer inner step by phase and op name, counted like
    ``harness.count_aten_ops`` (the same total). Forward phases are the synthesizer's NVTX range
    names; backward ops are filed by autograd-node pre-hooks placed on each phase's output (the
    engine runs a phase's nodes together: student, BN-loss, teacher, augmentation, generator);
    best-image tracking is its own phase. Returns (total, {phase: {op: count}})."""
    import contextlib

    from ..synthesis import core, fast_meta

    teacher, student, gen, batch, nz = build(quick, torch.device(device))
    syn = _fastsynth(teacher, student, gen, batch, nz, device)
    counter = _PhaseCounter()
    active = [False]

    @contextlib.contextmanager
    def phase_range(name, enabled):
        old = counter.phase
        if active[0]:
            counter.phase = _FWD_PHASES.get(name, name)
        try:
            yield
        finally:
            if active[0] and name != "backward":  # backward phases are set by the node hooks
                counter.phase = old

    def mark(t, name):
        if active[0] and t.grad_fn is not None:
            t.grad_fn.register_prehook(lambda grads: setattr(counter, "phase", name))
        return t

    saved = (core.nvtx_range, fast_meta.nvtx_range)
    core.nvtx_range = fast_meta.nvtx_range = phase_range
    aug, loss, logit, track = syn.aug, syn.capture.loss, syn._logit_loss, syn._track_best

    def track_best(*a, **k):
        old, counter.phase = counter.phase, "best-image tracking"
        try:
            return track(*a, **k)
        finally:
            counter.phase = old

    syn.aug = lambda x, generator=None, codes=None: mark(aug(mark(x, "bwd generator"), generator=generator,
                                                             codes=codes), "bwd augment")
    syn.aug.draw = aug.draw  # the step draws the augmentation's random numbers through it
    syn.capture.loss = lambda **kw: mark(loss(**kw), "bwd losses")
    syn._logit_loss = lambda *a: (lambda r: (mark(r[0], "bwd losses"),) + tuple(r[1:]))(logit(*a))
    syn._track_best = track_best
    try:
        with syn._synthesis_mode():
            student_fwd = syn._student_fwd
            syn._student_fwd = lambda x: mark(student_fwd(x), "bwd student")
            real_teacher = syn.teacher

            class _Teacher:  # marks the teacher's logits; everything else goes to the real one
                def __call__(self, x):
                    return mark(real_teacher(x), "bwd teacher")

                def __getattr__(self, n):
                    return getattr(real_teacher, n)

            syn.teacher = _Teacher()
            syn._begin_round()
            step = _step_fn(syn)
            step()
            active[0] = True
            with counter:
                step()
            active[0] = False
            syn.teacher = real_teacher
            syn._end_round()
    finally:
        core.nvtx_range, fast_meta.nvtx_range = saved
    return counter.total, counter.by_phase


def print_breakdown(total: int, by_phase: dict) -> None:
    print(f"ATen ops per inner step: {total}")
    print("| phase | ops | by op name |")
    print("|---|---|---|")
    for ph, ops in sorted(by_phase.items(), key=lambda kv: -sum(kv[1].values())):
        names = ", ".join(f"{n} {c}" for n, c in sorted(ops.items(), key=lambda kv: -kv[1]))
        print(f"| {ph} | {sum(ops.values())} | {names} |")


def _fusion_summary(syn) -> str:
    """What the fusion reached in ``syn``'s step, from ``fuse.fusion_stats`` of the fused teacher
    and the student view (default call form): ReLUs folded into BatchNorm (``bn_relu``), conv+BN
    folds of the student (``conv_bn_fold``)."""
    from .. import fuse

    parts = []
    view = getattr(syn, "_student_view", None)
    for who, model in (("teacher", syn.teacher), ("student", view[1] if view else None)):
        try:
            stats = fuse.fusion_stats(model) if model is not None else None
        except ValueError:
            stats = None
        form = next(iter(stats.values()), None) if stats else None
        if form is None:
            parts.append(f"{who} not traced")
            continue
        keys = ("conv_bn_fold", "bn_relu") if who == "student" else ("fused_bn", "bn_relu")
        parts.append(f"{who} " + " ".join(f"{k}={form.get(k, 0)}" for k in keys))
    return "; ".join(parts)


def run(quick: bool = False, device: str = "cpu", compile: bool = True, reps: int | None = None,
        models: str = "both") -> list[dict]:
    """Rows of one inner step, reference against fastsynth, on fastsynth's own models
    (``models="fastsynth"``), the upstream-style classifiers (``"upstream"``), or both (the
    default, what ``fastsynth bench`` runs; there the ``compile=True`` row is measured on
    fastsynth's models only: inductor compiling a second model pair would double the suite's
    longest part, and the eager step is what a user of the upstream models gets by default)."""
    if models == "both":
        return run(quick, device, compile, reps, "fastsynth") + run(quick, device, False, reps, "upstream")
    if models not in ("fastsynth", "upstream"):
        raise ValueError(f"models must be 'fastsynth', 'upstream' or 'both', got {models!r}")
    device = torch.device(device)
    reps = reps or (10 if quick else 5)
    teacher, student, gen, batch, nz = build(quick, device, models)
    if models == "upstream":
        case = ("upstream resnet20->resnet8" if quick else "upstream resnet34->resnet18") + f" b{batch} g_steps2"
    else:
        case = ("cnn16->cnn8" if quick else "resnet34->resnet18") + f" b{batch} g_steps2"
    rows = []

    def record(provider, fn, compiled=False, t=None):
        if t is None:
            t = harness.median_time(fn, warmup=2, reps=reps, device=device)
        if compiled:
            ops, how = count_launches_profiled(fn), "profiler"
            mem = float("nan") if device.type != "cuda" else _peak_mb(fn, device)
        else:
            ops, how = harness.count_aten_ops(fn), "dispatch"
            mem = _peak_mb(fn, device)
        rows.append({"kernel": KERNEL, "case": case, "provider": provider, "median_ms": t * 1e3,
                     "aten_ops": ops, "ops_counted_by": how, "peak_mem_MB": round(mem, 2)})

    ref = reference_in_round(copy.deepcopy(teacher), copy.deepcopy(student), upstream_generator(gen), batch, nz,
                             device)

    # The reference and the eager fastsynth step are timed in alternation (the speedup target is
    # their ratio; a multi-second step on a shared machine drifts between two sequential runs).
    syn = _fastsynth(copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(gen), batch, nz, device)
    with syn._synthesis_mode():
        syn._begin_round()
        t = harness.interleaved_median_times({"reference": ref.step, "fastsynth": _step_fn(syn)}, warmup=2,
                                             reps=reps, device=device)
        record("reference", ref.step, t=t["reference"])
        record("fastsynth", _step_fn(syn), t=t["fastsynth"])
        rows[-1]["aten_ops_profiler"] = count_launches_profiled(_step_fn(syn))  # to compare the methods
        rows[-1]["fusion"] = _fusion_summary(syn)
        syn._end_round()
    del syn

    variants = []
    if compile:
        variants.append(("fastsynth+compile", {"compile": True}))
    if device.type == "cuda":
        variants.append(("fastsynth+cuda_graph", {"cuda_graph": True}))
    for name, kw in variants:
        syn = _fastsynth(copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(gen), batch, nz, device, **kw)
        with syn._synthesis_mode():
            syn._begin_round()
            record(name, _step_fn(syn), compiled="compile" in kw)
            syn._end_round()
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_eager"] = base / r["median_ms"]
        r["ops_frac_vs_reference"] = r["aten_ops"] / rows[0]["aten_ops"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed steps per provider (default 10 quick, 5 full)")
    p.add_argument("--breakdown", action="store_true",
                   help="only print the eager fastsynth step's ATen ops by phase and op name")
    p.add_argument("--models", default="fastsynth", choices=("fastsynth", "upstream", "both"),
                   help="teacher/student classes: fastsynth.models, the upstream-style classifiers "
                        "(fastsynth.models.upstream: forward(x, return_features=False)), or both")
    p.add_argument("--generative", action="store_true",
                   help="only the GenerativeSynthesizer rows (DAFL / ZSKT / DFQ / DFAD, per synthesize() call)")
    p.add_argument("--new", default=None, metavar="METHODS",
                   help="only the issue-19 synthesizer rows, per synthesize() call at iterations=1: a comma list "
                        f"of {','.join(NEW_METHODS)} or 'all'")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        total, by_phase = op_breakdown(quick=args.quick, device=args.device)
        print_breakdown(total, by_phase)
        return total, by_phase
    if args.new:
        rows = run_new(quick=args.quick, device=args.device, reps=args.reps,
                       methods=None if args.new == "all" else args.new.split(","))
    elif args.generative:
        rows = run_generative(quick=args.quick, device=args.device, compile=not args.no_compile)
    else:
        rows = []
        for models in (("fastsynth", "upstream") if args.models == "both" else (args.models,)):
            rows += run(quick=args.quick, device=args.device, compile=not args.no_compile, reps=args.reps,
                        models=models)
    harness.print_table(rows, ["case", "provider", "median_ms", "speedup_vs_eager", "aten_ops",
                               "ops_frac_vs_reference", "peak_mem_MB"])
    for r in rows:
        if r.get("fusion"):
            print(f"{r['case']} {r['provider']}: {r['fusion']}")
    if args.csv:
        harness.write_csv(rows, args.csv, harness.machine_info(args.device))
    return rows



# ----------------------------------------------------------------------------- generative synthesizer
# DAFL / ZSKT / DFQ / DFAD: fastsynth's GenerativeSynthesizer against the upstream
# GenerativeSynthesizer loop, per synthesize() call (g_steps 1, the scripts' setting).
GENERATIVE_KERNEL = "generative_synthesize"


def run_generative(quick: bool = False, device: str = "cpu", compile: bool = True, reps: int | None = None,
                   methods=None, compile_methods=("dfq",), models: str = "fastsynth") -> list[dict]:
    """Rows of the generative methods: per method ``reference`` and ``fastsynth`` timed in
    alternation, one synthesize() call each (batch 64, ResNet-34 -> ResNet-18, the FastDFKD
    generator at the method's nz; ``quick``: the small CNN pair at batch 16), ATen ops per call,
    and ``fastsynth+compile`` for ``compile_methods``."""
    from ..losses import KLDiv
    from ..synthesis import GENERATIVE_METHODS, GenerativeSynthesizer, Normalizer

    device = torch.device(device)
    reps = reps or (10 if quick else 5)
    teacher, student, _, batch, _ = build(quick, device, models)
    rows = []
    for method in (methods or list(GENERATIVE_METHODS)):
        cfg = dict(GENERATIVE_METHODS[method])
        nz = cfg.pop("nz") // (4 if quick else 1)
        crit = cfg.pop("criterion")
        torch.manual_seed(0)
        gen = _gen_for_bench(quick, nz, device)
        case = {"fastsynth": "cnn16->cnn8" if quick else "resnet34->resnet18",
                "upstream": "upstream resnet20->resnet8" if quick else "upstream resnet34->resnet18"}[models]
        case += f" b{batch} {method}"
        ref = RefGenerative(ReturnFeatures(copy.deepcopy(teacher)), copy.deepcopy(student), upstream_generator(gen), nz,
                            1, 1e-3, batch, batch, criterion=nn.L1Loss() if crit == "L1Loss" else upstream_kldiv,
                            normalizer=UPSTREAM_NORMALIZER, device=device, **cfg)
        base = None
        providers = [("fastsynth", {})] + ([("fastsynth+compile", {"compile": True})]
                                           if compile and method in compile_methods else [])
        for name, kw in providers:
            syn = GenerativeSynthesizer(copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(gen), nz,
                                        (3, 32, 32), iterations=1, lr_g=1e-3, synthesis_batch_size=batch,
                                        sample_batch_size=batch, normalizer=Normalizer(MEAN, STD), device=device,
                                        criterion=nn.L1Loss() if crit == "L1Loss" else KLDiv(), **cfg, **kw)
            if base is None:
                t = harness.interleaved_median_times({"reference": ref.synthesize, name: syn.synthesize},
                                                     warmup=2, reps=reps, device=device)
                base = t["reference"]
                rows.append({"kernel": GENERATIVE_KERNEL, "case": case, "provider": "reference",
                             "median_ms": base * 1e3, "aten_ops": harness.count_aten_ops(ref.synthesize),
                             "ops_counted_by": "dispatch"})
                ref_ops = rows[-1]["aten_ops"]
                t_ours = t[name]
            else:
                t_ours = harness.median_time(syn.synthesize, warmup=2, reps=reps, device=device)
            if kw.get("compile"):
                ops, how = count_launches_profiled(syn.synthesize), "profiler"
            else:
                ops, how = harness.count_aten_ops(syn.synthesize), "dispatch"
            rows.append({"kernel": GENERATIVE_KERNEL, "case": case, "provider": name, "median_ms": t_ours * 1e3,
                         "aten_ops": ops, "ops_counted_by": how})
            syn.close()
            del syn
        for r in rows:
            if r["case"] == case:
                r["speedup_vs_eager"] = base * 1e3 / r["median_ms"]
                r["ops_frac_vs_reference"] = r["aten_ops"] / ref_ops
    return rows


def _gen_for_bench(quick: bool, nz: int, device):
    from ..nn import Generator

    return Generator(nz=nz, ngf=16 if quick else 64, img_size=32, nc=3).to(device)


# ----------------------------------------------------------------------------- issue 19 synthesizers
# CMISynthesizer, FastMetaSynthesizerForImageNet and DeepInvSyntheiszer (NVlabs' ImageNet options
# on) against the eager upstream loops their equivalence tests run against (reference_loops.py; one
# reference loop serves tests and benchmarks), and the generative
# family's DAFL setting (run_generative). Per synthesize() call at iterations=1 (one inner step
# per call), reference and fastsynth timed in alternation, augmentation off on both sides (the
# references leave it out); ATen ops of one call each.
NEW_KERNEL = "synthesizer_call"
NEW_METHODS = ("cmi", "fast_meta_imagenet", "deepinv", "dafl")


def _new_models(quick: bool, device):
    """Teacher and student: the upstream-style CIFAR ResNet-34 -> ResNet-18 at batch 64 (full) or
    the small CNN pair at batch 8 (quick: seconds)."""
    from ..models import upstream

    torch.manual_seed(0)
    if quick:
        teacher, student, batch = _small_cnn(8), _small_cnn(4), 8
    else:
        teacher, student, batch = upstream.resnet34(10), upstream.resnet18(10), 64
    return _randomise_bn(teacher, 1).to(device).eval(), _randomise_bn(student, 2).to(device).train(), batch


def _pair_cmi(teacher, student, batch, quick, device):
    from ..nn import Generator
    from ..synthesis import Normalizer
    from ..synthesis.cmi import CMISynthesizer

    from . import reference_cmi as rc
    nz, ngf = (16, 8) if quick else (256, 64)
    bank, n_neg, head_dim = (64, 32, 16) if quick else (40960, 4096, 128)
    torch.manual_seed(3)
    gen = Generator(nz=nz, ngf=ngf, img_size=32, nc=3).to(device)
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    # the ResNet-34 scripts' feature layers: the four residual stages' inputs
    layers = (lambda m: None) if quick else (lambda m: [m.layer1, m.layer2, m.layer3, m.layer4])
    kw = dict(iterations=1, lr_g=1e-3, adv=0.5, bn=1.0, oh=0.5, cr=0.8, cr_T=0.2)
    ours = CMISynthesizer(t, s, copy.deepcopy(gen), nz, 10, (3, 32, 32), feature_layers=layers(t), bank_size=bank,
                          n_neg=n_neg, head_dim=head_dim, synthesis_batch_size=batch, sample_batch_size=batch,
                          normalizer=Normalizer(MEAN, STD), device=device, augment=False, seed=5, **kw)
    rt, rs = copy.deepcopy(teacher), copy.deepcopy(student)
    ref = rc.RefCMI(rt, rs, upstream_generator(gen), copy.deepcopy(ours.head), nz, kw["iterations"], kw["lr_g"],
                    batch, kw["adv"], kw["bn"], kw["oh"], kw["cr"], kw["cr_T"], bank, n_neg,
                    Normalizer(MEAN, STD), 5, feature_layers=layers(rt))
    # both banks hold n_neg rows (the same ones): the contrastive term at its steady-state size
    fill = torch.randn(n_neg, ref.mem_bank.data.shape[1], generator=torch.Generator().manual_seed(1))
    ref.mem_bank.add(fill)
    ours.mem_bank.add(fill.to(device))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(7)).sort()[0]
    return (lambda: ref.synthesize(y)), (lambda: ours.synthesize(y.to(device))), ours


def _pair_fast_meta_imagenet(teacher, student, batch, quick, device):
    from ..nn import DeepGenerator
    from ..synthesis import FastMetaSynthesizerForImageNet, Normalizer

    nz, ngf = (16, 8) if quick else (256, 64)
    torch.manual_seed(3)
    gen = DeepGenerator(nz=nz, ngf=ngf, img_size=32, nc=3).to(device)
    kw = dict(iterations=1, lr_g=5e-3, lr_z=0.015, lr_g_meta=5e-3, lr_z_meta=0.015, adv=1.33, bn=10.0, oh=0.5)
    ours = FastMetaSynthesizerForImageNet(
        copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(gen), nz, 10, (3, 32, 32),
        synthesis_batch_size=batch, sample_batch_size=batch, normalizer=Normalizer(MEAN, STD), bn_mmt=0.9,
        is_maml=1, augment=False, seed=5, device=device, **kw)
    up = upstream_generator(gen)
    up.clone = lambda: upstream_generator(up)  # the inner-loop copy computes as upstream too
    ref = RefFastMetaImageNet(copy.deepcopy(teacher), copy.deepcopy(student), up, nz, 10, (3, 32, 32), kw["iterations"],
                              kw["lr_g"], kw["lr_z"], kw["lr_g_meta"], kw["lr_z_meta"], batch, kw["adv"], kw["bn"],
                              kw["oh"], Normalizer(MEAN, STD), torch.Generator().manual_seed(5), bn_mmt=0.9, is_maml=1)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(7))
    return (lambda: ref.synthesize(y)), (lambda: ours.synthesize(y.to(device))), ours


def _pair_deepinv(teacher, student, batch, quick, device):
    from ..synthesis import DeepInvSyntheiszer, Normalizer

    # NVlabs' ImageNet options on (all but the multi-resolution warm-up, which one iteration per
    # call never leaves)
    extra = dict(first_bn_multiplier=10.0, tv_l2=1e-4, l2_scale=1e-5, adi_scale=0.5)
    kw = dict(iterations=1, lr_g=0.1, adv=1.0, bn=10.0, oh=1.0, tv=1e-3, l2=1e-5)
    ours = DeepInvSyntheiszer(copy.deepcopy(teacher), copy.deepcopy(student), 10, (3, 32, 32),
                              synthesis_batch_size=batch, sample_batch_size=batch, normalizer=Normalizer(MEAN, STD),
                              device=device, augment=False, **kw, **extra)
    ref = RefDeepInv(copy.deepcopy(teacher), copy.deepcopy(student), 10, (3, 32, 32), kw["iterations"], kw["lr_g"],
                     batch, kw["adv"], kw["bn"], kw["oh"], kw["tv"], kw["l2"], Normalizer(MEAN, STD), device=device,
                     **extra)
    return ref.synthesize, ours.synthesize, ours


_NEW_PAIRS = {"cmi": _pair_cmi, "fast_meta_imagenet": _pair_fast_meta_imagenet, "deepinv": _pair_deepinv}


def run_new(quick: bool = False, device: str = "cpu", reps: int | None = None, warmup: int = 1,
            methods=None) -> list[dict]:
    """Issue-19 rows: per method ``reference`` (the test suite's eager upstream loop) and
    ``fastsynth`` timed in alternation, one synthesize() call each at iterations=1 (full: the
    upstream-style CIFAR ResNet-34 -> ResNet-18 at batch 64; ``quick``: the small CNN pair at
    batch 8), and ATen ops per call (dispatch count). ``dafl`` comes from ``run_generative``
    (``RefGenerative``, per call at g_steps 1)."""
    methods = list(methods or NEW_METHODS)
    bad = [m for m in methods if m not in NEW_METHODS]
    if bad:
        raise ValueError(f"methods must be among {NEW_METHODS}, got {bad!r}")
    device = torch.device(device)
    reps = reps or (3 if quick else 3)
    rows = []
    teacher, student, batch = _new_models(quick, device)
    case_models = "cnn8->cnn4" if quick else "upstream resnet34->resnet18"
    for method in methods:
        if method == "dafl":
            g_rows = run_generative(quick=quick, device=device, compile=False, reps=reps, methods=["dafl"],
                                    models="fastsynth" if quick else "upstream")
            for r in g_rows:
                r["method"] = "dafl"
            rows += g_rows
            continue
        ref_fn, our_fn, syn = _NEW_PAIRS[method](teacher, student, batch, quick, device)
        t = harness.interleaved_median_times({"reference": ref_fn, "fastsynth": our_fn}, warmup=warmup, reps=reps,
                                             device=device)
        case = f"{case_models} b{batch} {method} it1"
        ref_ops = harness.count_aten_ops(ref_fn)
        our_ops = harness.count_aten_ops(our_fn)
        for prov, ops in (("reference", ref_ops), ("fastsynth", our_ops)):
            rows.append({"kernel": NEW_KERNEL, "case": case, "method": method, "provider": prov,
                         "median_ms": t[prov] * 1e3, "aten_ops": ops, "ops_counted_by": "dispatch",
                         "speedup_vs_eager": t["reference"] / t[prov], "ops_frac_vs_reference": ops / ref_ops})
        close = getattr(syn, "close", None)
        if close is not None:
            close()
        del syn, ref_fn, our_fn
        gc.collect()
    return rows


if __name__ == "__main__":
    main()
