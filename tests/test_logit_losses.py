"""Fused teacher/student logit losses: synthesis_logit_loss, kd_loss, js_divergence and the
drop-in kldiv / KLDiv / jsdiv, against float64 references of the upstream formulations."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastsynth
from fastsynth import _ext
from fastsynth.bench.harness import count_aten_ops
from fastsynth.bench.reference_loops import upstream_jsdiv, upstream_kldiv
from fastsynth.ops import logit_losses as ll
from helpers import compile_triton_for_gpu

FUSED = ["cpu", "triton"]
CLASSES = [2, 10, 100, 1000, 1023]
# tolerances of the gradients (elementwise, absolute; they are probabilities / N) and of the loss
# (relative) per input dtype: fp32 math everywhere, gradients rounded to the input dtype
GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


# ---------------------------------------------------------------------------------------------
# float64 oracles, written independently of fastsynth (the upstream formulation, autograd grads)
# ---------------------------------------------------------------------------------------------

def kl_rows(t, s):
    # KL(softmax(t) || softmax(s)) per row, the upstream kldiv(s, t, reduction='none').sum(1),
    # written with log_softmax for p_t: F.kl_div's gradient w.r.t. its target is log(target) + 1 -
    # input, which is -inf where a teacher probability underflows to 0 (logits of 1e4), so
    # autograd of the upstream code gives NaN teacher gradients there; this form gives the limit.
    lpt = F.log_softmax(t, dim=1)
    return (lpt.exp() * (lpt - F.log_softmax(s, dim=1))).sum(1)


def logit_loss_reference(kind, t, s, y=None, *, oh=1.0, adv=1.0, mask="agree", T=1.0, grad_out=1.0):
    """float64 loss, parts and gradients w.r.t. (t, s) of the upstream formulation."""
    t64 = t.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    parts = {}
    if kind == "synthesis":
        loss_oh = F.cross_entropy(t64, y)
        kl = kl_rows(t64, s64)
        m = (s64.argmax(1) == t64.argmax(1)).double() if mask == "agree" else torch.ones_like(kl)
        loss_adv = -(kl * m).mean()
        loss = oh * loss_oh + adv * loss_adv
        parts = {"oh": loss_oh.detach(), "adv": loss_adv.detach(), "agree_frac": m.mean()}
    elif kind == "kd":
        loss = kl_rows(t64 / T, s64 / T).mean() * (T * T)
    else:
        loss = upstream_jsdiv(s64, t64, T=T)
    gt, gs = torch.autograd.grad(loss, [t64, s64], torch.tensor(grad_out, dtype=torch.float64))
    return loss.detach(), parts, gt, gs


def run(kind, backend, t, s, y=None, *, oh=1.0, adv=1.0, mask="agree", T=1.0, grad_out=1.0):
    """fastsynth loss, parts and gradients w.r.t. (t, s)."""
    t = t.detach().requires_grad_()
    s = s.detach().requires_grad_()
    parts = {}
    if kind == "synthesis":
        loss, parts = fastsynth.ops.synthesis_logit_loss(t, s, y, oh=oh, adv=adv, mask=mask, backend=backend)
    elif kind == "kd":
        loss = fastsynth.ops.kd_loss(s, t, T, backend=backend)
    else:
        loss = fastsynth.ops.js_divergence(s, t, T=T, backend=backend)
    gt, gs = torch.autograd.grad(loss, [t, s], torch.tensor(grad_out, dtype=loss.dtype))
    return loss.detach(), parts, gt, gs


def make_logits(n, c, scale=3.0, dtype=torch.float32, agree_some=True):
    t = torch.randn(n, c, dtype=torch.float64) * scale
    s = 0.6 * t + torch.randn(n, c, dtype=torch.float64) * scale
    if agree_some and n > 1:
        s[::2] = t[::2] * 1.5 + 0.1 * torch.randn_like(t[::2])  # these rows (mostly) agree on argmax
    return t.to(dtype), s.to(dtype)


def assert_matches(got, ref, dtype, what=""):
    loss, parts, gt, gs = got
    rloss, rparts, rgt, rgs = ref
    rtol = LOSS_RTOL[dtype]
    assert torch.isfinite(loss).all() and torch.isfinite(gt).all() and torch.isfinite(gs).all(), what
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=rtol * 1e-2, msg=lambda m: f"{what} loss: {m}")
    for k, v in rparts.items():
        torch.testing.assert_close(parts[k].double(), v, rtol=rtol, atol=rtol * 1e-2, msg=lambda m: f"{what} {k}: {m}")
    atol = GRAD_ATOL[dtype]
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-3 if dtype != torch.float64 else 1e-7, atol=atol,
                               msg=lambda m: f"{what} grad teacher: {m}")
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-3 if dtype != torch.float64 else 1e-7, atol=atol,
                               msg=lambda m: f"{what} grad student: {m}")


# ---------------------------------------------------------------------------------------------
# Against float64 references
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("mask", ["agree", None])
def test_synthesis_matches_float64(backend, C, mask):
    t, s = make_logits(6, C)
    y = torch.randint(0, C, (6,))
    got = run("synthesis", backend, t, s, y, oh=0.7, adv=1.33, mask=mask, grad_out=2.5)
    ref = logit_loss_reference("synthesis", t, s, y, oh=0.7, adv=1.33, mask=mask, grad_out=2.5)
    assert_matches(got, ref, torch.float32, f"{backend} C={C} mask={mask}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("kind,T", [("kd", 20.0), ("kd", 1.0), ("js", 3.0), ("js", 1.0)])
def test_kd_and_js_match_float64(backend, C, kind, T):
    t, s = make_logits(5, C)
    got = run(kind, backend, t, s, T=T, grad_out=-0.75)
    ref = logit_loss_reference(kind, t, s, T=T, grad_out=-0.75)
    assert_matches(got, ref, torch.float32, f"{kind} {backend} C={C} T={T}")


@pytest.mark.parametrize("C", [10, 1000])
def test_reference_backend_is_the_upstream_formulation(C):
    t, s = make_logits(6, C)
    y = torch.randint(0, C, (6,))
    assert_matches(run("synthesis", "reference", t, s, y, oh=0.7, adv=1.33, grad_out=2.5),
                   logit_loss_reference("synthesis", t, s, y, oh=0.7, adv=1.33, grad_out=2.5), torch.float32)
    for kind, T in (("kd", 20.0), ("js", 3.0)):
        assert_matches(run(kind, "reference", t, s, T=T), logit_loss_reference(kind, t, s, T=T), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["synthesis", "kd", "js"])
def test_float64_inputs_are_computed_in_float64(backend, kind):
    t, s = make_logits(4, 33, dtype=torch.float64)
    y = torch.randint(0, 33, (4,))
    got = run(kind, backend, t, s, y, T=2.0, grad_out=1.5)
    ref = logit_loss_reference(kind, t, s, y, T=2.0, grad_out=1.5)
    assert got[0].dtype == torch.float64 and got[2].dtype == torch.float64
    tol = 1e-12
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[2], ref[2], rtol=tol, atol=tol)
    torch.testing.assert_close(got[3], ref[3], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck(backend):
    t, s = make_logits(2, 5, dtype=torch.float64)
    t.requires_grad_()
    s.requires_grad_()
    y = torch.tensor([0, 4])
    ops = fastsynth.ops
    fns = [
        lambda a, b: ops.synthesis_logit_loss(a, b, y, oh=0.5, adv=1.3, backend=backend)[0],
        lambda a, b: ops.synthesis_logit_loss(a, b, y, oh=0.5, adv=1.3, mask=None, backend=backend)[0],
        lambda a, b: ops.kd_loss(b, a, 4.0, backend=backend),
        lambda a, b: ops.js_divergence(b, a, T=1.0, backend=backend),
    ]
    tol = dict(atol=1e-6, rtol=1e-5)
    for fn in fns:
        # the interpreted Triton kernels are slow: the fast (random-projection) mode there
        assert torch.autograd.gradcheck(fn, (t, s), eps=1e-6, fast_mode=backend == "triton", **tol)


# ---------------------------------------------------------------------------------------------
# Masks, ties, edge cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_single_row(backend):
    t, s = make_logits(1, 17)
    y = torch.tensor([3])
    assert_matches(run("synthesis", backend, t, s, y, adv=2.0), logit_loss_reference("synthesis", t, s, y, adv=2.0), torch.float32)
    assert_matches(run("kd", backend, t, s, T=5.0), logit_loss_reference("kd", t, s, T=5.0), torch.float32)
    assert_matches(run("js", backend, t, s, T=3.0), logit_loss_reference("js", t, s, T=3.0), torch.float32)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_all_rows_masked_gives_zero_adv_and_zero_student_grad(backend):
    t = torch.randn(8, 10) * 5
    s = -t  # argmax of s is the argmin of t: every row disagrees
    y = torch.randint(0, 10, (8,))
    loss, parts, gt, gs = run("synthesis", backend, t, s, y, oh=0.0, adv=1.33)
    assert float(parts["agree_frac"]) == 0.0
    assert float(parts["adv"]) == 0.0 and float(loss) == 0.0
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))
    # with the CE term the teacher gradient is the CE gradient alone, never NaN
    loss, parts, gt, gs = run("synthesis", backend, t, s, y, oh=0.5, adv=1.33)
    ref = logit_loss_reference("synthesis", t, s, y, oh=0.5, adv=1.33)
    assert_matches((loss, parts, gt, gs), ref, torch.float32)
    assert torch.equal(gs, torch.zeros_like(gs))


@pytest.mark.parametrize("backend", FUSED)
def test_no_rows_masked(backend):
    t = torch.randn(8, 50) * 2
    s = 1.7 * t + 0.3  # same argmax in every row, different distributions
    y = torch.randint(0, 50, (8,))
    got = run("synthesis", backend, t, s, y, oh=0.5, adv=1.0)
    assert float(got[1]["agree_frac"]) == 1.0
    assert float(got[1]["adv"]) < 0
    assert_matches(got, logit_loss_reference("synthesis", t, s, y, oh=0.5, adv=1.0), torch.float32)
    nomask = run("synthesis", backend, t, s, y, oh=0.5, adv=1.0, mask=None)
    torch.testing.assert_close(nomask[0], got[0])


@pytest.mark.parametrize("backend", FUSED)
def test_argmax_ties_follow_torch_argmax(backend):
    # first maximal index wins in both tensors; rows crafted so the tie rule decides the mask
    t = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0]])
    s = torch.tensor([[3.0, 1.0, 3.0, 0.0], [0.0, 3.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # wide rows: ties between the lanes of the vectorised argmax and across Triton chunks
    wide_t = torch.zeros(2, 40)
    wide_s = torch.zeros(2, 40)
    wide_t[:, [5, 21, 37]] = 4.0
    wide_s[0, [5, 37]] = 4.0
    wide_s[1, [21, 37]] = 4.0
    t = torch.cat([F.pad(t, (0, 36), value=-9.0), wide_t])
    s = torch.cat([F.pad(s, (0, 36), value=-9.0), wide_s])
    y = torch.zeros(6, dtype=torch.int64)
    expected = (s.argmax(1) == t.argmax(1)).float().mean()
    loss, parts, gt, gs = run("synthesis", backend, t, s, y, adv=1.0)
    assert float(parts["agree_frac"]) == float(expected)
    assert_matches((loss, parts, gt, gs), logit_loss_reference("synthesis", t, s, y, adv=1.0), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_triton_and_cpu_multi_chunk_rows(backend, monkeypatch):
    # rows wider than one Triton chunk (online LSE across chunks, max growing chunk by chunk)
    from fastsynth.kernels import logit_losses as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 64)
    C = 300
    ramp = torch.linspace(0, 30, C)
    t = torch.randn(3, C) + ramp
    s = torch.randn(3, C) + ramp.flip(0)
    s[1] = t[1] * 1.1
    y = torch.tensor([299, 0, 150])
    assert_matches(run("synthesis", backend, t, s, y, oh=0.5, adv=1.2, grad_out=3.0),
                   logit_loss_reference("synthesis", t, s, y, oh=0.5, adv=1.2, grad_out=3.0), torch.float32)
    assert_matches(run("kd", backend, t, s, T=4.0), logit_loss_reference("kd", t, s, T=4.0), torch.float32)
    assert_matches(run("js", backend, t, s, T=3.0), logit_loss_reference("js", t, s, T=3.0), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C", [10, 100])  # CPU: one row per SIMD lane (C <= 64), row by row (C > 64)
def test_extreme_logits(backend, C):
    torch.manual_seed(3)
    t = (torch.randint(0, 2, (4, C)).float() * 2 - 1) * 1e4 + torch.randn(4, C)
    s = (torch.randint(0, 2, (4, C)).float() * 2 - 1) * 1e4 + torch.randn(4, C)
    s[0] = t[0] + 0.5 * torch.randn(C)  # agreeing row with a small KL next to huge logits
    y = torch.randint(0, C, (4,))
    for kind, kw in (("synthesis", dict(oh=0.5, adv=1.0)), ("kd", dict(T=20.0)), ("js", dict(T=3.0))):
        loss, parts, gt, gs = run(kind, backend, t, s, y, **kw)
        rloss, rparts, rgt, rgs = logit_loss_reference(kind, t, s, y, **kw)
        assert torch.isfinite(loss) and torch.isfinite(gt).all() and torch.isfinite(gs).all()
        # fp32 logits of magnitude 1e4 carry an absolute rounding of ~1e-3 (the fp32 upstream
        # formulation has the same); the loss is compared at that scale
        torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=2e-3)
        # the teacher-side KD gradient (only where the teacher requires grad) is p_t times a log
        # ratio of magnitude ~1e3 (logits 1e4 / T = 20), whose fp32 ulp is 6e-5; at C = 10 the
        # p_t are large enough for that to show (the fp32 upstream formulation gives NaN there)
        gt_atol = 5e-4 if kind == "kd" else 1e-5
        torch.testing.assert_close(gt.double(), rgt, rtol=1e-3, atol=gt_atol)
        torch.testing.assert_close(gs.double(), rgs, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["synthesis", "kd", "js"])
@pytest.mark.parametrize("T,oh,adv", [(3.0, 0.1, 1.0 / 3), (0.7, 1.0 / 7, 2.9)])
def test_float64_scalars_reach_the_kernels_in_float64(backend, kind, T, oh, adv):
    # 1/T, oh/N, adv/N and the clamp bounds not representable in fp32: an fp32 scalar leaves a
    # relative error of ~1e-8 on the loss and the gradients
    t, s = make_logits(7, 45, dtype=torch.float64)
    y = torch.randint(0, 45, (7,))
    got = run(kind, backend, t, s, y, T=T, oh=oh, adv=adv, grad_out=1.3)
    ref = logit_loss_reference(kind, t, s, y, T=T, oh=oh, adv=adv, grad_out=1.3)
    for g, r in zip((got[0], got[2], got[3]), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    if kind == "js":  # clamp bounds
        lo, hi = 0.1 / 3, 1 - 0.1 / 3
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fastsynth.ops.js_divergence(a, b, T=T, clamp=(lo, hi), backend=backend)
        ga = torch.autograd.grad(loss, a)[0]
        a2 = s.clone().requires_grad_()
        rloss = upstream_jsdiv_clamp(a2, t, T, lo, hi)
        rga = torch.autograd.grad(rloss, a2)[0]
        torch.testing.assert_close(loss, rloss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ga, rga, rtol=1e-12, atol=1e-14)


def upstream_jsdiv_clamp(logits, targets, T, lo, hi):
    P = F.softmax(logits / T, dim=1)
    Q = F.softmax(targets / T, dim=1)
    M = 0.5 * (P + Q)
    P, Q, M = torch.clamp(P, lo, hi), torch.clamp(Q, lo, hi), torch.clamp(M, lo, hi)
    return (0.5 * F.kl_div(torch.log(P), M, reduction="batchmean")
            + 0.5 * F.kl_div(torch.log(Q), M, reduction="batchmean"))


# ---------------------------------------------------------------------------------------------
# Non-finite logits: NaN in gives NaN out; -inf is a probability of 0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C", [10, 100, 300])  # CPU lanes, CPU rows; 300: several Triton chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_logit_gives_nan_loss(backend, C, dtype, where, monkeypatch):
    from fastsynth.kernels import logit_losses as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 64)
    for col in (0, 37 % C, C - 1):
        t, s = make_logits(5, C, dtype=dtype)
        y = torch.randint(0, C, (5,))
        (s if where == "student" else t)[1, col] = float("nan")
        loss, parts = fastsynth.ops.synthesis_logit_loss(t, s, y, oh=0.5, adv=1.0, backend=backend)
        assert torch.isnan(loss) and torch.isnan(parts["adv"]), (col, loss, parts)
        # the mask follows torch.argmax, for which NaN is the maximum
        expected = (s.argmax(1) == t.argmax(1)).to(parts["agree_frac"].dtype).mean()
        assert abs(float(parts["agree_frac"]) - float(expected)) < 1e-6, col
        # a row whose mask is 0 still reports its NaN (the reference multiplies by the mask)
        nomask = fastsynth.ops.synthesis_logit_loss(t, s, y, oh=0.0, adv=1.0, mask=None, backend=backend)[0]
        assert torch.isnan(nomask)
        assert torch.isnan(fastsynth.ops.kd_loss(s, t, 4.0, backend=backend))
        assert torch.isnan(fastsynth.ops.js_divergence(s, t, backend=backend))
        if where == "teacher":
            assert torch.isnan(parts["oh"])


@pytest.mark.parametrize("backend", FUSED)
def test_nan_argmax_follows_torch(backend):
    # rows where the NaN decides the mask: a NaN in the student at the teacher's argmax agrees,
    # elsewhere disagrees; two NaNs: the first wins
    t = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 4)
    s = torch.tensor([[0.0, 1.0, 9.0, 2.0]] * 4)
    s[0, 1] = float("nan")  # student argmax 1 == teacher argmax 1: agree
    s[1, 3] = float("nan")  # 3 != 1: disagree (the finite max 9 at 2 would disagree too)
    t[2, 2] = float("nan")  # teacher argmax 2 == student argmax 2: agree
    t[3, 0] = float("nan")
    s[3, 0] = float("nan")
    s[3, 2] = float("nan")  # first NaNs at 0 in both: agree
    y = torch.zeros(4, dtype=torch.int64)
    parts = fastsynth.ops.synthesis_logit_loss(t, s, y, backend=backend)[1]
    assert float(parts["agree_frac"]) == float((s.argmax(1) == t.argmax(1)).float().mean()) == 0.75


def kl_limit_rows(t, s):
    # float64 KL rows with p log p = 0 where p_t = 0 (a -inf teacher logit), the limit that the
    # fused kernels compute; F.kl_div gives 0 * inf = NaN where both logits are -inf
    lpt = F.log_softmax(t, dim=1)
    pt = lpt.exp()
    return torch.where(pt == 0, torch.zeros_like(pt), pt * (lpt - F.log_softmax(s, dim=1))).sum(1)


def finite_stand_in(x):
    # -inf replaced by a value 1e4 below the row's smallest finite value: exp underflows to
    # exactly 0 in float64, so losses and gradients equal their limits
    lo = torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf"))).amin(1, keepdim=True) - 1e4
    return torch.where(x == float("-inf"), lo.expand_as(x), x)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C", [10, 100, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neg_inf_logits_give_the_limit(backend, C, dtype, monkeypatch):
    from fastsynth.kernels import logit_losses as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 64)
    t, s = make_logits(6, C, dtype=dtype)
    ninf = float("-inf")
    t[0, 0] = ninf  # the first element: meets the empty running maximum
    t[1, C // 2:] = ninf  # whole chunks of -inf teacher logits next to finite student logits
    t[2, 3] = ninf
    s[2, 3] = ninf  # both -inf in one class: that class has probability 0 in both
    t[3, ::3] = ninf
    s[3, ::3] = ninf
    t[4, 0] = s[4, 0] = 1e30  # huge maxima next to -inf: -inf - 1e30 must stay -inf, exp 0
    t[4, 1] = s[4, 2] = ninf
    if dtype == torch.float64:
        # a huge student logit where the teacher has little mass: the gradient is a difference of
        # two values ~1e30 (d_c - KL), which float32 resolves only to ~1e-3 relative
        s[5, 0] = 1e30
        t[5, 1] = ninf
    y = torch.tensor([1, 0, 4, 1, 0, 2])
    t64, s64 = finite_stand_in(t.double()), finite_stand_in(s.double())
    assert torch.equal(kl_limit_rows(t.double(), s.double()), kl_limit_rows(t64, s64))
    for kind, kw in (("synthesis", dict(oh=0.5, adv=1.3, mask=None)), ("synthesis", dict(oh=0.5, adv=1.3)),
                     ("kd", dict(T=2.5)), ("js", dict(T=3.0))):
        got = run(kind, backend, t, s, y, **kw)
        ref = logit_loss_reference(kind, t64, s64, y, **kw)
        assert_matches(got, ref, dtype, f"{kind} {kw}")


def test_neg_inf_student_logit_gives_infinite_kl():
    # a student -inf where the teacher has mass: KL = +inf on every backend, as the reference
    t, s = make_logits(3, 20)
    s[1, 4] = float("-inf")
    for backend in FUSED + ["reference"]:
        assert fastsynth.ops.kd_loss(s, t, 2.0, backend=backend).item() == float("inf"), backend


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_strided_targets(backend):
    t, s = make_logits(6, 30)
    y_full = torch.randint(0, 30, (12,))
    y = y_full[::2]
    assert not y.is_contiguous()
    got = run("synthesis", backend, t, s, y, oh=0.7, adv=1.1)
    assert_matches(got, logit_loss_reference("synthesis", t, s, y.contiguous(), oh=0.7, adv=1.1), torch.float32)


@pytest.mark.parametrize("n", [1, 16, 17, 50])
@pytest.mark.parametrize("c", [3, 10, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_short_rows_in_lane_blocks(n, c, dtype):
    # C <= 64: the CPU kernel transposes blocks of 16 rows and puts one row per SIMD lane (the
    # last block padded); C = 65 takes the row-by-row path. Both against the float64 oracle.
    torch.manual_seed(n * 100 + c)
    t, s = make_logits(n, c, dtype=dtype)
    y = torch.randint(0, c, (n,))
    assert_matches(run("synthesis", "cpu", t, s, y, oh=0.7, adv=1.3, grad_out=1.7),
                   logit_loss_reference("synthesis", t, s, y, oh=0.7, adv=1.3, grad_out=1.7), dtype, f"n={n} c={c}")
    assert_matches(run("kd", "cpu", t, s, T=4.0, grad_out=0.6), logit_loss_reference("kd", t, s, T=4.0, grad_out=0.6), dtype,
                   f"n={n} c={c}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["column_strided", "row_strided", "transposed"])
def test_non_contiguous_inputs(backend, layout):
    n, c = 5, 37
    base_t, base_s = make_logits(n, 2 * c)
    if layout == "column_strided":
        t, s = base_t[:, ::2], base_s[:, ::2]
    elif layout == "row_strided":
        t, s = base_t[:, :c], base_s[:, c:]
    else:
        t, s = base_t[:, :c].t().contiguous().t(), base_s[:, :c].t().contiguous().t()
    assert not t.is_contiguous()
    y = torch.randint(0, c, (n,))
    assert_matches(run("synthesis", backend, t, s, y, adv=1.0, grad_out=0.5),
                   logit_loss_reference("synthesis", t, s, y, adv=1.0, grad_out=0.5), torch.float32, layout)
    assert_matches(run("kd", backend, t, s, T=3.0), logit_loss_reference("kd", t, s, T=3.0), torch.float32, layout)
    assert_matches(run("js", backend, t, s, T=3.0), logit_loss_reference("js", t, s, T=3.0), torch.float32, layout)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["synthesis", "kd", "js"])
def test_half_precision_inputs(backend, dtype, kind):
    t, s = make_logits(6, 100, dtype=dtype)
    y = torch.randint(0, 100, (6,))
    loss, parts, gt, gs = run(kind, backend, t, s, y, T=4.0, adv=1.0, grad_out=2.0)
    assert loss.dtype == torch.float32 and gt.dtype == dtype and gs.dtype == dtype
    # the oracle sees the same (rounded) half values: fp32 math makes the loss tight; the
    # gradients are rounded to the input dtype
    assert_matches((loss, parts, gt, gs), logit_loss_reference(kind, t, s, y, T=4.0, adv=1.0, grad_out=2.0), dtype)


def test_cpu_and_triton_agree():
    t, s = make_logits(9, 257)
    y = torch.randint(0, 257, (9,))
    for kind in ("synthesis", "kd", "js"):
        a = run(kind, "cpu", t, s, y, T=2.0, adv=1.5, grad_out=1.25)
        b = run(kind, "triton", t, s, y, T=2.0, adv=1.5, grad_out=1.25)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a[2], b[2], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a[3], b[3], rtol=1e-4, atol=1e-7)


def test_cpu_batch_reduction_is_deterministic_across_thread_counts():
    t, s = make_logits(300, 211)
    y = torch.randint(0, 211, (300,))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run("synthesis", "cpu", t, s, y, adv=1.0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("backend", FUSED)
def test_gradients_only_for_inputs_that_require_them(backend):
    t, s = make_logits(4, 20)
    y = torch.randint(0, 20, (4,))
    s_leaf = s.clone().requires_grad_()
    loss, _ = fastsynth.ops.synthesis_logit_loss(t, s_leaf, y, adv=1.0, backend=backend)
    (gs,) = torch.autograd.grad(loss, [s_leaf])
    torch.testing.assert_close(gs.double(), logit_loss_reference("synthesis", t, s, y, adv=1.0)[3], rtol=1e-4, atol=1e-7)
    # KD with a detached teacher (the upstream use), and no grad at all
    kd = fastsynth.ops.kd_loss(s_leaf, t, 20.0, backend=backend)
    (gs,) = torch.autograd.grad(kd, [s_leaf])
    torch.testing.assert_close(gs.double(), logit_loss_reference("kd", t, s, T=20.0)[3], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        loss, parts = fastsynth.ops.synthesis_logit_loss(t, s_leaf, y, backend=backend)
    assert not loss.requires_grad
    assert not any(v.requires_grad for v in parts.values())


@pytest.mark.parametrize("backend", FUSED)
def test_parts_are_detached_and_loss_is_one_op_each_way(backend):
    t, s = make_logits(4, 20)
    t.requires_grad_()
    s.requires_grad_()
    y = torch.randint(0, 20, (4,))
    box = {}

    def fwd():
        box["out"] = fastsynth.ops.synthesis_logit_loss(t, s, y, adv=1.0, backend=backend)

    assert count_aten_ops(fwd) == 1
    loss, parts = box["out"]
    assert loss.requires_grad and not any(v.requires_grad for v in parts.values())
    g = torch.tensor(2.0)
    assert count_aten_ops(lambda: torch.autograd.grad(loss, [t, s], g)) == 1
    assert count_aten_ops(lambda: fastsynth.ops.kd_loss(s, t, 4.0, backend=backend)) == 1
    assert count_aten_ops(lambda: fastsynth.ops.js_divergence(s, t, backend=backend)) == 1


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_bad_input_names_the_argument(backend):
    t, s = make_logits(4, 10)
    y = torch.randint(0, 10, (4,))
    op = fastsynth.ops.synthesis_logit_loss
    with pytest.raises(ValueError, match="student_logits must have the shape of teacher_logits"):
        op(t, s[:, :9], y, backend=backend)
    with pytest.raises(ValueError, match="teacher_logits must have 2 dimensions"):
        op(t[0], s[0], y, backend=backend)
    with pytest.raises(TypeError, match="targets must be int64"):
        op(t, s, y.int(), backend=backend)
    with pytest.raises(TypeError, match="targets must be int64"):
        op(t, s, y.float(), backend=backend)
    with pytest.raises(ValueError, match=r"targets must have shape \[4\]"):
        op(t, s, y[:3], backend=backend)
    with pytest.raises(ValueError, match="teacher_logits must not be empty"):
        op(t[:0], s[:0], y[:0], backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        op(t, s.double(), y, backend=backend)
    with pytest.raises(ValueError, match="mask must be 'agree' or None"):
        op(t, s, y, mask="all", backend=backend)
    with pytest.raises(TypeError, match="oh must be a real number"):
        op(t, s, y, oh=torch.tensor(1.0), backend=backend)
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="T must be a positive finite temperature"):
            fastsynth.ops.kd_loss(s, t, bad_t, backend=backend)
        with pytest.raises(ValueError, match="T must be a positive finite temperature"):
            fastsynth.ops.js_divergence(s, t, T=bad_t, backend=backend)
    with pytest.raises(ValueError, match="clamp must satisfy"):
        fastsynth.ops.js_divergence(s, t, clamp=(0.5, 0.1), backend=backend)
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        fastsynth.ops.kd_loss(s.tolist(), t, 2.0, backend=backend)
    with pytest.raises(ValueError, match="student_logits must not be empty"):
        fastsynth.ops.kd_loss(s[:0], t[:0], 2.0, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_of_range_targets_raise_on_cpu(backend):
    t, s = make_logits(4, 10)
    for bad in (10, -1, -100):
        y = torch.tensor([0, 1, bad, 2])
        with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 10\)"):
            fastsynth.ops.synthesis_logit_loss(t, s, y, backend=backend)


def test_out_of_range_targets_poison_the_loss_on_triton():
    # GPU backends do not sync to check values: the index is clamped and the loss is NaN
    t, s = make_logits(4, 10)
    y = torch.tensor([0, 1, 10, 2])
    loss, parts = fastsynth.ops.synthesis_logit_loss(t, s, y, backend="triton")
    assert torch.isnan(loss) and torch.isnan(parts["oh"])


# ---------------------------------------------------------------------------------------------
# Drop-ins: upstream parity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("T", [1.0, 3.0, 20.0])
def test_dropin_kldiv_and_jsdiv_match_upstream(reduction, T):
    t, s = make_logits(6, 40)
    for ours, theirs in ((fastsynth.kldiv, upstream_kldiv), (fastsynth.jsdiv, upstream_jsdiv)):
        a_s, a_t = s.clone().requires_grad_(), t.clone().requires_grad_()
        b_s, b_t = s.clone().requires_grad_(), t.clone().requires_grad_()
        a = ours(a_s, a_t, T=T, reduction=reduction)
        b = theirs(b_s, b_t, T=T, reduction=reduction)
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)
        g = torch.randn_like(b)
        ga = torch.autograd.grad(a, [a_s, a_t], g)
        gb = torch.autograd.grad(b, [b_s, b_t], g)
        for x, y_ in zip(ga, gb):  # both fp32: compare at fp32 resolution of the largest entry
            torch.testing.assert_close(x, y_, rtol=1e-4, atol=1e-5 * float(y_.abs().max()))
    mod = fastsynth.KLDiv(T=T, reduction=reduction)
    assert isinstance(mod, torch.nn.Module)
    torch.testing.assert_close(mod(s, t), upstream_kldiv(s, t, T=T, reduction=reduction), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("shape", [(), (6, 1)])  # a learnable scalar T; a per-sample T
def test_dropin_kldiv_tensor_temperature(reduction, shape, monkeypatch):
    # upstream kldiv takes T as a tensor (a learnable temperature): loss and gradients w.r.t. both
    # logits AND T as autograd of the upstream formula gives them, in float64
    t, s = make_logits(6, 40, dtype=torch.float64)
    T0 = torch.full(shape, 2.5, dtype=torch.float64) + (torch.rand(shape, dtype=torch.float64) if shape else 0.0)
    fused = reduction != "none" and shape == ()
    if fused:  # a 0-d T runs the fused kernel, never the eager formula
        monkeypatch.setattr(ll, "_upstream_kldiv", lambda *a, **k: pytest.fail("eager formula for a 0-d T"))
    a_s, a_t, a_T = s.clone().requires_grad_(), t.clone().requires_grad_(), T0.clone().requires_grad_()
    b_s, b_t, b_T = s.clone().requires_grad_(), t.clone().requires_grad_(), T0.clone().requires_grad_()
    a = fastsynth.kldiv(a_s, a_t, T=a_T, reduction=reduction)
    b = upstream_kldiv(b_s, b_t, T=b_T, reduction=reduction)
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(b)
    ga = torch.autograd.grad(a, [a_s, a_t, a_T], g)
    gb = torch.autograd.grad(b, [b_s, b_t, b_T], g)
    assert float(gb[2].abs().sum()) > 1e-3  # the temperature's gradient is really checked
    for x, y_ in zip(ga, gb):
        torch.testing.assert_close(x, y_, rtol=1e-9, atol=1e-12)
    # T without grad, teacher detached (student training): the gradient reaches the student only
    c_s = s.clone().requires_grad_()
    c = fastsynth.kldiv(c_s, t, T=T0, reduction=reduction)
    torch.testing.assert_close(c, b.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(c, c_s, g)[0], gb[0], rtol=1e-9, atol=1e-12)


def test_dropin_kldiv_tensor_temperature_fp32_module_and_errors():
    # the module form with a learnable T registers it as a parameter (as upstream) and trains it
    t, s = make_logits(5, 30)
    mod = fastsynth.KLDiv(T=torch.nn.Parameter(torch.tensor(4.0)))
    assert [n for n, _ in mod.named_parameters()] == ["T"]
    s = s.requires_grad_()
    loss = mod(s, t)
    ref_T = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    ref = upstream_kldiv(s.detach().double(), t.double(), T=ref_T)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(mod.T.grad.double(), torch.autograd.grad(ref, ref_T)[0], rtol=1e-4, atol=1e-7)
    # fp16 logits with an fp32 T keep the logits' dtype, as upstream
    h = fastsynth.kldiv(s.detach().half(), t.half(), T=torch.tensor(2.0))
    assert h.dtype == torch.float16
    with pytest.raises(TypeError, match="tensor T must be real"):
        fastsynth.kldiv(s, t, T=torch.tensor(True))


def test_dropins_fall_back_for_other_layouts_and_keep_dtype():
    seg_s, seg_t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)  # segmentation logits
    torch.testing.assert_close(fastsynth.kldiv(seg_s, seg_t, T=2.0), upstream_kldiv(seg_s, seg_t, T=2.0))
    torch.testing.assert_close(fastsynth.jsdiv(seg_s, seg_t), upstream_jsdiv(seg_s, seg_t))
    s, t = make_logits(4, 10, dtype=torch.float16)
    out = fastsynth.kldiv(s, t, T=4.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), upstream_kldiv(s.float(), t.float(), T=4.0), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastsynth.kldiv(s, t, reduction="avg")
    with pytest.raises(ValueError, match="T must be a positive"):
        fastsynth.jsdiv(s, t, T=0)


def test_dropin_used_like_fastdfkd():
    # the FastDFKD synthesizer's adversarial term, written with the drop-in
    t, s = make_logits(8, 10)
    mask = (s.max(1)[1] == t.max(1)[1]).float()
    ours = -(fastsynth.kldiv(s, t, reduction="none").sum(1) * mask).mean()
    fused, parts = fastsynth.ops.synthesis_logit_loss(t, s, torch.zeros(8, dtype=torch.int64), oh=0.0, adv=1.0)
    torch.testing.assert_close(fused, ours, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def _op_samples(suffix):
    t, s = make_logits(3, 12)
    y = torch.randint(0, 12, (3,))
    ns = torch.ops.fastsynth
    rg = lambda x: x.clone().requires_grad_()  # noqa: E731
    return [
        (getattr(ns, "synthesis_logit_loss" + suffix).default, (rg(t), rg(s), y, 0.5, 1.3, True, True, True)),
        (getattr(ns, "synthesis_logit_loss" + suffix).default, (t, rg(s), y, 0.5, 1.3, False, False, True)),
        (getattr(ns, "kd_loss" + suffix).default, (rg(s), t, 4.0, 16.0 / 3, True, False)),
        (getattr(ns, "kd_loss" + suffix).default, (rg(s), rg(t), 4.0, 16.0 / 3, True, True)),
        (getattr(ns, "js_divergence" + suffix).default, (rg(s), rg(t), 3.0, 0.01, 0.99, 1.0 / 3, True, True)),
        (getattr(ns, "logit_loss_backward" + suffix).default, (torch.tensor(2.0), s, t[:0])),
    ]


@pytest.mark.skipif(not _ext.has_extension(), reason="needs fastsynth._C")
def test_opcheck_cpp_ops():
    for op, args in _op_samples(""):
        torch.library.opcheck(op, args)


def test_opcheck_triton_ops():
    for op, args in _op_samples("_triton"):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    t, s = make_logits(4, 30)
    y = torch.randint(0, 30, (4,))

    def step(t, s, y):
        loss, parts = fastsynth.ops.synthesis_logit_loss(t, s, y, oh=0.5, adv=1.33, backend=backend)
        kd = fastsynth.ops.kd_loss(s, t.detach(), 4.0, backend=backend)
        js = fastsynth.ops.js_divergence(s, t, backend=backend)
        return loss + 0.5 * kd - js, parts["agree_frac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    outs = []
    for fn in (step, compiled):
        a, b = t.clone().requires_grad_(), s.clone().requires_grad_()
        total, agree = fn(a, b, y)
        grads = torch.autograd.grad(total * 1.5, [a, b])
        outs.append((total.detach(), agree, *grads))
    for x, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-7)


_AOT_SCRIPT = r"""
from fastsynth.kernels import logit_losses as K

FLOAT_ARGS = {"inv_t", "ce_w", "kl_w", "lo", "hi", "w"}
INT_ARGS = {"stride_t", "stride_s", "C"}
for elem, acc in (("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
    kl = K._kl_rows_kernel_f64 if acc == "fp64" else K._kl_rows_kernel
    js = K._js_rows_kernel_f64 if acc == "fp64" else K._js_rows_kernel
    for fn, cx in (
        (kl, dict(HAS_TARGETS=True, AGREE_MASK=True, WRITE_GT=True, WRITE_GS=True)),
        (kl, dict(HAS_TARGETS=False, AGREE_MASK=False, WRITE_GT=False, WRITE_GS=True)),
        (js, dict(WRITE_GT=True, WRITE_GS=True)),
    ):
        # the *_f64 entry points take fp64 scalars, the others fp32
        sig = signature(fn, elem, INT_ARGS, FLOAT_ARGS, acc, {"y_ptr": "*i64", "part_ptr": "*" + acc})
        cx = dict(cx, BLOCK=1024, ACC=tl.float64 if acc == "fp64" else tl.float32)
        compile_kernel(fn, sig, cx, (elem,))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_row_kernels_compile_for_gpus(arch):
    compile_triton_for_gpu(_AOT_SCRIPT, arch)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("C", [2, 10, 100, 1000, 1023, 21843])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_float64(backend, C, dtype):
    t, s = make_logits(33, C, dtype=dtype)
    t, s = t.cuda(), s.cuda()
    y = torch.randint(0, C, (33,), device="cuda")
    for kind in ("synthesis", "kd", "js"):
        got = run(kind, backend, t, s, y, T=3.0, adv=1.3, oh=0.5, grad_out=2.0)
        ref = logit_loss_reference(kind, t, s, y, T=3.0, adv=1.3, oh=0.5, grad_out=2.0)
        got = tuple(x.cpu() if isinstance(x, torch.Tensor) else {k: v.cpu() for k, v in x.items()} for x in got)
        ref = tuple(x.cpu() if isinstance(x, torch.Tensor) else {k: v.cpu() for k, v in x.items()} for x in ref)
        assert_matches(got, ref, dtype if dtype != torch.float64 else torch.float32, f"{kind} {backend} {C} {dtype}")


@pytest.mark.needs_cuda
def test_cuda_graph_capture_of_forward_backward():
    t, s = make_logits(64, 1000)
    t, s = t.cuda().requires_grad_(), s.cuda().requires_grad_()
    y = torch.randint(0, 1000, (64,), device="cuda")
    g = torch.tensor(1.7, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up
            loss, _ = fastsynth.ops.synthesis_logit_loss(t, s, y, adv=1.0)
            torch.autograd.grad(loss, [t, s], g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, _ = fastsynth.ops.synthesis_logit_loss(t, s, y, adv=1.0)
        gt, gs = torch.autograd.grad(loss, [t, s], g)
    graph.replay()
    torch.cuda.synchronize()
    ref = logit_loss_reference("synthesis", t, s, y, adv=1.0, grad_out=1.7)
    torch.testing.assert_close(loss.double().cpu(), ref[0].cpu(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs.double().cpu(), ref[3].cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.needs_cuda
def test_cuda_backward_checks_the_device_of_grad_loss():
    # the kernel dereferences grad_loss on the device: a host tensor must be refused, not read
    g = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="grad_loss must be a CUDA tensor"):
        torch.ops.fastsynth.logit_loss_backward(torch.tensor(1.0), g, g[:0])


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("C", [10, 1000, 21843])
def test_cuda_non_finite_logits(backend, C):
    # NaN in gives NaN out with torch.argmax's mask; -inf gives the float64 limit (as on the CPU)
    t, s = make_logits(6, C)
    s[1, C // 3] = float("nan")
    loss, parts = fastsynth.ops.synthesis_logit_loss(t.cuda(), s.cuda(), torch.zeros(6, dtype=torch.int64).cuda(),
                                                     backend=backend)
    assert torch.isnan(loss) and torch.isnan(parts["adv"])
    assert float(parts["agree_frac"]) == float((s.argmax(1) == t.argmax(1)).float().mean())
    assert torch.isnan(fastsynth.ops.kd_loss(t.cuda(), s.cuda(), 4.0, backend=backend))
    assert torch.isnan(fastsynth.ops.js_divergence(s.cuda(), t.cuda(), backend=backend))
    t, s = make_logits(6, C)
    t[0, 0] = t[2, 3] = s[2, 3] = float("-inf")
    t[1, C // 2:] = float("-inf")
    y = torch.tensor([1, 0, 4, 1, 0, 2])
    t64, s64 = finite_stand_in(t.double()), finite_stand_in(s.double())
    for kind, kw in (("synthesis", dict(oh=0.5, adv=1.3, mask=None)), ("kd", dict(T=2.5)), ("js", dict(T=3.0))):
        got = run(kind, backend, t.cuda(), s.cuda(), y.cuda(), **kw)
        got = tuple(x.cpu() if isinstance(x, torch.Tensor) else {k: v.cpu() for k, v in x.items()} for x in got)
        assert_matches(got, logit_loss_reference(kind, t64, s64, y, **kw), torch.float32, f"{kind} {backend} {C}")
