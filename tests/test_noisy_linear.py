"""fastsynth.ops.noisy_linear: K Linear layers on consecutive row blocks of nl rows.

Oracle: a Python loop over the K layers (F.linear on each row block, as NAYER's upstream
ModuleList), in float64, with gradients."""
import pytest
import torch
import torch.nn.functional as F

from fastsynth import _ext
from fastsynth.nn.generators import NoisyLayers
from fastsynth.ops.noisy_linear import noisy_linear, noisy_linear_reference

needs_ext = pytest.mark.skipif(not _ext.has_extension(), reason="needs fastsynth._C")


def loop_reference(x, weight, bias, nl):
    """Layer k on rows k*nl .. (k+1)*nl - 1 (the last block may be partial)."""
    parts = []
    for k in range(-(-x.shape[0] // nl)):
        parts.append(F.linear(x[k * nl:(k + 1) * nl], weight[k].t(), bias[k]))
    return torch.cat(parts)


def _inputs(b, k, i, o, dtype=torch.float64, requires_grad=(True, True, True)):
    x = torch.randn(b, i, dtype=dtype, requires_grad=requires_grad[0])
    w = torch.randn(k, i, o, dtype=dtype, requires_grad=requires_grad[1])
    bias = torch.randn(k, o, dtype=dtype, requires_grad=requires_grad[2])
    return x, w, bias


# (B, K, in, out, nl): whole blocks; partial last block; fewer layers in use than K; nl > 8
# (several row chunks per weight row) and nl = 1; out not a multiple of the vector width; in
# not a multiple of the 4-row forward step
SHAPES = [(40, 4, 16, 24, 10), (35, 4, 16, 24, 10), (12, 5, 13, 29, 10), (7, 3, 9, 5, 3),
          (60, 2, 11, 37, 30), (5, 6, 8, 16, 1), (100, 4, 7, 3, 25), (1, 2, 5, 1, 4)]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_per_layer_loop_float64_with_gradients(shape):
    b, k, i, o, nl = shape
    x, w, bias = _inputs(b, k, i, o)
    out = noisy_linear(x, w, bias, nl, backend="cpu")
    ref = loop_reference(x, w, bias, nl)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)  # grad_output != 1
    got = torch.autograd.grad(out, (x, w, bias), grad)
    used = -(-b // nl)
    want = torch.autograd.grad(ref, (x, w, bias), grad, allow_unused=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1][:used], want[1][:used], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2][:used], want[2][:used], rtol=1e-12, atol=1e-12)
    assert torch.all(got[1][used:] == 0) and torch.all(got[2][used:] == 0)  # unused layers


@needs_ext
@pytest.mark.parametrize("shape", [(7, 3, 5, 6, 3), (10, 2, 4, 9, 5)])
def test_gradcheck(shape):
    b, k, i, o, nl = shape
    x, w, bias = _inputs(b, k, i, o)
    assert torch.autograd.gradcheck(lambda *a: noisy_linear(*a, nl, backend="cpu"), (x, w, bias))


@needs_ext
@pytest.mark.parametrize("shape", [(400, 40, 64, 100, 10), (37, 5, 33, 45, 8), (200, 2, 50, 70, 100)])
def test_float32_against_float64_reference(shape):
    b, k, i, o, nl = shape
    x, w, bias = _inputs(b, k, i, o, dtype=torch.float32)
    out = noisy_linear(x, w, bias, nl, backend="cpu")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, bias), grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    ref = loop_reference(x64, w64, b64, nl)
    want = torch.autograd.grad(ref, (x64, w64, b64), grad.double())
    # fp32 sums of up to max(in, out, nl) products of N(0, 1) values
    for g, r in zip((out,) + got, (ref,) + want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=2e-4)


@needs_ext
def test_non_contiguous_inputs():
    b, k, i, o, nl = 23, 3, 12, 17, 8
    x0, w0, b0 = _inputs(b, k, i, o, requires_grad=(False, False, False))
    x = x0.t().contiguous().t().requires_grad_()          # column-major x
    w = w0.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strided weight
    bias = torch.cat([b0, b0], 1)[:, :o].requires_grad_()                   # row stride 2*o
    assert not x.is_contiguous() and not w.is_contiguous() and not bias.is_contiguous()
    out = noisy_linear(x, w, bias, nl, backend="cpu")
    grad = torch.randn(o, b, dtype=torch.float64).t()  # non-contiguous grad_output
    got = torch.autograd.grad(out, (x, w, bias), grad)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
    ref = loop_reference(xr, wr, br, nl)
    want = torch.autograd.grad(ref, (xr, wr, br), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (False, True, True)])
def test_only_requested_gradients(needs):
    b, k, i, o, nl = 19, 3, 10, 13, 7
    x, w, bias = _inputs(b, k, i, o, requires_grad=needs)
    out = noisy_linear(x, w, bias, nl, backend="cpu")
    grad = torch.randn_like(out)
    out.backward(grad)
    xr, wr, br = (t.detach().clone().requires_grad_(n) for t, n in zip((x, w, bias), needs))
    loop_reference(xr, wr, br, nl).backward(grad)
    for t, r, n in zip((x, w, bias), (xr, wr, br), needs):
        if n:
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-12, atol=1e-12)
        else:
            assert t.grad is None


@needs_ext
def test_large_weight_gradient_buffers_are_recycled_correctly():
    """grad_weight of 4 MiB or more comes from a cache of recycled blocks: a reused (dirty)
    block must be fully overwritten, including the zero gradient of unused layers."""
    k, i, o, nl = 3, 512, 1000, 10  # 6 MB float32 gradient
    x, w, bias = _inputs(k * nl, k, i, o, dtype=torch.float32)
    g1 = torch.autograd.grad(noisy_linear(x, w, bias, nl, backend="cpu").sum(), w)[0]
    del g1  # back into the cache
    x2 = x[:nl + 3].detach().requires_grad_()  # two layers in use: layer 2 must be zeroed
    out = noisy_linear(x2, w, bias, nl, backend="cpu")
    grad = torch.randn_like(out)
    g2 = torch.autograd.grad(out, w, grad)[0]
    ref = torch.autograd.grad(noisy_linear_reference(x2, w, bias, nl), w, grad)[0]
    torch.testing.assert_close(g2, ref, rtol=1e-5, atol=1e-4)
    assert torch.all(g2[2] == 0)
    g3 = torch.autograd.grad(noisy_linear(x2, w, bias, nl, backend="cpu"), w, grad)[0]  # another block
    torch.testing.assert_close(g3, g2, rtol=0, atol=0)


@needs_ext
def test_deterministic_across_thread_counts():
    x, w, bias = _inputs(400, 40, 64, 100, dtype=torch.float32)
    grad = torch.randn(400, 100)
    results = []
    n0 = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = noisy_linear(x, w, bias, 10, backend="cpu")
            results.append((out,) + torch.autograd.grad(out, (x, w, bias), grad))
    finally:
        torch.set_num_threads(n0)
    for res in results[1:]:
        for a, b in zip(results[0], res):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_falls_back_to_batched_matmul(dtype):
    b, k, i, o, nl = 20, 2, 16, 8, 10
    x, w, bias = _inputs(b, k, i, o, dtype=dtype)
    out = noisy_linear(x, w, bias, nl)
    assert out.dtype == dtype
    ref = loop_reference(x.double(), w.double(), bias.double(), nl)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.float16 else dict(rtol=5e-2, atol=2e-1)
    torch.testing.assert_close(out.double(), ref, **tol)
    out.float().sum().backward()
    assert w.grad.dtype == dtype and w.grad.shape == w.shape


def test_reference_backend_matches_loop():
    x, w, bias = _inputs(35, 4, 6, 7)
    torch.testing.assert_close(noisy_linear(x, w, bias, 10, backend="reference"), loop_reference(x, w, bias, 10),
                               rtol=1e-12, atol=1e-12)


def test_bad_input_is_a_clear_error():
    x, w, bias = _inputs(20, 2, 6, 5, requires_grad=(False, False, False))
    with pytest.raises(ValueError, match="exceeds"):
        noisy_linear(torch.randn(21, 6, dtype=torch.float64), w, bias, 10)
    with pytest.raises(ValueError, match="x must be"):
        noisy_linear(torch.randn(20, 7, dtype=torch.float64), w, bias, 10)
    with pytest.raises(ValueError, match="bias must be"):
        noisy_linear(x, w, bias[:, :4], 10)
    with pytest.raises(ValueError, match="weight must have 3"):
        noisy_linear(x, w[0], bias, 10)
    with pytest.raises(TypeError, match="share one dtype"):
        noisy_linear(x.float(), w, bias, 10)
    with pytest.raises(TypeError, match="x must be a floating"):
        noisy_linear(x.long(), w, bias, 10)
    with pytest.raises(ValueError, match=r"nl \(rows per layer\) must be a positive int, got 0"):
        noisy_linear(x, w, bias, 0)
    for nl in (2.5, True, torch.tensor(10)):
        with pytest.raises(TypeError, match=r"nl \(rows per layer\) must be a positive int"):
            noisy_linear(x, w, bias, nl)


@needs_ext
def test_opcheck():
    x, w, bias = _inputs(23, 3, 9, 11, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastsynth.noisy_linear.default, (x, w, bias, 8))
    g = torch.randn(23, 11)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.fastsynth.noisy_linear_backward.default,
                              (g, x.detach(), w.detach(), 8) + needs)


@needs_ext
def test_torch_compile_fullgraph_forward_backward():
    layers = NoisyLayers(4, 12, 9, 5).double()
    x = torch.randn(18, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(18, 9, dtype=torch.float64)

    def step(x):
        return (layers(x) * grad).sum()

    compiled = torch.compile(step, fullgraph=True)  # inductor
    loss = compiled(x)
    got = torch.autograd.grad(loss, (x, layers.weight, layers.bias))
    want_loss = (loop_reference(x, layers.weight, layers.bias, 5) * grad).sum()
    want = torch.autograd.grad(want_loss, (x, layers.weight, layers.bias), allow_unused=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_ext
def test_automatic_backend_fused_for_few_rows_per_layer_batched_gemm_above():
    from fastsynth.bench.harness import AtenOpCounter
    from fastsynth.ops.noisy_linear import FUSED_MAX_NL

    for nl, fused in ((10, True), (FUSED_MAX_NL + 1, False)):
        layers = NoisyLayers(2, 8, 6, nl)
        x = torch.randn(2 * nl - 1, 8)
        with AtenOpCounter() as counter:
            out = layers(x)
        assert (counter.counts.get("fastsynth.noisy_linear", 0) == 1) == fused, counter.counts
        assert (counter.counts.get("aten.baddbmm", 0) == 1) == (not fused), counter.counts
        torch.testing.assert_close(out, loop_reference(x, layers.weight, layers.bias, nl), rtol=1e-5, atol=1e-5)


def test_route_is_the_documented_table():
    from fastsynth.ops.noisy_linear import FUSED_MAX_NL, route

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ext = _ext.has_extension()
    for dtype in (torch.float32, torch.float64):
        assert route(None, cpu, dtype, 10) == ("fused_cpu" if ext else "batched_gemm")
        assert route(None, cpu, dtype, FUSED_MAX_NL + 1) == "batched_gemm"
        assert route("reference", cpu, dtype, 10) == "batched_gemm"
        if ext:
            assert route("cpu", cpu, dtype, FUSED_MAX_NL + 1) == "fused_cpu"  # asked for: no size rule
    for dtype in (torch.float16, torch.bfloat16):
        assert route(None, cpu, dtype, 10) == "batched_gemm"
    # CUDA tensors: cuBLAS's batched GEMM is the implementation (decided without a GPU present)
    for dtype in (torch.float16, torch.float32, torch.float64):
        for nl in (1, 10, 1000):
            assert route(None, cuda, dtype, nl) == "batched_gemm"
    assert route("reference", cuda, torch.float32, 10) == "batched_gemm"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backends_without_a_kernel_are_refused_not_rerouted(backend):
    x, w, bias = _inputs(20, 2, 6, 5, dtype=torch.float32, requires_grad=(False, False, False))
    with pytest.raises(ValueError, match=rf"backend='{backend}': noisy_linear has no {backend} kernel.*batched GEMM"):
        noisy_linear(x, w, bias, 10, backend=backend)


@needs_ext
def test_cpu_backend_on_half_precision_is_the_batched_gemm():
    from fastsynth.ops.noisy_linear import route

    for dtype in (torch.float16, torch.bfloat16):
        assert route("cpu", torch.device("cpu"), dtype, 10) == "batched_gemm"


@pytest.mark.needs_cuda
def test_cuda_runs_the_batched_gemm():
    from fastsynth.bench.harness import AtenOpCounter

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w, bias = (t.cuda() for t in _inputs(37, 4, 12, 9, dtype=torch.float32, requires_grad=(False, False, False)))
    with AtenOpCounter() as counter:
        out = noisy_linear(x, w, bias, 10)
    assert counter.counts.get("aten.baddbmm", 0) == 1, counter.counts
    ref = loop_reference(x.double(), w.double(), bias.double(), 10)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
