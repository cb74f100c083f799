"""Loading of the compiled extension ``fastsynth._C`` and of the Triton kernels.

fastsynth works without either: ops fall back to Triton (when installed) or to the eager
reference implementation, and say so once with a warning.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

_C = None
_C_ERROR: Exception | None = None
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_c():
    global _C, _C_ERROR
    if os.environ.get("FASTSYNTH_DISABLE_EXTENSION", "0") == "1":
        _C_ERROR = RuntimeError("disabled by FASTSYNTH_DISABLE_EXTENSION=1")
        return
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        _C = importlib.import_module("fastsynth._C")
    except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
        _C = None
        _C_ERROR = exc


_load_c()


def has_extension() -> bool:
    """True when fastsynth._C loaded (the C++ CPU ops are registered)."""
    return _C is not None


def has_cuda_extension() -> bool:
    """True when fastsynth._C was built with its CUDA kernels."""
    return _C is not None and bool(_C.build_info()["cuda"])


def extension_error() -> Exception | None:
    return _C_ERROR


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty_cache() -> int:
    """Free the large CPU output blocks the C++ kernels keep for reuse (gradients of big feature
    maps and weights: reusing them spares the page faults of fresh memory, see
    csrc/cpu/large_alloc.h; at most 512 MB are kept). Returns the bytes freed; 0 without the
    extension. Tensors in use are not affected."""
    return int(_C.empty_cache()) if _C is not None else 0


def build_info() -> dict:
    """Which backends are available in this installation."""
    info = {"extension": has_extension(), "cpu": False, "cuda": False, "openmp": False}
    if _C is not None:
        info.update(dict(_C.build_info()))
    else:
        info["extension_error"] = repr(_C_ERROR)
    info["triton"] = has_triton()
    info["triton_interpret"] = triton_interpreting()
    return info
