"""Backend selection and argument validation shared by every op.

Backends:
  reference  eager PyTorch, the oracle (any device, float64-capable)
  cpu        C++ kernels of fastsynth._C on CPU tensors
  cuda       CUDA kernels of fastsynth._C on CUDA tensors
  triton     Triton kernels (GPU tensors; CPU tensors under TRITON_INTERPRET=1)

``backend=None`` picks the fastest available for the tensor's device: cuda (or triton when the
extension has no CUDA kernels) on a GPU, cpu on the CPU; without the extension it falls back to
triton or reference and warns once.
"""
from __future__ import annotations

from typing import Iterable

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Return the backend that runs ``op`` for tensors on ``device``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "cpu":
            if device.type != "cpu":
                raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
            if not _ext.has_extension():
                raise RuntimeError(f"{op}: backend='cpu' needs fastsynth._C, which failed to load: {_ext.extension_error()!r}")
        elif backend == "cuda":
            if device.type != "cuda":
                raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
            if not _ext.has_cuda_extension():
                raise RuntimeError(f"{op}: backend='cuda' needs fastsynth._C built with CUDA (see setup.py, FASTSYNTH_CUDA)")
        elif backend == "triton":
            if not _ext.has_triton():
                raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
            if device.type == "cpu" and not _ext.triton_interpreting():
                raise ValueError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                                 f"got tensors on {device}")
        return backend

    if device.type == "cuda":
        if _ext.has_cuda_extension():
            return "cuda"
        if _ext.has_triton():
            _ext.warn_once("no-cuda-ext", "fastsynth: extension has no CUDA kernels; using the Triton kernels")
            return "triton"
        _ext.warn_once("no-gpu-kernels", "fastsynth: no CUDA or Triton kernels available; using the eager reference")
        return "reference"
    if device.type == "cpu":
        if _ext.has_extension():
            return "cpu"
        _ext.warn_once(
            "no-ext",
            f"fastsynth: compiled extension unavailable ({_ext.extension_error()!r}); using the eager reference",
        )
        return "reference"
    return "reference"


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Iterable[int] | None = None,
    floating: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    nonempty: bool = False,
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming ``name`` when ``t`` is not what an op expects."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float64/32/16, bfloat16), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the input), got {t.device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t
