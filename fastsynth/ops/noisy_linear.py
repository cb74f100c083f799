"""Batched noisy layers (NAYER's ``NLGenerator``): K Linear layers on consecutive row blocks.

Math (x: [B, I], weight W: [K, I, O], bias: [K, O], B <= K * nl; row b goes through layer
k = b // nl; the last block may be partial and layers k >= ceil(B / nl) are unused):

    out[b]        = bias[k] + x[b] @ W[k]
    grad_x[b]     = grad_out[b] @ W[k]^T
    grad_W[k]     = x[rows of k]^T @ grad_out[rows of k]      (zero for unused layers)
    grad_bias[k]  = sum over the rows of k of grad_out         (zero for unused layers)

Two implementations, chosen by ``route`` (the one place that decides):

  "fused_cpu"     ``fastsynth::noisy_linear`` / ``noisy_linear_backward`` (csrc/cpu/noisy_linear.cpp),
                  CPU tensors, float32 and float64. Each GEMM here has only nl rows (10 for
                  CIFAR-10 against a 512 x 1000 weight), so the op is bound by streaming the
                  weight: the forward reads W once; the backward reads each weight row once and in
                  the same sweep forms grad_x (dot products with the layer's nl grad_out rows, held
                  in cache) and writes the grad_W row (where MKL runs grad_W as a GEMM of inner
                  dimension nl, far below the bandwidth floor).
  "batched_gemm"  ``noisy_linear_reference``: one ``torch.baddbmm(bias, x.view(kb, nl, I), W[:kb])``
                  over the kb layers in use (x zero-padded to whole blocks; the padded rows'
                  outputs are dropped), autograd by torch.

Routing (``backend``, then the tensors):

  backend="cpu"        fused_cpu for float32/float64 at any nl; float16/bfloat16 CPU tensors take
                       batched_gemm, which is then the CPU implementation (the fused kernel has no
                       fp32-accumulating path for them; MKL's half GEMM has).
  backend="reference"  batched_gemm, any device and dtype.
  backend=None, CPU    fused_cpu for float32/float64 with nl <= FUSED_MAX_NL; batched_gemm above
                       (each weight element then serves enough rows for MKL's GEMM to be the
                       faster kernel), for float16/bfloat16, and without the extension.
  backend=None, CUDA   batched_gemm on cuBLAS. This is the CUDA implementation by design, not a
                       fallback: the K small GEMMs of the upstream loop become one launch, and at
                       these sizes the GPU's bandwidth is not the limit, so a custom kernel would
                       not beat cuBLAS.
  backend="cuda" / "triton"  an error naming the above: noisy_linear has no CUDA or Triton kernel,
                       and asking for one must not silently run something else.
"""
from __future__ import annotations

import numbers

import torch

from .. import _ext
from ..backend import check_tensor, resolve_backend

OP = "noisy_linear"

__all__ = ["noisy_linear", "noisy_linear_reference", "route"]
_CPU_DTYPES = (torch.float32, torch.float64)
# With the backend chosen automatically, CPU tensors take the fused kernel up to this many rows
# per layer and the batched GEMM above it: at nl = 10 (CIFAR-10) the fused kernel is about twice
# as fast as MKL's bmm, at nl = 100 (CIFAR-100) each layer's GEMM has 100 rows, MKL runs it near
# its compute peak and is about twice as fast as the fused kernel (docs/PERFORMANCE.md).
FUSED_MAX_NL = 32


# ---------------------------------------------------------------------------------------------
# reference (the batched GEMM: also the CUDA implementation)


def noisy_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, nl: int) -> torch.Tensor:
    """One baddbmm over the layers in use; differentiable by torch autograd."""
    b, k = x.shape[0], weight.shape[0]
    kb = -(-b // nl)  # layers in use
    rows = kb * nl
    if rows != b:
        x = torch.cat([x, x.new_zeros(rows - b, x.shape[1])])
    # all layers in use (the usual case): no slice, whose backward would materialise a zero
    # gradient of the whole weight and copy into it (an extra pass over K x in x out)
    w = weight if kb == k else weight[:kb]
    bb = bias.unsqueeze(1) if kb == k else bias[:kb, None, :]
    out = torch.baddbmm(bb, x.reshape(kb, nl, x.shape[1]), w).reshape(rows, weight.shape[2])
    return out[:b] if rows != b else out


# ---------------------------------------------------------------------------------------------
# validation


def _validate(x, weight, bias, nl):
    """Shapes, dtypes, devices and nl, before any kernel runs. An empty batch (B = 0) is valid, as
    for nn.Linear: the output is [0, out_features] and the weight gradients are zero."""
    check_tensor(f"{OP}: x", x, ndim=2)
    check_tensor(f"{OP}: weight", weight, ndim=3, device=x.device)
    check_tensor(f"{OP}: bias", bias, ndim=2, device=x.device)
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise TypeError(f"{OP}: x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, {bias.dtype}")
    k, i, o = weight.shape
    if x.shape[1] != i:
        raise ValueError(f"{OP}: x must be [B, in_features={i}] (weight is [K, in, out] = {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if tuple(bias.shape) != (k, o):
        raise ValueError(f"{OP}: bias must be [K={k}, out_features={o}], got shape {tuple(bias.shape)}")
    if isinstance(nl, bool) or not isinstance(nl, numbers.Integral):
        raise TypeError(f"{OP}: nl (rows per layer) must be a positive int, got {type(nl).__name__} {nl!r}")
    if nl < 1:
        raise ValueError(f"{OP}: nl (rows per layer) must be a positive int, got {nl!r}")
    if x.shape[0] > k * nl:
        raise ValueError(f"{OP}: batch {x.shape[0]} exceeds the {k} noisy layers x nl={nl} rows ({k * nl})")


# ---------------------------------------------------------------------------------------------
# C++ op (cpu): fake kernels (the autograd is C++: csrc/autograd/noisy_linear.cpp)


def _fake_forward(x, weight, bias, nl):
    return x.new_empty((x.shape[0], weight.shape[2]))


def _fake_backward(grad_out, x, weight, nl, need_grad_x, need_grad_weight, need_grad_bias):
    gx = x.new_empty(x.shape if need_grad_x else (0,))
    gw = x.new_empty(weight.shape if need_grad_weight else (0,))
    gb = x.new_empty((weight.shape[0], weight.shape[2]) if need_grad_bias else (0,))
    return gx, gw, gb


if _ext.has_extension():
    torch.library.register_fake("fastsynth::noisy_linear")(_fake_forward)
    torch.library.register_fake("fastsynth::noisy_linear_backward")(_fake_backward)


# ---------------------------------------------------------------------------------------------
# routing


def route(backend: str | None, device: torch.device, dtype: torch.dtype, nl: int) -> str:
    """"fused_cpu" or "batched_gemm" for inputs on ``device`` of ``dtype`` with ``nl`` rows per
    layer (the table of the module docstring). Raises for a backend noisy_linear does not have."""
    if backend in ("cuda", "triton"):
        raise ValueError(f"{OP}: backend={backend!r}: noisy_linear has no {backend} kernel; on CUDA tensors it runs "
                         "cuBLAS's batched GEMM, which backend=None or backend='reference' selects")
    if backend is None and device.type != "cpu":
        return "batched_gemm"
    be = resolve_backend(backend, device, OP)  # validates "cpu"/"reference"; None on CPU: "cpu" or "reference"
    if be == "reference":
        return "batched_gemm"
    if dtype not in _CPU_DTYPES:  # the CPU implementation of half precision is the batched GEMM
        return "batched_gemm"
    return "fused_cpu" if backend == "cpu" or nl <= FUSED_MAX_NL else "batched_gemm"


# ---------------------------------------------------------------------------------------------
# public API


def noisy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, nl: int,
                 backend: str | None = None) -> torch.Tensor:
    """K Linear layers on consecutive blocks of ``nl`` rows of ``x`` (see the module docstring).

    ``x``: [B, in_features] with B <= K * nl (the last block may be partial; layers past the
    batch are unused and get zero gradients), ``weight``: [K, in_features, out_features],
    ``bias``: [K, out_features]. Returns [B, out_features]; B = 0 gives an empty output.
    ``backend``: None (automatic), "cpu" (the fused CPU kernel for float32/float64) or "reference"
    (the batched GEMM, also what CUDA tensors run); "cuda" and "triton" are errors, as no such
    kernel exists (``route`` and the module docstring give the whole table).
    """
    _validate(x, weight, bias, nl)
    if route(backend, x.device, x.dtype, nl) == "fused_cpu":
        return torch.ops.fastsynth.noisy_linear(x, weight, bias, int(nl))
    return noisy_linear_reference(x, weight, bias, int(nl))
