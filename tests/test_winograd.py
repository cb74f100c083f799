"""Winograd F(2x2, 3x3) convolution for frozen weights (fastsynth/cpu/winograd.py,
csrc/cpu/winograd_conv.cpp): the op against float64 convolutions (its float64 build is exact to
rounding; float32 within a stated bound), its input gradient, its errors, and its use by the fused
teacher graph and the student's eval view."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsynth import _ext, fuse
from fastsynth.cpu import config, convs, winograd

pytestmark = pytest.mark.skipif(not _ext.has_extension(), reason="needs fastsynth._C")


def _op(x, w, b=None):
    return torch.ops.fastsynth.winograd_conv3x3(x, winograd.winograd_weight(w), b)


# odd maps (cut last tiles), 1x1 and 1xW maps, channel counts below, at and above a 64-byte vector
# of lanes (8 doubles, 16 floats) with tails
SHAPES = [(2, 3, 5, 7, 4), (3, 17, 9, 11, 9), (1, 7, 1, 1, 2), (2, 16, 8, 8, 16), (1, 33, 1, 6, 35),
          (2, 40, 6, 5, 24)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_float64_matches_direct_convolution(shape, with_bias):
    n, c, h, w_, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w_, dtype=torch.float64, generator=g)
    w = torch.randn(k, c, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(k, dtype=torch.float64, generator=g) if with_bias else None
    y = _op(x, w, b)
    assert y.shape == (n, k, h, w_) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_input_gradient_mode_is_the_flipped_transposed_convolution(shape):
    """input_grad=True with the forward's U: conv2d(g, w.transpose(0, 1).flip(-1, -2), padding=1)."""
    n, c, h, w_, k = shape
    g = torch.Generator().manual_seed(7 + sum(shape))
    grad_y = torch.randn(n, k, h, w_, dtype=torch.float64, generator=g)
    w = torch.randn(k, c, 3, 3, dtype=torch.float64, generator=g)
    got = torch.ops.fastsynth.winograd_conv3x3(grad_y, winograd.winograd_weight(w), None, True)
    ref = F.conv2d(grad_y, w.transpose(0, 1).flip(-1, -2), padding=1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_any_input_layout(layout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 9, 14, dtype=torch.float64, generator=g)
    w = torch.randn(12, 20, 3, 3, dtype=torch.float64, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, :, ::2]  # non-contiguous, 9 x 7
    torch.testing.assert_close(_op(x, w), F.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 128, 4, 4, 128),   # all tiles at once (small V and M)
                                   (1, 64, 112, 112, 64),  # blocks of tiles (V and M over 20 MB)
                                   (3, 96, 13, 10, 80)])
def test_float32_within_rounding_of_float64(shape):
    """Float32 against the float64 convolution: the transforms are exact in their coefficients,
    so the error is the rounding of the sums; bound 4e-6 of the largest output (measured 6-7e-7;
    oneDNN's direct float32 convolution: 1-3e-6)."""
    n, c, h, w_, k = shape
    g = torch.Generator().manual_seed(c + h)
    x = torch.randn(n, c, h, w_, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
    b = torch.randn(k, generator=g)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    err = (_op(x, w, b).double() - ref).abs().max() / ref.abs().max()
    assert err < 4e-6


def test_input_gradient_and_bias_gradient_float64():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: winograd.winograd_conv3x3(x, w, b), (x, b))
    # against the direct convolution's gradients, grad_output != 1, channels_last grad_output
    y = winograd.winograd_conv3x3(x, w, b)
    go = torch.randn(y.shape, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    gx, gb = torch.autograd.grad(y, (x, b), go)
    x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
    rx, rb = torch.autograd.grad(F.conv2d(x2, w, b2, padding=1), (x2, b2), go)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused_with_the_argument_named():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(3, 4, 3, 3)
    with pytest.raises(ValueError, match="weight must not require grad"):
        winograd.winograd_conv3x3(x, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="weight \\(K, C, 3, 3\\)"):
        winograd.winograd_conv3x3(x, torch.randn(3, 5, 3, 3))
    with pytest.raises(ValueError, match="one dtype"):
        winograd.winograd_conv3x3(x, w.double())
    with pytest.raises(ValueError, match="bias must be"):
        winograd.winograd_conv3x3(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="shape \\(K, C, 3, 3\\)"):
        winograd.winograd_weight(torch.randn(3, 4, 5, 5))
    op = torch.ops.fastsynth.winograd_conv3x3
    with pytest.raises(RuntimeError, match="u must be the transformed weight"):
        op(x, torch.randn(9, 4, 3), None)
    with pytest.raises(RuntimeError, match="u has 5 input channels, x has 4"):
        op(x, torch.randn(16, 5, 3), None)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        op(x.half(), torch.randn(16, 4, 3).half(), None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, torch.randn(16, 4, 3), torch.randn(2))
    with pytest.raises(RuntimeError, match="u has 3 input channels \\(input_grad"):
        op(x, torch.randn(16, 4, 3), None, True)


def test_empty_batch_and_no_input_channels():
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    assert _op(torch.randn(0, 4, 5, 5, dtype=torch.float64), w).shape == (0, 3, 5, 5)
    b = torch.randn(3, dtype=torch.float64)
    y = torch.ops.fastsynth.winograd_conv3x3(torch.randn(2, 0, 3, 3, dtype=torch.float64),
                                             torch.zeros(16, 0, 3, dtype=torch.float64), b)
    torch.testing.assert_close(y, b.view(1, 3, 1, 1).expand(2, 3, 3, 3))


def test_nan_propagates():
    x = torch.randn(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    y = _op(x, torch.randn(5, 4, 3, 3))
    ref = F.conv2d(x, torch.randn(5, 4, 3, 3), padding=1)
    assert torch.isnan(y[0, :, 1:4, 2:5]).all() and torch.isnan(ref[0, :, 1:4, 2:5]).all()


def test_opcheck_schema_and_fake():
    x = torch.randn(2, 5, 6, 7)
    u = winograd.winograd_weight(torch.randn(3, 5, 3, 3))
    torch.library.opcheck(torch.ops.fastsynth.winograd_conv3x3, (x, u, torch.randn(3)),
                          test_utils=("test_schema", "test_faketensor"))
    grad_y = torch.randn(2, 3, 6, 7)
    torch.library.opcheck(torch.ops.fastsynth.winograd_conv3x3, (grad_y, u, None, True),
                          test_utils=("test_schema", "test_faketensor"))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)  # not a Winograd shape

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + x)
        return self.down(y).mean((2, 3))


def _randomised(c):
    m = _Block(c)
    for bn in (m.bn1, m.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    return m.eval().requires_grad_(False)


@pytest.mark.parametrize("which", ["teacher", "student_view"])
def test_fused_graphs_take_the_path_and_match(which, monkeypatch):
    monkeypatch.setattr(config, "winograd_min_channels", 16)
    ref = _randomised(16)
    model = fuse.fuse_teacher(copy.deepcopy(ref)) if which == "teacher" else fuse.fused_eval_view(ref)
    calls = []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(convs, "frozen_conv3x3", lambda *a: calls.append(1) or winograd.frozen_conv3x3(*a))
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(2) or real(*a))
    x = torch.randn(3, 16, 9, 9, requires_grad=True)
    x2 = x.detach().double().requires_grad_()
    y = model(x)
    assert calls.count(2) == 2  # the two 3x3 stride-1 convolutions; the stride-2 one runs oneDNN
    y_ref = copy.deepcopy(ref).double()(x2)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    go = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, x, go)
    (gr,) = torch.autograd.grad(y_ref, x2, go.double())
    torch.testing.assert_close(gx.double(), gr, rtol=1e-5, atol=1e-5)
    if which == "teacher":  # unfusing drops the cached transformed weights
        assert "_fs_winograd" in model.conv1.__dict__
        fuse.unfuse_teacher(model)
        assert not any("_fs_winograd" in m.__dict__ for m in model.modules())
        model = fuse.fuse_teacher(model)
    # switched off: the same numbers through oneDNN
    monkeypatch.setattr(config, "winograd_min_channels", 0)
    calls.clear()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    assert 2 not in calls


def test_not_taken_for_trained_weights_float64_or_autocast():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    assert not winograd.winograd_applies(x, conv, conv.weight)  # needs a gradient
    conv.requires_grad_(False)
    assert winograd.winograd_applies(x, conv, conv.weight) == (16 >= config.winograd_min_channels > 0)
    big = nn.Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    xb = torch.randn(1, 128, 4, 4)
    assert winograd.winograd_applies(xb, big, big.weight)
    assert not winograd.winograd_applies(xb.double(), big.double(), big.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.winograd_applies(xb, big, big.weight)
    for geometry in (dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(padding=1, groups=2),
                     dict(padding=1, padding_mode="reflect")):
        other = nn.Conv2d(128, 128, 3, **geometry).float().requires_grad_(False)
        assert not winograd.winograd_applies(xb, other, other.weight)


def test_transformed_weights_follow_in_place_changes():
    conv = nn.Conv2d(6, 5, 3, padding=1).double().requires_grad_(False)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    y0 = winograd.winograd_conv3x3(x, conv.weight, conv.bias, owner=conv)
    torch.testing.assert_close(y0, conv(x), rtol=1e-12, atol=1e-12)
    conv.weight.mul_(-2.0)  # a new version: the cached transform is rebuilt
    y1 = winograd.winograd_conv3x3(x, conv.weight, conv.bias, owner=conv)
    torch.testing.assert_close(y1, conv(x), rtol=1e-12, atol=1e-12)


def _compiled_conv2d_calls(model, x):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(model, fullgraph=True, dynamic=False, backend=counter)(x)
    return sum("conv2d" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def test_compiled_forward_takes_the_prepared_path(monkeypatch):
    """Inside torch.compile the path needs the weights transformed beforehand (prepare_winograd,
    which the synthesizers call each round); then the compiled graph calls it and its results and
    gradients match oneDNN's."""
    monkeypatch.setattr(config, "winograd_min_channels", 16)
    model = fuse.fuse_teacher(copy.deepcopy(_randomised(16)))
    x = torch.randn(3, 16, 9, 9, requires_grad=True)
    # not prepared: all three convolutions stay oneDNN's in the graph
    assert _compiled_conv2d_calls(model, x) == 3
    assert winograd.prepare_winograd(model) == 2
    assert _compiled_conv2d_calls(model, x) == 1  # only the stride-2 one
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    monkeypatch.setattr(config, "winograd_min_channels", 0)
    y0 = model(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, g0, rtol=1e-5, atol=1e-6)
    # a weight changed in place is re-transformed in place by the next prepare: the compiled
    # graph (no recompilation) reads the new values
    monkeypatch.setattr(config, "winograd_min_channels", 16)
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)
    winograd.prepare_winograd(model)
    y1 = compiled(x)
    monkeypatch.setattr(config, "winograd_min_channels", 0)
    torch.testing.assert_close(y1, model(x), rtol=1e-5, atol=1e-6)
    assert (y1 - y).abs().max() > 1e-3


def test_portable_gemm_path_matches():
    """Where PyTorch exports no usable Fortran sgemm_/dgemm_ the GEMMs run through at::mm
    (``config.winograd_blas = False`` takes that path here): the same results."""
    import fastsynth.cpu

    for blas in (False, True):
        with fastsynth.cpu.configured(winograd_blas=blas):
            for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                for n, c, h, w, k in ((2, 17, 9, 7, 5), (64, 128, 4, 4, 128), (1, 64, 112, 112, 64)):
                    x = torch.randn(n, c, h, w, dtype=dt)
                    wt = torch.randn(k, c, 3, 3, dtype=dt) / (9 * c) ** 0.5
                    b = torch.randn(k, dtype=dt)
                    y = torch.ops.fastsynth.winograd_conv3x3(x, winograd.winograd_weight(wt), b)
                    torch.testing.assert_close(y, F.conv2d(x, wt, b, padding=1), rtol=tol, atol=tol)
    assert config.winograd_blas is True


def _same_address_weight(old_id: int, old_version: int, shape, dtype):
    """A new frozen ``nn.Parameter`` of random values whose id() is ``old_id`` (the address of a
    freed one) and whose version counter reads ``old_version``, or None when no such address
    came back. CPython reuses freed object memory of one size class, but first fills the other
    pools of that class: empty Parameters are made (and kept) until one lands there, and only it
    gets the values."""
    keep = []
    for _ in range(200_000):
        t = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        if id(t) == old_id:
            t.data = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                while t._version < old_version:
                    t.add_(0)  # in place: only the version counter moves
            return t if t._version == old_version else None
        keep.append(t)
    return None


def test_transformed_weights_not_reused_for_a_new_weight_at_a_freed_address():
    """The cached transform is keyed on the weight tensor (a weak reference) and its version,
    not on id(): a weight freed and another allocated at the same address, at the same version,
    gets its own transform; the cache does not keep a replaced weight alive."""
    import gc
    import weakref

    conv = nn.Conv2d(6, 5, 3, padding=1).double().requires_grad_(False)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    winograd.winograd_conv3x3(x, conv.weight, conv.bias, owner=conv)
    old = weakref.ref(conv.weight)
    old_id, old_version = id(conv.weight), conv.weight._version
    del conv.weight  # the Parameter is freed: nothing else holds it (not the cache)
    gc.collect()
    assert old() is None
    new = _same_address_weight(old_id, old_version, (5, 6, 3, 3), torch.float64)
    if new is None:
        pytest.skip("this interpreter did not reuse the freed address")
    conv.weight = new
    y = winograd.winograd_conv3x3(x, conv.weight, conv.bias, owner=conv)
    torch.testing.assert_close(y, F.conv2d(x, new, conv.bias, padding=1), rtol=1e-12, atol=1e-12)
