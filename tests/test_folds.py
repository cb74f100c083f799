"""Graph-level folds of fastsynth.fuse used by the synthesis step: residual joins left as written, the
student's conv+BatchNorm folding (``ConvBNFold``) and their rewriting of traced graphs, with the
CPU room's convolution routing and layouts (fastsynth.cpu). Each is
checked against the unfolded float64 computation, forward and input/parameter gradients, with a
grad_output that is not all ones."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsynth.cpu
from fastsynth import _ext, fuse
from fastsynth.cpu import convs
from fastsynth.cpu.layout import conv_input_layout, conv_output_layout
from fastsynth.bench.harness import AtenOpCounter
from fastsynth.models import resnet18
from fastsynth.synthesis.core import frozen


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


# ---------------------------------------------------------------- residual joins
def test_fused_teacher_keeps_the_residual_join_as_written():
    """``relu(a + b)`` of a residual block stays the model's add and ReLU (three ops with the
    ReLU's backward; a one-pass CPU join saved 0.2% of a step and cost its Python autograd
    Function's detaches, docs/PERFORMANCE.md); the fused forward and its gradient equal the model's."""
    ref = _randomise_bn(resnet18()).double().eval()
    model = fuse.fuse_teacher(copy.deepcopy(ref))
    stats = fuse.fusion_stats(model)["x"]
    assert "add_relu" not in stats and stats["bn_relu"] == 9, stats
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    counter = AtenOpCounter()
    with counter:
        y = model(x)
    # one add and one ReLU per BasicBlock (8), nothing else in their place
    adds = counter.counts["aten.add"] + counter.counts["aten.add_"]
    relus = counter.counts["aten.relu"] + counter.counts["aten.relu_"]
    assert adds == 8 and relus == 8, dict(counter.counts)
    assert not any("add_relu" in k for k in counter.counts), dict(counter.counts)
    y_ref = ref(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x2, g)[0],
                               rtol=1e-10, atol=1e-12)
    fuse.unfuse_teacher(model)
    assert "_fs_dispatch" not in model.__dict__


def test_hooked_relu_module_after_a_residual_add_sees_the_sum():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)) + x)

    net = _randomise_bn(Block()).eval()
    seen = []
    net.act.register_forward_hook(lambda m, i, o: seen.append(i[0].min().item()))
    view = fuse.fused_eval_view(net)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(view(x), net(x), rtol=1e-6, atol=1e-6)
    assert len(seen) == 2 and seen[0] < 0  # the view's forward, then the model's: the sum before the ReLU

# ---------------------------------------------------------------- ConvBNFold
class ConvBN(nn.Module):
    def __init__(self, conv_bias: bool, affine: bool, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=conv_bias, groups=groups)
        self.bn = nn.BatchNorm2d(6, affine=affine)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(out)) + out


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bn_fold_matches_float64_eval_forward(conv_bias, affine, stride, groups, layout):
    torch.manual_seed(1)
    model = _randomise_bn(ConvBN(conv_bias, affine, stride, groups)).double().eval()
    view = fuse.fused_eval_view(model)
    folds = [m for m in view.modules() if isinstance(m, fuse.ConvBNFold)]
    assert len(folds) == 2
    assert not any(isinstance(m, fuse.FusedBatchNorm2d) for m in view.modules())  # every BN folded
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = view(x1), model(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_ref)
    torch.testing.assert_close(torch.autograd.grad(y, x1, g)[0], torch.autograd.grad(y_ref, x2, g)[0],
                               rtol=1e-10, atol=1e-12)


def test_conv_bn_fold_float32_and_bfloat16_tolerances():
    torch.manual_seed(2)
    model = _randomise_bn(ConvBN(True, True)).eval()
    ref64 = copy.deepcopy(model).double()
    view = fuse.fused_eval_view(model)
    x = torch.randn(2, 4, 8, 8)
    exact = ref64(x.double())
    # float32: folding changes the rounding order only (W*s then the sum vs the sum then *s)
    torch.testing.assert_close(view(x).double(), exact, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = view(x)
    torch.testing.assert_close(yb.double(), exact, rtol=5e-2, atol=5e-2)


def test_conv_bn_fold_follows_training_and_replaced_tensors():
    model = _randomise_bn(ConvBN(False, True)).double()
    view = fuse.fused_eval_view(model)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fold = next(m for m in view.modules() if isinstance(m, fuse.ConvBNFold))
    w_buf = fold.weight
    # a train-mode step of the model (running stats move, an optimizer changes weights)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 4, 6, 6, dtype=torch.float64)).square().mean().backward()
    opt.step()
    model.eval()
    assert fuse.refresh_folds(view) == 2
    assert fold.weight is w_buf  # re-folded in place: captured graphs keep reading it
    assert fuse.refresh_folds(view) == 0  # nothing changed since
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)
    # an in-place change is picked up by the next eager forward without refresh_folds
    with torch.no_grad():
        model.bn.running_var.mul_(3.0)
        model.conv.weight.add_(0.1)
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)
    # so is a replaced parameter
    model.bn.weight = nn.Parameter(torch.full((6,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)
    # the folded buffers never require grad: a synthesis backward computes no weight gradients
    # through them; only the input gets a gradient while the model is frozen
    assert not fold.weight.requires_grad and not fold.bias.requires_grad
    with frozen(model):
        xg = x.clone().requires_grad_()
        grads = torch.autograd.grad(view(xg).sum(), [xg])
    assert grads[0].shape == x.shape and all(p.requires_grad for p in model.parameters())


def test_conv_bn_fold_leaves_shared_hooked_and_mismatched_pairs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.hooked = nn.Conv2d(4, 4, 1)
            self.bn_h = nn.BatchNorm2d(4)
            self.shared = nn.Conv2d(4, 4, 1)
            self.bn_s = nn.BatchNorm2d(4)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out = self.bn_h(self.hooked(out))
            s = self.shared(out)
            return self.bn_s(s) + s  # the conv output has another user: no fold

    net = _randomise_bn(Net()).eval()
    calls = []
    net.hooked.register_forward_hook(lambda m, i, o: calls.append(1))
    view = fuse.fused_eval_view(net)
    folds = [m for m in view.modules() if isinstance(m, fuse.ConvBNFold)]
    assert [f.conv for f in folds] == [net.conv]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(view(x), net(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the hook ran in both forwards
    assert fuse.fused_eval_view(net, fold_conv_bn=False) is not None
    assert not any(isinstance(m, fuse.ConvBNFold) for m in fuse.fused_eval_view(net, fold_conv_bn=False).modules())


def test_conv_bn_fold_student_view_in_compiled_step_reads_refreshed_weights():
    torch.manual_seed(3)
    model = _randomise_bn(ConvBN(False, True)).eval()
    view = fuse.fused_eval_view(model)
    for p in model.parameters():
        p.requires_grad_(False)
    step = torch.compile(lambda x: view(x).square().mean(), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(step(x), model(x).square().mean(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.conv.weight.mul_(1.5)
        model.bn.running_mean.add_(0.3)
    fuse.refresh_folds(view)  # what the synthesizer does at the start of every round
    torch.testing.assert_close(step(x), model(x).square().mean(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- convolution input layouts (CPU)
def test_conv_layout_functions():
    big, small = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    a = conv_input_layout(big, 256)
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    torch.testing.assert_close(a, big, rtol=0, atol=0)
    b = conv_input_layout(small, 256)
    assert b.is_contiguous()
    assert conv_input_layout(big, 0) is big and conv_input_layout(big, 257).is_contiguous()
    flat = torch.randn(4, 5)
    assert conv_input_layout(flat, 1) is flat
    assert conv_output_layout(small, 256).is_contiguous() and conv_output_layout(a, 256) is a
    assert conv_output_layout(small, 64) is small
    # the conversion is differentiable; the gradient reaches the input with its values
    x = big.clone().requires_grad_()
    g = torch.randn(2, 3, 16, 16)
    (gx,) = torch.autograd.grad(conv_input_layout(x, 256), x, g)
    torch.testing.assert_close(gx, g, rtol=0, atol=0)


def _record_conv_input_layouts(model):
    seen = {}

    def pre(name):
        def hook(m, args):
            x = args[0]
            seen[name] = "cl" if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) \
                else "nchw"
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(pre(name))
    return seen


def test_teacher_graph_lays_out_convolution_inputs_by_size():
    ref = _randomise_bn(resnet18()).double().eval()
    model = fuse.fuse_teacher(copy.deepcopy(ref))
    assert model.__dict__["_fs_conv_layouts"] == sum(isinstance(m, nn.Conv2d) for m in ref.modules())
    seen = _record_conv_input_layouts(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = model(x), ref(x2)
    # 32x32 and 16x16 inputs (stem, layer1, layer2, layer3's stride-2 entry) channels_last; 8x8 and
    # 4x4 NCHW
    assert seen["conv1"] == "cl" and seen["layer1.0.conv1"] == "cl" and seen["layer2.1.conv2"] == "cl"
    assert seen["layer3.0.conv1"] == "cl" and seen["layer3.0.shortcut.0"] == "cl"
    assert seen["layer3.0.conv2"] == "nchw" and seen["layer4.1.conv2"] == "nchw"
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    gx, gr = torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x2, g)[0]
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)
    # switched off: every convolution sees the layout the model makes (NCHW here)
    off = fuse.fuse_teacher(copy.deepcopy(ref), channels_last_min_hw=None)
    assert off.__dict__["_fs_conv_layouts"] == 0
    seen_off = _record_conv_input_layouts(off)
    off(x.detach())
    assert set(seen_off.values()) == {"nchw"}


def test_student_view_lays_out_convolution_inputs_by_size():
    model = _randomise_bn(resnet18()).double().eval()
    view = fuse.fused_eval_view(model)
    layouts = [n for n in view.graph.nodes if n.target is convs.conv and n.args[2] > 0]
    assert len(layouts) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)
    off = fuse.fused_eval_view(model, channels_last_min_hw=0)
    assert not any(n.target is conv_input_layout for n in off.graph.nodes)
    assert all(n.args[2] == 0 for n in off.graph.nodes if n.target is convs.conv)


def test_layout_threshold_resolution_and_global_switch(monkeypatch):
    cpu = fastsynth.cpu
    assert cpu.resolve_min_hw("auto") == cpu.config.channels_last_min_hw
    assert cpu.resolve_min_hw(None) == 0 and cpu.resolve_min_hw(64) == 64
    for bad in ("on", -1, 2.5, True):
        with pytest.raises(ValueError, match="channels_last_min_hw"):
            cpu.resolve_min_hw(bad)
    monkeypatch.setattr(cpu.config, "channels_last_min_hw", 0)
    model = _randomise_bn(resnet18()).eval()
    assert fuse.fuse_teacher(copy.deepcopy(model)).__dict__["_fs_conv_layouts"] == 0
    view = fuse.fused_eval_view(model)
    assert not any(n.target is conv_input_layout for n in view.graph.nodes)
    assert all(n.args[2] == 0 for n in view.graph.nodes if n.target is convs.conv)


def test_upsample_conv_transposed_kernel_and_op_count():
    """The 4x4 transposed kernel per axis is [w2, w1 + w2, w0 + w1, w0]; the fused upsample +
    convolution dispatches five ops forward and nine backward (no pads, phase maps or
    interleaving copies; the upsample + convolution it replaces: two and two, over a 4x larger map), on an
    NCHW and a channels_last input alike (the output keeps the input's layout)."""
    from fastsynth.nn.upsample_conv import _transposed_kernel, upsample2x_conv3x3

    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    axis = lambda t: torch.stack([t[..., 2], t[..., 1] + t[..., 2], t[..., 0] + t[..., 1], t[..., 0]], -1)  # noqa: E731
    want = axis(axis(w).transpose(-1, -2)).transpose(-1, -2)  # [O, C, 4, 4]: rows, then columns
    torch.testing.assert_close(_transposed_kernel(w), want.transpose(0, 1), rtol=0, atol=1e-15)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 5, 6).contiguous(memory_format=fmt).requires_grad_()
        wf = w.float().requires_grad_()
        upsample2x_conv3x3(x, wf)  # the first call per dtype and device casts the 0/1 matrix once
        with AtenOpCounter() as fwd:
            y = upsample2x_conv3x3(x, wf)
        g = torch.randn_like(y)
        with AtenOpCounter() as bwd:
            y.backward(g)
        assert fwd.total == 5, dict(fwd.counts)
        # convolution_backward, the kernel's way back (transpose, reshape: clone + view, t + mm, view)
        # and the two leaves' gradient detaches
        assert bwd.total <= 9 and bwd.counts["aten.convolution_backward"] == 1, dict(bwd.counts)
        assert y.is_contiguous(memory_format=fmt)


# ---------------------------------------------------------------- caches keyed on the tensor itself
def test_conv_bn_fold_refolds_for_a_new_weight_at_a_freed_address():
    """A fold remembers its sources by weak reference and version, not by id(): a conv weight
    freed and a new one allocated at the same address and version is re-folded."""
    import gc
    import weakref

    from test_winograd import _same_address_weight

    model = _randomise_bn(ConvBN(False, True)).double().eval().requires_grad_(False)
    view = fuse.fused_eval_view(model)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)
    old = weakref.ref(model.conv.weight)
    old_id, old_version = id(model.conv.weight), model.conv.weight._version
    del model.conv.weight
    gc.collect()
    assert old() is None  # the fold did not keep the replaced weight alive
    new = _same_address_weight(old_id, old_version, (6, 4, 3, 3), torch.float64)
    if new is None:
        pytest.skip("this interpreter did not reuse the freed address")
    model.conv.weight = new
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)
    # and an in-place update of the new weight
    with torch.no_grad():
        model.conv.weight.mul_(-1.5)
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)


def test_conv_bn_fold_copies_and_pickles():
    import pickle

    model = _randomise_bn(ConvBN(True, True)).double().eval()
    view = fuse.fused_eval_view(model)
    fold = next(m for m in view.modules() if isinstance(m, fuse.ConvBNFold))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for copied in (copy.deepcopy(fold), pickle.loads(pickle.dumps(fold))):
        # the copy refers to copied sources: it re-folds from them at its first forward
        with torch.no_grad():
            copied.conv.weight.mul_(2.0)
        want = F.batch_norm(F.conv2d(x, copied.conv.weight, copied.conv.bias, padding=1),
                            copied.bn.running_mean, copied.bn.running_var, copied.bn.weight, copied.bn.bias,
                            False, 0.0, copied.bn.eps)
        torch.testing.assert_close(copied(x), want, rtol=1e-12, atol=1e-12)


def _run(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_gpu_path_does_not_import_the_cpu_room():
    """Importing fuse, nn and the synthesizers does not import fastsynth.cpu, nor does fusing,
    viewing and running a model that is not on the CPU (the meta device stands in for a GPU)."""
    code = (
        "import sys, torch\n"
        "import fastsynth, fastsynth.fuse as fuse, fastsynth.nn, fastsynth.synthesis\n"
        "assert 'fastsynth.cpu' not in sys.modules, 'import'\n"
        "from fastsynth.models import resnet18\n"
        "m = resnet18().to('meta').eval()\n"
        "view = fuse.fused_eval_view(m)\n"
        "y = view(torch.empty(2, 3, 32, 32, device='meta'))\n"
        "t = fuse.fuse_teacher(resnet18().to('meta').eval())\n"
        "t(torch.empty(2, 3, 32, 32, device='meta'))\n"
        "g = fastsynth.nn.Generator(nz=8, ngf=8, img_size=32, nc=3).to('meta')\n"
        "g(torch.empty(2, 8, device='meta'))\n"
        "assert 'fastsynth.cpu' not in sys.modules, 'use'\n"
        "assert fuse.fusion_stats(view)['x']['conv_routed'] == 0\n"
        "print('ok')\n")
    assert _run(code) == "ok"


def test_cpu_room_imports_first_without_a_circle():
    assert _run("import fastsynth.cpu\nimport fastsynth.fuse\nprint(fastsynth.cpu.config.winograd_min_channels)") \
        == str(fastsynth.cpu.CPUConfig().winograd_min_channels)


def test_cpu_config_checks_and_restores(monkeypatch):
    cfg = fastsynth.cpu.config
    for name, bad in (("channels_last_min_hw", -1), ("winograd_min_channels", 2.5), ("upsample_fuse_min_macs", True),
                      ("large_blocks", 1), ("winograd_blas", "no")):
        with pytest.raises(ValueError, match=name):
            setattr(cfg, name, bad)
    with pytest.raises(AttributeError, match="no field 'min_hw'"):
        cfg.min_hw = 3
    before = dataclasses_astuple(cfg)
    with pytest.raises(KeyError):
        with fastsynth.cpu.configured(channels_last_min_hw=0, winograd_min_channels=0):
            assert cfg.channels_last_min_hw == 0 and cfg.winograd_min_channels == 0
            raise KeyError("restored on the way out")
    assert dataclasses_astuple(cfg) == before


def dataclasses_astuple(cfg):
    import dataclasses

    return dataclasses.astuple(cfg)


def test_large_blocks_switch_gives_the_same_values():
    if not _ext.has_extension():
        pytest.skip("needs fastsynth._C")
    x = torch.randn(64, 64, 32, 32)  # 16 MB: above the recycled-block size
    bn = _randomise_bn(nn.BatchNorm2d(64)).eval()
    fused = fuse.fuse_teacher(copy.deepcopy(bn))  # a bare BatchNorm2d: its fused layer
    with torch.no_grad():
        want = bn(x)
        outs = []
        for on in (False, True, True):  # the second recycled call reuses the first one's block
            with fastsynth.cpu.configured(large_blocks=on):
                outs.append(fused(x).clone())
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
