"""Fused teacher BatchNorm: eval-mode BatchNorm (+ ReLU) and the batch statistics of its input
in one pass, so the DeepInversion BatchNorm-statistics loss rides on the teacher's own passes.

Math (x: N x C x H x W, M = N*H*W, per channel c):

    scale = gamma / sqrt(running_var + eps),   shift = beta - running_mean * scale
    y     = x * scale + shift                  (max(y, 0) when ReLU is fused)
    mean  = mean_{n,h,w} x,   var = mean_{n,h,w} (x - mean)^2         (biased; fp32 for fp16/bf16)
    inst_mean[n, c] = mean_{h,w} x[n, c]                  (optional: with_instance_means; fp32 likewise)

The instance means are the per-sample channel means that CMI's InstanceMeanHook takes of every
BatchNorm2d's input: the pass that reduces x per channel for (mean, var) sums each (n, c) plane
on the way, so they cost no extra read of x.

The loss is computed from (mean, var) by ``fastsynth.ops.bn_stat_loss.loss_from_stats``; its
gradients g_mean, g_var flow back into the one backward pass:

    g_pre  = grad_y * [x*scale + shift > 0]      (grad_y when no ReLU)
    grad_x = g_pre * scale + g_mean / M + 2 g_var (x - mean) / M + g_inst[n, c] / (H W)
    dbeta  = sum g_pre,   dgamma = sum g_pre * (x - running_mean) / sqrt(running_var + eps)

running_mean/running_var are buffers (no gradient). With ``with_stats=False`` no statistics work
is done and mean/var are empty tensors. The backward is not itself differentiable (once
differentiable): double backward raises.

Backends: ``reference`` (eager, the oracle), ``cpu`` (csrc/cpu/fused_bn.cpp), ``triton``
(fastsynth/kernels/fused_bn.py, ops ``fastsynth::fused_bn_forward_triton``/``_backward_triton``), ``cuda``
(csrc/cuda/fused_bn.cu). The C++ ops are ``fastsynth::fused_bn_forward``/``fused_bn_backward``.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..backend import check_tensor, resolve_backend

OP = "fused_bn"

__all__ = ["fused_bn", "fused_bn_reference"]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_channels_last(x: torch.Tensor) -> bool:
    # Layout decision shared with the kernels: channels_last path only when x is channels_last
    # dense and not also NCHW dense; other layouts are read through their strides.
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def _out_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _use_channels_last(x) else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# reference


def fused_bn_reference(x, weight, bias, running_mean, running_var, eps=1e-5, apply_relu=False, with_stats=True,
                       with_instance_means=False):
    """Eager oracle (differentiable by autograd, float64-capable); ``(y, mean, var)``, plus
    ``inst_mean`` with ``with_instance_means``."""
    acc = _stat_dtype(x.dtype)
    invstd = torch.rsqrt(running_var.detach().to(acc) + eps)
    scale = weight.to(acc) * invstd
    shift = bias.to(acc) - running_mean.detach().to(acc) * scale
    xa = x.to(acc)
    y = xa * scale[:, None, None] + shift[:, None, None]
    if apply_relu:
        y = torch.relu(y)
    y = y.to(x.dtype)
    if with_stats:
        var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
    else:
        mean = var = x.new_empty((0,), dtype=acc)
    if with_instance_means:
        return y, mean, var, xa.mean(dim=(2, 3))
    return y, mean, var


# ---------------------------------------------------------------------------------------------
# validation


def _validate(x, weight, bias, running_mean, running_var, eps):
    check_tensor("x", x, ndim=4, nonempty=True)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(name, t, ndim=1, device=x.device)
        if t.shape[0] != C:
            raise ValueError(f"{name} must have C={C} entries (x.shape[1]), got shape {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


# ---------------------------------------------------------------------------------------------
# C++ ops (cpu, cuda): fake kernels and autograd


def _fake_forward(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, with_instance_means=False):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))
    n = x.shape[1] if with_stats else 0
    mean = x.new_empty((n,), dtype=_stat_dtype(x.dtype))
    var = x.new_empty((n,), dtype=_stat_dtype(x.dtype))
    inst = x.new_empty(tuple(x.shape[:2]) if with_instance_means else (0,), dtype=_stat_dtype(x.dtype))
    return y, mean, var, inst


def _fake_backward(grad_y, x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst_mean, eps,
                   apply_relu, with_stats, with_instance_means, need_weight_grad):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))
    n = x.shape[1] if need_weight_grad else 0
    return gx, weight.new_empty((n,)), bias.new_empty((n,))


_PLACEHOLDERS: dict = {}


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """An empty stats-dtype tensor for the unused mean/grad_mean/grad_var arguments of a backward
    without statistics (cached: no op per call)."""
    key = (_stat_dtype(x.dtype), x.device)
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():  # fake/functional tracing: no real tensor
        return x.new_empty((0,), dtype=key[0])
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.empty((0,), dtype=key[0], device=x.device)
    return t


def _setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, with_instance_means = inputs
    mean = output[1]
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    # the batch mean is an output: save_for_backward would detach it when saving AND when
    # unpacking (two ops per layer); one explicit detach (a constant for the backward) is enough
    ctx.mean = mean.detach() if with_stats else None
    # unused outputs (the statistics of a layer outside the loss) get None, not a zeros op each
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.apply_relu, ctx.with_stats, ctx.with_inst = eps, apply_relu, with_stats, with_instance_means


def _make_backward(backward_op):
    def _backward(ctx, grad_y, grad_mean, grad_var, grad_inst_mean):
        x, weight, bias, running_mean, running_var = ctx.saved_tensors
        need_wgrad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if ctx.with_stats:
            mean = ctx.mean
            if grad_mean is None:
                grad_mean = torch.zeros_like(mean)
            if grad_var is None:
                grad_var = torch.zeros_like(mean)
        else:
            mean = grad_mean = grad_var = _placeholder(x)  # empty; unused by the kernels
        inst = ctx.with_inst and grad_inst_mean is not None  # an unused inst_mean adds nothing
        gx, gw, gb = backward_op(grad_y.to(x.dtype), x, weight, bias, running_mean, running_var, mean, grad_mean,
                                 grad_var, grad_inst_mean if inst else _placeholder(x), ctx.eps, ctx.apply_relu,
                                 ctx.with_stats, inst, need_wgrad)
        return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
                gb if ctx.needs_input_grad[2] else None, None, None, None, None, None, None)

    return _backward


if _ext.has_extension():
    torch.library.register_fake("fastsynth::fused_bn_forward")(_fake_forward)
    torch.library.register_fake("fastsynth::fused_bn_backward")(_fake_backward)
    # autograd of the C++ op: csrc/autograd/fused_bn.cpp (the formulas of _make_backward,
    # registered for the Autograd key, without a Python wrapper per layer)


# ---------------------------------------------------------------------------------------------
# Triton ops


@torch.library.custom_op("fastsynth::fused_bn_forward_triton", mutates_args=())
def _fused_bn_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                             running_var: torch.Tensor, eps: float, apply_relu: bool, with_stats: bool,
                             with_instance_means: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    from ..kernels import fused_bn as k

    return k.forward(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, with_instance_means,
                     _out_format(x), _stat_dtype(x.dtype))


@torch.library.custom_op("fastsynth::fused_bn_backward_triton", mutates_args=())
def _fused_bn_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                              grad_mean: torch.Tensor, grad_var: torch.Tensor, grad_inst_mean: torch.Tensor,
                              eps: float, apply_relu: bool, with_stats: bool, with_instance_means: bool,
                              need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import fused_bn as k

    return k.backward(grad_y, x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst_mean,
                      eps, apply_relu, with_stats, with_instance_means, need_weight_grad, _out_format(x))


_fused_bn_forward_triton.register_fake(_fake_forward)
_fused_bn_backward_triton.register_fake(_fake_backward)
_fused_bn_forward_triton.register_autograd(_make_backward(_fused_bn_backward_triton), setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API


def fused_bn(x, weight, bias, running_mean, running_var, eps: float = 1e-5, apply_relu: bool = False,
             with_stats: bool = True, backend: str | None = None, with_instance_means: bool = False):
    """Eval-mode BatchNorm2d (+ ReLU) of ``x`` and the batch statistics of ``x`` in one pass.

    Returns ``(y, mean, var)``; ``mean``/``var`` (biased, fp32 for fp16/bf16 x) are differentiable
    w.r.t. ``x`` (feed them to ``loss_from_stats``) and empty when ``with_stats`` is False.
    ``with_instance_means=True`` returns ``(y, mean, var, inst_mean)``: ``inst_mean`` [N, C] =
    ``x.mean(dim=(2, 3))`` (fp32 for fp16/bf16 x), differentiable w.r.t. ``x``, from the same pass.
    ``weight``/``bias`` may require grad (dgamma/dbeta are reduced in the backward pass);
    ``running_mean``/``running_var`` are constants.
    """
    _validate(x, weight, bias, running_mean, running_var, eps)
    b = resolve_backend(backend, x.device, OP)
    eps, apply_relu, with_stats, inst = float(eps), bool(apply_relu), bool(with_stats), bool(with_instance_means)
    if b == "reference":
        return fused_bn_reference(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, inst)
    if running_mean.requires_grad or running_var.requires_grad:  # buffers never do: no detach op for them
        running_mean, running_var = running_mean.detach(), running_var.detach()
    if b == "triton":
        out = _fused_bn_forward_triton(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, inst)
    else:
        out = torch.ops.fastsynth.fused_bn_forward(x, weight, bias, running_mean, running_var, eps, apply_relu,
                                                   with_stats, inst)
    return out if inst else out[:3]
