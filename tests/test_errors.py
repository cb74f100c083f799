"""Errors that name the problem (issue 18): every public entry point refuses bad arguments with a
ValueError/TypeError whose message names the argument, what was given and what was expected,
before touching them, instead of an AttributeError, an IndexError or a failure inside a matmul.

Each case is (callable, exception type, regular expression the message must match). The
expression names the argument; where the issue quotes the old, unhelpful message, the test also
checks that it is gone. A case documenting a defect that is not fixed yet is marked
``xfail(strict=True)`` with the defect in its reason, so it fails loudly once fixed.
"""
import re

import pytest
import torch
import torch.nn as nn

import fastsynth
from fastsynth import _ext
from fastsynth.nn import (DCGAN_Generator, DeepGenerator, Generator, LargeGenerator, NLDeepGenerator, NLGenerator,
                          NoisyLayers)
from fastsynth.ops import (bn_stat_loss, bn_stat_loss_multi, js_divergence, kd_loss, make_seed, noisy_linear, reinit_,
                           synthesis_logit_loss)
from fastsynth.ops.fused_bn import fused_bn

needs_ext = pytest.mark.skipif(not _ext.has_extension(), reason="needs fastsynth._C")
# Triton on CPU tensors runs under the interpreter only (GPU machines run the compiled kernels)
needs_interpreter = pytest.mark.skipif(not (_ext.has_triton() and _ext.triton_interpreting()),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=needs_interpreter)]
NC, IMG, B = 10, 16, 8


def _raises(fn, exc, pattern):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert re.search(pattern, msg), f"{type(info.value).__name__}: {msg!r} does not match {pattern!r}"
    # never the old leaks of the issue
    assert "NoneType' object has no attribute" not in msg and "cannot unpack" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# the list


def test_bn_stat_loss_none_running_statistics_are_named():
    x = torch.randn(4, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    _raises(lambda: bn_stat_loss(x, None, rv), TypeError, r"running_mean must be a tensor of shape \(3,\).*got None")
    _raises(lambda: bn_stat_loss(x, rm, None), TypeError, r"running_var must be a tensor.*got None")
    _raises(lambda: bn_stat_loss_multi([x], [None], [rv]), TypeError, r"running_means\[0\] must be a tensor")


def test_deepinversion_hook_on_a_module_without_running_statistics():
    _raises(lambda: fastsynth.DeepInversionHook(nn.BatchNorm2d(3, track_running_stats=False)), ValueError,
            r"module must be a BatchNorm layer with running statistics \(track_running_stats=True\)")
    _raises(lambda: fastsynth.DeepInversionHook(nn.Conv2d(3, 3, 1)), ValueError,
            r"module must be a BatchNorm layer.*got Conv2d")
    _raises(lambda: fastsynth.DeepInversionHook(None), TypeError, r"module must be a BatchNorm nn.Module, got NoneType")
    _raises(lambda: fastsynth.DeepInversionHook(nn.BatchNorm2d(3), float("nan")), ValueError,
            r"mmt_rate must be finite, got nan")


def test_update_mmt_before_any_forward_names_the_missing_forward():
    """A call-order mistake, not a bad argument: RuntimeError (no argument to name), saying what
    to do; no longer "cannot unpack non-iterable NoneType"."""
    h = fastsynth.DeepInversionHook(nn.BatchNorm2d(3))
    _raises(h.update_mmt, RuntimeError, r"update_mmt\(\): no batch statistics yet; run a forward")
    h.remove()


def test_deepinversion_hook_bad_backend_at_construction():
    _raises(lambda: fastsynth.DeepInversionHook(nn.BatchNorm2d(3), backend="gpu"), ValueError, r"backend")


def test_bn_stat_loss_multi_scalar_weights_and_nan_hyperparameters():
    x = torch.randn(4, 3, 5, 5)
    rm, rv = [torch.zeros(3)], [torch.ones(3)]
    msg = _raises(lambda: bn_stat_loss_multi([x], rm, rv, weights=2.0), TypeError,
                  r"weights must be a list of floats \(one per layer\) or a 1-D tensor, got float")
    assert "has no len()" not in msg
    _raises(lambda: bn_stat_loss_multi([x], rm, rv, weights=[float("nan")]), ValueError, r"weights\[0\] must be finite")
    _raises(lambda: bn_stat_loss_multi([x], rm, rv, weights=torch.tensor([float("inf")])), ValueError,
            r"weights must be finite")
    _raises(lambda: bn_stat_loss_multi([x], rm, rv, weights=torch.ones(1, 1)), ValueError,
            r"weights must be a 1-D tensor with one entry per layer")
    _raises(lambda: bn_stat_loss_multi([x], rm, rv, weights=[1.0, 2.0]), ValueError,
            r"weights must have one entry per layer \(1\), got 2")
    for rate in (float("nan"), float("inf")):
        _raises(lambda: bn_stat_loss_multi([x], rm, rv, rm, rv, mmt_rate=rate), ValueError, r"mmt_rate must be finite")
        _raises(lambda: bn_stat_loss(x, rm[0], rv[0], rm[0], rv[0], mmt_rate=rate), ValueError,
                r"mmt_rate must be finite")
    _raises(lambda: bn_stat_loss(x, rm[0], rv[0], rm[0], rv[0], mmt_rate="0.9"), TypeError,
            r"mmt_rate must be a Python float, got str")


class TinyNet(nn.Module):
    def __init__(self, num_classes=NC, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def _nl_generator():
    return NLGenerator(ngf=4, img_size=IMG, nc=3, nl=NC, label_emb=torch.randn(NC, 16), le_emb_size=8, le_size=16,
                       sbz=B)


def test_synthesizer_construction_errors():
    from fastsynth import synthesis as fs

    teacher, student = TinyNet().eval(), TinyNet(width=4)
    gen = Generator(nz=8, ngf=4, img_size=IMG)
    kw = dict(num_classes=NC, img_size=(3, IMG, IMG), synthesis_batch_size=B)
    _raises(lambda: fs.FastMetaSynthesizer(teacher, student, gen, nz=8, iterations=0, **kw), ValueError,
            r"FastMetaSynthesizer: iterations must be >= 1, got 0")
    _raises(lambda: fs.NAYER(teacher, student, _nl_generator(), g_steps=0, **kw), ValueError,
            r"NAYER: g_steps must be >= 1, got 0")
    # a FastDFKD generator given to NAYER: named at construction, not on .reinit
    _raises(lambda: fs.NAYER(teacher, student, gen, **kw), TypeError,
            r"generator must be a NAYER generator with reinit\(\) and re_init_le\(\).*got Generator")
    # generator nz != synthesizer nz: named, not a matmul failure
    _raises(lambda: fs.FastMetaSynthesizer(teacher, student, gen, nz=16, **kw), ValueError,
            r"nz=16 but the generator \(Generator\) takes z of 8 features")
    # num_classes larger than the teacher's outputs: named, not an IndexError from cross-entropy
    _raises(lambda: fs.FastMetaSynthesizer(teacher, student, gen, nz=8, **dict(kw, num_classes=NC + 5)), ValueError,
            r"num_classes=15 but the teacher has 10 outputs")
    _raises(lambda: fs.NAYER(teacher, student, _nl_generator(), **dict(kw, num_classes=NC + 1)), ValueError,
            r"num_classes=11 but the teacher has 10 outputs")
    _raises(lambda: fs.DeepInvSyntheiszer(teacher, student, NC + 2, (3, IMG, IMG)), ValueError,
            r"num_classes=12 but the teacher has 10 outputs")


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


META_TRITON = {
    "bn_stat_loss": lambda: bn_stat_loss(_meta(2, 3, 4, 4), _meta(3), _meta(3), backend="triton"),
    "bn_stat_loss_multi": lambda: bn_stat_loss_multi([_meta(2, 3, 4, 4)], [_meta(3)], [_meta(3)], backend="triton"),
    "fused_bn": lambda: fused_bn(_meta(2, 3, 4, 4), _meta(3), _meta(3), _meta(3), _meta(3), backend="triton"),
    "synthesis_logit_loss": lambda: synthesis_logit_loss(_meta(2, 5), _meta(2, 5), _meta(2, dtype=torch.int64),
                                                         backend="triton"),
    "kd_loss": lambda: kd_loss(_meta(2, 5), _meta(2, 5), 4.0, backend="triton"),
    "js_divergence": lambda: js_divergence(_meta(2, 5), _meta(2, 5), backend="triton"),
}


@pytest.mark.parametrize("op", sorted(META_TRITON))
def test_meta_tensors_on_the_triton_backend_are_named(op):
    msg = _raises(META_TRITON[op], ValueError, rf"{op}: backend='triton' needs CUDA tensors.*got tensors on meta")
    assert "scalarType" not in msg


def test_meta_tensors_in_reinit_are_named():
    _raises(lambda: reinit_([_meta(3)], make_seed(0).to("meta"), backend="triton"), ValueError,
            r"reinit_: tensors are meta tensors")


# ---------------------------------------------------------------------------------------------
# the other public ops, on every backend that runs here


def _bn_cases():
    x, rm, rv = torch.randn(4, 3, 5, 5), torch.zeros(3), torch.ones(3)
    return [
        ("x list", lambda be: bn_stat_loss([1.0], rm, rv, backend=be), TypeError,
         r"x must be a torch.Tensor, got list"),
        ("x 1-D", lambda be: bn_stat_loss(torch.randn(3), rm, rv, backend=be), ValueError,
         r"x must have 2 or 3 or 4 dimensions, got shape \(3,\)"),
        ("x int", lambda be: bn_stat_loss(x.long(), rm, rv, backend=be), TypeError, r"x must be a floating tensor"),
        ("rm shape", lambda be: bn_stat_loss(x, torch.zeros(4), rv, backend=be), ValueError,
         r"running_mean must have shape \(3,\) to match the 3 channels of x, got \(4,\)"),
        ("rm dtype", lambda be: bn_stat_loss(x, rm.double(), rv, backend=be), TypeError,
         r"running_mean must have dtype torch.float32.*got torch.float64"),
        ("rv device", lambda be: bn_stat_loss(x, rm, rv.to("meta"), backend=be), ValueError,
         r"running_var must be on cpu.*got meta"),
        ("empty batch", lambda be: bn_stat_loss(torch.randn(0, 3, 2, 2), rm, rv, backend=be), ValueError,
         r"x must have a non-empty batch"),
        ("mmt half", lambda be: bn_stat_loss(x, rm, rv, rm, None, backend=be), ValueError,
         r"mmt_mean and mmt_var must be given together"),
        ("backend", lambda be: bn_stat_loss(x, rm, rv, backend="gpu"), ValueError,
         r"bn_stat_loss: backend must be one of"),
        ("multi tensor", lambda be: bn_stat_loss_multi(x, [rm], [rv], backend=be), TypeError,
         r"features must be a list of tensors, got Tensor"),
        ("multi empty", lambda be: bn_stat_loss_multi([], [], [], backend=be), ValueError,
         r"features must hold at least one"),
        ("multi lengths", lambda be: bn_stat_loss_multi([x], [rm, rm], [rv], backend=be), ValueError,
         r"running_means must be a list with one entry per feature map \(1\)"),
        ("multi dtypes", lambda be: bn_stat_loss_multi([x, x.double()], [rm, rm], [rv, rv], backend=be), TypeError,
         r"features\[1\] must have dtype torch.float32 like features\[0\], got torch.float64"),
        ("fused_bn 3-D", lambda be: fused_bn(torch.randn(4, 3, 5), rv, rm, rm, rv, backend=be), ValueError,
         r"x must have 4 dimensions"),
        ("fused_bn weight", lambda be: fused_bn(x, torch.ones(4), rm, rm, rv, backend=be), ValueError,
         r"weight must have C=3 entries"),
        ("fused_bn None", lambda be: fused_bn(x, rv, rm, None, rv, backend=be), TypeError,
         r"running_mean must be a torch.Tensor, got NoneType"),
        ("fused_bn eps", lambda be: fused_bn(x, rv, rm, rm, rv, eps=float("nan"), backend=be), ValueError,
         r"eps must be a non-negative float, got nan"),
        ("fused_bn empty", lambda be: fused_bn(torch.randn(0, 3, 2, 2), rv, rm, rm, rv, backend=be), ValueError,
         r"x must not be empty"),
    ]


def _logit_cases():
    t, s, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    op = "synthesis_logit_loss"
    return [
        ("shape", lambda be: synthesis_logit_loss(t, torch.randn(4, 6), y, backend=be), ValueError,
         rf"{op}: student_logits must have the shape of teacher_logits \(4, 5\), got \(4, 6\)"),
        ("dtype", lambda be: synthesis_logit_loss(t, s.double(), y, backend=be), TypeError,
         r"teacher_logits and student_logits must have the same dtype"),
        ("device", lambda be: synthesis_logit_loss(t.to("meta"), s, y, backend=be), ValueError,
         r"must be on the same device, got meta and cpu"),
        ("targets dtype", lambda be: synthesis_logit_loss(t, s, y.float(), backend=be), TypeError,
         r"targets must be int64 class indices, got torch.float32"),
        ("targets shape", lambda be: synthesis_logit_loss(t, s, y[:3], backend=be), ValueError,
         r"targets must have shape \[4\]"),
        ("targets list", lambda be: synthesis_logit_loss(t, s, [0, 1, 2, 3], backend=be), TypeError,
         r"targets must be a torch.Tensor"),
        ("oh nan", lambda be: synthesis_logit_loss(t, s, y, oh=float("nan"), backend=be), ValueError,
         r"oh must be finite, got nan"),
        ("adv str", lambda be: synthesis_logit_loss(t, s, y, adv="1", backend=be), TypeError,
         r"adv must be a real number, got str"),
        ("mask", lambda be: synthesis_logit_loss(t, s, y, mask="all", backend=be), ValueError,
         r"mask must be 'agree' or None, got 'all'"),
        ("empty", lambda be: synthesis_logit_loss(t[:0], s[:0], y[:0], backend=be), ValueError,
         r"teacher_logits must not be empty"),
        ("1-D", lambda be: synthesis_logit_loss(t[0], s[0], y, backend=be), ValueError,
         r"teacher_logits must have 2 dimensions"),
        ("kd T 0", lambda be: kd_loss(s, t, 0, backend=be), ValueError, r"kd_loss: T must be a positive finite"),
        ("kd T nan", lambda be: kd_loss(s, t, float("nan"), backend=be), ValueError, r"T must be a positive finite"),
        ("kd T str", lambda be: kd_loss(s, t, "4", backend=be), TypeError,
         r"T must be a positive real number, got str"),
        ("kd int", lambda be: kd_loss(s.long(), t.long(), 4.0, backend=be), TypeError,
         r"student_logits must be a floating tensor"),
        ("js clamp order", lambda be: js_divergence(s, t, clamp=(0.5, 0.1), backend=be), ValueError,
         r"clamp must satisfy 0 < min <= max <= 1, got \(0.5, 0.1\)"),
        ("js clamp scalar", lambda be: js_divergence(s, t, clamp=0.1, backend=be), TypeError,
         r"clamp must be a pair \(min, max\), got 0.1"),
        ("js clamp nan", lambda be: js_divergence(s, t, clamp=(float("nan"), 0.9), backend=be), ValueError,
         r"clamp\[0\] must be finite"),
    ]


def _reinit_cases():
    seed = make_seed(0)
    return [
        ("a tensor", lambda be: reinit_(torch.zeros(3), seed, backend=be), TypeError,
         r"reinit_: tensors must be a list of tensors, got Tensor"),
        ("empty list", lambda be: reinit_([], seed, backend=be), ValueError, r"tensors must be a non-empty list"),
        ("int tensor", lambda be: reinit_([torch.zeros(3, dtype=torch.long)], seed, backend=be), TypeError,
         r"tensors\[0\] must be a floating tensor"),
        ("seed int", lambda be: reinit_([torch.zeros(3)], 0, backend=be), TypeError,
         r"seed must be a one-element int64 torch.Tensor, got int"),
        ("seed float", lambda be: reinit_([torch.zeros(3)], torch.zeros(1), backend=be), TypeError,
         r"seed must be a one-element int64 tensor, got dtype torch.float32"),
        ("dist", lambda be: reinit_([torch.zeros(3)], seed, dist="gauss", backend=be), ValueError,
         r"dist must be one of .*got 'gauss'"),
        ("a nan", lambda be: reinit_([torch.zeros(3)], seed, a=float("nan"), backend=be), ValueError,
         r"a must be finite, got nan"),
        ("std 0", lambda be: reinit_([torch.zeros(3)], seed, b=0.0, backend=be), ValueError,
         r"normal needs std b > 0, got b=0.0"),
        ("uniform a >= b", lambda be: reinit_([torch.zeros(3)], seed, dist="uniform", a=1.0, b=1.0, backend=be),
         ValueError, r"uniform needs a < b"),
        ("uniform range overflow", lambda be: reinit_([torch.zeros(3)], seed, dist="uniform", a=-3e38, b=3e38,
                                                      backend=be), ValueError, r"uniform needs b - a <="),
        ("non-contiguous", lambda be: reinit_([torch.zeros(3, 4).t()], seed, backend=be), ValueError,
         r"tensors\[0\] must be contiguous"),
        ("kaiming 1-D", lambda be: reinit_([torch.zeros(3)], seed, dist="kaiming_uniform", backend=be), ValueError,
         r"kaiming_uniform needs tensors of 2 or more dimensions"),
        ("a list length", lambda be: reinit_([torch.zeros(3)], seed, a=[0.0, 1.0], backend=be), ValueError,
         r"a must be one value or a list of one per tensor \(1\), got 2"),
        ("overlap", lambda be: (lambda w: reinit_([w[:3], w[2:]], seed, backend=be))(torch.zeros(6)), ValueError,
         r"tensors\[0\] and tensors\[1\] overlap in memory"),
    ]


_OP_CASES = [(op, c) for op, cases in (("bn", _bn_cases()), ("logit", _logit_cases()), ("reinit", _reinit_cases()))
             for c in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for _, c in _OP_CASES], ids=[f"{op}-{c[0]}" for op, c in _OP_CASES])
def test_ops_name_the_argument(case, backend):
    _, fn, exc, pattern = case
    _raises(lambda: fn(backend), exc, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets(backend):
    """Reference and cpu check class indices on the host (ValueError); the Triton kernels (like
    the CUDA ones) cannot without a host sync: they clamp the index and make the loss NaN, never
    a finite wrong value."""
    t, s, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 5])
    if backend == "triton":
        loss, parts = synthesis_logit_loss(t, s, y, backend=backend)
        assert torch.isnan(loss) and torch.isnan(parts["oh"])
    else:
        _raises(lambda: synthesis_logit_loss(t, s, y, backend=backend), ValueError,
                r"targets must be class indices in \[0, 5\)")


def test_kldiv_jsdiv_arguments():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    _raises(lambda: fastsynth.kldiv(a, b, reduction="avg"), ValueError, r"kldiv: reduction must be one of")
    _raises(lambda: fastsynth.kldiv(a, b, T=0), ValueError, r"kldiv: T must be a positive finite temperature")
    _raises(lambda: fastsynth.KLDiv(T=-1.0)(a, b), ValueError, r"kldiv: T must be a positive finite temperature")
    _raises(lambda: fastsynth.jsdiv(a, b, T="1"), TypeError, r"jsdiv: T must be a positive real number, got str")
    _raises(lambda: fastsynth.jsdiv(a, b, reduction=None), ValueError, r"jsdiv: reduction must be one of")


@pytest.mark.parametrize("fn", [fastsynth.kldiv, fastsynth.jsdiv], ids=["kldiv", "jsdiv"])
def test_kldiv_jsdiv_shape_mismatch_is_named(fn):
    _raises(lambda: fn(torch.randn(2, 3), torch.randn(2, 4)), ValueError, r"targets.*\(2, 4\)")


def test_kldiv_non_tensor_is_named():
    _raises(lambda: fastsynth.kldiv([1.0], torch.randn(2, 4)), TypeError, r"logits must be a torch.Tensor")


# ---------------------------------------------------------------------------------------------
# noisy_linear and the generators (shape, dtype, device, empty batch)


def test_noisy_linear_arguments():
    w, b = torch.randn(2, 3, 4), torch.randn(2, 4)
    x = torch.randn(4, 3)
    _raises(lambda: noisy_linear([[1.0]], w, b, 2), TypeError, r"noisy_linear: x must be a torch.Tensor, got list")
    _raises(lambda: noisy_linear(x.long(), w, b, 2), TypeError, r"noisy_linear: x must be a floating tensor")
    _raises(lambda: noisy_linear(x[0], w, b, 2), ValueError, r"noisy_linear: x must have 2 dimensions")
    _raises(lambda: noisy_linear(torch.randn(4, 5), w, b, 2), ValueError,
            r"x must be \[B, in_features=3\] \(weight is \[K, in, out\] = \(2, 3, 4\)\), got shape \(4, 5\)")
    _raises(lambda: noisy_linear(x, w, b[:, :3], 2), ValueError, r"bias must be \[K=2, out_features=4\], got shape")
    _raises(lambda: noisy_linear(x, w.double(), b, 2), TypeError, r"x, weight and bias must share one dtype")
    _raises(lambda: noisy_linear(x, w.to("meta"), b, 2), ValueError, r"noisy_linear: weight must be on cpu.*got meta")
    _raises(lambda: noisy_linear(x, w, b.to("meta"), 2), ValueError, r"noisy_linear: bias must be on cpu.*got meta")
    _raises(lambda: noisy_linear(torch.randn(5, 3), w, b, 2), ValueError,
            r"batch 5 exceeds the 2 noisy layers x nl=2 rows \(4\)")
    _raises(lambda: noisy_linear(x, w, b, 0), ValueError, r"nl \(rows per layer\) must be a positive int, got 0")
    _raises(lambda: noisy_linear(x, w, b, 2.0), TypeError, r"nl \(rows per layer\) must be a positive int")
    _raises(lambda: noisy_linear(x, w, b, 2, backend="gpu"), ValueError, r"noisy_linear: backend must be one of")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_noisy_linear_empty_batch_is_an_empty_output(backend):
    """B = 0 is valid as for nn.Linear: [0, out] output, zero weight and bias gradients."""
    x = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = noisy_linear(x, w, b, 2, backend=backend)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 3) and torch.all(w.grad == 0) and torch.all(b.grad == 0)


@pytest.mark.parametrize("cls,kw", [(Generator, {}), (LargeGenerator, {}), (DCGAN_Generator, {"img_size": 32}),
                                    (DeepGenerator, {"img_size": 32})],
                         ids=["Generator", "LargeGenerator", "DCGAN_Generator", "DeepGenerator"])
def test_latent_generators_check_z(cls, kw):
    g = cls(nz=8, ngf=4, **kw)
    name = cls.__name__
    _raises(lambda: g(torch.randn(2, 7)), ValueError, rf"{name}: z must be \[B, nz=8\].*got shape \(2, 7\)")
    _raises(lambda: g(torch.randn(8)), ValueError, rf"{name}: z must be \[B, nz=8\]")
    _raises(lambda: g(torch.randn(0, 8)), ValueError, rf"{name}: z must hold at least one sample")
    _raises(lambda: g(torch.ones(2, 8, dtype=torch.long)), TypeError, rf"{name}: z must be a floating tensor")
    _raises(lambda: g(torch.randn(2, 8, dtype=torch.float64)), TypeError,
            rf"{name}: z must have the generator's dtype torch.float32, got torch.float64")
    _raises(lambda: g(torch.randn(2, 8, device="meta")), ValueError,
            rf"{name}: z must be on the generator's device cpu, got meta")
    _raises(lambda: g([0.0] * 8), TypeError, rf"{name}: z must be a torch.Tensor")
    assert g.eval()(torch.randn(1, 8)).shape[0] == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts z itself: no dtype error
        assert g.eval()(torch.randn(2, 8, dtype=torch.bfloat16)).shape[0] == 2


@pytest.mark.parametrize("cls", [Generator, LargeGenerator, DCGAN_Generator, DeepGenerator])
@pytest.mark.parametrize("arg,value,exc", [("nz", 0, ValueError), ("ngf", -1, ValueError), ("nc", 0, ValueError),
                                           ("nz", 8.0, TypeError), ("ngf", True, TypeError)])
def test_generator_construction_arguments(cls, arg, value, exc):
    kw = dict(nz=8, ngf=4, nc=3)
    if cls in (DCGAN_Generator, DeepGenerator):
        kw["img_size"] = 32
    kw[arg] = value
    _raises(lambda: cls(**kw), exc, rf"{cls.__name__}: {arg} must be an int >= 1, got .*{value!r}")


def test_generator_img_size_is_named():
    _raises(lambda: Generator(nz=8, ngf=4, img_size=30), ValueError, r"img_size must be a positive multiple of 4")
    _raises(lambda: DeepGenerator(nz=8, ngf=4, img_size=0), ValueError, r"img_size must be a positive multiple of 32")
    _raises(lambda: NLGenerator(ngf=4, img_size=0, nl=2, sbz=4, le_size=4, le_emb_size=4), ValueError,
            r"NLGenerator: img_size must be a positive multiple of 4, got 0")
    _raises(lambda: NLDeepGenerator(ngf=4, img_size=8, nl=2, sbz=4, le_size=4, le_emb_size=4), ValueError,
            r"NLDeepGenerator: img_size must be a positive multiple of 16")
    _raises(lambda: DCGAN_Generator(nz=8, ngf=4, img_size=(32, 20)), ValueError,
            r"img_size must be a positive multiple of 16")


@pytest.mark.parametrize("arg", ["ngf", "nc", "nl", "le_emb_size", "le_size", "sbz"])
def test_nl_generator_construction_arguments(arg):
    kw = dict(ngf=4, img_size=8, nc=3, nl=3, label_emb=torch.randn(10, 16), le_emb_size=8, le_size=16, sbz=6)
    kw[arg] = 0
    _raises(lambda: NLGenerator(**kw), ValueError, rf"NLGenerator: {arg} must be an int >= 1, got 0")


def test_nl_generator_label_emb_and_noisy_layers():
    _raises(lambda: NLGenerator(ngf=4, img_size=8, nl=3, label_emb=torch.randn(16), le_emb_size=8, le_size=16),
            ValueError, r"label_emb must be \[num_classes, le_size=16\], got shape \(16,\)")
    _raises(lambda: NLGenerator(ngf=4, img_size=8, nl=3, label_emb=torch.randn(10, 12), le_emb_size=8, le_size=16),
            ValueError, r"label_emb must be \[num_classes, le_size=16\], got shape \(10, 12\)")
    for arg in ("k", "in_features", "out_features", "nl"):
        kw = dict(k=2, in_features=3, out_features=4, nl=2)
        kw[arg] = 0
        _raises(lambda: NoisyLayers(**kw), ValueError, rf"NoisyLayers: {arg} must be an int >= 1, got 0")


def test_nl_generator_checks_targets():
    g = NLGenerator(ngf=4, img_size=8, nl=3, label_emb=torch.randn(10, 16), le_emb_size=8, le_size=16, sbz=6)
    _raises(lambda: g(None), ValueError, r"NLGenerator: targets must be a tensor of class indices \[B\], got None")
    msg = _raises(lambda: g(torch.tensor([0, 10])), ValueError,
                  r"targets must be class indices in \[0, 10\) \(label_emb has 10 rows\), got values in \[0, 10\]")
    assert "out of bounds" not in msg  # was an IndexError
    # a negative index silently wrapped around to the last class
    _raises(lambda: g(torch.tensor([0, -1])), ValueError, r"targets must be class indices in \[0, 10\)")
    _raises(lambda: g(torch.tensor([0.0, 1.0])), TypeError, r"targets must be int64 \(or int32\) class indices")
    _raises(lambda: g(torch.zeros(2, 1, dtype=torch.long)), ValueError,
            r"targets must be class indices of shape \[B\] with B >= 1, got shape \(2, 1\)")
    _raises(lambda: g(torch.zeros(0, dtype=torch.long)), ValueError, r"with B >= 1, got shape \(0,\)")
    _raises(lambda: g(torch.zeros(2, dtype=torch.long, device="meta")), ValueError,
            r"targets must be on the generator's device cpu, got meta")
    _raises(lambda: g(torch.zeros(7, dtype=torch.long)), ValueError,
            r"batch 7 exceeds the 2 noisy layers x nl=3 rows \(6\)")
    _raises(lambda: g(["a", "b"]), TypeError, r"targets must be .*class indices")
    assert g(torch.tensor([0, 9], dtype=torch.int32)).shape == (2, 3, 8, 8)
    assert g([1, 2]).shape == (2, 3, 8, 8)  # a list of ints is taken as upstream's indexing takes it
    g.label_emb = None
    _raises(lambda: g(torch.tensor([0, 1])), ValueError, r"label_emb was not given")
