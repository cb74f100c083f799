"""A GPU performance model on paper: bytes moved, kernel launches and FLOPs of every fastsynth
kernel against the upstream formulation, and the resulting floor on an H100.

    python -m fastsynth.bench.perf_model            # regenerates docs/PERF_MODEL.md
    fastsynth bench --model                         # same

How the numbers are obtained
----------------------------
* Shapes come from the models: forward hooks on ``fastsynth.models.resnet34`` (CIFAR, 32x32)
  and on a torchvision-layout ResNet-50 (ImageNet, 224x224) run on the ``meta`` device collect
  every BatchNorm2d input shape, so this file is regenerated from the same shape sets as the
  benchmarks.
* The upstream formulation is run for real, on ``meta`` tensors, under a ``TorchDispatchMode``
  (``OpTrace``) that records every ATen operator forward AND backward (autograd's ops included)
  with the bytes of its tensor arguments (read) and results (written). Views (permute, view,
  expand, ...), detach and uninitialised allocations launch nothing and move nothing and are not
  counted; every other operator counts as one kernel launch. Bytes of a tensor are
  ``min(numel, storage) * itemsize``, so a broadcast (expanded) argument counts its storage
  once. This is the op sequence eager PyTorch executes, listed per op in the report.
* The fastsynth formulation runs the same surrounding code, with each fused kernel replaced by a
  stand-in autograd function that records ONE launch with the bytes the fused kernel is designed
  to move (its docstring says what it reads and writes); the small per-channel loss ops
  (``loss_from_stats``, the real fastsynth code) are traced like the upstream ops.
* Floor on the GPU: every launch costs at least ``LAUNCH_S`` (about 4 us without CUDA graphs),
  its bytes at least bytes / ``HBM_BW`` and its FLOPs (convolutions, matmuls) at least
  FLOPs / ``TF32_FLOPS``; launches on one stream serialise, so
      floor = sum over launches of max(launch, bytes / BW, FLOPs / peak).
  ``bytes / BW`` and ``launches x 4 us`` are also listed separately.
All tensors are float32 (4 bytes), targets int64.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .reference_loops import ref_adv, upstream_kldiv

HBM_BW = 3.35e12          # H100 SXM HBM3, bytes/s
LAUNCH_S = 4e-6           # per kernel launch without CUDA graphs
GRAPH_LAUNCH_S = 1e-6     # per kernel inside a replayed CUDA graph
TF32_FLOPS = 494.7e12     # H100 SXM dense TF32 tensor-core peak (cuDNN/cuBLAS default for fp32 convs)
META = torch.device("meta")
# Per-channel statistics (a few KB) live on the CPU while tracing: loss_from_stats needs real
# values for repeat_interleave's output size, which a meta tensor does not have. Their ops are
# traced like any other (on a GPU they are device kernels too).
STATS = torch.device("cpu")
F32 = 4

# ---------------------------------------------------------------------------------------------
# op tracing
# ---------------------------------------------------------------------------------------------


@dataclass
class Op:
    name: str
    read: int
    written: int
    flops: float = 0.0
    phase: str = ""

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def floor_s(self, launch_s: float = LAUNCH_S) -> float:
        return max(launch_s, self.bytes / HBM_BW, self.flops / TF32_FLOPS)


# allocations without a kernel, and metadata-only ops
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
              "lift_fresh", "alias", "_unsafe_view", "set_", "resize_", "_reshape_alias"}
# ops that overwrite their first argument without reading it
_WRITE_ONLY_FIRST = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_"}


def tensor_bytes(t: torch.Tensor) -> int:
    try:
        storage = t.untyped_storage().nbytes()
    except Exception:
        storage = t.numel() * t.element_size()
    return min(t.numel() * t.element_size(), storage)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _flops(name: str, args, out) -> float:
    if name == "convolution":
        w = args[1]  # [C_out, C_in / groups, kh, kw]
        return 2.0 * out.numel() * (w.numel() // w.shape[0])
    if name == "convolution_backward":
        grad_out, w = args[0], args[2]
        mask = args[10] if len(args) > 10 else [True, True, True]
        per = 2.0 * grad_out.numel() * (w.numel() // w.shape[0])
        return per * (int(bool(mask[0])) + int(bool(mask[1])))
    if name in ("mm", "bmm", "addmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        batch = a.shape[0] if a.dim() == 3 else 1
        return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    return 0.0


class OpTrace(TorchDispatchMode):
    """Records every kernel-launching ATen op with bytes read/written (see module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.phase = ""
        self._paused = 0
        self.host_ids: set[int] = set()  # host-side tensors (Adam's step counters): no launches

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def in_phase(self, name: str):
        old, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = old

    def add(self, name: str, read: int, written: int, flops: float = 0.0) -> None:
        # only ops inside a named phase count: building models and inputs is set-up
        if not self._paused and self.phase:
            self.ops.append(Op(name, int(read), int(written), flops, self.phase))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        name = func.overloadpacket.__name__
        schema = func._schema
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if is_view or name in _NO_KERNEL or name.startswith("_record_function"):
            return out
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        if ins and all(id(t) in self.host_ids for t in ins):
            return out
        if name in _WRITE_ONLY_FIRST and ins:
            ins = ins[1:]
        if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
            name += " (host sync: output size read back)"
        read = sum(tensor_bytes(t) for t in ins)
        written = sum(tensor_bytes(t) for t in _tensors(out))
        self.add(name, read, written, _flops(name, args, out))
        return out


_ACTIVE: list[OpTrace] = []


def trace(fn, *args, **kwargs) -> list[Op]:
    """Run ``fn`` under an OpTrace (stand-in fused ops record into it); return its ops."""
    tr = OpTrace()
    _ACTIVE.append(tr)
    try:
        with tr:
            fn(tr, *args, **kwargs)
    finally:
        _ACTIVE.pop()
    return tr.ops


def _record(name: str, read: int, written: int, flops: float = 0.0) -> None:
    _ACTIVE[-1].add(name, read, written, flops)


@contextlib.contextmanager
def _quiet():
    with _ACTIVE[-1].paused():
        yield


# ---------------------------------------------------------------------------------------------
# stand-ins for the fused kernels: one launch each, with the bytes the kernel is designed to move
# ---------------------------------------------------------------------------------------------


class FusedBNStats(torch.autograd.Function):
    """fastsynth bn_stat_loss_multi statistics kernel, all layers in ONE launch.
    forward: reads every feature map once (Welford), writes mean and var (2C per layer).
    backward: reads every feature map, mean/var and their gradients (4C), writes dL/da:
    dL/da = g_mu/M + 2 g_var (a - mu)/M in one elementwise pass."""

    @staticmethod
    def forward(ctx, *feats):
        ctx.save_for_backward(*feats)
        with _quiet():
            means = [torch.zeros(f.shape[1], device=STATS) for f in feats]
            varis = [torch.ones(f.shape[1], device=STATS) for f in feats]
        c = sum(f.shape[1] for f in feats)
        _record("fastsynth::bn_stats_fwd", sum(tensor_bytes(f) for f in feats), 2 * c * F32)
        return tuple(means) + tuple(varis)

    @staticmethod
    def backward(ctx, *grads):
        feats = ctx.saved_tensors
        c = sum(f.shape[1] for f in feats)
        _record("fastsynth::bn_stats_bwd", sum(tensor_bytes(f) for f in feats) + 4 * c * F32,
                sum(tensor_bytes(f) for f in feats))
        with _quiet():
            return tuple(torch.empty_like(f) for f in feats)


class FusedLogitLoss(torch.autograd.Function):
    """fastsynth synthesis_logit_loss: ONE forward launch reads both logits and the targets
    (row-wise online softmax, CE, masked KL) and writes both gradients (pre-scaled by 1) and the
    loss; ONE backward launch scales the stored gradients by grad_output (read 2NC, write 2NC)."""

    @staticmethod
    def forward(ctx, t, s, y):
        n, c = t.shape
        _record("fastsynth::synthesis_logit_loss_fwd", 2 * n * c * F32 + n * 8, 2 * n * c * F32 + 3 * F32)
        ctx.shape = (n, c)
        with _quiet():  # a CPU scalar, like the statistics (see STATS)
            return torch.zeros((), device=STATS)

    @staticmethod
    def backward(ctx, g):
        n, c = ctx.shape
        _record("fastsynth::synthesis_logit_loss_bwd", 2 * n * c * F32 + F32, 2 * n * c * F32)
        with _quiet():
            return torch.empty(n, c, device=META), torch.empty(n, c, device=META), None


class FusedKDLoss(torch.autograd.Function):
    """fastsynth kd_loss: forward reads both logits, writes the student gradient and the loss;
    backward scales the stored gradient (read NC, write NC)."""

    @staticmethod
    def forward(ctx, s, t):
        n, c = s.shape
        _record("fastsynth::kd_loss_fwd", 2 * n * c * F32, n * c * F32 + F32)
        ctx.shape = (n, c)
        with _quiet():
            return torch.zeros((), device=STATS)

    @staticmethod
    def backward(ctx, g):
        n, c = ctx.shape
        _record("fastsynth::kd_loss_bwd", n * c * F32 + F32, n * c * F32)
        with _quiet():
            return torch.empty(n, c, device=META), None


class FusedTeacherBN(torch.autograd.Function):
    """fastsynth fused teacher BatchNorm (eval): forward reads a once and writes the BN output
    AND the batch mean/var; backward reads grad_out and a once and writes
    grad_in = grad_out*scale + dL_bn/da (the statistics-loss gradient) in one pass."""

    @staticmethod
    def forward(ctx, a, rm, rv, w, b):
        c = a.shape[1]
        ctx.save_for_backward(a)
        _record("fastsynth::fused_bn_fwd", tensor_bytes(a) + 4 * c * F32, tensor_bytes(a) + 2 * c * F32)
        with _quiet():
            return torch.empty_like(a), torch.zeros(c, device=STATS), torch.ones(c, device=STATS)

    @staticmethod
    def backward(ctx, gy, gmu, gvar):
        (a,) = ctx.saved_tensors
        c = a.shape[1]
        _record("fastsynth::fused_bn_bwd", 2 * tensor_bytes(a) + 6 * c * F32, tensor_bytes(a))
        with _quiet():
            return torch.empty_like(a), None, None, None, None


# ---------------------------------------------------------------------------------------------
# shapes, from the models
# ---------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet50(nn.Module):
    """torchvision's resnet50 layout (7x7/2 stem, max-pool, bottlenecks [3, 4, 6, 3])."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        layers, cin = [], 64
        for planes, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                layers.append(_Bottleneck(cin, planes, stride if i == 0 else 1))
                cin = planes * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(F.adaptive_avg_pool2d(self.layers(x), 1).flatten(1))


def bn_input_shapes(model: nn.Module, batch: int, img: int) -> list[tuple[int, ...]]:
    """Input shapes of every BatchNorm2d of ``model`` in forward order (meta device)."""
    model = model.to(META).eval()
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, img, img, device=META))
    for h in hooks:
        h.remove()
    return shapes


def shape_sets() -> dict[str, list[tuple[int, ...]]]:
    from fastsynth.models import resnet34

    return {
        "CIFAR ResNet-34, batch 256": bn_input_shapes(resnet34(10), 256, 32),
        "ImageNet ResNet-50, batch 32": bn_input_shapes(ImageNetResNet50(), 32, 224),
    }


# ---------------------------------------------------------------------------------------------
# the formulations
# ---------------------------------------------------------------------------------------------


def upstream_hook_loss(a: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
    """The upstream DeepInversionHook body (plain variant), op for op."""
    nch = a.shape[1]
    mean = a.mean([0, 2, 3])
    var = a.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)


def _leaves(shapes, stat_device=META):
    feats = [torch.empty(s, device=META, requires_grad=True) for s in shapes]
    rms = [torch.zeros(s[1], device=stat_device) for s in shapes]
    rvs = [torch.ones(s[1], device=stat_device) for s in shapes]
    return feats, rms, rvs


def bn_loss_upstream(tr: OpTrace, shapes):
    feats, rms, rvs = _leaves(shapes)
    with tr.in_phase("fwd"):
        loss = sum(upstream_hook_loss(a, rm, rv) for a, rm, rv in zip(feats, rms, rvs))
    with tr.in_phase("bwd"):
        loss.backward()


def bn_loss_fastsynth(tr: OpTrace, shapes):
    from fastsynth.ops.bn_stat_loss import loss_from_stats

    feats, rms, rvs = _leaves(shapes, STATS)
    L = len(feats)
    with tr.in_phase("fwd"):
        stats = FusedBNStats.apply(*feats)
        loss = loss_from_stats(list(stats[:L]), list(stats[L:]), rms, rvs)
    with tr.in_phase("bwd"):
        loss.backward()


def upstream_synthesis_logit_loss(t, s, y, oh=0.5, adv=1.33):
    """FastDFKD's loss_oh + loss_adv, op for op (teacher logits carry gradient)."""
    return oh * F.cross_entropy(t, y) + adv * ref_adv(s, t)


def _loss_fwd_bwd(tr: OpTrace, loss_fn, *inputs):
    with tr.in_phase("fwd"):
        loss = loss_fn(*inputs)
    with tr.in_phase("bwd"):
        loss.backward()


def _logit_inputs(n, c):
    """(teacher logits, student logits, targets); both logits carry gradient."""
    return (torch.empty(n, c, device=META, requires_grad=True), torch.empty(n, c, device=META, requires_grad=True),
            torch.empty(n, dtype=torch.long, device=META))


def _kd_inputs(n, c):
    """(student logits with gradient, teacher logits)."""
    return torch.empty(n, c, device=META, requires_grad=True), torch.empty(n, c, device=META)


def logit_upstream(tr: OpTrace, n, c):
    _loss_fwd_bwd(tr, upstream_synthesis_logit_loss, *_logit_inputs(n, c))


def logit_fastsynth(tr: OpTrace, n, c):
    _loss_fwd_bwd(tr, FusedLogitLoss.apply, *_logit_inputs(n, c))


def kd_upstream(tr: OpTrace, n, c, T=20.0):
    _loss_fwd_bwd(tr, lambda s, t: upstream_kldiv(s, t, T=T), *_kd_inputs(n, c))


def kd_fastsynth(tr: OpTrace, n, c, T=20.0):
    _loss_fwd_bwd(tr, FusedKDLoss.apply, *_kd_inputs(n, c))


def reinit_upstream(tr: OpTrace, k=40, fan_in=512, out=1000):
    layers = [nn.Linear(fan_in, out, device=META) for _ in range(k)]
    with tr.in_phase("reinit"):
        for layer in layers:  # NAYER's re_init_le: a Python loop of per-layer inits
            nn.init.normal_(layer.weight, 0.0, 1.0)
            nn.init.constant_(layer.bias, 0.0)


def reinit_fastsynth(tr: OpTrace, k=40, fan_in=512, out=1000):
    nbytes = k * (out * fan_in + out) * F32
    with tr.in_phase("reinit"):
        # fastsynth.ops.reinit_: one multi-tensor Philox kernel over a pointer table (+ the seed)
        tr.add("fastsynth::reinit_", 8, nbytes)


def noisy_upstream(tr: OpTrace, batch=400, k=40, fan_in=512, out=1000):
    layers = [nn.Linear(fan_in, out, device=META) for _ in range(k)]
    x = torch.empty(batch, fan_in, device=META, requires_grad=True)
    rows = batch // k
    with tr.in_phase("fwd"):
        y = torch.cat([layer(x[i * rows:(i + 1) * rows]) for i, layer in enumerate(layers)])
    with tr.in_phase("bwd"):
        y.backward(torch.empty_like(y))


def noisy_fastsynth(tr: OpTrace, batch=400, k=40, fan_in=512, out=1000):
    w = torch.empty(k, fan_in, out, device=META, requires_grad=True)
    b = torch.empty(k, 1, out, device=META, requires_grad=True)
    x = torch.empty(batch, fan_in, device=META, requires_grad=True)
    with tr.in_phase("fwd"):
        y = torch.baddbmm(b, x.view(k, batch // k, fan_in), w).view(batch, out)
    with tr.in_phase("bwd"):
        y.backward(torch.empty_like(y))


def _teacher_bn_inputs(shapes):
    a = [torch.empty(s, device=META, requires_grad=True) for s in shapes]
    p = [[torch.empty(s[1], device=META) for _ in range(4)] for s in shapes]  # rm, rv, w, b
    gy = [torch.empty(s, device=META) for s in shapes]
    return a, p, gy


def teacher_bn(tr: OpTrace, shapes, variant: str):
    """All BatchNorm2d layers of the teacher in eval mode, forward + backward from a given
    grad_out, with the statistics loss computed the ``variant`` way."""
    from fastsynth.ops.bn_stat_loss import loss_from_stats

    a, p, gy = _teacher_bn_inputs(shapes)
    with tr.paused():  # the running statistics as the loss sees them (see STATS)
        rms = [torch.zeros(s[1], device=STATS) for s in shapes]
        rvs = [torch.ones(s[1], device=STATS) for s in shapes]
    with tr.in_phase("fwd"):
        if variant == "fused":
            outs = [FusedTeacherBN.apply(x, *q) for x, q in zip(a, p)]
            ys = [o[0] for o in outs]
            loss = loss_from_stats([o[1] for o in outs], [o[2] for o in outs], rms, rvs)
        else:
            ys = [F.batch_norm(x, q[0], q[1], q[2], q[3], training=False) for x, q in zip(a, p)]
            loss = None
            if variant == "upstream_hooks":
                loss = sum(upstream_hook_loss(x, q[0], q[1]) for x, q in zip(a, p))
            elif variant == "fastsynth_op":
                L = len(a)
                stats = FusedBNStats.apply(*a)
                loss = loss_from_stats(list(stats[:L]), list(stats[L:]), rms, rvs)
    with tr.in_phase("bwd"):
        outputs, grads = list(ys), list(gy)
        if loss is not None:
            outputs.append(loss)
            grads.append(None)
        torch.autograd.backward(outputs, grads)


class _FusedBNModule(nn.Module):
    """Stand-in for a fused teacher BatchNorm2d; stats collected for the loss."""

    def __init__(self, bn: nn.BatchNorm2d, sink: list):
        super().__init__()
        self.bn, self.sink = bn, sink

    def forward(self, x):
        y, mu, var = FusedTeacherBN.apply(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        with _quiet():
            c = x.shape[1]
            self.sink.append((mu, var, torch.zeros(c, device=STATS), torch.ones(c, device=STATS)))
        return y


def _swap_bn(model: nn.Module, sink: list) -> None:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, _FusedBNModule(child, sink))
        else:
            _swap_bn(child, sink)


def synthesis_step(tr: OpTrace, variant: str, batch=64, nz=256, num_classes=10):
    """One FastDFKD inner step of the CIFAR ResNet-34 teacher / ResNet-18 student config.

    upstream: teacher and student weights require grad (their weight gradients are computed),
    the hooks compute the loss on the forward, eager logit losses, ``loss.item()`` for
    best-image tracking, the inner Adam step and the first-order-MAML accumulation of the inner
    gradient into the slow generator, one add per parameter.
    fastsynth (op | fused): frozen teacher/student, fused BN-statistics op over all layers
    (op) or the fused teacher BatchNorm (fused), fused logit loss, foreach meta accumulation,
    best-image tracking on the device (a ``where``), no host sync.
    """
    from fastsynth.models import resnet18, resnet34
    from fastsynth.ops.bn_stat_loss import loss_from_stats

    from fastsynth.nn import Generator

    teacher, student = resnet34(num_classes).to(META).eval(), resnet18(num_classes).to(META).eval()
    gen = Generator(nz=nz).to(META).train()
    slow = [torch.empty_like(p) for p in gen.parameters()]  # the slow generator's .grad buffers
    upstream = variant == "upstream"
    if not upstream:
        for p in list(teacher.parameters()) + list(student.parameters()):
            p.requires_grad_(False)
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    feats, stats_sink, hook_losses = [], [], []
    if upstream:
        hooks = [m.register_forward_hook(lambda m, i, o: hook_losses.append(
            upstream_hook_loss(i[0], m.running_mean, m.running_var))) for m in bns]
    elif variant == "fastsynth_op":
        hooks = [m.register_forward_hook(lambda m, i, o: feats.append(i[0])) for m in bns]
    else:
        hooks = []
        _swap_bn(teacher, stats_sink)
    z = torch.empty(batch, nz, device=META, requires_grad=True)
    y = torch.empty(batch, dtype=torch.long, device=META)
    mean = torch.empty(1, 3, 1, 1, device=META)
    std = torch.empty(1, 3, 1, 1, device=META)
    flip = torch.empty(batch, 1, 1, 1, dtype=torch.bool, device=META)
    opt = torch.optim.Adam([{"params": gen.parameters()}, {"params": [z]}], 1e-3, betas=(0.5, 0.999),
                           foreach=True)
    with tr.paused():  # optimiser state exists after the first step: create it untraced
        for q in list(gen.parameters()) + [z]:
            q.grad = torch.empty_like(q)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Adam (not capturable) keeps its step counters on the host: their updates and the .item()
    # reads for the bias corrections are host work, no launches
    tr.host_ids.update(id(st["step"]) for st in opt.state.values())
    best = torch.empty((), device=META)
    with tr.in_phase("generator"):
        x = gen(z)
    with tr.in_phase("augment"):
        x = torch.where(flip, x.flip(3), x)
        x = (x - mean) / std
    with tr.in_phase("teacher"):
        t = teacher(x)
    with tr.in_phase("student"):
        s = student(x)
    with tr.in_phase("losses"):
        if upstream:
            loss_bn = sum(hook_losses)
            loss = 10.0 * loss_bn + upstream_synthesis_logit_loss(t, s, y)
        else:
            if variant == "fastsynth_op":
                L = len(feats)
                st = FusedBNStats.apply(*feats)
                with tr.paused():
                    rms = [torch.zeros(m.num_features, device=STATS) for m in bns]
                    rvs = [torch.ones(m.num_features, device=STATS) for m in bns]
                loss_bn = loss_from_stats(list(st[:L]), list(st[L:]), rms, rvs)
            else:
                loss_bn = loss_from_stats([q[0] for q in stats_sink], [q[1] for q in stats_sink],
                                          [q[2] for q in stats_sink], [q[3] for q in stats_sink])
            loss = 10.0 * loss_bn + FusedLogitLoss.apply(t, s, y)
    with tr.in_phase("best"):
        if upstream:
            # `if best_cost > loss.item()`: a device->host copy of one scalar and a sync
            # (recorded by hand: .item() cannot run on meta tensors)
            tr.add("_local_scalar_dense (loss.item(), host sync)", F32, 0)
        else:
            best = torch.minimum(best, loss.detach())
    with tr.in_phase("backward"):
        loss.backward()
    with tr.in_phase("step"):
        opt.step()
        grads = [p.grad for p in gen.parameters()]
        if upstream:
            for g_slow, g in zip(slow, grads):
                g_slow.add_(g)
        else:
            torch._foreach_add_(slow, grads)
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------------------------------------
# summaries and the report
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    launches: int
    bytes: int
    flops: float
    floor_s: float
    graph_floor_s: float
    by_phase: dict = field(default_factory=dict)
    syncs: int = 0

    @property
    def bw_s(self) -> float:
        return self.bytes / HBM_BW

    @property
    def launch_s(self) -> float:
        return self.launches * LAUNCH_S


def summarize(ops: list[Op]) -> Summary:
    by_phase: dict[str, list[Op]] = {}
    for o in ops:
        by_phase.setdefault(o.phase, []).append(o)
    return Summary(
        launches=len(ops), bytes=sum(o.bytes for o in ops), flops=sum(o.flops for o in ops),
        floor_s=sum(o.floor_s() for o in ops),
        graph_floor_s=sum(o.floor_s(GRAPH_LAUNCH_S) for o in ops),
        by_phase={p: summarize_flat(v) for p, v in by_phase.items()},
        syncs=sum(1 for o in ops if "host sync" in o.name),
    )


def summarize_flat(ops: list[Op]) -> tuple[int, int, float]:
    return len(ops), sum(o.bytes for o in ops), sum(o.floor_s() for o in ops)


def op_histogram(ops: list[Op]) -> list[tuple[str, int, int]]:
    """(op name, count, bytes) sorted by count."""
    count, nbytes = Counter(), Counter()
    for o in ops:
        count[o.name] += 1
        nbytes[o.name] += o.bytes
    return sorted(((k, count[k], nbytes[k]) for k in count), key=lambda r: (-r[1], r[0]))


def model() -> dict:
    """Every comparison: {section: [(case, {formulation: ops})]}."""
    sets = shape_sets()
    out: dict[str, list] = {}
    out["BatchNorm-statistics loss, forward + backward (all layers)"] = [
        (name, {"upstream hooks": trace(bn_loss_upstream, shapes), "fastsynth": trace(bn_loss_fastsynth, shapes)})
        for name, shapes in sets.items()
    ]
    logit_cases = [(256, 10), (256, 100), (256, 1000), (64, 21843)]
    out["Synthesis logit loss (CE + masked adversarial KL), forward + backward"] = [
        (f"N={n}, C={c}", {"upstream": trace(logit_upstream, n, c), "fastsynth": trace(logit_fastsynth, n, c)})
        for n, c in logit_cases
    ]
    out["KD loss (T=20, student gradient), forward + backward"] = [
        (f"N={n}, C={c}", {"upstream": trace(kd_upstream, n, c), "fastsynth": trace(kd_fastsynth, n, c)})
        for n, c in logit_cases
    ]
    out["NAYER noisy layers"] = [
        ("re-init, 40 x Linear(512->1000)", {"upstream": trace(reinit_upstream), "fastsynth": trace(reinit_fastsynth)}),
        ("forward + backward, batch 400, 40 layers", {"upstream": trace(noisy_upstream),
                                                      "fastsynth": trace(noisy_fastsynth)}),
    ]
    from fastsynth.models import resnet34

    tb = []
    for batch in (64, 256):
        shapes = bn_input_shapes(resnet34(10), batch, 32)
        tb.append((f"CIFAR ResNet-34 BNs, batch {batch}", {
            "plain BN (no loss)": trace(teacher_bn, shapes, "plain"),
            "BN + upstream hooks": trace(teacher_bn, shapes, "upstream_hooks"),
            "BN + fastsynth op": trace(teacher_bn, shapes, "fastsynth_op"),
            "fused teacher BN": trace(teacher_bn, shapes, "fused"),
        }))
    out["Teacher BatchNorm layers with the statistics loss, forward + backward"] = tb
    out["One synthesis step (FastDFKD, CIFAR ResNet-34 -> ResNet-18, batch 64, nz 256)"] = [
        ("inner step", {"upstream": trace(synthesis_step, "upstream"),
                        "fastsynth (fused op)": trace(synthesis_step, "fastsynth_op"),
                        "fastsynth (fused teacher)": trace(synthesis_step, "fused")}),
    ]
    return out


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:,.2f}"


def render(results: dict | None = None) -> str:
    results = results or model()
    sets = shape_sets()
    lines = [
        "# GPU performance model (on paper)",
        "",
        "Generated by `python -m fastsynth.bench.perf_model` (or `fastsynth bench --model`) from",
        "`fastsynth/bench/perf_model.py`; do not edit by hand. Method (details in the module docstring):",
        "the upstream formulation is executed on `meta` tensors under a dispatch-mode tracer that",
        "records every ATen op of forward and backward with the bytes of its arguments and results",
        "(views and allocations excluded); fastsynth's fused kernels are stand-ins recording one launch",
        "with the bytes they are designed to move. Shapes come from forward hooks on the models.",
        "",
        f"H100 SXM assumptions: HBM {HBM_BW / 1e12:.2f} TB/s, {LAUNCH_S * 1e6:.0f} us per launch without",
        f"CUDA graphs, {TF32_FLOPS / 1e12:.1f} TFLOP/s dense TF32 for convolutions and matmuls; fp32 tensors.",
        "floor = sum over launches of max(launch, bytes / BW, FLOPs / peak); `bytes/BW` and",
        "`launches x 4 us` are the two pure terms. The floor is what the op sequence cannot beat on",
        f"that GPU. The last column assumes a replayed CUDA graph ({GRAPH_LAUNCH_S * 1e6:.0f} us per kernel).",
        "",
        "What the model leaves out: the L2 cache (50 MB on an H100) keeps small per-channel tensors",
        "and some re-reads on chip, so `bytes/BW` overstates small ops; cuDNN may pick kernels that",
        "read a tensor more than once; launches may overlap with the previous kernel's tail. An",
        "argument an ATen kernel does not actually read (e.g. the input of an eval-mode BatchNorm",
        "backward when no weight gradient is needed) is still counted. The floors are lower bounds",
        "of the op sequences as written, not predictions of measured time.",
        "",
        "Shape sets (BatchNorm2d inputs, forward order):",
        "",
    ]
    for name, shapes in sets.items():
        distinct = Counter(shapes)
        desc = ", ".join(f"{n}x{list(s)}" for s, n in distinct.items())
        total = sum(torch.Size(s).numel() for s in shapes) * F32
        lines.append(f"- {name}: {len(shapes)} layers, {total / 1e6:,.1f} MB of feature maps: {desc}")
    lines.append("")
    for section, cases in results.items():
        lines += [f"## {section}", "",
                  "| case | formulation | launches | MB moved | GFLOP | bytes/BW us | launches x 4 us | floor us "
                  "| floor vs first row | floor with CUDA graph us |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for case, forms in cases:
            sums = {f: summarize(ops) for f, ops in forms.items()}
            base = next(iter(sums.values()))
            for f, s in sums.items():
                ratio = base.floor_s / s.floor_s if s.floor_s else float("nan")
                lines.append(f"| {case} | {f} | {s.launches} | {_mb(s.bytes)} | {s.flops / 1e9:,.2f} | "
                             f"{_us(s.bw_s)} | {_us(s.launch_s)} | {_us(s.floor_s)} | {ratio:.2f}x | "
                             f"{_us(s.graph_floor_s)} |")
        lines.append("")
        if section.startswith("One synthesis step"):
            forms = cases[0][1]
            phases = []
            for ops in forms.values():
                for o in ops:
                    if o.phase not in phases:
                        phases.append(o.phase)
            lines += ["Per phase (launches / MB / floor us):", "",
                      "| phase | " + " | ".join(forms) + " |", "|---|" + "---:|" * len(forms)]
            for ph in phases:
                cells = []
                for ops in forms.values():
                    n, b, fl = summarize_flat([o for o in ops if o.phase == ph])
                    cells.append(f"{n} / {_mb(b)} / {_us(fl)}")
                lines.append(f"| {ph} | " + " | ".join(cells) + " |")
            syncs = {f: [o.name for o in ops if "host sync" in o.name] for f, ops in forms.items()}
            lines += ["", "Host syncs per step: " + "; ".join(
                f"{f}: {len(v)}" + (f" ({', '.join(sorted(set(v)))})" if v else "") for f, v in syncs.items()) + ".",
                "A `repeat_interleave` without `output_size` (in `loss_from_stats`) reads its output size "
                "back to the host on a GPU; passing `output_size=sum(sizes)` removes that sync.", ""]
    # the explicit upstream op sequence of one BN layer
    a_shape = sets["CIFAR ResNet-34, batch 256"][0]
    ops = trace(bn_loss_upstream, [a_shape])
    lines += ["## The upstream hook, op by op (one layer, input " + "x".join(map(str, a_shape)) + ")", "",
              "| # | phase | ATen op | MB read | MB written |", "|---:|---|---|---:|---:|"]
    for i, o in enumerate(ops, 1):
        lines.append(f"| {i} | {o.phase} | {o.name} | {_mb(o.read)} | {_mb(o.written)} |")
    a_bytes = torch.Size(a_shape).numel() * F32
    up = summarize(ops)
    fs = summarize(trace(bn_loss_fastsynth, [a_shape]))
    lines += ["", f"Feature map A = {_mb(a_bytes)} MB. Upstream moves {up.bytes / a_bytes:.2f} A in {up.launches} "
              f"launches; fastsynth {fs.bytes / a_bytes:.2f} A (one read forward; one read and one write "
              f"backward) in {fs.launches} launches.", ""]
    for section, cases in results.items():
        if section.startswith("One synthesis step"):
            lines += ["## Op histogram of one synthesis step", "",
                      "| ATen op | upstream count | fastsynth (fused teacher) count |", "|---|---:|---:|"]
            hu = {k: c for k, c, _ in op_histogram(cases[0][1]["upstream"])}
            hf = {k: c for k, c, _ in op_histogram(cases[0][1]["fastsynth (fused teacher)"])}
            for k in sorted(set(hu) | set(hf), key=lambda k: (-hu.get(k, 0), k)):
                lines.append(f"| {k} | {hu.get(k, 0)} | {hf.get(k, 0)} |")
            lines.append("")
    return "\n".join(lines)


def default_path() -> str:
    """docs/PERF_MODEL.md of a source checkout; ./PERF_MODEL.md for an installed package."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(root, "setup.py")):
        return os.path.join(root, "docs", "PERF_MODEL.md")
    return os.path.abspath("PERF_MODEL.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsynth.bench.perf_model",
                                description="Regenerate the GPU performance model (docs/PERF_MODEL.md).")
    p.add_argument("--out", default=default_path(), help="output markdown (default docs/PERF_MODEL.md)")
    p.add_argument("--stdout", action="store_true", help="print instead of writing")
    a = p.parse_args(argv)
    text = render()
    if a.stdout:
        print(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
