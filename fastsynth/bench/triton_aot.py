"""Ahead-of-time compile check of every Triton kernel in fastsynth/kernels/*.py for real GPUs (no GPU needed).

Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) runs on
a CPU-only machine for a named target (``GPUTarget("cuda", 80 | 90, 32)``). The test suite runs
the kernels under TRITON_INTERPRET=1, which accepts code the real compiler rejects; this check
compiles what a GPU would compile.

What is compiled is not written by hand: the real host launchers of fastsynth/kernels/*.py are called on
``meta`` tensors of realistic shapes (the BatchNorm inputs of a CIFAR ResNet-34 at batch 256 and
of an ImageNet ResNet-50 at batch 64, NCHW and channels_last; logits of 10/100/1000/50000
classes; the FastDFKD generator's parameters) in every dtype (fp32, fp16, bf16, fp64) and every
flag combination the launchers accept, with each kernel replaced by a recorder. Each recorded
launch is then specialised exactly as Triton's JIT would specialise it (its own binder: integer
widths, ``== 1`` constants, 16-byte divisibility) and compiled for sm_80 and sm_90; the launch
configuration functions (``_launch_config``, ``_block``, ``_num_warps``) therefore pick the block
sizes and warp counts, with the SM count of an A100 (108) for sm_80 and of an H100 (132) for sm_90.

Per distinct compiled variant: registers, spill stores/loads and stack frame (ptxas ``-v`` of the
compile itself) and the shared memory Triton allocates. A compile error, or a spill in an
fp32/fp16/bf16 variant, fails the check; fp64 variants report theirs.

    python -m fastsynth.bench.triton_aot                       # full matrix, table on stdout
    python -m fastsynth.bench.triton_aot --write docs/TRITON_KERNELS.md
    python -m fastsynth.bench.triton_aot --subset --json out.json   # the bounded matrix of the tests

Must run with TRITON_INTERPRET unset or 0 (the interpreter replaces @triton.jit); ``main`` checks.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time

import torch

ARCHS = {80: 108, 90: 132}  # compute capability -> SM count of the GPU assumed for the launch config
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
CIFAR_BATCH, IMAGENET_BATCH = 256, 64
CLASSES = {10: CIFAR_BATCH, 100: CIFAR_BATCH, 1000: IMAGENET_BATCH, 50000: IMAGENET_BATCH}  # classes -> rows
CONTRASTIVE = ((2 * CIFAR_BATCH, 256), (2 * IMAGENET_BATCH, 128))  # (rows, feature dim) of CMI's head
# Kernels whose register count is bounded (issue 22: 4 warps at <= 64 registers, full occupancy
# of the register file); checked by tests/test_triton_aot.py outside fp64.
REGISTER_BOUND = 64
BOUNDED_KERNELS = ("_fused_bn_fwd_kernel", "_fused_bn_bwd_kernel", "_bn_stats_chunk_kernel", "_bn_backward_kernel")


@dataclasses.dataclass
class Launch:
    module: str       # kernels module name (fused_bn, bn_stat_loss, ...)
    kernel: str       # attribute name of the @triton.jit function
    dtype: str        # element dtype of the workload (fp32, fp16, bf16, fp64)
    case: str         # workload description
    args: tuple
    kwargs: dict
    arch: int


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn, sink, module, name):
        self.fn, self.sink, self.module, self.name = fn, sink, module, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.module, self.name, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(sink):
    """Every @triton.jit function of the loaded fastsynth/kernels/ modules records its launches,
    under the module that defines it (a kernel shared by several ops, such as
    addresses._addresses_kernel, is one kernel)."""
    import triton

    mods = [m for n, m in list(sys.modules.items()) if n.startswith("fastsynth.kernels.") and m is not None]
    saved = [(m, n, v) for m in mods for n, v in vars(m).items() if isinstance(v, triton.runtime.jit.JITFunction)]
    try:
        for m, n, v in saved:
            setattr(m, n, _Recorder(v, sink, m.__name__.rsplit(".", 1)[-1], n))
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def _bn_shapes():
    """(name, (N, C, H, W)) of every distinct BatchNorm input of the two teachers."""
    from .bn_stat_loss import RESNET50_BN_INPUTS, cifar_resnet34_bn_inputs

    out = [("cifar-r34", s) for s, _ in cifar_resnet34_bn_inputs(CIFAR_BATCH)]
    out += [("imagenet-r50", (IMAGENET_BATCH,) + c) for c, _ in RESNET50_BN_INPUTS]
    return out


def _meta(shape, dtype, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _workloads(arch: int, subset: bool):
    """Yield (module, case, dtype name, thunk) for every launcher call of the matrix."""
    from fastsynth.kernels import bn_stat_loss, contrastive_loss, fused_bn, logit_losses, reinit

    dtypes = list(DTYPES.items())
    shapes = _bn_shapes()
    if subset:  # the first (largest) and last (smallest) map of each teacher, both layouts
        shapes = [[s for s in shapes if s[0] == name][i] for name in ("cifar-r34", "imagenet-r50") for i in (0, -1)]

    # fused teacher BatchNorm: every flag combination, both layouts
    for name, shape in shapes:
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            case = f"{name} {tuple(shape)}{' channels_last' if cl else ''}"
            for dn, dt in dtypes:
                sdt = torch.float64 if dt == torch.float64 else torch.float32
                x = _meta(shape, dt, cl)
                p = torch.empty(shape[1], dtype=sdt, device="meta")
                gi = torch.empty(shape[:2], dtype=sdt, device="meta")  # gradient of the instance means
                for relu, stats, inst in itertools.product((False, True), repeat=3):
                    yield ("fused_bn", case, dn,
                           lambda x=x, p=p, relu=relu, stats=stats, inst=inst, fmt=fmt, sdt=sdt:
                           fused_bn.forward(x, p, p, p, p, 1e-5, relu, stats, inst, fmt, sdt))
                    for wgrad in (False, True):
                        yield ("fused_bn", case, dn,
                               lambda x=x, p=p, gi=gi, relu=relu, stats=stats, inst=inst, wgrad=wgrad, fmt=fmt:
                               fused_bn.backward(torch.empty_like(x), x, p, p, p, p, p, p, p, gi, 1e-5, relu,
                                                 stats, inst, wgrad, fmt))

    # BatchNorm-statistics loss: all layers of a teacher in one call, both layouts
    teachers = {}
    for name, shape in _bn_shapes():
        teachers.setdefault(name, []).append(shape)
    for name, layer_shapes in teachers.items():
        for cl in (False, True):
            case = f"{name} all BN layers{' channels_last' if cl else ''}"
            for dn, dt in dtypes:
                sdt = torch.float64 if dt == torch.float64 else torch.float32
                xs = [_meta(s, dt, cl) for s in layer_shapes]
                nch = sum(s[1] for s in layer_shapes)
                v = torch.empty(nch, dtype=sdt, device="meta")
                yield ("bn_stat_loss", case, dn, lambda xs=xs: bn_stat_loss.bn_batch_stats_multi(xs))
                yield ("bn_stat_loss", case, dn,
                       lambda xs=xs, v=v: bn_stat_loss.bn_batch_stats_multi_backward(xs, v, v, v))

    # reinit_ of the FastDFKD generator's parameters (the distribution is a runtime value)
    from .workloads import fastdfkd_generator

    with torch.device("meta"):
        gen_shapes = [tuple(q.shape) for q in fastdfkd_generator().parameters()]
    for dn, dt in dtypes:
        ts = [torch.empty(s, dtype=dt, device="meta") for s in gen_shapes]
        seed = torch.empty(1, dtype=torch.int64, device="meta")
        codes = [i % 3 for i in range(len(ts))]
        params = [(0.0, 1.0)] * len(ts)
        yield ("reinit", "fastdfkd generator parameters", dn,
               lambda ts=ts, seed=seed, codes=codes, params=params: reinit.reinit(ts, seed, codes, params))

    # logit losses: every class count, every gradient flag
    for classes, rows in CLASSES.items():
        case = f"{rows} x {classes} logits"
        for dn, dt in dtypes:
            t = _meta((rows, classes), dt)
            y = torch.empty(rows, dtype=torch.int64, device="meta")
            flags = [(a, b) for a in (False, True) for b in (False, True)]
            for agree in (False, True):
                for gt, gs in flags:
                    yield ("logit_losses", case, dn, lambda t=t, y=y, agree=agree, gt=gt, gs=gs:
                           logit_losses.synthesis_logit_loss(t, t, y, 1.0, 1.0, agree, gt, gs))
            for gs, gt in flags:
                yield ("logit_losses", case, dn,
                       lambda t=t, gs=gs, gt=gt: logit_losses.kd_loss(t, t, 4.0, 1.0, gs, gt))
                yield ("logit_losses", case, dn,
                       lambda t=t, gs=gs, gt=gt: logit_losses.js_divergence(t, t, 1.0, 1e-7, 1.0, 1.0, gs, gt))
            g = torch.empty((), dtype=torch.float64 if dt == torch.float64 else torch.float32, device="meta")
            yield ("logit_losses", case, dn, lambda g=g, t=t: logit_losses.logit_loss_backward(g, t, t))

    # contrastive cross-entropy of CMI's projected features (2 x batch rows), every gradient flag
    for m, d in CONTRASTIVE:
        case = f"{m} x {d} features"
        for dn, dt in dtypes:
            q = _meta((m, d), dt)
            for gq in (False, True):
                for gk in (False, True):
                    yield ("contrastive_loss", case, dn, lambda q=q, gq=gq, gk=gk:
                           contrastive_loss.contrastive_ce(q, q, 1.0 / 0.1, 1, gq, gk))


def capture(subset: bool = False) -> list[Launch]:
    """Every kernel launch of the matrix, recorded from the real launchers on meta tensors."""
    import importlib

    launches = []
    for arch, sms in ARCHS.items():
        mods = {}
        for module, case, dn, thunk in _workloads(arch, subset):
            if module not in mods:
                mods[module] = importlib.import_module(f"fastsynth.kernels.{module}")
            mod = mods[module]
            sink = []
            patch_sms = getattr(mod, "_sm_count", None)
            with _recording(sink):
                if patch_sms is not None:
                    mod._sm_count = lambda device, sms=sms: sms
                try:
                    thunk()
                finally:
                    if patch_sms is not None:
                        mod._sm_count = patch_sms
            for kmodule, kernel, args, kwargs in sink:
                launches.append(Launch(kmodule, kernel, dn, case, args, kwargs, arch))
    return launches


def launched_dtypes(subset: bool = False) -> dict[str, list[str]]:
    """``module.kernel`` -> the workload dtypes it is launched with in the matrix."""
    out: dict = {}
    for la in capture(subset):
        out.setdefault(f"{la.module}.{la.kernel}", set()).add(la.dtype)
    return {k: sorted(v, key=list(DTYPES).index) for k, v in sorted(out.items())}


def kernel_inventory() -> dict[str, dict[str, list[str]]]:
    """Every @triton.jit function of every module of fastsynth/kernels/, by module, with the @triton.jit
    functions of that module that call it (a device function is compiled inside its callers):
    what the matrix must cover."""
    import importlib
    import pkgutil

    import triton

    import fastsynth.kernels as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastsynth.kernels.{info.name}")
        fns = {n: v for n, v in vars(mod).items() if isinstance(v, triton.runtime.jit.JITFunction)}
        if fns:
            out[info.name] = {n: sorted(c for c, f in fns.items() if c != n and re.search(rf"\b{n}\(", f.src))
                              for n in sorted(fns)}
    return out


def _variant(launch: Launch):
    """(key, compile inputs) of a launch, specialised as Triton's JIT does at a launch."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(f"fastsynth.kernels.{launch.module}"), launch.kernel)
    target = GPUTarget("cuda", launch.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    names = [p.name for p in fn.params]
    consts = {names[k[0]]: (str(v) if not isinstance(v, (bool, int)) else v) for k, v in constexprs.items()}
    key = (launch.module, launch.kernel, launch.arch, options.num_warps,
           tuple(sorted(signature.items())), tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
           tuple(sorted((str(k), str(v)) for k, v in attrs.items())))
    return key, (fn, target, signature, constexprs, attrs, options, consts)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _compile(inputs) -> dict:
    """Compile one variant; registers/spills from the ptxas -v log of this very compile."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    fn, target, signature, constexprs, attrs, options, _ = inputs
    knobs.nvidia.dump_ptxas_log = True  # printed to stdout by Triton's make_cubin: captured
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            kern = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is a reported failure
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return {"error": " ".join(msg[:3])[:400], "seconds": time.perf_counter() - t0}
    log = buf.getvalue()
    out = {"seconds": time.perf_counter() - t0, "shared": int(kern.metadata.shared), "error": None}
    for k, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            return {"error": f"no '{k}' in the ptxas log (a cached compile?): {log[:200]!r}",
                    "seconds": out["seconds"]}
        out[k] = int(m.group(1))
    return out


_FORKED_ITEMS: list = []  # the variants, inherited by forked workers (JIT functions do not pickle)


def _worker(idx):
    return idx, _compile(_FORKED_ITEMS[idx][1])


def _group_key(key, launch: Launch, inputs):
    """A kernel variant as the launcher chooses it: kernel, arch, dtype, warps and the declared
    constexpr arguments; its integer specialisations (widths, == 1, divisibility) are grouped."""
    fn, consts = inputs[0], inputs[6]
    declared = [p.name for p in fn.params if p.is_constexpr]
    return (launch.kernel, launch.arch, launch.dtype, inputs[5].num_warps,
            tuple((n, str(consts[n]).replace("triton.language.", "")) for n in declared), launch.module)


def _flags_on(gkey) -> int:
    return sum(v == "True" for _, v in gkey[4])


def _size(gkey) -> tuple:
    """Orders the variants of a kernel by expected register pressure: flags on, warps, block sizes."""
    ints = [int(v) for _, v in gkey[4] if v.isdigit()]
    prod = 1
    for v in ints:
        prod *= v
    return (_flags_on(gkey), prod, gkey[3], ints)


def _subset(groups: dict) -> dict:
    """The bounded matrix of the tests: per kernel, arch and dtype the variant with the most flags on
    and the largest blocks (the highest register pressure); for the register-bounded BatchNorm
    kernels that variant for every distinct set of non-boolean constexprs (the layouts pick
    different tiles). One integer specialisation each."""
    by_rest: dict = {}
    for gkey in groups:
        rest = gkey[:3] + (gkey[5],)
        if gkey[0] in BOUNDED_KERNELS:
            rest += (gkey[3], tuple(kv for kv in gkey[4] if kv[1] not in ("True", "False")))
        by_rest.setdefault(rest, []).append(gkey)
    keep = {max(gks, key=_size) for gks in by_rest.values()}
    return {g: v[:1] for g, v in groups.items() if g in keep}


def _flag_extremes(groups: dict) -> dict:
    """Per kernel, arch, dtype, warps and non-boolean constexprs: the variants with the most and
    the fewest flags on, one integer specialisation each (the matrix of the docs table)."""
    by_rest: dict = {}
    for gkey in groups:
        rest = gkey[:4] + (tuple(kv for kv in gkey[4] if kv[1] not in ("True", "False")), gkey[5])
        by_rest.setdefault(rest, []).append(gkey)
    keep = set()
    for gks in by_rest.values():
        keep.add(max(gks, key=_flags_on))
        keep.add(min(gks, key=_flags_on))
    return {g: v[:1] for g, v in groups.items() if g in keep}


def run(subset: bool = False, jobs: int = 1, only: tuple = (), every: bool = False) -> list[dict]:
    """Compile the matrix; one result row per group of variants (``_group_key``).

    Default (the docs table): every teacher map, ``_flag_extremes``'s selection. ``every``: every
    distinct specialisation of every captured launch (hours on a small machine). ``subset`` (the
    tests): the first and last map of each teacher and ``_subset``'s selection. ``only``: kernel
    names to compile (all when empty)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: @triton.jit is the interpreter; run with TRITON_INTERPRET=0")
    variants: dict = {}
    for la in capture(subset):
        if only and la.kernel not in only:
            continue
        key, inputs = _variant(la)
        entry = variants.setdefault(key, [la, inputs, set(), _group_key(key, la, inputs), set()])
        entry[2].add(la.case)
        entry[4].add(la.dtype)  # a variant can serve several workload dtypes (fp32 statistics of fp16 maps)
    groups: dict = {}
    for key, (la, inputs, cases, gkey, dts) in variants.items():
        groups.setdefault(gkey, []).append((key, la, inputs, cases, dts))
    if subset:
        groups = _subset(groups)
    elif not every:
        groups = _flag_extremes(groups)
    items = [(g, key, la, inputs) for g, v in groups.items() for key, la, inputs, _, _ in v]
    # a private Triton cache: every variant really runs ptxas (its log carries the spill counts)
    with tempfile.TemporaryDirectory(prefix="fastsynth_aot_") as cache:
        from triton import knobs

        old = knobs.cache.dir
        knobs.cache.dir = cache
        try:
            if jobs > 1:
                import multiprocessing as mp

                _FORKED_ITEMS[:] = [(it[0], it[3]) for it in items]
                try:
                    with mp.get_context("fork").Pool(jobs) as pool:
                        results = dict(pool.imap_unordered(_worker, range(len(items))))
                finally:
                    _FORKED_ITEMS.clear()
            else:
                results = {i: _compile(it[3]) for i, it in enumerate(items)}
        finally:
            knobs.cache.dir = old
    rows = []
    for gkey, members in groups.items():
        res = [results[i] for i, it in enumerate(items) if it[0] == gkey]
        ok = [r for r in res if not r["error"]]
        errors = sorted({r["error"] for r in res if r["error"]})
        cases = sorted(set().union(*(m[3] for m in members)))
        kernel, arch, dtype, warps, consts, _ = gkey
        launch_dtypes = sorted(set().union(*(m[4] for m in members)), key=list(DTYPES).index)
        row = {"module": members[0][1].module, "kernel": kernel, "arch": arch, "dtype": dtype, "num_warps": warps,
               "constexprs": dict(consts), "specialisations": len(res), "cases": cases,
               "launch_dtypes": launch_dtypes,
               "error": errors[0] if errors else None, "seconds": sum(r["seconds"] for r in res)}
        for k in ("regs", "stack", "spill_st", "spill_ld", "shared"):
            vals = [r[k] for r in ok]
            row[k] = max(vals) if vals else None
        row["regs_min"] = min((r["regs"] for r in ok), default=None)
        rows.append(row)
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["arch"], list(DTYPES).index(r["dtype"]),
                             json.dumps(r["constexprs"])))
    return rows


def failures(rows: list[dict]) -> list[str]:
    """Compile errors, and spills of variants that are not fp64."""
    out = []
    for r in rows:
        tag = f"{r['kernel']} sm_{r['arch']} {r['dtype']} {_fmt_consts(r['constexprs'])}"
        if r["error"]:
            out.append(f"{tag}: compile error: {r['error']}")
        elif r["dtype"] != "fp64" and (r["spill_st"] or r["spill_ld"]):
            out.append(f"{tag}: spills {r['spill_st']} B stores / {r['spill_ld']} B loads")
    return out


def _fmt_consts(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items())


def markdown(rows: list[dict], seconds: float, command: str) -> str:
    import triton

    n_spec = sum(r["specialisations"] for r in rows)
    lines = [
        "# Triton kernels compiled for real GPUs",
        "",
        "Generated by `" + command + "` (fastsynth/bench/triton_aot.py; do not edit by hand).",
        f"Triton {triton.__version__} with its bundled ptxas; {n_spec} compiled specialisations in {len(rows)} "
        f"variants, {seconds:.0f} s on this machine.",
        "",
        "Every `@triton.jit` kernel of `fastsynth/kernels/*.py` is compiled ahead of time for sm_80 (launch",
        "configuration with the SM count of an A100) and sm_90 (an H100): the real launchers run on `meta`",
        "tensors of the CIFAR ResNet-34 (batch 256) and ImageNet ResNet-50 (batch 64) BatchNorm inputs",
        "(NCHW and channels_last), of 10/100/1000/50000-class logits, of CMI's contrastive features and of",
        "the FastDFKD generator's parameters, in fp32, fp16, bf16 and fp64, with every flag combination;",
        "each launch is specialised as Triton's JIT specialises it at a launch. A row is one variant as the",
        "launcher chooses it (kernel, arch, dtype, warps, constexpr arguments; a dtype such as",
        "`fp32/fp16/bf16` is one variant serving those workloads, e.g. fp32 statistics of fp16 maps).",
        "Without `--every`, per kernel, arch, dtype and non-boolean constexprs the variants with the most",
        "and the fewest flags on are compiled, each with the integer specialisation (argument widths,",
        "arguments equal to 1, 16-divisibility) of its first launch (`--every` compiles every flag",
        "combination and specialisation; `spec.` counts the specialisations compiled). `regs` (min-max),",
        "spill stores/loads and stack frame in bytes come from ptxas `-v` of each compile, `smem` is the",
        "shared memory Triton allocates (bytes). The check fails on a compile error or on a spill outside",
        "fp64; the BatchNorm kernels (`" + "`, `".join(BOUNDED_KERNELS) + "`)",
        f"are held to <= {REGISTER_BOUND} registers outside fp64 (full register-file occupancy at 4 warps).",
        "`tests/test_triton_aot.py` compiles the bounded subset (`--subset`: largest and smallest map",
        "of each teacher, per kernel, arch and dtype the variant with the most flags and the largest",
        "blocks) in a subprocess with TRITON_INTERPRET=0.",
        "",
    ]
    fails = failures(rows) + over_bound(rows)
    lines += ["**Failures:** " + ("none" if not fails else f"{len(fails)}"), ""]
    for f in fails:
        lines.append(f"- {f}")
    if fails:
        lines.append("")
    lines += ["| kernel | arch | dtype | constexprs | warps | spec. | regs | spill st/ld | stack | smem | cases |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cases = "; ".join(r["cases"][:2]) + (f"; +{len(r['cases']) - 2} more" if len(r["cases"]) > 2 else "")
        dts = r.get("launch_dtypes") or [r["dtype"]]
        dtype = r["dtype"] if dts == [r["dtype"]] else "/".join(dts)  # one variant serving several dtypes
        head = (f"| {r['module']}.{r['kernel']} | sm_{r['arch']} | {dtype} | {_fmt_consts(r['constexprs'])} | "
                f"{r['num_warps']} | {r['specialisations']} | ")
        if r["error"]:
            lines.append(head + f"**compile error** | | | | {cases} |")
        else:
            regs = f"{r['regs_min']}" if r["regs_min"] == r["regs"] else f"{r['regs_min']}-{r['regs']}"
            lines.append(head + f"{regs} | {r['spill_st']}/{r['spill_ld']} | {r['stack']} | {r['shared']} | "
                         f"{cases} |")
    lines.append("")
    return "\n".join(lines)


def over_bound(rows: list[dict]) -> list[str]:
    """BatchNorm kernel variants (outside fp64) above REGISTER_BOUND registers."""
    return [f"{r['kernel']} sm_{r['arch']} {r['dtype']} {_fmt_consts(r['constexprs'])}: {r['regs']} registers "
            f"> {REGISTER_BOUND}"
            for r in rows if r["kernel"] in BOUNDED_KERNELS and r["dtype"] != "fp64" and not r["error"]
            and r["regs"] > REGISTER_BOUND]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsynth.bench.triton_aot", description=__doc__.split("\n")[0])
    ap.add_argument("--subset", action="store_true", help="the bounded matrix of tests/test_triton_aot.py")
    ap.add_argument("--every", action="store_true",
                    help="every flag combination and integer specialisation (default: per constexpr group the "
                         "variants with the most and the fewest flags on, one specialisation each)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the result rows as JSON")
    ap.add_argument("--only", action="append", default=[], metavar="KERNEL",
                    help="compile only this kernel (repeatable; for register work on one kernel)")
    ap.add_argument("--write", help="write the markdown table to this file (e.g. docs/TRITON_KERNELS.md)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    t0 = time.perf_counter()
    rows = run(subset=args.subset, jobs=args.jobs, only=tuple(args.only), every=args.every)
    seconds = time.perf_counter() - t0
    cmd = "python -m fastsynth.bench.triton_aot" + (" --subset" if args.subset else "") + \
        (" --every" if args.every else "") + \
        (f" --write {args.write}" if args.write else "")
    md = markdown(rows, seconds, cmd)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": seconds, "rows": rows, "inventory": kernel_inventory(),
                       "launched": launched_dtypes(args.subset)}, f, indent=1)
    if args.write:
        with open(args.write, "w") as f:
            f.write(md)
    else:
        print(md)
    fails = failures(rows)
    bound = over_bound(rows)
    print(f"{len(rows)} variants, {len(fails)} failures, {len(bound)} over the register bound, {seconds:.1f} s",
          file=sys.stderr)
    for f in fails + bound:
        print("  " + f, file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
