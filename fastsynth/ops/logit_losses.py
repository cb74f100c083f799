"""Teacher/student divergences of a synthesis step (Fast-Datafree's and NAYER's synthesizers) and of
student training (their KD and JS losses); the formulas below are the whole definition.

Notation: teacher logits t, student logits s (both [N, C]), targets y ([N], int64), p = softmax.

``synthesis_logit_loss`` (FastDFKD, NAYER, CMI; temperature 1)::

    CE     = (1/N) sum_i (lse(t_i) - t_i,y_i)                          F.cross_entropy(t, y)
    KL_i   = sum_c p_t,ic (log p_t,ic - log p_s,ic)                    KL(teacher || student)
    m_i    = [argmax s_i == argmax t_i]   (first maximal index wins ties, as torch.argmax;
                                           mask=None: m_i = 1; never differentiated)
    L_adv  = -(1/N) sum_i m_i KL_i                                      (divided by N, not by sum m)
    loss   = oh * CE + adv * L_adv

    dloss/dt_ic = (oh/N) (p_t,ic - [c = y_i]) - (adv m_i / N) p_t,ic (log p_t,ic - log p_s,ic - KL_i)
    dloss/ds_ic = -(adv m_i / N) (p_s,ic - p_t,ic)

``kd_loss`` (student training)::

    loss = T^2 (1/N) sum_i KL(p_t(T)_i || p_s(T)_i),    p(T) = softmax(x / T)
    dloss/ds_ic = (T/N) (p_s(T)_ic - p_t(T)_ic)
    dloss/dt_ic = (T/N) p_t(T)_ic (log p_t(T)_ic - log p_s(T)_ic - KL_i)   (only where the teacher
                                                                             requires grad; upstream
                                                                             detaches it)

``js_divergence`` (DataFree DeepInversion synthesizer, NVlabs ADI; T = 3)::

    P = softmax(s/T), Q = softmax(t/T), M = (P + Q)/2   (M from the UNclamped P, Q), then
    P^, Q^, M^ = clamp(P|Q|M, lo, hi)
    js = (1/N) sum_i sum_c [ 0.5 M^ (log M^ - log P^) + 0.5 M^ (log M^ - log Q^) ]
    (= 0.5 KL(M^||P^) + 0.5 KL(M^||Q^), batchmean; no T^2 factor; L_adv = -js)

    with the gradients autograd gives the upstream code: torch.clamp passes gradient on the closed
    interval [lo, hi] and blocks it outside, and the softmax backward  ds = P (dP - <P, dP>) / T.

Every fused op computes the loss AND its gradients w.r.t. the logits in the same call, row by row
(the CPU kernel sweeps each row three times while it stays in cache; the CUDA and Triton kernels
read it twice: online log-sum-exp, then gradients). The gradients for a unit upstream gradient
are returned as extra outputs; backward is one op,
``logit_loss_backward``, that scales them by grad_output read from the tensor (no host sync, no
``torch.equal(grad_output, 1)`` shortcut). Batch sums over rows are reduced in a fixed order
(per-row partials, then one ordered sum): results do not depend on threads or launch order.

Outputs: the loss and the per-term values are fp32 for fp16/bf16/fp32 inputs and fp64 for fp64
inputs; gradients have the dtype of the logits. Math is fp32 for fp16/bf16 inputs.

Bad input raises TypeError/ValueError naming the argument before a kernel runs. Target range:
checking values needs them on the host, so it is done where they are (CPU tensors: the C++ kernel
checks before computing, raising ValueError; the reference checks them eagerly). On a GPU
(cuda/triton backends) an out-of-range target does not read out of bounds: the kernel clamps the
index and makes that row's CE, hence the loss, NaN, without a host sync.

Backends: reference (eager upstream formulation, float64-capable), cpu (csrc/cpu/logit_losses.cpp),
cuda (csrc/cuda/logit_losses.cu), triton (fastsynth/kernels/logit_losses.py, ops ``fastsynth::*_triton``).
"""
from __future__ import annotations

import importlib
import math
import numbers

import torch
import torch.nn.functional as F

from .. import _ext
from ..backend import check_tensor, resolve_backend

__all__ = [
    "synthesis_logit_loss",
    "kd_loss",
    "js_divergence",
    "synthesis_logit_loss_reference",
    "kd_loss_reference",
    "js_divergence_reference",
]

_MASKS = ("agree", None)


# ---------------------------------------------------------------------------------------------
# Argument validation (before any kernel runs)
# ---------------------------------------------------------------------------------------------

def _check_logit_pair(op: str, a_name: str, a, b_name: str, b) -> None:
    check_tensor(f"{op}: {a_name}", a, ndim=2, nonempty=True)
    check_tensor(f"{op}: {b_name}", b, ndim=2, nonempty=True)
    if a.shape != b.shape:
        raise ValueError(f"{op}: {b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def _real(op: str, name: str, value, kind: str = "a real number") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be {kind}, got {type(value).__name__}")
    return float(value)


def _check_number(op: str, name: str, value) -> float:
    value = _real(op, name, value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def _check_temperature(op: str, T) -> float:
    T = _real(op, "T", T, "a positive real number")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"{op}: T must be a positive finite temperature, got {T}")
    return T


def _check_targets(op: str, targets, n: int, num_classes: int, device: torch.device, eager_range: bool) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor of int64 class indices, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64 class indices, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"{op}: targets must have shape [{n}] (one class index per row), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{op}: targets must be on {device} like the logits, got {targets.device}")
    if eager_range and targets.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(targets)
        if int(lo) < 0 or int(hi) >= num_classes:
            raise ValueError(
                f"{op}: targets must be class indices in [0, {num_classes}), got values in [{int(lo)}, {int(hi)}]"
            )


def _check_clamp(op: str, clamp) -> tuple[float, float]:
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise TypeError(f"{op}: clamp must be a pair (min, max), got {clamp!r}") from None
    lo = _check_number(op, "clamp[0]", lo)
    hi = _check_number(op, "clamp[1]", hi)
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{op}: clamp must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    return lo, hi


def _needs_grad(x: torch.Tensor) -> bool:
    return bool(x.requires_grad and torch.is_grad_enabled())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Eager references: the upstream formulations (also the float64 oracle of the tests)
# ---------------------------------------------------------------------------------------------

def _upstream_kldiv(logits, targets, T=1.0, reduction="batchmean"):
    # KL(softmax(targets/T) || softmax(logits/T)) * T^2, the CMI/FastDFKD criterion
    q = F.log_softmax(logits / T, dim=1)
    p = F.softmax(targets / T, dim=1)
    return F.kl_div(q, p, reduction=reduction) * (T * T)


def _upstream_jsdiv(logits, targets, T=1.0, reduction="batchmean", clamp=(0.01, 0.99)):
    P = F.softmax(logits / T, dim=1)
    Q = F.softmax(targets / T, dim=1)
    M = 0.5 * (P + Q)
    P = torch.clamp(P, clamp[0], clamp[1])
    Q = torch.clamp(Q, clamp[0], clamp[1])
    M = torch.clamp(M, clamp[0], clamp[1])
    return 0.5 * F.kl_div(torch.log(P), M, reduction=reduction) + 0.5 * F.kl_div(torch.log(Q), M, reduction=reduction)


def _opmath(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def synthesis_logit_loss_reference(teacher_logits, student_logits, targets, oh=1.0, adv=1.0, mask="agree"):
    """Eager upstream formulation (cross_entropy + masked kldiv), in fp32 for fp16/bf16 inputs."""
    t, s = _opmath(teacher_logits), _opmath(student_logits)
    loss_oh = F.cross_entropy(t, targets)
    kl = _upstream_kldiv(s, t, reduction="none").sum(1)
    if mask == "agree":
        m = (s.max(1)[1] == t.max(1)[1]).to(kl.dtype)
        loss_adv = -(kl * m).mean()
        agree = m.mean()
    else:
        loss_adv = -kl.mean()
        agree = torch.ones((), dtype=kl.dtype, device=kl.device)
    loss = oh * loss_oh + adv * loss_adv
    return loss, {"oh": loss_oh.detach(), "adv": loss_adv.detach(), "agree_frac": agree.detach()}


def kd_loss_reference(student_logits, teacher_logits, T):
    return _upstream_kldiv(_opmath(student_logits), _opmath(teacher_logits), T=T)


def js_divergence_reference(student_logits, teacher_logits, T=3.0, clamp=(0.01, 0.99)):
    return _upstream_jsdiv(_opmath(student_logits), _opmath(teacher_logits), T=T, clamp=clamp)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd (shared by the C++ ops and the Triton custom ops)
# ---------------------------------------------------------------------------------------------

def _fake_grad(x: torch.Tensor, needed: bool) -> torch.Tensor:
    return x.new_empty(x.shape) if needed else x.new_empty((0,))


def _fake_scalar(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((), dtype=_acc_dtype(x.dtype))


def _synthesis_fake(teacher_logits, student_logits, targets, oh, adv, agree_mask, need_grad_teacher, need_grad_student):
    t = teacher_logits
    return (_fake_scalar(t), _fake_scalar(t), _fake_scalar(t), _fake_scalar(t),
            _fake_grad(t, need_grad_teacher), _fake_grad(student_logits, need_grad_student))


def _kd_fake(student_logits, teacher_logits, T, scale, need_grad_student, need_grad_teacher):
    return (_fake_scalar(student_logits), _fake_grad(student_logits, need_grad_student),
            _fake_grad(teacher_logits, need_grad_teacher))


def _js_fake(student_logits, teacher_logits, T, clamp_min, clamp_max, scale, need_grad_student, need_grad_teacher):
    return (_fake_scalar(student_logits), _fake_grad(student_logits, need_grad_student),
            _fake_grad(teacher_logits, need_grad_teacher))


def _backward_fake(grad_loss, grad_a, grad_b):
    return torch.empty_like(grad_a), torch.empty_like(grad_b)


def _make_autograd(backward_op, n_inputs: int, n_loss_outputs: int):
    """setup_context/backward for a fused loss op whose outputs are
    (loss, <n_loss_outputs - 1 detached values>, grad_first_input, grad_second_input)."""

    def setup_context(ctx, inputs, output):
        grad_a, grad_b = output[-2], output[-1]
        ctx.save_for_backward(grad_a, grad_b)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs that carry no gradient

    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:  # the loss took no part in what is differentiated
            return (None,) * n_inputs
        grad_a, grad_b = ctx.saved_tensors
        out_a, out_b = backward_op(grad_loss, grad_a, grad_b)
        # an empty saved gradient means the input did not require grad (static shape, no sync)
        return (out_a if grad_a.numel() else None, out_b if grad_b.numel() else None) + (None,) * (n_inputs - 2)

    return setup_context, backward


if _ext.has_extension():
    torch.library.register_fake("fastsynth::synthesis_logit_loss")(_synthesis_fake)
    torch.library.register_fake("fastsynth::kd_loss")(_kd_fake)
    torch.library.register_fake("fastsynth::js_divergence")(_js_fake)
    torch.library.register_fake("fastsynth::logit_loss_backward")(_backward_fake)
    # autograd of the C++ ops: csrc/autograd/logit_losses.cpp (the same formulas as
    # _make_autograd, registered for the Autograd key, without a Python wrapper per call)


# ---------------------------------------------------------------------------------------------
# Triton custom ops (the Triton module is imported inside the op bodies)
# ---------------------------------------------------------------------------------------------

def _triton_kernels():
    return importlib.import_module("fastsynth.kernels.logit_losses")


@torch.library.custom_op("fastsynth::synthesis_logit_loss_triton", mutates_args=())
def _synthesis_triton(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor, oh: float, adv: float,
    agree_mask: bool, need_grad_teacher: bool, need_grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().synthesis_logit_loss(
        teacher_logits, student_logits, targets, oh, adv, agree_mask, need_grad_teacher, need_grad_student
    )


@torch.library.custom_op("fastsynth::kd_loss_triton", mutates_args=())
def _kd_triton(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, scale: float, need_grad_student: bool,
    need_grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().kd_loss(student_logits, teacher_logits, T, scale, need_grad_student, need_grad_teacher)


@torch.library.custom_op("fastsynth::js_divergence_triton", mutates_args=())
def _js_triton(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, clamp_min: float, clamp_max: float,
    scale: float, need_grad_student: bool, need_grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().js_divergence(
        student_logits, teacher_logits, T, clamp_min, clamp_max, scale, need_grad_student, need_grad_teacher
    )


@torch.library.custom_op("fastsynth::logit_loss_backward_triton", mutates_args=())
def _backward_triton(
    grad_loss: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().logit_loss_backward(grad_loss, grad_a, grad_b)


_synthesis_triton.register_fake(_synthesis_fake)
_kd_triton.register_fake(_kd_fake)
_js_triton.register_fake(_js_fake)
_backward_triton.register_fake(_backward_fake)
for _op, _n_in, _n_loss in ((_synthesis_triton, 8, 4), (_kd_triton, 6, 1), (_js_triton, 8, 1)):
    _setup, _bwd = _make_autograd(_backward_triton, _n_in, _n_loss)
    _op.register_autograd(_bwd, setup_context=_setup)


def _fused(name: str, backend: str):
    if backend == "triton":
        return {"synthesis_logit_loss": _synthesis_triton, "kd_loss": _kd_triton, "js_divergence": _js_triton}[name]
    # the OpOverload itself: calling the packet would resolve the overload on every call
    return getattr(torch.ops.fastsynth, name).default


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def synthesis_logit_loss(teacher_logits, student_logits, targets, oh=1.0, adv=1.0, mask="agree", backend=None):
    """``oh * CE(t, y) + adv * L_adv`` of one synthesis step (module docstring), fused.

    Returns ``(loss, parts)``: ``loss`` a 0-dim tensor differentiable w.r.t. both logits;
    ``parts`` a dict of detached 0-dim tensors: ``"oh"`` (the cross-entropy), ``"adv"`` (L_adv,
    unweighted), ``"agree_frac"`` (fraction of rows whose mask is 1). No host sync.
    """
    op = "synthesis_logit_loss"
    _check_logit_pair(op, "teacher_logits", teacher_logits, "student_logits", student_logits)
    n, c = teacher_logits.shape
    oh = _check_number(op, "oh", oh)
    adv = _check_number(op, "adv", adv)
    if mask not in _MASKS:
        raise ValueError(f"{op}: mask must be 'agree' or None, got {mask!r}")
    backend = resolve_backend(backend, teacher_logits.device, op)
    _check_targets(op, targets, n, c, teacher_logits.device, eager_range=(backend == "reference"))
    if backend == "reference":
        return synthesis_logit_loss_reference(teacher_logits, student_logits, targets, oh, adv, mask)
    loss, oh_term, adv_term, agree, _, _ = _fused(op, backend)(
        teacher_logits, student_logits, targets, oh, adv, mask == "agree",
        _needs_grad(teacher_logits), _needs_grad(student_logits),
    )
    return loss, {"oh": oh_term, "adv": adv_term, "agree_frac": agree}


def _kd(student_logits, teacher_logits, T: float, scale: float, backend: str):
    loss, _, _ = _fused("kd_loss", backend)(
        student_logits, teacher_logits, T, scale, _needs_grad(student_logits), _needs_grad(teacher_logits)
    )
    return loss


def kd_loss(student_logits, teacher_logits, T, backend=None):
    """``T^2 * KL(p_t(T) || p_s(T))``, batchmean (module docstring), fused; a 0-dim tensor.

    The gradient flows to the student logits; to the teacher logits too if they require grad
    (exactly what autograd gives the upstream formula; upstream detaches the teacher)."""
    op = "kd_loss"
    _check_logit_pair(op, "student_logits", student_logits, "teacher_logits", teacher_logits)
    T = _check_temperature(op, T)
    backend = resolve_backend(backend, student_logits.device, op)
    if backend == "reference":
        return kd_loss_reference(student_logits, teacher_logits, T)
    return _kd(student_logits, teacher_logits, T, T * T / student_logits.shape[0], backend)


def _js(student_logits, teacher_logits, T: float, lo: float, hi: float, scale: float, backend: str):
    loss, _, _ = _fused("js_divergence", backend)(
        student_logits, teacher_logits, T, lo, hi, scale, _needs_grad(student_logits), _needs_grad(teacher_logits)
    )
    return loss


def js_divergence(student_logits, teacher_logits, T=3.0, clamp=(0.01, 0.99), backend=None):
    """Clamped Jensen-Shannon divergence of the DeepInversion synthesizers (module docstring),
    batchmean, fused; a 0-dim tensor differentiable w.r.t. both logits. ``L_adv = -js``."""
    op = "js_divergence"
    _check_logit_pair(op, "student_logits", student_logits, "teacher_logits", teacher_logits)
    T = _check_temperature(op, T)
    lo, hi = _check_clamp(op, clamp)
    backend = resolve_backend(backend, student_logits.device, op)
    if backend == "reference":
        return js_divergence_reference(student_logits, teacher_logits, T, (lo, hi))
    return _js(student_logits, teacher_logits, T, lo, hi, 1.0 / student_logits.shape[0], backend)
