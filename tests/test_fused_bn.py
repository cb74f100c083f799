"""Fused teacher BatchNorm: the op (fastsynth.ops.fused_bn) on every backend, and the module API
(fastsynth.fuse) on the teachers of the DFKD literature."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsynth import _ext, fuse
from fastsynth.fuse import (FusedBatchNorm2d, bn_statistics, fuse_teacher, fused_layers, set_stats_enabled,
                            unfuse_teacher)
from fastsynth.models import resnet18, vgg8_bn, wrn_16_2
from fastsynth.ops.bn_stat_loss import loss_from_stats
from fastsynth.ops.fused_bn import fused_bn, fused_bn_reference

BACKENDS = ["cpu", "triton"]
# fp16/bf16: y is rounded to the input dtype (relative rounding 2^-11 / 2^-8); statistics are
# accumulated in fp32 from the same rounded inputs, so they stay at fp32 accuracy.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def relerr(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-contiguous view: every other column of a wider tensor
        big = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x.contiguous()


def rand_inputs(N, C, H, W, dtype=torch.float64, mean_scale=1.0):
    x = torch.randn(N, C, H, W, dtype=torch.float64) * (0.5 + torch.rand(C, 1, 1, dtype=torch.float64))
    x = x + mean_scale * torch.randn(C, 1, 1, dtype=torch.float64)
    weight = 0.5 + torch.rand(C, dtype=torch.float64)
    bias = 0.3 * torch.randn(C, dtype=torch.float64)
    rm = 0.5 * torch.randn(C, dtype=torch.float64)
    rv = 0.5 + torch.rand(C, dtype=torch.float64)
    return x.to(dtype), weight, bias, rm, rv


# ---------------------------------------------------------------------------------------------
# the op


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_maps_in_recycled_blocks(layout):
    # y and grad_x of >= 4 MB come from csrc/cpu/large_alloc.h (recycled blocks): values and
    # layout as with torch's allocator
    x, w, b, rm, rv = rand_inputs(2, 4, 1024, 1040, dtype=torch.float32)
    x = make_layout(x, layout).requires_grad_()
    y, mean, var = fused_bn(x, w.float(), b.float(), rm.float(), rv.float(), 1e-5, True, True, backend="cpu")
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * gy).sum() + mean.sum() + var.sum(), [x])
    x64 = x.detach().double().requires_grad_()
    ry, rmean, rvar = fused_bn_reference(x64, w, b, rm, rv, 1e-5, True, True)
    (rgx,) = torch.autograd.grad((ry * gy.double()).sum() + rmean.sum() + rvar.sum(), [x64])
    assert y.stride() == x.stride() and gx.stride() == x.stride()
    assert relerr(y, ry) < 1e-6 and relerr(gx, rgx) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("relu", [False, True])
def test_forward_matches_float64_reference(backend, layout, relu):
    x, w, b, rm, rv = rand_inputs(3, 5, 6, 7)
    x32 = make_layout(x.float(), layout)
    y, mean, var = fused_bn(x32, w.float(), b.float(), rm.float(), rv.float(), 1e-5, relu, True, backend=backend)
    ry, rmean, rvar = fused_bn_reference(x32.double(), w, b, rm, rv, 1e-5, relu, True)
    assert y.shape == x.shape and y.dtype == torch.float32 and mean.dtype == torch.float32
    assert relerr(y, ry) < TOL[torch.float32]
    assert relerr(mean, rmean) < TOL[torch.float32] and relerr(var, rvar) < TOL[torch.float32]
    # reference against torch's own eval BatchNorm
    torch.testing.assert_close(ry, (F.relu if relu else (lambda t: t))(F.batch_norm(x32.double(), rm, rv, w, b, False,
                                                                                    0.0, 1e-5)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 37, 9, 11),  # CPU channels_last: two 16-channel chunks and a tail
                                   (2, 48, 20, 20)])  # several row blocks per tensor (CPU)
@pytest.mark.parametrize("relu", [False, True])
def test_channels_last_wide_float64_forward_and_backward(backend, shape, relu):
    x, w, b, rm, rv = rand_inputs(*shape)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w1, b1 = w.clone().requires_grad_(), b.clone().requires_grad_()
    y, mean, var = fused_bn(xc, w1, b1, rm, rv, 1e-5, relu, True, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x64 = x.clone().requires_grad_()
    w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
    ry, rmean, rvar = fused_bn_reference(x64, w2, b2, rm, rv, 1e-5, relu, True)
    assert relerr(y, ry) < 1e-12 and relerr(mean, rmean) < 1e-12 and relerr(var, rvar) < 1e-10
    gy = torch.randn_like(ry)
    gm, gv = torch.randn_like(rmean), torch.randn_like(rvar)
    got = torch.autograd.grad((y * gy).sum() + (mean * gm).sum() + (var * gv).sum(), [xc, w1, b1])
    ref = torch.autograd.grad((ry * gy).sum() + (rmean * gm).sum() + (rvar * gv).sum(), [x64, w2, b2])
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, r in zip(got, ref):
        assert relerr(a, r) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 3, 5, 7), (3, 5, 1, 1), (2, 1, 4, 4), (4, 2, 33, 17),
                                   (2, 3, 32, 33),    # CPU: planes of 1024+ elements take the channel-major path
                                   (2, 2, 70, 65)])  # the last: planes larger than one CPU segment
def test_odd_shapes_float64(backend, shape):
    x, w, b, rm, rv = rand_inputs(*shape)
    y, mean, var = fused_bn(x, w, b, rm, rv, 1e-3, True, True, backend=backend)
    ry, rmean, rvar = fused_bn_reference(x, w, b, rm, rv, 1e-3, True, True)
    assert relerr(y, ry) < 1e-12 and relerr(mean, rmean) < 1e-12
    torch.testing.assert_close(var, rvar, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [32, 4])  # CPU: channel-major path at 32x32, small-plane path at 4x4
def test_large_mean_small_variance(backend, hw):
    # E[x^2]-E[x]^2 in fp32 loses the variance at mean 100, std 0.1 (7.7% relative error)
    x = 100.0 + 0.1 * torch.randn(4, 3, hw, hw, dtype=torch.float64)
    _, w, b, rm, rv = rand_inputs(4, 3, hw, hw)
    _, mean, var = fused_bn(x.float(), w.float(), b.float(), rm.float(), rv.float(), 1e-5, False, True, backend=backend)
    rvar = x.float().double().var(dim=(0, 2, 3), unbiased=False)
    assert relerr(var, rvar) < 1e-3
    assert relerr(mean, x.float().double().mean(dim=(0, 2, 3))) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision(backend, dtype, layout):
    x, w, b, rm, rv = rand_inputs(2, 6, 5, 5)
    xh = make_layout(x.to(dtype), layout)
    y, mean, var = fused_bn(xh, w.float(), b.float(), rm.float(), rv.float(), 1e-5, True, True, backend=backend)
    ry, rmean, rvar = fused_bn_reference(xh.double(), w, b, rm, rv, 1e-5, True, True)
    assert y.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    assert relerr(y, ry) < TOL[dtype]
    assert relerr(mean, rmean) < 1e-5 and relerr(var, rvar) < 1e-5
    # half parameters too (a .half() teacher)
    y2, _, _ = fused_bn(xh, w.to(dtype), b.to(dtype), rm.to(dtype), rv.to(dtype), 1e-5, True, True, backend=backend)
    assert relerr(y2, ry) < 4 * TOL[dtype]


def _grads(backend, x, w, b, rm, rv, relu, gy, gm, gv, eps=1e-5):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    if backend == "reference":
        y, mean, var = fused_bn_reference(x, w, b, rm, rv, eps, relu, True)
    else:
        y, mean, var = fused_bn(x, w, b, rm, rv, eps, relu, True, backend=backend)
    loss = (y.double() * gy).sum() + (mean.double() * gm).sum() + (var.double() * gv).sum()
    loss.backward()
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("relu", [False, True])
def test_backward_matches_reference_grad_output_not_one(backend, layout, relu):
    x, w, b, rm, rv = rand_inputs(3, 4, 5, 6)
    gy = torch.randn(x.shape, dtype=torch.float64) * 3.0
    gm, gv = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    xin = make_layout(x, layout)
    got = _grads(backend, xin, w, b, rm, rv, relu, gy, gm, gv)
    ref = _grads("reference", xin, w, b, rm, rv, relu, gy, gm, gv)
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-11
    # the closed form of the statistics-loss gradient (csrc/common/fused_bn_math.h)
    M = 3 * 5 * 6
    xd = x.detach()
    mu = xd.mean(dim=(0, 2, 3), keepdim=True)
    scale = (w / (rv + 1e-5).sqrt()).view(1, -1, 1, 1)
    pre = xd * scale + (b - rm * w / (rv + 1e-5).sqrt()).view(1, -1, 1, 1)
    g_pre = gy * (pre > 0) if relu else gy
    closed = g_pre * scale + gm.view(1, -1, 1, 1) / M + 2 * gv.view(1, -1, 1, 1) * (xd - mu) / M
    assert relerr(got[0], closed) < 1e-11


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_low_precision(backend, dtype):
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 5)
    gy = torch.randn(x.shape, dtype=torch.float64)
    gm, gv = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    xl = x.to(dtype)
    got = _grads(backend, xl, w.float(), b.float(), rm.float(), rv.float(), True, gy.to(dtype).double(), gm, gv)
    ref = _grads("reference", xl.double(), w, b, rm, rv, True, gy.to(dtype).double(), gm, gv)
    assert got[0].dtype == dtype
    assert relerr(got[0], ref[0]) < 2 * TOL[dtype]
    assert relerr(got[1], ref[1]) < 1e-4 and relerr(got[2], ref[2]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, w, b, rm, rv = rand_inputs(2, 3, 2, 2)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    # the interpreted Triton kernels are slow: fast_mode (random directional derivatives) there
    fast = backend == "triton"
    for relu in (False, True):
        def fn(x, w, b):
            return fused_bn(x, w, b, rm, rv, 1e-5, relu, True, backend=backend)

        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_stats_does_no_statistics(backend):
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 4)
    x.requires_grad_(True)
    y, mean, var = fused_bn(x, w, b, rm, rv, 1e-5, True, False, backend=backend)
    assert mean.numel() == 0 and var.numel() == 0
    ry, _, _ = fused_bn_reference(x, w, b, rm, rv, 1e-5, True, False)
    assert relerr(y, ry) < 1e-12
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (rgx,) = torch.autograd.grad(ry, x, gy)
    assert relerr(gx, rgx) < 1e-12


def test_cross_backend_agreement():
    x, w, b, rm, rv = rand_inputs(3, 4, 7, 5)
    x = x.float().contiguous(memory_format=torch.channels_last)
    outs = {bk: fused_bn(x, w.float(), b.float(), rm.float(), rv.float(), 1e-5, True, True, backend=bk)
            for bk in ["reference", "cpu", "triton"]}
    for bk in ["cpu", "triton"]:
        for a, r in zip(outs[bk], outs["reference"]):
            assert relerr(a, r) < 2e-6


def test_nan_propagates():
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    for bk in BACKENDS:
        y, mean, var = fused_bn(x, w, b, rm, rv, 1e-5, True, True, backend=bk)
        assert torch.isnan(mean[1]) and torch.isnan(var[1]) and torch.isnan(y[0, 1, 2, 2])
        assert torch.isfinite(mean[[0, 2]]).all()


def test_bad_input():
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 4)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        fused_bn(x[0], w, b, rm, rv)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        fused_bn(x.long(), w, b, rm, rv)
    with pytest.raises(ValueError, match="x must not be empty"):
        fused_bn(x[:0], w, b, rm, rv)
    with pytest.raises(ValueError, match="weight must have C=3"):
        fused_bn(x, w[:2], b, rm, rv)
    with pytest.raises(ValueError, match="running_var must have 1 dimensions"):
        fused_bn(x, w, b, rm, rv.view(3, 1))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        fused_bn(x, w, None, rm, rv)
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        fused_bn(x, w, b, rm, rv, eps=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_bn(x, w, b, rm, rv, backend="gpu")
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        fuse_teacher("resnet")


def test_opcheck_registered_ops():
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 5, dtype=torch.float32)
    w, b, rm, rv = w.float(), b.float(), rm.float(), rv.float()
    xg = x.clone().requires_grad_(True)
    gy = torch.randn_like(x)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
    gm, gv = torch.randn(3), torch.randn(3)
    cases = [(torch.ops.fastsynth.fused_bn_forward_triton.default, torch.ops.fastsynth.fused_bn_backward_triton.default)]
    if _ext.has_extension():
        cases.append((torch.ops.fastsynth.fused_bn_forward.default, torch.ops.fastsynth.fused_bn_backward.default))
    gi = torch.randn(2, 3)
    xcl = xg.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    for fwd, bwd in cases:
        torch.library.opcheck(fwd, (xcl, w, b, rm, rv, 1e-5, True, True, False))
        torch.library.opcheck(fwd, (xg, w, b, rm, rv, 1e-5, False, False, False))
        torch.library.opcheck(fwd, (xcl, w, b, rm, rv, 1e-5, True, True, True))
        torch.library.opcheck(fwd, (xg, w, b, rm, rv, 1e-5, False, False, True))
        torch.library.opcheck(bwd, (gy, x, w, b, rm, rv, mean, gm, gv, gi, 1e-5, True, True, False, True))
        torch.library.opcheck(bwd, (gy, x, w, b, rm, rv, mean, gm, gv, gi, 1e-5, True, True, True, True))
        torch.library.opcheck(bwd, (gy, x, w, b, rm, rv, mean, gm, gv, gi, 1e-5, False, False, True, False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inst", [False, True])
def test_torch_compile_fullgraph_op(backend, inst):
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 4, dtype=torch.float32)
    w, b, rm, rv = w.float(), b.float(), rm.float(), rv.float()

    def step(x):
        y, mean, var, *im = fused_bn(x, w, b, rm, rv, 1e-5, True, True, backend=backend, with_instance_means=inst)
        return y.square().mean() + loss_from_stats([mean], [var], [rm], [rv]) + sum(m.square().sum() for m in im)

    xe = x.clone().requires_grad_(True)
    step(xe).backward()
    xc = x.clone().requires_grad_(True)
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(xc).backward()
    assert relerr(xc.grad, xe.grad) < 1e-6


@pytest.mark.needs_cuda
def test_cuda_matches_reference():
    x, w, b, rm, rv = rand_inputs(4, 8, 9, 7)
    for layout in ("nchw", "channels_last", "sliced"):
        for dtype in (torch.float32, torch.float16):
            xc = make_layout(x.to(dtype), layout).cuda()
            gy = torch.randn(x.shape, dtype=torch.float64)
            gm, gv = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
            got = _grads("cuda", xc, w.cuda().float(), b.cuda().float(), rm.cuda().float(), rv.cuda().float(), True,
                         gy.cuda(), gm.cuda(), gv.cuda())
            ref = _grads("reference", xc.cpu().double(), w, b, rm, rv, True, gy, gm, gv)
            for g, r in zip(got, ref):
                assert relerr(g.cpu(), r) < 2 * TOL[dtype]
            y, mean, var = fused_bn(xc, w.cuda().float(), b.cuda().float(), rm.cuda().float(), rv.cuda().float(), 1e-5,
                                    True, True, backend="cuda")
            ry, rmean, rvar = fused_bn_reference(xc.cpu().double(), w, b, rm, rv, 1e-5, True, True)
            assert relerr(y.cpu(), ry) < TOL[dtype] and relerr(var.cpu(), rvar) < 1e-5


# ---------------------------------------------------------------------------------------------
# the module API


class TinyTorchvisionBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock's structure: one shared nn.ReLU module, used after
    bn1 (foldable) and after the residual add (not foldable)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TinyTorchvisionResNet(nn.Module):
    """torchvision-style ResNet (7x7 stem, BN, ReLU, max-pool, stages, avgpool, fc) in miniature."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TinyTorchvisionBasicBlock(8, 8))
        self.layer2 = nn.Sequential(TinyTorchvisionBasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DataDependent(nn.Module):
    """Does not trace with torch.fx (branch on a tensor value)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        if out.sum() > 0:
            out = torch.relu(self.bn2(out))
        return out.mean(dim=(2, 3))


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            C = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(C, generator=g))
            m.running_var.copy_(0.5 + torch.rand(C, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(C, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(C, generator=g))
    return model


MODELS = {
    "cifar_resnet18": lambda: resnet18(),
    "wrn_16_2": lambda: wrn_16_2(),
    "vgg8_bn": lambda: vgg8_bn(),
    "torchvision_resnet": lambda: TinyTorchvisionResNet(),
}


def _bn_params(model):
    # gradients w.r.t. the input and every BatchNorm gamma/beta (dgamma/dbeta are the fused
    # reductions; conv weight gradients follow from grad_x)
    return [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]


def upstream_loss_and_grads(model, x, target, weights_grad=True):
    """Upstream-style reference: forward hooks on every nn.BatchNorm2d computing mean/var of the
    BN input (permute/contiguous formulation), loss_from_stats on them, plus a logit loss."""
    stats = []

    def hook(module, inputs, output):
        a = inputs[0]
        nch = a.shape[1]
        mean = a.mean([0, 2, 3])
        var = a.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        stats.append((mean, var, module.running_mean, module.running_var))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = x.clone().requires_grad_(True)
    logits = model(x)
    bn = loss_from_stats(*[list(t) for t in zip(*stats)])
    loss = F.cross_entropy(logits, target) + 0.7 * bn
    params = _bn_params(model) if weights_grad else []
    grads = torch.autograd.grad(loss, [x] + params)
    for h in handles:
        h.remove()
    return logits.detach(), bn.detach(), grads


def fused_loss_and_grads(model, x, target, weights_grad=True):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    bn = loss_from_stats(*bn_statistics(model))
    loss = F.cross_entropy(logits, target) + 0.7 * bn
    params = _bn_params(model) if weights_grad else []
    grads = torch.autograd.grad(loss, [x] + params)
    return logits.detach(), bn.detach(), grads


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fuse_relu", [False, True])
def test_fused_teacher_matches_upstream_hooks_float64(name, fuse_relu):
    torch.manual_seed(1)
    ref = randomise_bn(MODELS[name]()).double().eval()
    model = copy.deepcopy(ref)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert fuse_teacher(model, fuse_relu=fuse_relu) is model
    assert len(fused_layers(model)) == n_bn
    folded = model.__dict__.get("_fs_relus_folded", 0)
    assert (folded > 0) == fuse_relu
    side = 32 if name == "vgg8_bn" else 16  # VGG pools 5 times
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    target = torch.tensor([1, 7])
    lr, br, gr = upstream_loss_and_grads(ref, x, target)
    lf, bf, gf = fused_loss_and_grads(model, x, target)
    assert relerr(lf, lr) < 1e-12
    assert relerr(bf, br) < 1e-12
    assert len(gf) == len(gr)
    for a, b in zip(gf, gr):
        assert relerr(a, b) < 1e-10


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_fused_teacher_float32_channels_last(fuse_relu):
    ref = randomise_bn(resnet18()).eval().to(memory_format=torch.channels_last)
    model = fuse_teacher(copy.deepcopy(ref), fuse_relu=fuse_relu)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    target = torch.tensor([0, 3])
    lr, br, gr = upstream_loss_and_grads(ref, x, target, weights_grad=False)
    lf, bf, gf = fused_loss_and_grads(model, x, target, weights_grad=False)
    assert relerr(lf, lr) < 1e-4 and relerr(bf, br) < 1e-4 and relerr(gf[0], gr[0]) < 1e-3


def test_relu_folding_counts_and_shared_relu():
    model = fuse_teacher(randomise_bn(TinyTorchvisionResNet()).eval())
    # stem bn1->relu and each block's bn1->relu fold; bn2 (feeds the add) and downsample BN do not
    assert model.__dict__["_fs_relus_folded"] == 3
    model = fuse_teacher(randomise_bn(wrn_16_2()).eval())
    assert model.__dict__["_fs_relus_folded"] == sum(isinstance(m, nn.BatchNorm2d) for m in wrn_16_2().modules())


def test_teacher_triton_backend():
    ref = randomise_bn(TinyTorchvisionResNet()).eval()
    model = fuse_teacher(copy.deepcopy(ref), backend="triton")
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([2, 5])
    lr, br, gr = upstream_loss_and_grads(ref, x, target)
    lf, bf, gf = fused_loss_and_grads(model, x, target)
    assert relerr(lf, lr) < 1e-5 and relerr(bf, br) < 1e-5
    for a, b in zip(gf, gr):
        assert relerr(a, b) < 1e-4


def test_unfuse_restores_exact_modules_and_state_dict():
    model = randomise_bn(resnet18()).eval()
    originals = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict().keys())
    x = torch.randn(2, 3, 16, 16)
    y0 = model(x)
    fuse_teacher(model)
    assert list(model.state_dict().keys()) == keys
    assert all(type(m) is not nn.BatchNorm2d for m in model.modules())
    # the fused layers share the original tensors
    assert model.bn1.weight is originals["bn1"].weight and model.bn1.running_var is originals["bn1"].running_var
    # a fused teacher's state_dict loads into an unfused one, and back
    plain = resnet18()
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())
    torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-5)
    assert unfuse_teacher(model) is model
    assert "forward" not in model.__dict__
    for n, m in model.named_modules():
        assert m is originals[n] and type(m) is type(originals[n])
    assert list(model.state_dict().keys()) == keys
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    fuse_teacher(model)  # fusing again works after unfusing
    with pytest.raises(ValueError, match="already fused"):
        fuse_teacher(model)


def test_train_mode_is_plain_batchnorm():
    ref = randomise_bn(wrn_16_2())
    model = fuse_teacher(copy.deepcopy(ref))
    ref.train()
    model.train()
    x = torch.randn(4, 3, 16, 16)
    y_ref, y = ref(x), model(x)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)  # running stats and num_batches_tracked updated alike
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_untraceable_teacher_falls_back_to_bn_only():
    ref = randomise_bn(DataDependent()).eval()
    model = copy.deepcopy(ref)
    # the warning names the reason (where the model branches on tensor values) and what still runs fused
    with pytest.warns(RuntimeWarning, match=r"fuse_teacher: DataDependent.forward\(x\) cannot be traced .*"
                                            r"output of module 'bn' at .*test_fused_bn.py.*BatchNorm layers fused"):
        fuse_teacher(model)
    assert len(fused_layers(model)) == 2
    assert fuse.fusion_stats(model) == {"x": None}  # the form is recorded as not traced
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at fuse time, not at every call
        model(x)
    lr, br, gr = upstream_loss_and_grads(ref, x, torch.tensor([0, 1]))
    lf, bf, gf = fused_loss_and_grads(model, x, torch.tensor([0, 1]))
    assert relerr(lf, lr) < 1e-5 and relerr(bf, br) < 1e-5
    for a, b in zip(gf, gr):
        assert relerr(a, b) < 1e-4


def test_hooked_submodules_still_fire():
    model = randomise_bn(TinyTorchvisionResNet()).eval()
    seen = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fuse_teacher(model)
    model(torch.randn(1, 3, 16, 16))
    assert seen == [torch.Size([1, 8, 4, 4])]


def test_stats_enabled_switch():
    model = fuse_teacher(randomise_bn(vgg8_bn()).eval())
    x = torch.randn(2, 3, 32, 32)
    model(x)
    means, variances, rms, rvs = bn_statistics(model)
    assert len(means) == 5 and len(rvs) == 5 and rms[0] is fused_layers(model)[0].running_mean
    set_stats_enabled(model, False)
    with torch.no_grad():
        y = model(x)
    assert all(m.last_mean is None for m in fused_layers(model))
    with pytest.raises(RuntimeError, match="no statistics recorded"):
        bn_statistics(model)
    set_stats_enabled(model, True)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(model(xg), y)
    means, variances, _, _ = bn_statistics(model)
    assert means[0].grad_fn is not None and variances[-1].grad_fn is not None
    with pytest.raises(ValueError, match="no fused BatchNorm"):
        bn_statistics(nn.Conv2d(1, 1, 1))


def test_torch_compile_fullgraph_teacher_step():
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out = F.relu(self.bn(self.conv(x)))
            out = self.bn2(self.conv2(out))
            return self.fc(out.mean(dim=(2, 3)))

    ref = randomise_bn(Small()).eval()
    model = fuse_teacher(copy.deepcopy(ref))
    assert model.__dict__["_fs_relus_folded"] == 1
    for p in model.parameters():
        p.requires_grad_(False)

    def step(x):
        logits = model(x)
        return logits.logsumexp(1).mean() + loss_from_stats(*bn_statistics(model))

    x = torch.randn(2, 3, 8, 8)
    xe = x.clone().requires_grad_(True)
    step(xe).backward()
    torch._dynamo.reset()
    xc = x.clone().requires_grad_(True)
    torch.compile(step, fullgraph=True, backend="aot_eager")(xc).backward()
    assert relerr(xc.grad, xe.grad) < 1e-5


@pytest.mark.parametrize("backend", ["cpu"])
def test_large_strided_plane(backend):
    # sliced planes with more elements than one CPU segment: the CPU's segmented, strided path
    # (the Triton kernels have no segments; their strided reads are tested above)
    x, w, b, rm, rv = rand_inputs(2, 2, 70, 65)
    xs = make_layout(x, "sliced")
    assert not xs.is_contiguous() and xs.stride(-1) == 2
    gy = torch.randn(x.shape, dtype=torch.float64)
    gm, gv = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    got = _grads(backend, xs, w, b, rm, rv, True, gy, gm, gv)
    ref = _grads("reference", xs, w, b, rm, rv, True, gy, gm, gv)
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-11
    y, mean, var = fused_bn(xs, w, b, rm, rv, 1e-5, True, True, backend=backend)
    ry, rmean, rvar = fused_bn_reference(xs, w, b, rm, rv, 1e-5, True, True)
    assert relerr(y, ry) < 1e-12 and relerr(mean, rmean) < 1e-12 and relerr(var, rvar) < 1e-12


# ---------------------------------------------------------------------------------------------
# op overhead: the ATen ops one fused layer dispatches


@pytest.mark.skipif(not _ext.has_extension(), reason="needs the C++ extension")
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("inst", [False, True])
def test_one_layer_dispatches_only_its_ops(stats, inst):
    """Forward + backward of one fused layer: one forward op, one backward op and the ops of the
    loss written here, nothing else (no detach of the saved batch mean, no zeros for the outputs
    without a gradient beyond the one the kernel reads)."""
    from collections import Counter

    from fastsynth.bench.harness import AtenOpCounter

    x, w, b, rm, rv = rand_inputs(2, 4, 5, 3, dtype=torch.float32)
    w, b, rm, rv = w.float(), b.float(), rm.float(), rv.float()
    x.requires_grad_(True)
    with AtenOpCounter() as counter:
        out = fused_bn(x, w, b, rm, rv, 1e-5, True, stats, backend="cpu", with_instance_means=inst)
        loss = out[0].sum()
        if stats:
            loss = loss + out[1].sum()  # var takes no part: its gradient is one zeros_like
        if inst:
            loss = loss + out[3].sum()
        (gx,) = torch.autograd.grad(loss, [x])
    terms = 1 + stats + inst
    expected = Counter({"fastsynth.fused_bn_forward": 1, "fastsynth.fused_bn_backward": 1, "aten.sum": terms,
                        "aten.add": terms - 1, "aten.ones_like": 1, "aten.expand": terms})
    if stats:
        expected["aten.zeros_like"] = 1
    assert counter.counts == expected
    xr = x.detach().double().requires_grad_(True)
    ref = fused_bn_reference(xr, w.double(), b.double(), rm.double(), rv.double(), 1e-5, True, stats, inst)
    rloss = ref[0].sum() + (ref[1].sum() if stats else 0) + (ref[3].sum() if inst else 0)
    (rgx,) = torch.autograd.grad(rloss, [xr])
    assert relerr(gx, rgx) < 1e-5


# ---------------------------------------------------------------------------------------------
# instance means: inst_mean[n, c] = mean over H, W of x, from the same pass


def _inst_grads(backend, x, w, b, rm, rv, relu, stats, gy, gi, gm=None, gv=None):
    """Outputs (y, mean, var, inst_mean) and the gradients w.r.t. x, weight and bias of
    <y, gy> + <inst_mean, gi> (+ <mean, gm> + <var, gv> with stats)."""
    x = x.detach().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    y, mean, var, inst = fused_bn(x, w, b, rm, rv, 1e-5, relu, stats, backend=backend, with_instance_means=True)
    loss = (y.double() * gy).sum() + (inst.double() * gi).sum()
    if stats:
        loss = loss + (mean.double() * gm).sum() + (var.double() * gv).sum()
    return (y, mean, var, inst) + torch.autograd.grad(loss, [x, w, b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("stats", [False, True])
def test_instance_means_match_float64_reference(backend, layout, relu, stats):
    x, w, b, rm, rv = rand_inputs(3, 5, 7, 9)
    xl = make_layout(x, layout)
    gy = torch.randn(x.shape, dtype=torch.float64)
    gi, gm, gv = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = _inst_grads(backend, xl, w, b, rm, rv, relu, stats, gy, gi, gm, gv)
    ref = _inst_grads("reference", x, w, b, rm, rv, relu, stats, gy, gi, gm, gv)
    torch.testing.assert_close(got[3], x.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        if r.numel():
            assert relerr(g, r) < 1e-12
    # the instance-mean term is in grad_x: without it grad_x differs
    plain = _inst_grads(backend, xl, w, b, rm, rv, relu, stats, gy, torch.zeros_like(gi), gm, gv)
    assert relerr(got[4] - plain[4], gi[:, :, None, None].expand(x.shape) / (7 * 9)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 3, 5, 7), (3, 5, 1, 1), (2, 1, 4, 4), (4, 2, 33, 17),
                                   (2, 40, 3, 5), (3, 2, 70, 70)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_instance_means_odd_shapes(backend, shape, layout):
    # (3, 2, 70, 70): CPU planes of more than one segment; (2, 40, 3, 5) channels_last: several
    # 16-channel chunks and a tail; H = W = 1: one value per plane
    x, w, b, rm, rv = rand_inputs(*shape)
    xl = make_layout(x, layout)
    gy = torch.randn(shape, dtype=torch.float64)
    gi = torch.randn(shape[:2], dtype=torch.float64)
    gm, gv = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    for stats in (False, True):
        got = _inst_grads(backend, xl, w, b, rm, rv, True, stats, gy, gi, gm, gv)
        ref = _inst_grads("reference", x, w, b, rm, rv, True, stats, gy, gi, gm, gv)
        for g, r in zip(got, ref):
            if r.numel():
                assert relerr(g, r) < 1e-11, (stats, g.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_means_gradcheck(backend):
    x, w, b, rm, rv = rand_inputs(2, 3, 3, 4)
    for layout in ("nchw", "channels_last"):
        for stats in (False, True):
            def f(x, w, b, stats=stats):
                y, mean, var, inst = fused_bn(x, w, b, rm, rv, 1e-5, True, stats, backend=backend,
                                              with_instance_means=True)
                return (y, inst, mean, var) if stats else (y, inst)

            args = (make_layout(x, layout).requires_grad_(True), w.clone().requires_grad_(True),
                    b.clone().requires_grad_(True))
            assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_instance_means_low_precision(backend, dtype, layout):
    # inst_mean is accumulated in fp32 from the rounded inputs: fp32 accuracy against the float64
    # means of those inputs (1e-5 relative); grad_x is rounded to the input dtype (TOL).
    x, w, b, rm, rv = rand_inputs(4, 6, 9, 11)
    xh = make_layout(x.to(dtype), layout)
    xr = xh.double()
    gy = torch.randn(x.shape, dtype=torch.float64)
    gi = torch.randn(4, 6, dtype=torch.float64)
    got = _inst_grads(backend, xh, w.float(), b.float(), rm.float(), rv.float(), True, False, gy.to(dtype), gi)
    ref = _inst_grads("reference", xr, w, b, rm, rv, True, False, gy.to(dtype).double(), gi)
    assert got[3].dtype == torch.float32 and got[3].shape == (4, 6)
    assert relerr(got[3], ref[3]) < 1e-5
    assert got[4].dtype == dtype and relerr(got[4], ref[4]) < 2 * TOL[dtype]
    for g, r in zip(got[5:], ref[5:]):  # dgamma / dbeta: fp32 reductions
        assert relerr(g, r) < 1e-4


def test_instance_means_output_only_when_asked():
    x, w, b, rm, rv = rand_inputs(2, 3, 4, 4)
    assert len(fused_bn(x, w, b, rm, rv, backend="cpu")) == 3
    out = fused_bn(x, w, b, rm, rv, backend="cpu", with_instance_means=True)
    assert len(out) == 4 and out[3].shape == (2, 3)
    # an unused inst_mean adds nothing to grad_x
    xg = x.clone().requires_grad_(True)
    y, _, _, inst = fused_bn(xg, w, b, rm, rv, 1e-5, False, False, backend="cpu", with_instance_means=True)
    (g1,) = torch.autograd.grad(y.sum(), [xg])
    (g2,) = torch.autograd.grad(fused_bn(xg, w, b, rm, rv, 1e-5, False, False, backend="cpu")[0].sum(), [xg])
    assert torch.equal(g1, g2)


@pytest.mark.needs_cuda
def test_cuda_instance_means_match_reference():
    x, w, b, rm, rv = rand_inputs(4, 40, 9, 7)
    gy = torch.randn(x.shape, dtype=torch.float64)
    gi = torch.randn(4, 40, dtype=torch.float64)
    gm, gv = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    for layout in ("nchw", "channels_last", "sliced"):
        for stats in (False, True):
            ref = _inst_grads("reference", x, w, b, rm, rv, True, stats, gy, gi, gm, gv)
            got = _inst_grads("cuda", make_layout(x, layout).cuda(), w.cuda(), b.cuda(), rm.cuda(), rv.cuda(), True,
                              stats, gy.cuda(), gi.cuda(), gm.cuda(), gv.cuda())
            for g, r in zip(got, ref):
                if r.numel():
                    assert relerr(g.cpu(), r) < 1e-12
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                xh = make_layout(x.to(dtype), layout).cuda()
                got = _inst_grads("cuda", xh, w.cuda().float(), b.cuda().float(), rm.cuda().float(),
                                  rv.cuda().float(), True, stats, gy.to(dtype).cuda(), gi.cuda(), gm.cuda(), gv.cuda())
                ref = _inst_grads("reference", xh.cpu().double(), w, b, rm, rv, True, stats,
                                  gy.to(dtype).double(), gi, gm, gv)
                assert got[3].dtype == torch.float32 and relerr(got[3].cpu(), ref[3]) < 1e-5
                assert relerr(got[4].cpu(), ref[4]) < 2 * TOL[dtype]
    for shape in ((1, 3, 1, 1), (3, 5, 1, 1), (2, 1, 4, 4), (4, 2, 33, 17), (3, 2, 70, 70)):
        x, w, b, rm, rv = rand_inputs(*shape)
        gy, gi = torch.randn(shape, dtype=torch.float64), torch.randn(shape[:2], dtype=torch.float64)
        ref = _inst_grads("reference", x, w, b, rm, rv, False, False, gy, gi)
        for layout in ("nchw", "channels_last"):
            got = _inst_grads("cuda", make_layout(x, layout).cuda(), w.cuda(), b.cuda(), rm.cuda(), rv.cuda(), False,
                              False, gy.cuda(), gi.cuda())
            assert relerr(got[3].cpu(), ref[3]) < 1e-12 and relerr(got[4].cpu(), ref[4]) < 1e-12


# ---------------------------------------------------------------------------------------------
# instance means at the module level


def upstream_instance_means(model, x):
    """CMI's InstanceMeanHook with feature_layers=None: a forward hook on every BatchNorm2d
    taking the mean over dims 2, 3 of the layer's input."""
    means = []
    handles = [m.register_forward_hook(lambda mod, inp, out: means.append(inp[0].mean(dim=[2, 3])))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, means


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fuse_relu", [False, True])
def test_instance_means_match_instance_mean_hooks(name, fuse_relu):
    torch.manual_seed(2)
    ref = randomise_bn(MODELS[name]()).double().eval()
    model = fuse_teacher(copy.deepcopy(ref), fuse_relu=fuse_relu)
    fuse.set_instance_means_enabled(model, True)
    side = 32 if name == "vgg8_bn" else 16
    x = torch.randn(3, 3, side, side, dtype=torch.float64)
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lr, mr = upstream_instance_means(ref, xr)
    lf = model(xf)
    mf = fuse.instance_means(model)
    assert len(mf) == len(mr) == len(fused_layers(model))
    for a, b in zip(mf, mr):
        assert a.shape == b.shape
        assert relerr(a, b) < 1e-12
    # values and gradients: a loss on the means (as CMI's contrastive head would take them)
    ws = [torch.randn(m.shape, dtype=torch.float64) for m in mr]
    gr = torch.autograd.grad(sum((m * w).sum() for m, w in zip(mr, ws)) + lr.square().sum(), [xr] + _bn_params(ref))
    gf = torch.autograd.grad(sum((m * w).sum() for m, w in zip(mf, ws)) + lf.square().sum(),
                             [xf] + _bn_params(model))
    for a, b in zip(gf, gr):
        assert relerr(a, b) < 1e-10


def test_instance_means_switch_and_errors():
    model = fuse_teacher(randomise_bn(vgg8_bn()).eval())
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="set_instance_means_enabled"):
        fuse.instance_means(model)
    fuse.set_instance_means_enabled(model, True)
    y = model(x)
    means = fuse.instance_means(model)
    assert len(means) == 5 and all(m.shape[0] == 2 for m in means)
    assert len(bn_statistics(model)[0]) == 5  # the statistics still ride along
    set_stats_enabled(model, False)  # instance means alone
    torch.testing.assert_close(model(x), y)
    for a, b in zip(fuse.instance_means(model), means):
        torch.testing.assert_close(a, b)
    fuse.set_instance_means_enabled(model, False)
    assert all(m.last_inst_mean is None for m in fused_layers(model))
    with pytest.raises(RuntimeError, match="none recorded"):
        fuse.instance_means(model)
    with pytest.raises(ValueError, match="no fused BatchNorm"):
        fuse.instance_means(nn.Conv2d(1, 1, 1))
    fuse.set_instance_means_enabled(model, True)
    model.train()  # train mode: plain BatchNorm, the means computed beside it
    xt = torch.randn(2, 3, 32, 32)
    _, mr = upstream_instance_means(model, xt)
    for a, b in zip(fuse.instance_means(model), mr):
        torch.testing.assert_close(a, b)

