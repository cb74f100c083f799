"""Fused contrastive cross-entropy and per-instance channel means (fastsynth/ops/contrastive_loss.py)."""
import pytest
import torch

from fastsynth import _ext
from fastsynth.ops import contrastive_loss as cl
from fastsynth.ops.contrastive_loss import contrastive_ce, instance_mean_multi, instance_mean_multi_reference
from helpers import compile_triton_for_gpu

HAS_EXT = _ext.has_extension() and hasattr(torch.ops.fastsynth, "contrastive_ce")
BACKENDS = (["cpu"] if HAS_EXT else []) + ["triton"]
TOL = {  # (rtol of the loss, gradient error relative to the gradient's max magnitude)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 3e-2),
}


def make_pair(m, d, dtype=torch.float32, normalize=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64)
    k = torch.randn(m, d, generator=g, dtype=torch.float64)
    if normalize:  # CMI's head output is L2-normalised
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k + 0.5 * q, dim=1)
    return q.to(dtype), k.to(dtype)


def run(backend, q, k, T, n_split, grad_out=1.0, grad_keys=True):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_(grad_keys)
    loss = contrastive_ce(q, k, T, n_split, backend=backend)
    wrt = [q, k] if grad_keys else [q]
    grads = torch.autograd.grad(loss, wrt, torch.tensor(grad_out, dtype=loss.dtype))
    return loss.detach(), grads


def contrastive_ce_reference(q, k, T, n_split, grad_out=1.0, grad_keys=True):
    """float64 loss and gradients (the reference backend on float64 copies)."""
    return run("reference", q.double(), k.double(), T, n_split, grad_out, grad_keys)


def assert_close(got, ref, dtype, what):
    rl, rg = TOL[dtype]
    loss, grads = got
    rloss, rgrads = ref
    torch.testing.assert_close(loss.double(), rloss, rtol=rl, atol=rl * 1e-3, msg=what)
    for g, r in zip(grads, rgrads):
        assert g.dtype == dtype, what
        err = (g.double() - r).abs().max().item()
        assert err <= rg * r.abs().max().item() + 1e-12, f"{what}: grad error {err} vs scale {r.abs().max().item()}"


def test_reference_is_upstream_formula():
    q, k = make_pair(9, 5, torch.float64)
    logits = q @ k.T / 0.2
    per_row = torch.nn.functional.cross_entropy(logits, torch.arange(9), reduction="none")
    want = per_row[:4].mean() + per_row[4:].mean()
    torch.testing.assert_close(cl.contrastive_ce_reference(q, k, 0.2, 4), want)
    torch.testing.assert_close(cl.contrastive_ce_reference(q, k, 0.2, 9), per_row.mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,d,n_split", [(1, 1, 1), (7, 3, 3), (33, 17, 33), (40, 128, 8), (300, 24, 37)])
def test_matches_float64(backend, m, d, n_split):
    if backend == "triton" and m * d > 40 * 128:
        pytest.skip("interpreter: small shapes only")
    q, k = make_pair(m, d)
    got = run(backend, q, k, 0.2, n_split, grad_out=1.7)
    ref = contrastive_ce_reference(q, k, 0.2, n_split, grad_out=1.7)
    assert_close(got, ref, torch.float32, f"{backend} {m}x{d} split {n_split}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    q, k = make_pair(37, 20, dtype)
    got = run(backend, q, k, 0.5, 16)
    ref = contrastive_ce_reference(q, k, 0.5, 16)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, ref, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_detached_keys(backend):
    q, k = make_pair(21, 26)
    qt = torch.randn(26, 21, dtype=torch.float32).T  # transposed view
    qt.copy_(q)
    ks = torch.zeros(21, 52)[:, ::2]  # strided columns
    ks.copy_(k)
    assert not qt.is_contiguous() and not ks.is_contiguous()
    got = run(backend, qt, ks, 0.1, 5, grad_keys=False)
    ref = contrastive_ce_reference(q, k, 0.1, 5, grad_keys=False)
    assert len(got[1]) == 1
    assert_close(got, ref, torch.float32, f"{backend} non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_multiple_row_blocks_and_large_logits(backend):
    # unnormalised rows and a small temperature: similarities in the hundreds (log-sum-exp must be
    # stabilised); CPU: M > 256 crosses row blocks
    m = 300 if backend == "cpu" else 40
    q, k = make_pair(m, 8, normalize=False, seed=3)
    got = run(backend, q, k, 0.05, m - 7, grad_out=0.3)
    ref = contrastive_ce_reference(q, k, 0.05, m - 7, grad_out=0.3)
    assert torch.isfinite(got[0])
    assert_close(got, ref, torch.float32, f"{backend} large logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    q, k = make_pair(6, 4, torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: contrastive_ce(a, b, 0.3, 2, backend=backend), (q, k))


def test_backends_agree():
    if not HAS_EXT:
        pytest.skip("needs fastsynth._C")
    q, k = make_pair(45, 32)
    a = run("cpu", q, k, 0.2, 9)
    b = run("triton", q, k, 0.2, 9)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_bad_input():
    q, k = make_pair(8, 4)
    with pytest.raises(ValueError, match="keys must have the feature dimension"):
        contrastive_ce(q, k[:, :3], 0.2)
    with pytest.raises(ValueError, match="one row per query"):
        contrastive_ce(q, k[:5], 0.2)
    with pytest.raises(ValueError, match="n_split must be in"):
        contrastive_ce(q, k, 0.2, n_split=9)
    with pytest.raises(ValueError, match="n_split must be in"):
        contrastive_ce(q, k, 0.2, n_split=0)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_ce(q, k, 0.0)
    with pytest.raises(TypeError, match="same dtype"):
        contrastive_ce(q, k.double(), 0.2)
    with pytest.raises(ValueError, match="queries must have 2"):
        contrastive_ce(q[None], k, 0.2)
    with pytest.raises(TypeError, match="queries must be a floating"):
        contrastive_ce(q.long(), k, 0.2)


def test_opcheck_and_compile():
    q, k = make_pair(19, 8)
    q.requires_grad_()
    if HAS_EXT:
        torch.library.opcheck(torch.ops.fastsynth.contrastive_ce.default, (q, k, 5.0, 7, True, False))
        xs = [torch.randn(3, 4, 5, 6, requires_grad=True), torch.randn(3, 2, 1, 1, requires_grad=True)]
        torch.library.opcheck(torch.ops.fastsynth.instance_mean_multi.default, (xs,))
    torch.library.opcheck(torch.ops.fastsynth.contrastive_ce_triton.default, (q, k, 5.0, 7, True, False))

    def f(a, b):
        return contrastive_ce(a, b, 0.2, 7, backend="cpu" if HAS_EXT else "triton") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (f, compiled):
        a = q.detach().clone().requires_grad_()
        loss = fn(a, k)
        outs.append((loss.detach(), torch.autograd.grad(loss, a)[0]))
    torch.testing.assert_close(outs[1], outs[0])


# ---------------------------------------------------------------------------------------------
# instance_mean_multi


def _maps(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 3, 7, 9, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(5, 70, 4, 4, generator=g, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)
    c = torch.randn(5, 6, 8, 10, generator=g, dtype=torch.float64).to(dtype)[:, :, ::2, 1::3]  # strided view
    d = torch.randn(5, 2, 1, 1, generator=g, dtype=torch.float64).to(dtype)
    return [a, b, c, d]


@pytest.mark.skipif(not HAS_EXT, reason="needs fastsynth._C")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_instance_mean_matches_float64(dtype):
    xs = [x.requires_grad_() for x in _maps(dtype)]
    out = instance_mean_multi(xs, backend="cpu")
    ref_xs = [x.detach().double().requires_grad_() for x in xs]
    ref = instance_mean_multi_reference(ref_xs)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert out.shape == (5, 3 + 70 + 6 + 2)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    w = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), xs)
    rgrads = torch.autograd.grad((ref * w).sum(), ref_xs)
    for g, r, x in zip(grads, rgrads, xs):
        assert g.dtype == dtype and g.shape == x.shape
        torch.testing.assert_close(g.double(), r, rtol=tol * 10, atol=tol)
    assert grads[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not HAS_EXT, reason="needs fastsynth._C")
def test_instance_mean_gradcheck_and_bad_input():
    xs = [torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: instance_mean_multi([a, b], backend="cpu"), xs)
    with pytest.raises(ValueError, match=r"xs\[1\] has batch"):
        instance_mean_multi([torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"xs\[0\] must have 4"):
        instance_mean_multi([torch.randn(2, 3, 4)])
    with pytest.raises(TypeError, match="non-empty list"):
        instance_mean_multi([])


# ---------------------------------------------------------------------------------------------
# Triton kernels compiled for real GPU targets (the interpreter accepts what the compiler rejects)

_AOT_SCRIPT = r"""
from fastsynth.kernels import contrastive_loss as K

INT_ARGS = {"M", "D", "sqm", "sqd", "skm", "skd", "n_split"}
FLOAT_ARGS = {"scale_hi", "scale_lo"}  # Python floats: fp32 arguments
# ones: integer arguments that Triton's JIT specialises to the constant 1 (M = n_split = 1: a
# single query; sqd = skd = 1: row-major inputs)
CASES = [((), "fp32", "fp32", 64, 128), ((), "fp16", "fp32", 64, 128), ((), "bf16", "fp32", 64, 256),
         ((), "fp64", "fp64", 32, 128), (("M", "n_split", "sqd", "skd"), "bf16", "fp32", 64, 128)]
for ones, elem, acc, bm, bd in CASES:
    for fn in (K._lse_kernel, K._grad_q_kernel, K._grad_k_kernel):
        special = dict({n: "constexpr" for n in ones}, lse_ptr="*" + acc, loss_ptr="*" + acc)
        sig = signature(fn, elem, INT_ARGS, FLOAT_ARGS, "fp32", special)
        cx = {n: 1 for n in ones if n in fn.arg_names}
        cx.update(BM=bm, BN=bm, BD=bd, ACC=tl.float64 if acc == "fp64" else tl.float32,
                  IEEE=elem in ("fp32", "fp64"), UPCAST=False)
        compile_kernel(fn, sig, cx, (elem, ones))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpus(arch):
    compile_triton_for_gpu(_AOT_SCRIPT, arch)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m,d", [(4160, 128), (1000, 256), (77, 13)])
def test_cuda_triton_matches_float64(dtype, m, d):
    q, k = make_pair(m, d, dtype)
    got = run(None, q.cuda(), k.cuda(), 0.2, min(64, m))
    got = (got[0].cpu(), [g.cpu() for g in got[1]])
    ref = contrastive_ce_reference(q, k, 0.2, min(64, m))
    assert_close(got, ref, dtype, f"cuda {dtype} {m}x{d}")


@pytest.mark.needs_cuda
def test_cuda_graph_capture():
    q, k = make_pair(300, 64)
    q, k = q.cuda().requires_grad_(), k.cuda()
    g = torch.tensor(1.3, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.autograd.grad(contrastive_ce(q, k, 0.2, 64), q, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = contrastive_ce(q, k, 0.2, 64)
        (gq,) = torch.autograd.grad(loss, q, g)
    graph.replay()
    ref = contrastive_ce_reference(q.detach().cpu(), k.cpu(), 0.2, 64, grad_out=1.3, grad_keys=False)
    torch.testing.assert_close(loss.cpu().double(), ref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gq.cpu().double(), ref[1][0], rtol=1e-3, atol=1e-5)
