"""fastsynth.nn.upsample2x_conv3x3 and UpsampleConvSequential: equal to nearest 2x upsampling then
a 3x3 convolution (values and gradients), on odd shapes, layouts and dtypes; the generators that
use it give the upstream generators' outputs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsynth.cpu
from fastsynth.nn import DeepGenerator, Generator, NLGenerator, UpsampleConvSequential, upsample2x_conv3x3


def reference(x, weight, bias=None):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def _grads(fn, x, w, b, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    inputs = [x, w] + ([] if b is None else [b])
    return (y, *torch.autograd.grad(y, inputs, g))


@pytest.mark.parametrize("shape,out_ch,with_bias", [((2, 3, 5, 7), 4, True), ((1, 1, 1, 1), 2, False),
                                                    ((3, 8, 4, 4), 5, True), ((2, 6, 6, 3), 1, False)])
def test_matches_upsample_then_conv_float64(shape, out_ch, with_bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(out_ch, shape[1], 3, 3, dtype=torch.float64)
    b = torch.randn(out_ch, dtype=torch.float64) if with_bias else None
    g = torch.randn(shape[0], out_ch, 2 * shape[2], 2 * shape[3], dtype=torch.float64)
    got, want = _grads(upsample2x_conv3x3, x, w, b, g), _grads(reference, x, w, b, g)
    assert got[0].shape == want[0].shape
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_channels_last_input_gives_channels_last_output_float64():
    # the channels_last interleave (one strided copy per phase) against the oracle, gradients too
    torch.manual_seed(5)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, 5, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    g = torch.randn(2, 3, 12, 14, dtype=torch.float64)
    got, want = _grads(upsample2x_conv3x3, x, w, b, g), _grads(reference, x.contiguous(), w, b, g)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_generator_layouts_change_no_value_float64():
    # DeepGenerator at 32x32: its convolutions from 16x16 up run channels_last on the CPU
    torch.manual_seed(6)
    gen = DeepGenerator(nz=8, ngf=4, img_size=32, nc=3).double().train()
    gen.conv_blocks.fuse = True
    plain = copy.deepcopy(gen)
    plain.conv_blocks.channels_last_min_hw = None  # layouts as they come (all NCHW)
    z = torch.randn(3, 8, dtype=torch.float64)
    ya, yb = gen(z), plain(z)
    assert ya.is_contiguous(memory_format=torch.channels_last) and yb.is_contiguous()
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(yb)
    ga = torch.autograd.grad(ya, list(gen.parameters()), g, allow_unused=True)
    gb = torch.autograd.grad(yb, list(plain.parameters()), g, allow_unused=True)
    assert sum(a is not None for a in ga) > 0
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_float32_layouts(layout):
    torch.manual_seed(1)
    x = torch.randn(3, 6, 9, 10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(3, 12, 9, 20)[:, ::2, :, ::2]  # non-contiguous view
    w, b = torch.randn(4, 6, 3, 3) * 0.2, torch.randn(4)
    g = torch.randn(3, 4, 18, 20)
    got, want = _grads(upsample2x_conv3x3, x, w, b, g), _grads(reference, x.double(), w.double(), b.double(), g.double())
    for a, r in zip(got, want):
        # float32 against a float64 oracle; the combined taps round differently from 9 products
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_bfloat16():
    torch.manual_seed(2)
    x, w = torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3) * 0.1
    got = upsample2x_conv3x3(x.bfloat16(), w.bfloat16()).double()
    want = reference(x.double(), w.double())
    # bf16 inputs and products (8-bit mantissa): a few 1e-2 of the output scale
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()


def test_bad_input():
    with pytest.raises(ValueError, match="x must be"):
        upsample2x_conv3x3(torch.randn(2, 3, 4), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="weight must be"):
        upsample2x_conv3x3(torch.randn(2, 3, 4, 4), torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="weight must be"):
        upsample2x_conv3x3(torch.randn(2, 3, 4, 4), torch.randn(4, 2, 3, 3))


def _blocks(fuse):
    torch.manual_seed(3)
    return UpsampleConvSequential(
        nn.BatchNorm2d(4), nn.Upsample(scale_factor=2), nn.Conv2d(4, 5, 3, padding=1, bias=False),
        nn.LeakyReLU(0.2), nn.Upsample(scale_factor=(2, 2)), nn.Conv2d(5, 3, 3, padding=1), fuse=fuse)


def test_sequential_fused_equals_plain_and_keeps_state_dict_keys():
    fused, plain = _blocks(True), _blocks(False)
    assert list(fused.state_dict()) == list(nn.Sequential(*plain).state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    fused, plain = fused.double(), plain.double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), plain(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa] + list(fused.parameters()), g)
    gb = torch.autograd.grad(yb, [xb] + list(plain.parameters()), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sequential_fuses_only_the_eligible_pairs(monkeypatch):
    calls = []
    import fastsynth.nn.upsample_conv as uc

    real = uc.upsample2x_conv3x3
    monkeypatch.setattr(uc, "upsample2x_conv3x3", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fastsynth.cpu.config, "upsample_fuse_min_macs", 0)  # default mode, every size
    seq = UpsampleConvSequential(
        nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 3, padding=1),                  # fused
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(3, 3, 3, padding=1),  # not nearest
        nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 3, padding=1, stride=2),        # strided conv
        nn.Upsample(scale_factor=3), nn.Conv2d(3, 3, 3, padding=1),                  # not 2x
        nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 5, padding=2))                  # 5x5
    plain = nn.Sequential(*seq)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    seq, plain = seq.double(), plain.double()
    torch.testing.assert_close(seq(x), plain(x), rtol=1e-12, atol=1e-12)
    assert len(calls) == 1


def test_sequential_default_fuses_only_large_cpu_convolutions(monkeypatch):
    calls = []
    import fastsynth.nn.upsample_conv as uc

    real = uc.upsample2x_conv3x3
    monkeypatch.setattr(uc, "upsample2x_conv3x3", lambda *a: calls.append(1) or real(*a))
    seq = UpsampleConvSequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1))
    small = torch.randn(1, 4, 4, 4)
    seq(small)
    assert calls == []  # 2 K multiply-adds: upsample + conv as upstream
    monkeypatch.setattr(fastsynth.cpu.config, "upsample_fuse_min_macs", 4 * 4 * 4 * 16 * 9)
    seq(small)
    assert calls == [1]


@pytest.mark.parametrize("make", [
    lambda: Generator(nz=16, ngf=8, img_size=16, nc=3),
    lambda: NLGenerator(ngf=8, img_size=16, nc=3, nl=2, label_emb=torch.randn(2, 10), le_emb_size=12, le_size=10,
                        sbz=4),
    lambda: DeepGenerator(nz=8, ngf=4, img_size=32, nc=3),
])
def test_generators_equal_their_unfused_computation(make):
    torch.manual_seed(4)
    gen = make().double().train()
    gen.conv_blocks.fuse = True  # small test sizes: force the fused form
    plain = copy.deepcopy(gen)
    plain.conv_blocks.fuse = False  # the upstream modules: upsample, then conv
    if isinstance(gen, NLGenerator):
        inp = torch.randint(0, 2, (4,))
    elif isinstance(gen, DeepGenerator):
        inp = torch.randn(3, 8, dtype=torch.float64)
    else:
        inp = torch.randn(3, 16, dtype=torch.float64)
    ya, yb = gen(inp), plain(inp)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, list(gen.parameters()), g, allow_unused=True)
    gb = torch.autograd.grad(yb, list(plain.parameters()), g, allow_unused=True)
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_inference_mode_first_then_training():
    """A first call under inference_mode must not leave an inference tensor behind that a later
    training call would try to save for backward."""
    import fastsynth.nn.upsample_conv as uc

    uc._COMBINE_CACHE.clear()
    x, w = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with torch.inference_mode():
        upsample2x_conv3x3(x, w)
    wr = w.clone().requires_grad_()
    y = upsample2x_conv3x3(x, wr)
    (g,) = torch.autograd.grad(y.sum(), [wr])
    (want,) = torch.autograd.grad(reference(x, wr).sum(), [wr])
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph():
    fn = torch.compile(upsample2x_conv3x3, fullgraph=True, backend="aot_eager")
    x, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(fn(x, w), upsample2x_conv3x3(x, w))


@pytest.mark.needs_cuda
def test_cuda_matches_reference():
    x = torch.randn(2, 8, 7, 9, device="cuda", dtype=torch.float64)
    w = torch.randn(4, 8, 3, 3, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(upsample2x_conv3x3(x, w), reference(x, w), rtol=1e-12, atol=1e-12)
