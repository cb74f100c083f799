"""Nearest 2x upsampling followed by a 3x3 convolution, without the upsampled map.

The generators of FastDFKD and NAYER grow their images with ``nn.Upsample(scale_factor=2)``
followed by ``nn.Conv2d(c, o, 3, padding=1)``. Every 2x2 block of the upsampled map repeats one
input pixel, so each output pixel of the convolution sees only 2x2 distinct input pixels, with
the 3x3 taps summed per distinct pixel. Along one axis, with u the input index and the output
index 2u + p (phase p in {0, 1}) and w0, w1, w2 the kernel taps:

    p = 0:  y[2u]     = w0 x[u-1] + (w1 + w2) x[u]
    p = 1:  y[2u + 1] = (w0 + w1) x[u] + w2 x[u+1]

(x zero outside the map, as the convolution's zero padding of the upsampled map). Read the other
way round, input pixel u reaches outputs 2u - 1 .. 2u + 2 with the taps w2, w1 + w2, w0 + w1, w0:
that is a transposed convolution with stride 2, padding 1 and the 4-tap kernel
``[w2, w1 + w2, w0 + w1, w0]`` per axis. In 2-D the 4x4 kernel is the outer combination of the
two axes, built from the 3x3 weight by one matmul with a constant 0/1 matrix, and the whole
upsample + convolution is ONE ``conv_transpose2d``: 16 multiply-adds per 2x2 output pixels
instead of 36 (2.25x fewer FLOPs, forward and both backward convolutions), the upsampled map is
never written or read, and a call dispatches five ops forward and seven backward (the upsample
and the convolution: two and two), so it pays on small maps too.
Measured on this CPU: docs/PERFORMANCE.md.

The result equals ``conv2d(upsample_nearest2x(x), weight, bias, padding=1)`` up to the rounding
of the summed taps (tests/test_upsample_conv.py: float64 to 1e-12, float32 to 1e-5 relative,
gradients included). The weight stays the module's 3x3 ``Conv2d.weight``: state_dicts are
unchanged, and autograd carries the gradient of the combined taps back to it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["upsample2x_conv3x3", "UpsampleConvSequential"]

# taps of one axis of the 3x3 kernel (w0, w1, w2) summed into each of the 4 transposed taps
_AXIS_TAPS = ((2,), (1, 2), (0, 1), (0,))


def _tap_combinations() -> torch.Tensor:
    """[9, 16] 0/1 matrix: column 4 * a + b of the transposed 4x4 kernel sums the 3x3 taps
    3 * i + j with i in ``_AXIS_TAPS[a]`` and j in ``_AXIS_TAPS[b]``."""
    m = torch.zeros(9, 16, dtype=torch.float64)
    for a, rows in enumerate(_AXIS_TAPS):
        for b, cols in enumerate(_AXIS_TAPS):
            for i in rows:
                for j in cols:
                    m[3 * i + j, 4 * a + b] = 1.0
    return m


_COMBINE = _tap_combinations()
_COMBINE_CACHE: dict = {}


def _transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[C, O, 4, 4]: the ``conv_transpose2d`` weight equal to nearest 2x upsampling followed by the
    3x3 convolution ``weight`` [O, C, 3, 3] (one matmul with the 0/1 combination matrix)."""
    key = (weight.device, weight.dtype)
    m = _COMBINE_CACHE.get(key)
    if m is None:
        m = _COMBINE.to(device=weight.device, dtype=weight.dtype)
        # not while tracing (a constant there), nor under inference_mode: an inference tensor
        # could not be saved for backward by a later training call
        if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
            _COMBINE_CACHE[key] = m
    o, c = weight.shape[:2]
    return torch.mm(weight.reshape(o * c, 9), m).view(o, c, 4, 4).transpose(0, 1)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``, fused
    into one stride-2 transposed convolution (module docstring).

    x: [N, C, H, W]; weight: [O, C, 3, 3]; bias: [O] or None. Returns [N, O, 2H, 2W] (channels_last
    for a channels_last input, as the convolution gives it).
    """
    if x.dim() != 4:
        raise ValueError(f"upsample2x_conv3x3: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"upsample2x_conv3x3: weight must be [O, {x.shape[1]}, 3, 3], got shape {tuple(weight.shape)}")
    return F.conv_transpose2d(x, _transposed_kernel(weight), bias, stride=2, padding=1)


def _is_nearest_2x(m: nn.Module) -> bool:
    if type(m) is not nn.Upsample or m.size is not None or m.mode != "nearest":
        return False
    s = m.scale_factor
    return s == 2 or s == 2.0 or (isinstance(s, tuple) and all(v == 2 for v in s))


def _is_plain_conv3x3(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


class UpsampleConvSequential(nn.Sequential):
    """``nn.Sequential`` that runs each ``nn.Upsample(scale_factor=2)`` (nearest) directly followed
    by a 3x3, stride-1, padding-1 ``nn.Conv2d`` as one ``upsample2x_conv3x3``.

    Same modules, indices and state_dict keys as the plain ``nn.Sequential`` it replaces.
    ``fuse``: None (default) fuses on CPU tensors where the convolution has at least
    ``fastsynth.cpu.config.upsample_fuse_min_macs`` multiply-adds (measured faster there; on a
    GPU it is unmeasured); True always; False never (the upstream computation).
    ``channels_last_min_hw``: on the CPU, the input of a convolution (fused or plain) with at
    least this many pixels runs channels_last, smaller ones NCHW (``fastsynth.cpu``; "auto":
    ``fastsynth.cpu.config.channels_last_min_hw`` at each forward; None or 0: layouts as they
    come). On other devices neither reaches ``fastsynth.cpu``.
    """

    def __init__(self, *modules: nn.Module, fuse: bool | None = None,
                 channels_last_min_hw: int | str | None = "auto"):
        super().__init__(*modules)
        self.fuse = fuse
        self.channels_last_min_hw = channels_last_min_hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self._modules.values())
        cpu = None
        if x.device.type == "cpu":
            from .. import cpu  # the CPU tuning: layouts by map size, where fusing pays

            min_hw = cpu.resolve_min_hw(getattr(self, "channels_last_min_hw", "auto"))
        i = 0
        while i < len(mods):
            m = mods[i]
            if (self.fuse is not False and i + 1 < len(mods) and x.dim() == 4 and _is_nearest_2x(m)
                    and _is_plain_conv3x3(mods[i + 1])
                    and (self.fuse or (cpu is not None and cpu.upsample_worth_fusing(x, mods[i + 1])))):
                conv = mods[i + 1]
                # the transposed convolution reads the input at its size: its layout is chosen
                # for that size, and a channels_last input gives a channels_last output
                if cpu is not None:
                    x = cpu.conv_input_layout(x, min_hw)
                x = upsample2x_conv3x3(x, conv.weight, conv.bias)
                i += 2
            elif type(m) is nn.Conv2d and cpu is not None:
                x = cpu.conv_output_layout(m(cpu.conv_input_layout(x, min_hw)), min_hw)
                i += 1
            else:
                x = m(x)
                i += 1
        return x
