"""Nearest 2x upsampling followed by a 3x3 convolution, without the upsampled map.

The generators of FastDFKD and NAYER grow their images with ``nn.Upsample(scale_factor=2)``
followed by ``nn.Conv2d(c, o, 3, padding=1)``. Every 2x2 block of the upsampled map repeats one
input pixel, so each output pixel of the convolution sees only 2x2 distinct input pixels, with
the 3x3 taps summed per distinct pixel. Along one axis, with u the input index and the output
index 2u + p (phase p in {0, 1}) and w0, w1, w2 the kernel taps:

    p = 0:  y[2u]     = w0 x[u-1] + (w1 + w2) x[u]
    p = 1:  y[2u + 1] = (w0 + w1) x[u] + w2 x[u+1]

(x zero outside the map, as the convolution's zero padding of the upsampled map). In 2-D each
of the four phases (p, q) is a 2x2 convolution of x (zero-padded by one row/column on the side
the phase reads past) with the taps combined as above; the four phase maps are interleaved into
the output. That is 16 multiply-adds per 2x2 output pixels instead of 36 (2.25x fewer FLOPs,
forward and both backward convolutions), and the upsampled map is never written or read.
Measured on this CPU (2 threads, batch 64, forward + backward to input and weight):
128->128 at 8->16 px 104 -> 78 ms, 128->64 at 16->32 px 265 -> 172 ms (docs/PERFORMANCE.md).

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

_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _tap_combinations() -> torch.Tensor:
    """[16, 9] 0/1 matrix: row 4 * phase + 2 * dy + dx of a phase's 2x2 kernel sums these 3x3 taps."""
    sets = (((0,), (1, 2)), ((0, 1), (2,)))  # sets[phase][d]: taps of one axis read by 2x2 tap d
    m = torch.zeros(16, 9, dtype=torch.float64)
    for k, (p, q) in enumerate(_PHASES):
        for dy in (0, 1):
            for dx in (0, 1):
                for a in sets[p][dy]:
                    for b in sets[q][dx]:
                        m[4 * k + 2 * dy + dx, 3 * a + b] = 1.0
    return m


_COMBINE = _tap_combinations()
_COMBINE_CACHE: dict = {}


def _phase_kernels(weight: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """[4, O, C, 2, 2]: the 2x2 kernels of phases (0,0), (0,1), (1,0), (1,1) from a 3x3 kernel
    (one matmul with the 0/1 combination matrix, so the step stays a handful of ops).
    ``channels_last``: each phase's [O, C, 2, 2] kernel is laid out channels_last (for a
    channels_last input; PyTorch would otherwise convert it inside every convolution)."""
    key = (weight.device, weight.dtype)
    m = _COMBINE_CACHE.get(key)
    if m is None:
        m = _COMBINE.to(device=weight.device, dtype=weight.dtype).t().contiguous()
        # not while tracing (a constant there), nor under inference_mode: an inference tensor
        # could not be saved for backward by a later training call
        if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
            _COMBINE_CACHE[key] = m
    o, c = weight.shape[:2]
    k = torch.mm(weight.reshape(o * c, 9), m).view(o, c, 4, 2, 2)  # [O, C, phase, dy, dx]
    if channels_last:
        return k.permute(2, 0, 3, 4, 1).contiguous().permute(0, 1, 4, 2, 3)  # memory [phase, O, dy, dx, C]
    return k.permute(2, 0, 1, 3, 4).contiguous()


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``, fused.

    x: [N, C, H, W]; weight: [O, C, 3, 3]; bias: [O] or None. Returns [N, O, 2H, 2W].
    """
    if x.dim() != 4:
        raise ValueError(f"upsample2x_conv3x3: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"upsample2x_conv3x3: weight must be [O, {x.shape[1]}, 3, 3], got shape {tuple(weight.shape)}")
    # a channels_last CPU input (the layout fastsynth.cpu gives large maps): kernels and output
    # in channels_last as well, so no convolution converts its operands
    cl = x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last)
    kernels = _phase_kernels(weight, channels_last=cl)
    outs = []
    for k, (p, q) in zip(kernels, _PHASES):
        # phase 0 reads one row/column before the map (u - 1), phase 1 one after (u + 1)
        outs.append(F.conv2d(F.pad(x, (1 - q, q, 1 - p, p)), k, bias))
    n, o, h, w = outs[0].shape
    if cl:
        return _InterleaveChannelsLast.apply(*outs)
    # stack, then one interleaving copy: writing each phase into a stride-2 view of a preallocated
    # NCHW output instead measured no faster (80 vs 84 ms, 186 vs 197 ms fwd+bwd at the sizes above)
    y = torch.stack(outs, 2)  # [N, O, 4, H, W], phases in (p, q) order
    # y[n, o, (p, q), u, v] -> out[n, o, 2u + p, 2v + q]
    return y.view(n, o, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, o, 2 * h, 2 * w)


class _InterleaveChannelsLast(torch.autograd.Function):
    """Four channels_last phase maps [N, O, H, W] (phases (0,0), (0,1), (1,0), (1,1)) into one
    channels_last [N, O, 2H, 2W] map, whose memory [N, 2H, 2W, O] is [N, H, 2, W, 2, O]: one
    strided copy per phase forward (O contiguous values at a time), and one backward that cuts
    the gradient into four channels_last phase gradients, the layout their convolutions take.
    (Slice assignment under autograd cloned and zero-filled the whole gradient per phase.)"""

    @staticmethod
    def forward(ctx, y00, y01, y10, y11):
        n, o, h, w = y00.shape
        out = torch.empty((n, o, 2 * h, 2 * w), dtype=y00.dtype, device=y00.device,
                          memory_format=torch.channels_last)
        slots = out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, o)
        for y_k, (p, q) in zip((y00, y01, y10, y11), _PHASES):
            slots[:, :, p, :, q, :].copy_(y_k.permute(0, 2, 3, 1))
        return out

    @staticmethod
    def backward(ctx, grad):
        n, o, h2, w2 = grad.shape
        h, w = h2 // 2, w2 // 2
        slots = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(n, h, 2, w, 2, o)
        return tuple(slots[:, :, p, :, q, :].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
                     for p, q in _PHASES)


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
                # the phase convolutions run at the input's size: its layout is chosen for that
                # size, and a channels_last input gives a channels_last output
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
