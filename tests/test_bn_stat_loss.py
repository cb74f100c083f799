"""bn_stat_loss / bn_stat_loss_multi / DeepInversionHook against a float64 reference.

Tolerances: fp64 maps 1e-10 relative (loss and gradient); fp32 maps 1e-5 on the loss and 1e-4 on
the gradient (relative norm error); fp16 maps 1e-4 on the loss (statistics are accumulated in
fp32) and 4e-3 on the gradient (the gradient is rounded to fp16); bf16 1e-4 / 2e-2.
"""
import pytest
import torch
import torch.nn as nn

import fastsynth
from fastsynth import DeepInversionHook
from fastsynth.ops import bn_stat_loss, bn_stat_loss_multi, loss_from_stats

from conftest import HAS_CUDA
from fastsynth.bench.reference_loops import RefHook

BACKENDS = ["cpu", "triton"]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_map(shape, dtype=torch.float64, layout="contiguous", mean=0.5, std=2.0):
    """A feature map in the requested layout (values drawn fresh; never zeros)."""
    if layout == "channels_last":
        x = torch.randn(shape, dtype=torch.float64) * std + mean
        return x.to(dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":  # every other sample and every other column of a bigger map
        big = list(shape)
        big[0] *= 2
        big[-1] *= 2
        x = torch.randn(big, dtype=torch.float64) * std + mean
        return x.to(dtype)[::2, ..., 1::2]
    if layout == "sliced_channels_last":
        big = list(shape)
        big[0] *= 2
        x = (torch.randn(big, dtype=torch.float64) * std + mean).to(dtype).to(memory_format=torch.channels_last)
        return x[1::2]
    return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)


def stats_for(C, dtype=torch.float64):
    rm = torch.randn(C, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, dtype=torch.float64) * 3 + 0.5).to(dtype)
    return rm, rv


def bn_stat_loss_reference(x, rm, rv, mm=None, mv=None, rho=0.0, grad_out=1.0):
    """float64 oracle, written like the upstream hook."""
    a = x.detach().double().requires_grad_()
    C = a.shape[1]
    dims = [0] + list(range(2, a.dim()))
    mean = a.mean(dims)
    var = a.transpose(0, 1).contiguous().view(C, -1).var(1, unbiased=False)
    rm, rv = rm.double(), rv.double()
    if mm is None:
        loss = torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)
    else:
        loss = torch.norm(rv - (1 - rho) * var - rho * mv.double(), 2) + torch.norm(rm - (1 - rho) * mean - rho * mm.double(), 2)
    (g,) = torch.autograd.grad(loss * grad_out, a)
    return loss.detach(), g, mean.detach(), var.detach()


SHAPES = [(4, 3, 5, 7), (6, 4, 1, 1), (1, 3, 6, 6), (5, 8), (3, 4, 9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("momentum", [False, True])
def test_float64_matches_reference(backend, shape, layout, momentum):
    if layout == "channels_last" and len(shape) != 4:
        layout = "contiguous"
    x = make_map(shape, layout=layout).requires_grad_()
    rm, rv = stats_for(shape[1])
    mm, mv, rho = (rm + 0.3 * torch.randn_like(rm), rv * 1.2, 0.9) if momentum else (None, None, 0.0)
    loss, mean, var = bn_stat_loss(x, rm, rv, mm, mv, rho, backend=backend)
    (g,) = torch.autograd.grad(loss * 2.5, x)  # grad_output != 1
    rl, rg, rmean, rvar = bn_stat_loss_reference(x, rm, rv, mm, mv, rho, grad_out=2.5)
    assert mean.dtype == torch.float64 and not mean.requires_grad and not var.requires_grad
    assert rel(loss, rl) < 1e-10
    assert rel(mean, rmean) < 1e-10 and rel(var, rvar) < 1e-10
    assert rel(g, rg) < 1e-10
    assert g.shape == x.shape


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_gradcheck(backend):
    rm, rv = stats_for(2)
    x = make_map((2, 2, 2, 2), layout="channels_last").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bn_stat_loss(t, rm, rv, rm * 0.5, rv * 2, 0.9, backend=backend)[0], (x,))
    if backend != "triton":  # the interpreter is slow; the layouts are covered against the oracle above
        y = make_map((3, 2, 2, 3), layout="sliced").requires_grad_()
        assert torch.autograd.gradcheck(lambda t: bn_stat_loss(t, rm, rv, backend=backend)[0], (y,))


def test_gradcheck_of_the_ops():
    x = make_map((2, 3, 2, 3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.ops.fastsynth.bn_batch_stats(t), (x,))
    y = make_map((3, 2, 2), layout="sliced").requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fastsynth.bn_batch_stats_multi([a, b]), (x, y))
    from fastsynth.ops.bn_stat_loss import _bn_batch_stats_multi_triton

    a, b = make_map((2, 2, 1, 2)).requires_grad_(), make_map((2, 1, 2), layout="sliced").requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: _bn_batch_stats_multi_triton([p, q]), (a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol_loss,tol_grad", [(torch.float32, 1e-5, 1e-4), (torch.float16, 1e-4, 4e-3),
                                                     (torch.bfloat16, 1e-4, 2e-2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_channels_last"])
def test_low_precision(backend, dtype, tol_loss, tol_grad, layout):
    x = make_map((4, 5, 6, 6), dtype=dtype, layout=layout).requires_grad_()
    rm, rv = stats_for(5, dtype)
    loss, mean, var = bn_stat_loss(x, rm, rv, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    rl, rg, rmean, rvar = bn_stat_loss_reference(x, rm, rv)  # oracle on the same (rounded) values
    assert mean.dtype == torch.float32 and var.dtype == torch.float32 and loss.dtype == torch.float32
    assert g.dtype == dtype
    assert rel(mean, rmean) < 1e-5 and rel(var, rvar) < 1e-5
    assert rel(loss, rl) < tol_loss
    assert rel(g, rg) < tol_grad


@pytest.mark.parametrize("backend,shape,layout", [
    ("cpu", (2, 2, 160, 160), "contiguous"),       # a channel split into several chunks (grid-level merge)
    ("cpu", (2, 2, 160, 160), "sliced"),
    ("cpu", (64, 200, 8, 8), "channels_last"),     # rows path: several channel blocks and row chunks
    ("cpu", (1, 4, 300, 301), "contiguous"),       # N=1, 4 channels: still split over chunks (both cores)
    ("cpu", (512, 64, 4, 4), "contiguous"),        # samples path (small planes): 16 sample chunks
    ("cpu", (128, 256, 16, 16), "contiguous"),     # samples path: several two-pass blocks per item
    ("cpu", (6, 3, 5, 5), "contiguous"),           # samples path, tiny
    ("triton", (2, 2, 128, 80), "contiguous"),     # two chunks per channel
])
def test_chunked_reductions(backend, shape, layout):
    x = make_map(shape, torch.float32, layout, mean=3.0).requires_grad_()
    rm, rv = stats_for(shape[1], torch.float32)
    loss, mean, var = bn_stat_loss(x, rm, rv, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    rl, rg, rmean, rvar = bn_stat_loss_reference(x, rm, rv)
    assert rel(mean, rmean) < 1e-6 and rel(var, rvar) < 1e-5
    assert rel(loss, rl) < 1e-5 and rel(g, rg) < 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_gradients_in_recycled_blocks(layout):
    # gradients of >= 4 MB come from csrc/cpu/large_alloc.h (recycled blocks, own deleter):
    # values, strides and lifetime as with torch's allocator; a freed block serves the next call
    torch.manual_seed(0)
    fastsynth.empty_cache()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, 4, 1024, 1040) * 2 + 3).to(memory_format=fmt).requires_grad_()
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    loss, _, _ = bn_stat_loss(x, rm, rv, backend="cpu")
    (g,) = torch.autograd.grad(loss, [x], torch.tensor(1.5))
    x64 = x.detach().double().requires_grad_()
    ref, _, _ = bn_stat_loss(x64, rm.double(), rv.double(), backend="reference")
    (g_ref,) = torch.autograd.grad(ref, [x64], torch.tensor(1.5, dtype=torch.float64))
    assert g.stride() == x.stride()
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-10)
    keep = g.clone()
    ptr = g.data_ptr()
    del g  # back to the cache, not to the system
    loss, _, _ = bn_stat_loss(x, rm, rv, backend="cpu")
    (g2,) = torch.autograd.grad(loss, [x], torch.tensor(1.5))
    assert g2.data_ptr() == ptr  # the same block, reused
    torch.testing.assert_close(g2, keep, rtol=0, atol=0)
    g2.add_(1.0)  # an ordinary writable tensor
    assert fastsynth.empty_cache() == 0  # the block is in use by g2: nothing cached
    del g2
    assert fastsynth.empty_cache() == x.numel() * 4
    assert fastsynth.empty_cache() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_small_variance(backend):
    # mean 1000, std 0.01 in fp32: E[x^2]-E[x]^2 in fp32 loses the variance entirely
    x64 = 1000.0 + 0.01 * torch.randn(8, 4, 16, 16, dtype=torch.float64)
    x = x64.float().requires_grad_()
    # rm = 0 keeps the mean term well conditioned in fp32 (|rm - mu| ~ 2000), so the checks below
    # see the variance path: the variance itself and the centred (variance) part of the gradient
    rm, rv = torch.zeros(4), torch.full((4,), 2e-4)
    loss, mean, var = bn_stat_loss(x, rm, rv, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    rl, rg, rmean, rvar = bn_stat_loss_reference(x, rm, rv)
    assert rel(var, rvar) < 1e-3
    assert rel(mean, rmean) < 1e-6
    assert rel(loss, rl) < 1e-5
    centred = lambda t: t.double() - t.double().mean([0, 2, 3], keepdim=True)  # noqa: E731
    assert rel(centred(g), centred(rg)) < 1e-2
    xf = x.detach()
    naive = (xf * xf).mean([0, 2, 3]) - xf.mean([0, 2, 3]) ** 2
    assert rel(naive, rvar) > 0.05  # the case really breaks the naive formula


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_layer_with_weights_and_partial_momentum(backend):
    shapes = [(4, 3, 6, 6), (4, 8, 3, 3), (4, 5, 1, 1), (4, 2, 5, 4)]
    layouts = ["contiguous", "channels_last", "sliced", "channels_last"]
    xs = [make_map(s, layout=l).requires_grad_() for s, l in zip(shapes, layouts)]
    rms, rvs = zip(*[stats_for(s[1]) for s in shapes])
    mms = [None, rms[1] * 0.5, None, rms[3] + 1]
    mvs = [None, rvs[1] * 2, None, rvs[3] * 0.5]
    weights = [10.0, 1.0, 0.5, 2.0]
    loss, means, variances = bn_stat_loss_multi(xs, list(rms), list(rvs), mms, mvs, 0.9, weights, backend=backend)
    gs = torch.autograd.grad(loss * 0.7, xs)
    ref_total = 0
    for i, x in enumerate(xs):
        rl, rg, rmean, rvar = bn_stat_loss_reference(x, rms[i], rvs[i], mms[i], mvs[i], 0.9 if mms[i] is not None else 0.0,
                                                grad_out=0.7 * weights[i])
        ref_total = ref_total + weights[i] * rl
        assert rel(gs[i], rg) < 1e-10
        assert rel(means[i], rmean) < 1e-10 and rel(variances[i], rvar) < 1e-10
        assert means[i].shape == (shapes[i][1],) and not means[i].requires_grad
    assert rel(loss, ref_total) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_layer_full_momentum_and_weights(backend):
    # every layer with momentum state and float weights: the one-node loss on the concatenated
    # statistics of the fused multi-layer op, against per-layer float64 references
    shapes = [(4, 6, 5, 5), (4, 3, 7, 3), (4, 9, 2, 2)]
    xs = [make_map(sh, torch.float64) for sh in shapes]
    rms, rvs = zip(*[stats_for(sh[1], torch.float64) for sh in shapes])
    mms, mvs = zip(*[stats_for(sh[1], torch.float64) for sh in shapes])
    w = [2.0, 0.5, 1.5]
    ts = [x.clone().requires_grad_() for x in xs]
    loss, means, variances = bn_stat_loss_multi(ts, list(rms), list(rvs), list(mms), list(mvs), mmt_rate=0.9,
                                                weights=w, backend=backend)
    grads = torch.autograd.grad(loss, ts, torch.tensor(1.7, dtype=torch.float64))
    total = 0.0
    for i, x in enumerate(xs):
        xr = x.clone().requires_grad_()
        r, m, v = bn_stat_loss(xr, rms[i], rvs[i], mms[i], mvs[i], mmt_rate=0.9, backend="reference")
        (g,) = torch.autograd.grad(r * w[i], [xr], torch.tensor(1.7, dtype=torch.float64))
        total = total + w[i] * r.detach()
        assert rel(grads[i], g) < 1e-10
        assert rel(means[i], m) < 1e-10 and rel(variances[i], v) < 1e-10
    assert rel(loss, total) < 1e-10


def test_cross_backend_agreement_fp32():
    xs = [make_map((8, 16, 8, 8), torch.float32), make_map((8, 32, 4, 4), torch.float32, "channels_last")]
    rms, rvs = zip(*[stats_for(x.shape[1], torch.float32) for x in xs])
    out = {}
    for be in ["reference", "cpu", "triton"]:
        ts = [x.clone().requires_grad_() for x in xs]
        loss, means, variances = bn_stat_loss_multi(ts, list(rms), list(rvs), backend=be)
        out[be] = (loss, torch.autograd.grad(loss, ts), means, variances)
    for be in ["cpu", "triton"]:
        assert rel(out[be][0], out["reference"][0]) < 1e-5
        for a, b in zip(out[be][1], out["reference"][1]):
            assert rel(a, b) < 1e-4
        for a, b in zip(out[be][2] + out[be][3], out["reference"][2] + out["reference"][3]):
            assert rel(a, b) < 1e-5


def test_default_backend_is_cpu_and_reference_matches_upstream_dtype():
    x = make_map((2, 3, 4, 4), torch.float16).requires_grad_()
    rm, rv = stats_for(3, torch.float32)
    l_cpu, m_cpu, _ = bn_stat_loss(x, rm, rv)
    l_ref, m_ref, _ = bn_stat_loss(x, rm, rv, backend="reference")
    assert m_cpu.dtype == m_ref.dtype == torch.float32
    assert rel(l_cpu, l_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_nan_and_inf_propagate_like_the_reference(backend):
    rm, rv = stats_for(3)
    for bad in [float("nan"), float("inf")]:
        x = make_map((2, 3, 4, 4), torch.float32).requires_grad_()
        with torch.no_grad():
            x[1, 2, 3, 1] = bad
        loss, mean, var = bn_stat_loss(x, rm.float(), rv.float(), backend=backend)
        rl, _, rmean, rvar = bn_stat_loss_reference(x, rm, rv)
        assert torch.isnan(loss) == torch.isnan(rl) and torch.isinf(loss) == torch.isinf(rl)
        assert torch.equal(torch.isnan(var), torch.isnan(rvar))
        assert torch.isfinite(mean[:2]).all() and torch.isfinite(var[:2]).all()  # other channels unaffected
        (g,) = torch.autograd.grad(loss, x)  # no crash


def test_zero_residual_has_zero_gradient_not_nan():
    x = make_map((4, 3, 3, 3)).requires_grad_()
    dims = [0, 2, 3]
    rm, rv = x.detach().mean(dims), x.detach().var(dims, unbiased=False)
    loss, _, _ = bn_stat_loss(x, rm, rv)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() < 1e-12 and torch.isfinite(g).all()


def loss_from_stats_reference(means, variances, rms, rvs, mms, mvs, rho, weights, scale):
    """Per-layer float64 formulation of the spec (torch.norm, as the upstream hook)."""
    total = 0.0
    for l in range(len(means)):
        if mms is None:
            r = torch.norm(rvs[l] - variances[l], 2) + torch.norm(rms[l] - means[l], 2)
        else:
            r = (torch.norm(rvs[l] - (1 - rho) * variances[l] - rho * mvs[l], 2)
                 + torch.norm(rms[l] - (1 - rho) * means[l] - rho * mms[l], 2))
        total = total + (1.0 if weights is None else weights[l]) * r
    return scale * total


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("weights,scale", [(None, 1.0), ([2.0, 0.5, 1.0], 1.0), (None, 10.0), ([3.0, 1.0, 0.25], 0.7)])
def test_loss_from_stats_fused_path_matches_oracle(momentum, weights, scale):
    """The one-node path (every layer with or without momentum state, float weights, ``scale``):
    loss and gradients w.r.t. the statistics in float64, grad_output != 1, one layer with an
    exactly zero residual (gradient 0, not NaN) and a NaN layer that propagates."""
    g = torch.Generator().manual_seed(5)
    sizes = [3, 5, 2]
    mk = lambda: [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]  # noqa: E731
    rms, rvs = mk(), [v.abs() + 0.5 for v in mk()]
    mms, mvs = (mk(), [v.abs() + 0.5 for v in mk()]) if momentum else (None, None)
    rho = 0.5 if momentum else 0.0  # 0.5: the zero residual below is exact in binary
    means = [t.clone().requires_grad_() for t in mk()]
    variances = [t.abs().add(0.3).requires_grad_() for t in mk()]
    with torch.no_grad():  # layer 1's mean residual is exactly zero: rm - (1-rho) mu - rho mbar = 0
        if momentum:
            mms[1].zero_()
            means[1].copy_(2 * rms[1])
        else:
            means[1].copy_(rms[1])
    loss = loss_from_stats(means, variances, rms, rvs, mms, mvs, rho, weights, scale=scale)
    assert loss.grad_fn is not None and "StatLoss" in type(loss.grad_fn).__name__  # the fused path ran
    ref_means = [m.detach().clone().requires_grad_() for m in means]
    ref_vars = [v.detach().clone().requires_grad_() for v in variances]
    ref = loss_from_stats_reference(ref_means, ref_vars, rms, rvs, mms, mvs, rho, weights, scale)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    gout = torch.tensor(0.37, dtype=torch.float64)
    got = torch.autograd.grad(loss, means + variances, gout)
    exp = torch.autograd.grad(ref, ref_means + ref_vars, gout)
    for a, b in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, torch.nan_to_num(b, nan=0.0), rtol=1e-10, atol=1e-12)
    # NaN in one layer's statistics: the loss is NaN and so is that layer's gradient
    bad = [m.detach().clone().requires_grad_() for m in means]
    with torch.no_grad():
        bad[2][0] = float("nan")
    l2 = loss_from_stats(bad, variances, rms, rvs, mms, mvs, rho, weights, scale=scale)
    assert torch.isnan(l2)
    assert torch.isnan(torch.autograd.grad(l2, bad[2])[0]).all()


def test_loss_from_stats_fused_path_op_count():
    """The fused path is a fixed number of ops whatever the number of layers (no op per layer)."""
    from fastsynth.bench.harness import AtenOpCounter

    counts = []
    for L in (3, 30):
        means = [torch.randn(4, requires_grad=True) for _ in range(L)]
        variances = [torch.rand(4).add(0.1).requires_grad_() for _ in range(L)]
        rms = [torch.randn(4) for _ in range(L)]
        rvs = [torch.rand(4) + 0.5 for _ in range(L)]
        loss_from_stats(means, variances, rms, rvs, rms, rvs, 0.9, scale=2.0)  # warm the constant caches
        with AtenOpCounter() as c:
            loss = loss_from_stats(means, variances, rms, rvs, rms, rvs, 0.9, scale=2.0)
            torch.autograd.grad(loss, means + variances)  # (backward() would add a detach per leaf)
        counts.append(c.total)
    # 20: the running statistics and momentum state are concatenated afresh every call (2 cat ops:
    # no cache can prove them unchanged) and the squares are summed in float64 (2 casts: no
    # overflow of the squared residual)
    assert counts[0] == counts[1] and counts[0] <= 20, counts


# ---- bad input -------------------------------------------------------------------------------
def test_bad_inputs_raise_naming_the_argument():
    x = make_map((2, 3, 4, 4), torch.float32)
    rm, rv = stats_for(3, torch.float32)
    cases = [
        (lambda: bn_stat_loss(torch.randn(3), rm, rv), ValueError, "x must have 2 or 3 or 4 dimensions"),
        (lambda: bn_stat_loss(torch.randn(2, 3, 2, 2, 2), rm, rv), ValueError, "x must have"),
        (lambda: bn_stat_loss(x.long(), rm, rv), TypeError, "x must be a floating tensor"),
        (lambda: bn_stat_loss(x[:0], rm, rv), ValueError, "x must have a non-empty batch"),
        (lambda: bn_stat_loss(x[:, :, :0], rm, rv), ValueError, "x must have a non-empty batch"),
        (lambda: bn_stat_loss(x, rm[:2], rv), ValueError, r"running_mean must have shape \(3,\)"),
        (lambda: bn_stat_loss(x, rm, rv.double()), TypeError, "running_var must have dtype torch.float32"),
        (lambda: bn_stat_loss(x, rm, rv.to("meta")), ValueError, "running_var must be on cpu"),
        (lambda: bn_stat_loss(x, rm, [1.0, 2.0, 3.0]), TypeError, "running_var must be a torch.Tensor"),
        (lambda: bn_stat_loss(x, rm, rv, rm, None, 0.9), ValueError, "mmt_mean and mmt_var"),
        (lambda: bn_stat_loss(x, rm, rv, rm, rv[:1], 0.9), ValueError, r"mmt_var must have shape \(3,\)"),
        (lambda: bn_stat_loss(x, rm, rv, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: bn_stat_loss_multi(x, [rm], [rv]), TypeError, "features must be a list"),
        (lambda: bn_stat_loss_multi([], [], []), ValueError, "at least one"),
        (lambda: bn_stat_loss_multi([x, x], [rm], [rv, rv]), ValueError, "running_means must be a list with one entry"),
        (lambda: bn_stat_loss_multi([x, x.double()], [rm, rm], [rv, rv]), TypeError, r"features\[1\] must have dtype torch.float32"),
        (lambda: bn_stat_loss_multi([x, torch.randn(2, 4, 2, 2)], [rm, rm], [rv, rv]), ValueError,
         r"running_means\[1\] must have shape \(4,\)"),
        (lambda: bn_stat_loss_multi([x, x], [rm, rm], [rv, rv], weights=[1.0]), ValueError, "weights must have one entry"),
        (lambda: bn_stat_loss_multi([x, x], [rm, rm], [rv, rv], [rm, None], [rv, rv], 0.9), ValueError,
         r"mmt_means\[1\] and mmt_vars\[1\]"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_cpp_ops_check_their_inputs_too():
    # second line of defence: a direct call with bad input raises, never crashes
    with pytest.raises(RuntimeError, match="must not be empty"):
        torch.ops.fastsynth.bn_batch_stats(torch.randn(0, 3, 2, 2))
    with pytest.raises(RuntimeError, match="must be 2-, 3- or 4-D"):
        torch.ops.fastsynth.bn_batch_stats(torch.randn(3))
    with pytest.raises(RuntimeError, match="statistics"):
        torch.ops.fastsynth.bn_batch_stats_backward(torch.randn(2, 3, 2, 2), torch.randn(2), torch.randn(3), torch.randn(3))


def test_bad_hyper_parameters_and_missing_statistics_raise():
    """issue 18: NaN hyper-parameters, non-1-D weights, missing running statistics and hook misuse
    raise errors that name the argument (before: NaN results, AttributeError, TypeError)."""
    x = make_map((2, 3, 4, 4), torch.float32)
    rm, rv = stats_for(3, torch.float32)
    nan, inf = float("nan"), float("inf")
    cases = [
        (lambda: bn_stat_loss(x, None, rv), TypeError, "running_mean must be a tensor of shape"),
        (lambda: bn_stat_loss(x, rm, None), TypeError, "running_var must be a tensor of shape"),
        (lambda: bn_stat_loss(x, rm, rv, rm, rv, nan), ValueError, "mmt_rate must be finite"),
        (lambda: bn_stat_loss(x, rm, rv, rm, rv, inf), ValueError, "mmt_rate must be finite"),
        (lambda: bn_stat_loss(x, rm, rv, rm, rv, True), TypeError, "mmt_rate must be a Python float"),
        (lambda: bn_stat_loss_multi([x], [None], [rv]), TypeError, r"running_means\[0\] must be a tensor"),
        (lambda: bn_stat_loss_multi([x], [rm], [rv], [rm], [rv], nan), ValueError, "mmt_rate must be finite"),
        (lambda: bn_stat_loss_multi([x], [rm], [rv], weights=2.0), TypeError, "weights must be a list of floats"),
        (lambda: bn_stat_loss_multi([x], [rm], [rv], weights=[nan]), ValueError, r"weights\[0\] must be finite"),
        (lambda: bn_stat_loss_multi([x, x], [rm, rm], [rv, rv], weights=[1.0, -inf]), ValueError,
         r"weights\[1\] must be finite"),
        (lambda: bn_stat_loss_multi([x], [rm], [rv], weights=["a"]), TypeError, r"weights\[0\] must be a Python float"),
        (lambda: bn_stat_loss_multi([x], [rm], [rv], weights=torch.tensor([inf])), ValueError, "weights must be finite"),
        (lambda: bn_stat_loss_multi([x, x], [rm, rm], [rv, rv], weights=torch.ones(2, 1)), ValueError,
         r"weights must be a 1-D tensor with one entry per layer \(2,\), got shape \(2, 1\)"),
        (lambda: bn_stat_loss_multi([x], [rm], [rv], weights=torch.ones(1, 1), backend="reference"), ValueError,
         "weights must be a 1-D tensor"),
        (lambda: loss_from_stats([rm], [rv], [rm], [rv], weights=[nan]), ValueError, r"weights\[0\] must be finite"),
        (lambda: loss_from_stats([rm], [rv], [rm], [rv], [rm], [rv], nan), ValueError, "mmt_rate must be finite"),
        (lambda: loss_from_stats([rm], [rv], [rm], [rv], scale=nan), ValueError, "scale must be finite"),
        (lambda: loss_from_stats([rm], [rv], [None], [rv]), TypeError, r"running_means\[0\] must be a tensor"),
        (lambda: bn_stat_loss(x.to("meta"), rm.to("meta"), rv.to("meta"), backend="triton"), ValueError,
         "backend='triton' needs CUDA tensors"),
        (lambda: DeepInversionHook(nn.BatchNorm2d(3, track_running_stats=False)), ValueError,
         "track_running_stats=False"),
        (lambda: DeepInversionHook(nn.Conv2d(3, 3, 1)), ValueError, "must be a BatchNorm layer with running statistics"),
        (lambda: DeepInversionHook(lambda t: t), TypeError, "module must be a BatchNorm nn.Module"),
        (lambda: DeepInversionHook(nn.BatchNorm2d(3), nan), ValueError, "mmt_rate must be finite"),
        (lambda: DeepInversionHook(nn.BatchNorm2d(3)).update_mmt(), RuntimeError, "no batch statistics yet"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_one_dimensional_weights_give_a_scalar_loss_on_every_backend(backend):
    x = make_map((2, 3, 4, 4), torch.float64)
    rm, rv = stats_for(3)
    for w in ([2.0, 0.5], (2.0, 0.5), torch.tensor([2.0, 0.5], dtype=torch.float64)):
        loss, _, _ = bn_stat_loss_multi([x, x], [rm, rm], [rv, rv], weights=w, backend=backend)
        assert loss.shape == ()
        one = bn_stat_loss(x, rm, rv, backend=backend)[0]
        torch.testing.assert_close(loss, 2.5 * one, rtol=1e-12, atol=0)


# ---- stale running statistics (issue 18): the constants are read afresh every call -------------
def _mutators():
    """Ways a caller changes a running buffer in place; none of the last three moves _version."""
    def inplace(t, v):
        t.copy_(v)

    def data(t, v):
        t.data.copy_(v)

    def numpy(t, v):
        t.detach().numpy()[...] = v.numpy()

    def data_assign(t, v):
        t.data = v.clone()

    return [inplace, data, numpy, data_assign]


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mutate", _mutators(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("momentum", [False, True])
def test_running_statistics_changed_between_calls_are_read(backend, mutate, momentum):
    torch.manual_seed(0)
    xs = [make_map((3, 4, 5, 5), torch.float32), make_map((3, 2, 3, 3), torch.float32)]
    rms = [torch.randn(4), torch.randn(2)]
    rvs = [torch.rand(4) + 0.5, torch.rand(2) + 0.5]
    mms = [torch.randn(4), torch.randn(2)] if momentum else None
    mvs = [torch.rand(4) + 0.5, torch.rand(2) + 0.5] if momentum else None
    rate = 0.9 if momentum else 0.0

    def fresh(t):  # a new tensor of the current values: nothing a cache could have seen
        return [v.clone() for v in t] if t is not None else None

    def first(t):
        return None if t is None else t[0]

    st = [bn_stat_loss(x, rm, rv, backend="reference")[1:] for x, rm, rv in zip(xs, rms, rvs)]
    means, variances = [m for m, _ in st], [v for _, v in st]
    for step in range(3):
        # expectations first, by paths without any cache (the reference backend and the oracle),
        # so that between two steps only the backend under test sees these tensors
        exp_multi = bn_stat_loss_multi(xs, fresh(rms), fresh(rvs), fresh(mms), fresh(mvs), rate,
                                       backend="reference")[0]
        exp = bn_stat_loss(xs[0], rms[0].clone(), rvs[0].clone(), first(fresh(mms)), first(fresh(mvs)), rate,
                           backend="reference")[0]
        exp_lfs = loss_from_stats_reference(means, variances, fresh(rms), fresh(rvs), fresh(mms), fresh(mvs), rate,
                                          None, 1.0)
        got_multi = bn_stat_loss_multi(xs, rms, rvs, mms, mvs, rate, backend=backend)[0]
        got = bn_stat_loss(xs[0], rms[0], rvs[0], first(mms), first(mvs), rate, backend=backend)[0]
        got_lfs = loss_from_stats(means, variances, rms, rvs, mms, mvs, rate)  # the synthesizers' entry
        torch.testing.assert_close(got_multi, exp_multi, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_lfs, exp_lfs, rtol=1e-6, atol=1e-6)
        for ts in [rms, rvs] + ([mms, mvs] if momentum else []):
            for t in ts:
                mutate(t, t + 1.5 + step)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_hook_on_a_train_mode_batchnorm_sees_its_updated_running_statistics(backend):
    """issue 18's example: a train-mode BatchNorm updates its running statistics in its forward,
    without moving their version counters; the hook's loss must follow them."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).train()
    h = DeepInversionHook(bn, 0.0, backend=backend)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 3 + 1
        bn(x)
        exp = bn_stat_loss(x, bn.running_mean.clone(), bn.running_var.clone(), backend="reference")[0]
        torch.testing.assert_close(h.r_feature, exp, rtol=1e-5, atol=1e-6)
    # plain op on the same BatchNorm: l2 is not l1 again
    x = torch.randn(4, 3, 5, 5)
    l1 = bn_stat_loss(x, bn.running_mean, bn.running_var, backend=backend)[0]
    with torch.no_grad():
        bn(torch.randn(4, 3, 5, 5) * 4 + 2)
    l2 = bn_stat_loss(x, bn.running_mean, bn.running_var, backend=backend)[0]
    exp = bn_stat_loss(x, bn.running_mean.clone(), bn.running_var.clone(), backend="reference")[0]
    assert not torch.equal(l1, l2)
    torch.testing.assert_close(l2, exp, rtol=1e-5, atol=1e-6)
    # buffers loaded through .data (a checkpoint restored the upstream way), momentum on
    h.mmt_rate = 0.5
    h.update_mmt()
    with torch.no_grad():
        bn.eval()
        bn.running_mean.data.copy_(torch.randn(3))
        bn.running_var.data.copy_(torch.rand(3) + 0.5)
        bn(x)
    mm, mv = h.mmt
    exp = bn_stat_loss(x, bn.running_mean.clone(), bn.running_var.clone(), mm, mv, 0.5, backend="reference")[0]
    torch.testing.assert_close(h.r_feature, exp, rtol=1e-5, atol=1e-6)
    h.close()
    assert not bn._forward_hooks


def test_constant_table_cache_is_bounded():
    """issue 20: a changing loss scale (a schedule on the bn coefficient) or changing weights must
    not grow the cache of constant tensors without bound."""
    import importlib

    mod = importlib.import_module("fastsynth.ops.bn_stat_loss")

    means = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    variances = [torch.rand(4).add(0.1).requires_grad_(), torch.rand(3).add(0.1).requires_grad_()]
    rms, rvs = [torch.randn(4), torch.randn(3)], [torch.rand(4) + 0.5, torch.rand(3) + 0.5]
    for i in range(3 * mod._TABLE_MAX):
        loss = loss_from_stats(means, variances, rms, rvs, weights=[1.0, 1.0 + i], scale=0.5 + i)
        exp = loss_from_stats(means, variances, rms, rvs, weights=torch.tensor([0.5 + i, (1.0 + i) * (0.5 + i)]))
        torch.testing.assert_close(loss, exp)
        assert len(mod._SEGMENT_IDS) <= mod._TABLE_MAX


# ---- float32 overflow of the squared residual (issue 18) --------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("momentum", [False, True])
def test_huge_maps_do_not_overflow_where_the_loss_fits(backend, momentum):
    """|x| ~ 1e18: the variance (~1e36) fits in float32, its square does not; the loss (a norm) is
    finite and matches the float64 oracle, and so is its gradient."""
    torch.manual_seed(0)
    x = (make_map((2, 3, 4, 4), torch.float64, std=1.0, mean=0.0) * 1e18).float()
    rm, rv = stats_for(3, torch.float32)
    mm, mv = (stats_for(3, torch.float32) if momentum else (None, None))
    rate = 0.5 if momentum else 0.0
    xg = x.clone().requires_grad_()
    loss = bn_stat_loss(xg, rm, rv, mm, mv, rate, backend=backend)[0]
    exp_loss, exp_grad = bn_stat_loss_reference(x, rm, rv, mm, mv, rate)[:2]
    assert torch.isfinite(loss)
    assert abs(loss.item() / exp_loss.item() - 1) < 1e-4
    (g,) = torch.autograd.grad(loss, xg)
    assert torch.isfinite(g).all()
    assert rel(g, exp_grad) < 1e-3
    # several layers, through the fused loss of the statistics
    loss2 = bn_stat_loss_multi([x, x * 0.5], [rm, rm], [rv, rv], None if mm is None else [mm, mm],
                               None if mv is None else [mv, mv], rate, weights=[1.0, 2.0], backend=backend)[0]
    e2 = exp_loss + 2 * bn_stat_loss_reference(x * 0.5, rm, rv, mm, mv, rate)[0]
    assert abs(loss2.item() / e2.item() - 1) < 1e-4


def test_float64_statistics_loss_does_not_overflow():
    """float64 residuals ~1e160 (squares overflow float64): the scaled norm stays finite."""
    means = [torch.full((3,), 1e160, dtype=torch.float64, requires_grad=True)]
    variances = [torch.full((3,), 2e160, dtype=torch.float64, requires_grad=True)]
    z = [torch.zeros(3, dtype=torch.float64)]
    for weights in (None, torch.tensor([1.0], dtype=torch.float64)):  # fused and plain paths
        loss = loss_from_stats(means, variances, z, z, weights=weights)
        torch.testing.assert_close(loss, torch.tensor(3e160 * 3 ** 0.5, dtype=torch.float64), rtol=1e-12, atol=0)
        g = torch.autograd.grad(loss, means + variances)
        for t in g:
            torch.testing.assert_close(t, torch.full((3,), 3 ** -0.5, dtype=torch.float64), rtol=1e-12, atol=0)


# ---- registration ------------------------------------------------------------------------------
def test_opcheck_every_op():
    from torch.library import opcheck

    from fastsynth.ops.bn_stat_loss import _bn_batch_stats_multi_backward_triton, _bn_batch_stats_multi_triton

    x = make_map((2, 3, 4, 5), torch.float32).requires_grad_()
    y = make_map((3, 4, 3, 3), torch.float32, "channels_last").requires_grad_()
    m = torch.randn(3)
    mm = torch.randn(7)
    opcheck(torch.ops.fastsynth.bn_batch_stats.default, (x,))
    opcheck(torch.ops.fastsynth.bn_batch_stats_backward.default, (x.detach(), m, torch.randn(3), torch.randn(3)))
    opcheck(torch.ops.fastsynth.bn_batch_stats_multi.default, ([x, y],))
    opcheck(torch.ops.fastsynth.bn_batch_stats_multi_backward.default,
            ([x.detach(), y.detach()], mm, torch.randn(7), torch.randn(7)))
    opcheck(_bn_batch_stats_multi_triton, ([x, y],))
    opcheck(_bn_batch_stats_multi_backward_triton, ([x.detach(), y.detach()], mm, torch.randn(7), torch.randn(7)))


def test_torch_compile_fullgraph_forward_and_backward():
    xs = [make_map((4, 3, 5, 5), torch.float32).requires_grad_(), make_map((4, 6, 2, 2), torch.float32).requires_grad_()]
    rms, rvs = zip(*[stats_for(x.shape[1], torch.float32) for x in xs])

    def f(a, b):
        l1, m1, v1 = bn_stat_loss_multi([a, b], list(rms), list(rvs), weights=[2.0, 1.0])
        l2, _, _ = bn_stat_loss(a, rms[0], rvs[0], m1[0], v1[0], 0.9)
        return l1 + l2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*xs)
    g = torch.autograd.grad(out, xs)
    ref = f(*xs)
    gr = torch.autograd.grad(ref, xs)
    assert rel(out, ref) < 1e-6
    for a, b in zip(g, gr):
        assert rel(a, b) < 1e-5


# ---- hook ----------------------------------------------------------------------------------------
# the upstream DeepInversion hook restated (the parity oracle), shared with the synthesis tests
UpstreamStyleHook = RefHook


def small_cnn():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 4)).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("hook_cls", [DeepInversionHook, lambda m, r: DeepInversionHook(m, r, backend="triton")])
def test_hook_parity_with_upstream(hook_cls):
    net = small_cnn()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    results = {}
    for name, cls in [("upstream", UpstreamStyleHook), ("fastsynth", hook_cls)]:
        hooks = [cls(m, 0.9) for m in bns]
        torch.manual_seed(1)
        per_step = []
        for step in range(3):
            x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
            net(x)
            loss = sum(h.r_feature for h in hooks)
            (g,) = torch.autograd.grad(loss, x)
            per_step.append((loss.detach(), g, [h.tmp_val[1].detach() for h in hooks]))
            for h in hooks:
                h.update_mmt()
        results[name] = (per_step, [h.mmt for h in hooks])
        for h in hooks:
            h.remove()
        assert not net[1]._forward_hooks
    for (la, ga, va), (lb, gb, vb) in zip(results["upstream"][0], results["fastsynth"][0]):
        assert rel(lb, la) < 1e-10 and rel(gb, ga) < 1e-10
        for a, b in zip(va, vb):
            assert rel(b, a) < 1e-10
    for (ma, va), (mb, vb) in zip(results["upstream"][1], results["fastsynth"][1]):
        assert rel(mb, ma) < 1e-10 and rel(vb, va) < 1e-10


def test_hook_skip_no_grad_option():
    net = small_cnn()
    bn = net[1]
    h_default = DeepInversionHook(bn, 0.0)
    h_skip = DeepInversionHook(bn, 0.0, skip_no_grad=True)
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert h_default.r_feature is not None  # upstream semantics: computed on every forward
    assert h_skip.r_feature is None and h_skip.tmp_val is None
    net(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert h_skip.r_feature is not None
    h_default.remove()
    h_skip.remove()


def test_exports():
    assert fastsynth.DeepInversionHook is DeepInversionHook
    assert fastsynth.ops.bn_stat_loss is bn_stat_loss and fastsynth.ops.loss_from_stats is loss_from_stats


# ---- CUDA ---------------------------------------------------------------------------------------
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype,tol_grad", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 4e-3),
                                            (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cuda_matches_reference(dtype, tol_grad, layout):
    shapes = [(8, 3, 33, 17), (2, 64, 8, 8), (1, 4, 300, 300), (16, 256, 1, 1)]
    xs = [make_map(s, dtype, layout).cuda().requires_grad_() for s in shapes]
    rms, rvs = zip(*[stats_for(s[1], dtype) for s in shapes])
    rms, rvs = [r.cuda() for r in rms], [r.cuda() for r in rvs]
    for be in ["cuda", "triton"]:
        loss, means, variances = bn_stat_loss_multi(xs, rms, rvs, backend=be)
        gs = torch.autograd.grad(loss, xs)
        total = 0
        for i, x in enumerate(xs):
            rl, rg, rmean, rvar = bn_stat_loss_reference(x.cpu(), rms[i].cpu(), rvs[i].cpu())
            total = total + rl
            assert rel(gs[i].cpu(), rg) < tol_grad
            assert rel(variances[i].cpu(), rvar) < (1e-10 if dtype == torch.float64 else 1e-5)
        assert rel(loss.cpu(), total) < (1e-10 if dtype == torch.float64 else 1e-4)
        l1, _, _ = bn_stat_loss(xs[0], rms[0], rvs[0], backend=be)
        assert torch.isfinite(l1)


# ---- Triton work tables: built once per shape on the device, cached (issue 22) ---------------
class _HostTensorSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reads or makes a tensor on another device than ``device``."""

    def __init__(self, device):
        super().__init__()
        self.device, self.foreign = torch.device(device), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
        if any(isinstance(t, torch.Tensor) and t.device != self.device for t in flat):
            self.foreign.append(str(func))
        return out


def test_triton_work_tables_are_built_on_the_device_once_per_shape():
    """The tables of a call are made by device-side ops (a table made on the host needs a
    host-to-device copy per call, which a captured CUDA graph would replay); a second call with the
    same shapes builds nothing; the cache is bounded."""
    pytest.importorskip("triton")
    from fastsynth.kernels import bn_stat_loss as k

    xs = [torch.empty(8, 16, 9, 7, device="meta"),
          torch.empty(8, 32, 5, 5, device="meta").to(memory_format=torch.channels_last),
          torch.empty(16, 8, 12, 10, device="meta")[::2, :, 1:, ::3]]
    k._CACHE.clear()
    with _HostTensorSpy("meta") as spy:
        stats = k._plan(xs, None)
        back = k._plan(xs, [torch.empty_like(x) for x in xs])
    assert not spy.foreign, f"host tensors in the table construction: {spy.foreign[:5]}"
    assert all(t.device.type == "meta" for t, *_ in stats[0] + back[0]) and stats[1].device.type == "meta"
    builds = k._BUILDS
    assert k._plan(xs, None) is stats and k._plan(xs, [torch.empty_like(x) for x in xs]) is back
    assert k._BUILDS == builds
    for n in range(k._CACHE_MAX + 5):  # new shapes: new tables, the cache stays bounded
        k._plan([torch.empty(n + 1, 3, 4, 4, device="meta")], None)
        assert len(k._CACHE) <= k._CACHE_MAX
    assert k._BUILDS == builds + k._CACHE_MAX + 5


def test_triton_second_call_with_the_same_shapes_builds_no_table():
    pytest.importorskip("triton")
    from fastsynth.kernels import bn_stat_loss as k

    specs = [((3, 5, 6, 7), torch.float32), ((4, 6, 3, 3), torch.float32, "channels_last"),
             ((2, 3, 5, 4), torch.float32, "sliced")]
    xs = [make_map(*s) for s in specs]
    first = bn_stat_loss_multi(xs, [torch.zeros(x.shape[1]) for x in xs], [torch.ones(x.shape[1]) for x in xs],
                               backend="triton")[0]
    builds = k._BUILDS
    xs2 = [make_map(*s).copy_(x) for s, x in zip(specs, xs)]  # same shapes and strides, other addresses
    assert all(a.data_ptr() != b.data_ptr() and a.stride() == b.stride() for a, b in zip(xs, xs2))
    second = bn_stat_loss_multi(xs2, [torch.zeros(x.shape[1]) for x in xs], [torch.ones(x.shape[1]) for x in xs],
                                backend="triton")[0]
    assert k._BUILDS == builds
    torch.testing.assert_close(second, first, rtol=0, atol=0)
