"""Memory layout of convolution inputs on the CPU (used by the fused teacher graph, the student's
eval view and the generators' convolution stacks). Values are unchanged; only the order of the
elements in memory (and so the speed of oneDNN's kernels) changes. Gradients follow the layout of
their tensors, and autograd converts them back where a conversion was made.

On the CPU PyTorch runs fp32 convolutions through oneDNN. Given NCHW maps it reorders every input
to a blocked layout and every output back (and the same for gradients in the backward); given
channels_last maps its NHWC kernels read and write them directly. That pays on large maps and
costs on small ones (``CPUConfig.channels_last_min_hw`` has the measurements), hence: convolution
inputs of at least ``min_hw`` pixels go in channels_last, smaller ones in NCHW, and a convolution
output below that size (from a stride-2 convolution on a channels_last input) goes back to NCHW:
one conversion per change of size class, forward and backward."""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.nn.modules import module as _module

__all__ = ["conv_input_layout", "conv_output_layout", "is_channels_last", "derived_from_frozen", "has_hooks"]


def conv_input_layout(x, min_hw: int):
    """``x`` in the layout its convolution runs fastest in on the CPU: channels_last when the map
    has at least ``min_hw`` pixels, NCHW otherwise (a no-op when already so). Other devices,
    non-4-D inputs and ``min_hw <= 0``: ``x`` unchanged."""
    if min_hw > 0 and isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu":
        if x.shape[-1] * x.shape[-2] >= min_hw:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()
    return x


def conv_output_layout(y, min_hw: int):
    """A convolution's output below ``min_hw`` pixels back in NCHW (a channels_last input gives a
    channels_last output): the layout the next convolution wants, and the one every other
    consumer (pooling, flatten, a residual add with an NCHW shortcut) handles best."""
    if min_hw > 0 and isinstance(y, torch.Tensor) and y.dim() == 4 and y.device.type == "cpu" \
            and y.shape[-1] * y.shape[-2] < min_hw:
        return y.contiguous()
    return y


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor dense in channels_last and not also dense in NCHW (the layout the kernels'
    channels_last paths take)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class _Derived(NamedTuple):
    """What ``derived_from_frozen`` keeps: a weak reference to the source tensor, its stamp, and
    the value made from it. A copy or a pickle of the owner gets an empty one (weak references
    do not travel), which is re-made at its first use."""

    source: object
    stamp: tuple | None
    value: torch.Tensor | None

    def __reduce__(self):
        return (_Derived, (None, None, None))


def derived_from_frozen(owner, name: str, weight: torch.Tensor, make, in_place: bool = False) -> torch.Tensor:
    """``make(weight)``, kept in ``owner.__dict__[name]`` while ``weight`` is the same tensor at the
    same version (frozen weights: made once, not every step). The tensor is recognised by a weak
    reference, not by ``id()``: a weight freed and another allocated at the same address (a
    replaced ``conv.weight``) is a new tensor, and the cache does not keep the old one alive. A
    stale value is replaced; with ``in_place`` one of the same shape, dtype and strides is
    overwritten instead, so a compiled graph holding it reads the new values."""
    # what else can change under the same Python object: its values (the version counter), and
    # its storage, dtype or shape through ``weight.data = ...``
    stamp = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape))
    cached = owner.__dict__.get(name)
    if cached is None or cached.source is None or cached.source() is not weight or cached.stamp != stamp:
        value = make(weight)
        old = None if cached is None else cached.value
        if in_place and old is not None and old.shape == value.shape and old.dtype == value.dtype \
                and old.stride() == value.stride():
            value = old.copy_(value)
        cached = owner.__dict__[name] = _Derived(weakref.ref(weight), stamp, value)
    return cached.value


def has_hooks(module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones, registered at any time)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks)
