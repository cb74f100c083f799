"""The CPU kernel of the residual join ``relu(a + b)`` (``fastsynth::add_relu``,
csrc/cpu/add_relu.cpp): one pass forward instead of an add and a ReLU each reading and writing the
map. ``fastsynth.fuse.add_relu`` (what the fused graphs call) hands CPU tensors here; other
devices run ``relu(a + b)``, which ``compile=True`` and CUDA graphs fuse."""
from __future__ import annotations

import torch

from .. import _ext
from .layout import is_channels_last

__all__ = ["add_relu"]


class _AddReLU(torch.autograd.Function):
    """Forward ``fastsynth::add_relu``; the backward is the ReLU's own, ``grad * (out > 0)``
    (threshold_backward on the output), handed to both inputs."""

    @staticmethod
    def forward(ctx, a, b):
        out = torch.ops.fastsynth.add_relu(a, b)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, out, 0)
        return g, g


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a + b)`` for two CPU tensors of one shape, dtype and layout kind (strided, floating),
    by the one-pass kernel where the extension is built (else as written)."""
    if not _ext.has_extension():
        return torch.relu(a + b)
    return _AddReLU.apply(a, b)


def _fake_add_relu(a, b):
    fmt = torch.channels_last if is_channels_last(a) else torch.contiguous_format
    return torch.empty_like(a, memory_format=fmt)


if _ext.has_extension():
    torch.library.register_fake("fastsynth::add_relu")(_fake_add_relu)
