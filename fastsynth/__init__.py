"""fastsynth: fused kernels and drop-in synthesizers for data-free knowledge distillation."""
from __future__ import annotations

from . import _ext


from ._ext import build_info, empty_cache  # noqa: E402
from . import ops  # noqa: E402
from .fuse import fuse_teacher, unfuse_teacher  # noqa: E402
from .hooks import DeepInversionHook  # noqa: E402
from .losses import KLDiv, jsdiv, kldiv  # noqa: E402
# fastsynth.patch(datafree) / fastsynth.unpatch(datafree): the names are the functions; the
# module is sys.modules["fastsynth.patch"] (``from fastsynth.patch import TABLE`` works)
from .patch import patch, unpatch  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "build_info",
    "empty_cache",
    "ops",
    "DeepInversionHook",
    "kldiv",
    "KLDiv",
    "jsdiv",
    "fuse_teacher",
    "unfuse_teacher",
    "patch",
    "unpatch",
]
