"""Fusion on the upstream DFKD classifiers (fastsynth.models.upstream reproduces their module
structure and signatures: ``forward(x, return_features=False)``, in-place residual adds, shape-
dependent branches, int() of runtime sizes).

Per model: the fused teacher (``fuse_teacher``) and the student view (``fused_eval_view``) reach
the fusion the architecture allows -- counted from the architecture, not from the graph -- and
give the unfused model's outputs, input gradients and BatchNorm batch statistics in float64, in
both call forms the upstream KD loop uses.
"""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn as nn

from fastsynth import fuse
from fastsynth.models import upstream as up

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small float64 ops; on a loaded machine intra-op threads spin against
    each other and cost 10-20x (results do not depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Input sizes that keep each model's module graph (adaptive pooling or enough stages left) at a
# fraction of the pixels: the ImageNet ResNets at 32x32 instead of 224x224; the models that pool
# adaptively at 16x16. resnet8..110 (AvgPool2d(8)) and ShuffleNetV2 (a fixed 4x4 pooling) need 32x32.
_HW = {"resnet18_imagenet": 32, "resnet50_imagenet": 32,
       **{n: 16 for n in ("resnet18", "resnet34", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg8", "vgg11",
                          "vgg13", "mobilenetv2")}}


def _model(name):
    torch.manual_seed(0)
    model = up.UPSTREAM_MODELS[name][0](num_classes=10).double().eval()
    with torch.no_grad():  # non-trivial eval statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.6, 1.2)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _expected(model):
    """What the architecture allows: (conv+BN folds and fused_bn calls of the view, BN->ReLU folds).
    A BatchNorm folds into the conv before it when that conv output feeds only it; a ReLU folds
    when it alone consumes a BatchNorm output (ReLU6 does not); a residual relu(a + b) runs as written."""
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    blocks = lambda cls: sum(isinstance(m, cls) for m in model.modules())  # noqa: E731
    if isinstance(model, (up.TinyResNet, up.DaflResNet)):
        n = blocks(up._TinyBlock) + blocks(up._DaflBlock)
        return dict(conv_bn_fold=bns, fused_bn=0, bn_relu=1 + n)
    if isinstance(model, up.ImageNetResNet):
        basic, bottle = blocks(up._TVBasic), blocks(up._TVBottleneck)
        return dict(conv_bn_fold=bns, fused_bn=0, bn_relu=1 + basic + 2 * bottle)
    if isinstance(model, up.WideResNet):
        n = blocks(up._WideBlock)
        # bn2 follows conv1 in every block; the stem conv feeds block1's bn1 alone unless that first
        # block is an identity block (then the stem output is also the residual)
        stem = 0 if model.block1.layer[0].equalInOut else 1
        return dict(conv_bn_fold=n + stem, fused_bn=bns - n - stem, bn_relu=bns)
    if isinstance(model, up.VGG):
        return dict(conv_bn_fold=bns, fused_bn=0, bn_relu=bns)
    if isinstance(model, up.MobileNetV2):
        return dict(conv_bn_fold=bns, fused_bn=0, bn_relu=0)
    if isinstance(model, up.ShuffleNetV2):
        # stem + last conv, bn1 of each basic block (its bn3 output also feeds the concatenation),
        # bn2/bn3/bn5 of each down block
        return dict(conv_bn_fold=bns, fused_bn=0, bn_relu=2 + blocks(up._ShuffleBlock) + 3 * blocks(up._ShuffleDown))
    raise AssertionError(type(model))


def _forms(model):
    forms = [{}]
    if "return_features" in inspect.signature(type(model).forward).parameters:
        forms.append({"return_features": True})
    return forms


def _outputs_and_grad(f, x, kw, weights):
    """Outputs of ``f(x, **kw)`` and the input gradient of sum(output * weight); an empty
    ``weights`` list is filled with random weights shaped like the outputs."""
    x = x.detach().clone().requires_grad_(True)
    out = f(x, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    if not weights:
        weights += [torch.randn_like(o) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    (grad,) = torch.autograd.grad(loss, x)
    return [o.detach() for o in outs], grad


def _assert_close(a, b, scale=None):
    # float64; deep nets amplify rounding, so compare relative to the magnitude of the reference
    # (or to ``scale``, the magnitude the compared values were computed from)
    scale = (b.abs().max().item() if scale is None else scale) + 1e-30
    assert (a - b).abs().max().item() <= 1e-9 * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("name", list(up.UPSTREAM_MODELS))
def test_upstream_model_full_fusion_matches_unfused_float64(name):
    ref = _model(name)
    hw = _HW.get(name, up.UPSTREAM_MODELS[name][1][1])
    x = torch.randn(2, 3, hw, hw, dtype=torch.float64)
    expect = _expected(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fusion may be turned off
        view = fuse.fused_eval_view(ref)
        teacher = fuse.fuse_teacher(copy.deepcopy(ref))
        assert view is not None
        for kw in _forms(ref):
            # BN statistics of the unfused model, from its BatchNorm inputs (hooks removed before
            # the view runs: it shares the model's modules, and hooked modules are not fused)
            # keyed by module: bn_statistics lists module order, which differs from call order
            # where a shortcut runs before the block's own convolutions (resnet8 .. 110, MobileNetV2)
            seen = {}
            hooks = [m.register_forward_pre_hook(lambda m, i, q=q: seen.__setitem__(q, i[0].detach()))
                     for q, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
            weights = []
            want, want_grad = _outputs_and_grad(ref, x, kw, weights)
            for h in hooks:
                h.remove()
            ref_stats = [(seen[q].mean((0, 2, 3)), seen[q].var((0, 2, 3), unbiased=False), seen[q].abs().max().item())
                         for q, m in teacher.named_modules() if isinstance(m, fuse.FusedBatchNorm2d)]
            assert len(ref_stats) == len(seen)
            for f in (view, teacher):
                got, grad = _outputs_and_grad(f, x, kw, weights)
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    assert g.shape == w.shape
                    _assert_close(g, w)
                _assert_close(grad, want_grad)
            means, variances, _, _ = fuse.bn_statistics(teacher)
            assert len(means) == len(ref_stats)
            for m, v, (rm, rv, mag) in zip(means, variances, ref_stats):
                # relative to the feature magnitude: a channel of MobileNetV2 is ~0 after ReLU6,
                # and its statistics are rounding noise of size eps * |feature|
                _assert_close(m.detach(), rm, mag)
                _assert_close(v.detach(), rv, mag * mag)
    forms = {"view": fuse.fusion_stats(view), "teacher": fuse.fusion_stats(teacher)}
    assert len(forms["view"]) == len(forms["teacher"]) == len(_forms(ref))
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    for form, stats in forms["view"].items():
        assert {k: stats[k] for k in expect} == expect, (form, stats)
    for form, stats in forms["teacher"].items():
        assert stats["fused_bn"] == bns and stats["bn_relu"] == expect["bn_relu"], (form, stats)
        assert "add_relu" not in stats, (form, stats)  # residual joins run as the model writes them


def test_shape_dependent_branch_is_traced_per_input_shape():
    """VGG pools once more at 64x64 (``if h == 64``): each input shape gets its own graph."""
    ref = _model("vgg8")
    view = fuse.fused_eval_view(ref)
    teacher = fuse.fuse_teacher(copy.deepcopy(ref))
    for hw in (32, 64, 32):
        x = torch.randn(3, 3, hw, hw, dtype=torch.float64)
        with torch.no_grad():
            want = ref(x, return_features=True)
            for f in (view, teacher):
                got = f(x, return_features=True)
                _assert_close(got[0], want[0])
                _assert_close(got[1], want[1])
    labels = list(fuse.fusion_stats(view))
    assert sorted(labels) == ["x, return_features=True @ (3, 3, 32, 32)", "x, return_features=True @ (3, 3, 64, 64)"]
    assert fuse.fusion_stats(teacher)[labels[1]]["bn_relu"] == 5


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, return_features=False):
        out = torch.relu(self.bn(self.conv(x)))
        if return_features and out.mean() > 0:  # tensor values decide: not traceable
            return out.flatten(1).sum(1), out
        return out.flatten(1).sum(1)


def test_data_dependent_form_warns_once_and_keeps_what_fuses():
    ref = _DataDependent().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    teacher = fuse.fuse_teacher(copy.deepcopy(ref))
    view = fuse.fused_eval_view(ref)
    assert fuse.fusion_stats(teacher)["x, return_features=False"]["bn_relu"] == 1  # the default form fuses
    for f, who in ((teacher, "fuse_teacher"), (view, "fused_eval_view")):
        with pytest.warns(RuntimeWarning,
                          match=rf"{who}: _DataDependent.forward\(x, return_features=True\) "
                                r"cannot be traced .*output of module .bn. at .*test_upstream_fusion.py"):
            got = f(x, return_features=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per form
            again = f(x, return_features=True)
        want = ref(x, return_features=True)
        for g in (got, again):
            _assert_close(g[0], want[0])
            _assert_close(g[1], want[1])
    # the fused teacher's BatchNorm still records statistics in the untraced form
    means, variances, _, _ = fuse.bn_statistics(teacher)
    feat = ref.conv(x)
    _assert_close(means[0], feat.mean((0, 2, 3)))
    assert fuse.fusion_stats(teacher)["x, return_features=True"] is None


def test_untraceable_default_form_view_is_none_with_the_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    with pytest.warns(RuntimeWarning, match=r"fused_eval_view: Branchy.forward\(x\) cannot be traced.*input 'x'"):
        assert fuse.fused_eval_view(Branchy()) is None
    with pytest.warns(RuntimeWarning,
                      match=r"fuse_teacher: Branchy.forward\(x\) cannot be traced.*BatchNorm layers fused"):
        teacher = fuse.fuse_teacher(Branchy().eval())
    assert len(fuse.fused_layers(teacher)) == 1


def test_arguments_that_are_not_traced_run_eagerly_with_a_warning():
    ref = _model("resnet8")
    view = fuse.fused_eval_view(ref)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"return_features' is a list"):
        out = view(x, return_features=[1])
    _assert_close(out[0], ref(x, return_features=True)[0])


def test_call_the_signature_rejects_raises_the_models_own_error():
    """A keyword the model does not take (MobileNetV2 has no return_features) raises the model's
    TypeError, with no tracing warning in front of it."""
    ref = _model("mobilenetv2")
    teacher = fuse.fuse_teacher(copy.deepcopy(ref))
    view = fuse.fused_eval_view(ref)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    for f in (ref, teacher, view):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TypeError, match="return_features"):
                f(x, return_features=True)


def test_synthesizer_on_upstream_models_reaches_full_fusion():
    """What a user of the upstream repositories gets: FastMetaSynthesizer with upstream-style
    teacher and student fuses both fully (what bench_synthesis reports in its fusion column)."""
    from fastsynth.bench import synthesis as bench
    from fastsynth.synthesis import FastMetaSynthesizer

    torch.manual_seed(0)
    teacher, student = up.cifar_resnet20(10).eval(), up.cifar_resnet8(10)
    gen = bench._gen_for_bench(True, 16, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fusion may be turned off
        syn = FastMetaSynthesizer(teacher, student, gen, nz=16, num_classes=10, img_size=(3, 32, 32), iterations=1,
                                  synthesis_batch_size=2, sample_batch_size=2, warmup=0, bn_mmt=0.9, is_maml=1)
        syn.synthesize()
    assert bench._fusion_summary(syn) == "teacher fused_bn=21 bn_relu=10; student conv_bn_fold=9 bn_relu=4"
    syn.close()


@pytest.mark.parametrize("name", ["wrn16_1", "resnet18_imagenet", "resnet8", "vgg8"])
def test_fused_teacher_accepts_an_empty_batch(name):
    """The fused teacher and the view give on an empty batch what the unfused model gives: an empty
    output, or -- where the model itself cannot take one (``x.view(x.size(0), -1)`` of resnet8 and
    vgg8) -- the same error."""
    ref = _model(name)
    teacher = fuse.fuse_teacher(copy.deepcopy(ref))
    view = fuse.fused_eval_view(ref)
    hw = _HW.get(name, 32)
    empty = torch.randn(0, 3, hw, hw, dtype=torch.float64)
    for kw in ({}, {"return_features": True}):
        try:
            want = ref(empty, **kw)
        except RuntimeError as exc:
            for f in (teacher, view):
                with pytest.raises(type(exc)):
                    f(empty, **kw)
            continue
        for f in (teacher, view):
            got = f(empty, **kw)
            got, want_t = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            assert [g.shape for g in got] == [w.shape for w in want_t]
    if name in ("wrn16_1", "resnet18_imagenet"):
        assert ref(empty).shape == (0, 10)  # these take it
    # statistics of an empty batch are undefined: the loss says so instead of returning NaN
    with pytest.raises(ValueError, match="empty batch"):
        fuse.bn_statistics(teacher)
    x = torch.randn(2, 3, hw, hw, dtype=torch.float64)
    teacher(x)  # a non-empty batch records statistics again
    assert len(fuse.bn_statistics(teacher)[0]) == sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
