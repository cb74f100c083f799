"""Fused ops of the CMI synthesizer: the contrastive cross-entropy over a memory bank and the
per-instance channel means of hooked feature maps.

``contrastive_ce(queries, keys, temperature, n_split)`` -- queries q and keys k both [M, D], row i
of k being the positive of row i of q and every other row a negative (CMI: the first N rows are
the batch, the remaining N' the projected memory-bank entries)::

    S_ij   = q_i . k_j / temperature                               (M x M, never stored)
    lse_i  = log sum_j exp(S_ij)
    loss_i = lse_i - S_ii                                          F.cross_entropy(S, arange(M), 'none')
    L      = (1/A) sum_{i<A} loss_i + (1/(M-A)) sum_{i>=A} loss_i  A = n_split (second term 0 if A = M)

    with w_i = 1/A (i < A), 1/(M-A) (i >= A),  P_ij = exp(S_ij - lse_i):
    G_ij    = w_i (P_ij - [i = j]) / temperature
    dL/dq_i = sum_j G_ij k_j                                       (dq = G k)
    dL/dk_j = sum_i G_ij q_i                                       (dk = G^T q)

Upstream (``CMISynthesizer.synthesize``) builds S with ``torch.mm`` and calls
``F.cross_entropy(reduction='none')`` then two means: an (N+N') x (N+N') matrix materialised and
read four times. The fused op computes the loss and both gradients in one sweep over blocks of
query rows (CPU: csrc/cpu/contrastive_loss.cpp; the unit gradients are returned, backward scales
them by grad_loss, no host sync) or with the three flash-style kernels of
fastsynth/kernels/contrastive_loss.py (Triton). ``need_grad`` flags skip the key gradient when keys are
detached (as in CMI).

No CUDA C++ kernel: on a GPU the Triton kernels already run the similarity products on tensor
cores (tl.dot) with the log-sum-exp in registers, which is what a hand-written CUDA kernel would
do; CUDA tensors take the Triton backend.

``instance_mean_multi(xs)`` -- for 4-D maps x_l [B, C_l, H_l, W_l]::

    out[b, off_l + c] = (1 / (H_l W_l)) sum_{h,w} x_l[b, c, h, w]      off_l = sum_{l'<l} C_l'
    dL/dx_l[b, c, h, w] = dL/dout[b, off_l + c] / (H_l W_l)

one reduction over every map (CPU C++; elsewhere the eager mean-and-cat), what
``InstanceMeanHook`` collects and CMI concatenates.

Precision: fp16/bf16 inputs are computed in fp32 (CPU: fp32 copies; Triton: fp32 accumulation of
fp16/bf16 products); the loss and the means are fp32 for fp16/bf16/fp32 inputs, fp64 for fp64;
gradients have the input dtype. Tolerances (tests/test_contrastive.py, vs the float64 reference):
fp32 rtol 1e-4; bf16 2e-2 / fp16 5e-3 relative on the loss, gradients within 3e-2 / 1e-2 of
their scale.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import _ext
from ..backend import check_tensor, resolve_backend

__all__ = ["contrastive_ce", "contrastive_ce_reference", "instance_mean_multi", "instance_mean_multi_reference"]


def _needs_grad(x: torch.Tensor) -> bool:
    return bool(x.requires_grad and torch.is_grad_enabled())


def _check_pair(op: str, queries, keys) -> None:
    check_tensor(f"{op}: queries", queries, ndim=2, nonempty=True)
    check_tensor(f"{op}: keys", keys, ndim=2, nonempty=True)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"{op}: keys must have the feature dimension of queries ({queries.shape[1]}), "
                         f"got {keys.shape[1]} (shape {tuple(keys.shape)})")
    if queries.shape[0] != keys.shape[0]:
        raise ValueError(f"{op}: keys must have one row per query ({queries.shape[0]}; row i is the positive of "
                         f"query i), got {keys.shape[0]}")
    if queries.dtype != keys.dtype:
        raise TypeError(f"{op}: queries and keys must have the same dtype, got {queries.dtype} and {keys.dtype}")
    if queries.device != keys.device:
        raise ValueError(f"{op}: queries and keys must be on the same device, got {queries.device} and {keys.device}")


def _check_temperature(op: str, temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a positive real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{op}: temperature must be positive and finite, got {t}")
    return t


def _check_split(op: str, n_split, m: int) -> int:
    if n_split is None:
        return m
    if isinstance(n_split, bool) or not isinstance(n_split, numbers.Integral):
        raise TypeError(f"{op}: n_split must be an int or None, got {type(n_split).__name__}")
    if not 1 <= int(n_split) <= m:
        raise ValueError(f"{op}: n_split must be in [1, {m}] (rows of queries), got {n_split}")
    return int(n_split)


# ---------------------------------------------------------------------------------------------
# Eager references (the upstream formulation; the float64 oracle of the tests)
# ---------------------------------------------------------------------------------------------

def contrastive_ce_reference(queries, keys, temperature, n_split=None):
    m = queries.shape[0]
    a = m if n_split is None else int(n_split)
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    logits = torch.mm(queries.to(acc), keys.to(acc).T) / temperature
    loss = F.cross_entropy(logits, torch.arange(m, device=queries.device), reduction="none")
    out = loss[:a].mean()
    if a < m:
        out = out + loss[a:].mean()
    return out


def instance_mean_multi_reference(xs):
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return torch.cat([x.to(acc).mean(dim=(2, 3)) for x in xs], dim=1)


# ---------------------------------------------------------------------------------------------
# Fake kernels and the Triton custom op
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ce_fake(queries, keys, scale, n_split, need_grad_queries, need_grad_keys):
    loss = queries.new_empty((), dtype=_acc_dtype(queries.dtype))
    gq = torch.empty_like(queries, memory_format=torch.contiguous_format) if need_grad_queries \
        else queries.new_empty((0,))
    gk = torch.empty_like(keys, memory_format=torch.contiguous_format) if need_grad_keys else keys.new_empty((0,))
    return loss, gq, gk


def _mean_fake(xs):
    total = sum(x.shape[1] for x in xs)
    return xs[0].new_empty((xs[0].shape[0], total), dtype=_acc_dtype(xs[0].dtype))


def _mean_backward_fake(xs, grad):
    return [torch.empty_like(x, memory_format=x.suggest_memory_format()
                             if hasattr(x, "suggest_memory_format") else torch.contiguous_format) for x in xs]


if _ext.has_extension() and hasattr(torch.ops.fastsynth, "contrastive_ce"):  # an older build lacks the op
    torch.library.register_fake("fastsynth::contrastive_ce")(_ce_fake)
    torch.library.register_fake("fastsynth::instance_mean_multi")(_mean_fake)
    torch.library.register_fake("fastsynth::instance_mean_multi_backward")(_mean_backward_fake)
    # autograd of the C++ ops: csrc/autograd/contrastive_loss.cpp


def _triton_kernels():
    from fastsynth.kernels import contrastive_loss as kernels

    return kernels


@torch.library.custom_op("fastsynth::contrastive_ce_triton", mutates_args=())
def _ce_triton(queries: torch.Tensor, keys: torch.Tensor, scale: float, n_split: int, need_grad_queries: bool,
               need_grad_keys: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_kernels().contrastive_ce(queries, keys, scale, n_split, need_grad_queries, need_grad_keys)


_ce_triton.register_fake(_ce_fake)


def _ce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 6
    gq, gk = ctx.saved_tensors
    from .logit_losses import _backward_triton  # the shared scaling op (grad_loss read on the device)

    out_q, out_k = _backward_triton(grad_loss, gq, gk)
    return (out_q if gq.numel() else None, out_k if gk.numel() else None, None, None, None, None)


_ce_triton.register_autograd(_ce_backward, setup_context=_ce_setup)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def contrastive_ce(queries, keys, temperature, n_split=None, backend=None):
    """The contrastive cross-entropy L of the module docstring, fused; a 0-dim tensor (fp32, fp64
    for fp64 inputs) differentiable w.r.t. queries and keys. ``n_split=None``: one mean over all
    rows. No host sync."""
    op = "contrastive_ce"
    _check_pair(op, queries, keys)
    t = _check_temperature(op, temperature)
    m, d = queries.shape
    a = _check_split(op, n_split, m)
    if backend is None and queries.device.type == "cuda":
        backend = "triton" if _ext.has_triton() else "reference"
    if backend == "cuda":
        raise ValueError(f"{op}: backend='cuda' has no CUDA C++ kernel (the Triton kernels serve CUDA tensors); "
                         "use backend='triton' or None")
    backend = resolve_backend(backend, queries.device, op)
    if backend == "reference":
        return contrastive_ce_reference(queries, keys, t, a)
    if backend == "triton":
        if d > _triton_kernels().MAX_D:
            raise ValueError(f"{op}: the Triton kernels hold the feature dimension in one block, at most "
                             f"{_triton_kernels().MAX_D}; got queries of shape {tuple(queries.shape)}")
        fn = _ce_triton
    else:
        fn = torch.ops.fastsynth.contrastive_ce.default
    loss, _, _ = fn(queries, keys, 1.0 / t, a, _needs_grad(queries), _needs_grad(keys))
    return loss


def instance_mean_multi(xs, backend=None):
    """``torch.cat([x.mean((2, 3)) for x in xs], 1)`` in one reduction (module docstring); fp32
    (fp64 for fp64 maps), differentiable."""
    op = "instance_mean_multi"
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise TypeError(f"{op}: xs must be a non-empty list of 4-D tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        check_tensor(f"{op}: xs[{i}]", x, ndim=4)
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(f"{op}: xs[{i}] has batch {x.shape[0]}, xs[0] has {xs[0].shape[0]}")
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(f"{op}: xs[{i}] is {x.dtype} on {x.device}, xs[0] is {xs[0].dtype} on {xs[0].device}")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"{op}: xs[{i}] has an empty plane, shape {tuple(x.shape)}")
    dev = xs[0].device
    if backend is None and dev.type != "cpu":
        backend = "reference"
    backend = resolve_backend(backend, dev, op)
    if backend == "cpu":
        return torch.ops.fastsynth.instance_mean_multi.default(list(xs))
    if backend in ("triton", "cuda"):
        raise ValueError(f"{op}: backend {backend!r} has no kernel yet; use 'cpu', 'reference' or None")
    return instance_mean_multi_reference(list(xs))
