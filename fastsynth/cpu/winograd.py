"""Frozen-weight 3x3 convolutions on the CPU by Winograd's F(2x2, 3x3) (csrc/cpu/winograd_conv.cpp).

During synthesis the teacher's and the student's weights are frozen, so each of their
convolutions needs its forward and its input gradient only. For a 3x3 convolution with stride 1
and padding 1 the input gradient is again such a convolution (weights flipped in space,
input/output channels swapped), so both directions run as

    y = A^T [ sum_c (G g_kc G^T) .* (B^T d_c B) ] A        per 2x2 output tile,

16 multiply-adds per channel pair and tile instead of the direct method's 36 (2.25x fewer; the
sums over channels are 16 GEMMs). ``U = G g G^T`` is computed once per weight in float64 and
kept until the weight changes (same tensor, same version counter); the input gradient reads the
same U (the flipped kernel's transform is U with its 16 positions permuted and its channels
transposed). The transforms' coefficients are 0, +-1 and 1/2, so float32 results differ from the
direct convolution by the rounding of the sums only: measured 6-7e-7 relative to the largest
output against 1-3e-6 for oneDNN's direct convolution, both against float64
(docs/PERFORMANCE.md, "Sixth pass"). Non-finite inputs give non-finite outputs in the tiles they
touch (NaN propagates; an inf may come out as NaN where the direct sum would keep the inf).

Used for: CPU float32 inputs outside autocast; weights that need no gradient (inside
torch.compile only weights transformed beforehand by ``prepare_winograd``); 3x3 kernels with
stride 1, padding 1, dilation 1, one group and zero padding; both channel counts at least
``fastsynth.cpu.config.winograd_min_channels`` (measured faster from 128 channels on; at 64 it
is a wash; 0 turns the path off). The output is channels_last (its tiles are written
channel-contiguous); any input layout is accepted.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import _ext
from ..fuse import ConvBNFold
from ._config import config
from .layout import derived_from_frozen

__all__ = ["winograd_weight", "winograd_conv3x3", "winograd_applies", "is_winograd_shape", "frozen_conv3x3",
           "prepare_winograd"]

# G of F(2x2, 3x3): U = G g G^T (4x4 per channel pair)
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """``G g G^T`` of a (K, C, 3, 3) weight as the kernel's (16, C, K) operand, computed in float64
    and rounded once to the weight's dtype."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"winograd_weight: weight must have shape (K, C, 3, 3), got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.detach().to(torch.float64), g)  # (4, 4, C, K)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


class _WinogradConv3x3(torch.autograd.Function):
    """y = conv2d(x, w, bias, padding=1) from the transformed weights; the weights are frozen, so
    the backward returns the input gradient only (and the bias's, when it needs one). The input
    gradient reads the same U (``input_grad=True``: the flipped kernel's transform is a
    permutation of U's 16 positions with the channels transposed)."""

    @staticmethod
    def forward(ctx, x, u, bias):
        ctx.save_for_backward(u)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return torch.ops.fastsynth.winograd_conv3x3(x, u, bias)

    @staticmethod
    def backward(ctx, grad_y):
        (u,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.fastsynth.winograd_conv3x3(grad_y, u, None, True)
        grad_bias = grad_y.sum((0, 2, 3)) if ctx.bias_grad else None
        return grad_x, None, grad_bias


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     owner: nn.Module | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(2x2, 3x3) on the CPU, with the
    input gradient (``weight`` gets none: it must not require one). The transformed weights are
    cached on ``owner`` (if given) until ``weight`` changes. Output in channels_last."""
    if weight.requires_grad:
        raise ValueError("winograd_conv3x3: weight must not require grad (the path serves frozen weights)")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[-2:] != (3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"winograd_conv3x3: expected x (N, C, H, W) and weight (K, C, 3, 3), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise ValueError(f"winograd_conv3x3: x and weight must be float32/float64 CPU tensors of one dtype, got "
                         f"{x.dtype} on {x.device} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"winograd_conv3x3: bias must be ({weight.shape[0]},) of dtype {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    return _WinogradConv3x3.apply(x, _transformed(weight, owner), bias)


def _transformed(weight: torch.Tensor, owner: nn.Module | None) -> torch.Tensor:
    """U of ``weight``, kept on ``owner`` while the weight is unchanged (16/9 of the weight's
    memory; re-made in place, so a compiled graph holding it reads the new values)."""
    if owner is None:
        return winograd_weight(weight)
    if torch.compiler.is_compiling():  # prepared eagerly (prepare_winograd); no version checks in a graph
        return owner.__dict__["_fs_winograd"].value
    return derived_from_frozen(owner, "_fs_winograd", weight, winograd_weight, in_place=True)


def is_winograd_shape(conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s geometry is one the path computes (3x3, stride 1, padding 1, ...)."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _weight_applies(conv: nn.Conv2d, weight: torch.Tensor) -> bool:
    min_ch = config.winograd_min_channels
    return (bool(min_ch) and _ext.has_extension() and weight.device.type == "cpu" and weight.dtype == torch.float32
            and not weight.requires_grad and min(conv.in_channels, conv.out_channels) >= min_ch
            and is_winograd_shape(conv))


def winograd_applies(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, owner: nn.Module | None = None) -> bool:
    """Whether ``conv`` (its geometry) with ``weight`` on input ``x`` takes the Winograd path now.
    Inside torch.compile only where ``prepare_winograd`` transformed the weight beforehand."""
    if torch.compiler.is_compiling() and (owner is None or owner.__dict__.get("_fs_winograd") is None
                                          or owner.__dict__["_fs_winograd"].value is None):
        return False
    return (_weight_applies(conv, weight) and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not torch.is_autocast_enabled("cpu"))


def frozen_conv3x3(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                   owner: nn.Module):
    """``conv``'s convolution of ``x`` with ``weight``/``bias`` by the Winograd path when it applies
    (``winograd_applies``), else None (the caller runs its usual convolution)."""
    if not winograd_applies(x, conv, weight, owner):
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    return winograd_conv3x3(x, weight, bias, owner)


def prepare_winograd(model: nn.Module) -> int:
    """Transform (or re-transform, in place, when they changed) the weights of every convolution in
    ``model`` that the Winograd path serves (``nn.Conv2d`` and ``fuse.ConvBNFold``), so that a
    torch.compile'd forward, which cannot check version counters, takes the path too. Call it
    eagerly before each compiled run in which the weights may have changed (the synthesizers do,
    each round). Returns how many convolutions are prepared."""
    n = 0
    for m in model.modules():
        if isinstance(m, ConvBNFold):
            m.refresh()
            conv, weight = m.conv, m.weight
        elif type(m) is nn.Conv2d:
            conv, weight = m, m.weight
        else:
            continue
        if _weight_applies(conv, weight):
            _transformed(weight, m)
            n += 1
        else:
            m.__dict__.pop("_fs_winograd", None)  # no longer served: the compiled graph must not take it
    return n


def _fake_winograd_conv3x3(x, u, bias, input_grad=False):
    k = u.shape[1] if input_grad else u.shape[2]
    return x.new_empty((x.shape[0], k, x.shape[2], x.shape[3])).contiguous(memory_format=torch.channels_last)


if _ext.has_extension():
    torch.library.register_fake("fastsynth::winograd_conv3x3")(_fake_winograd_conv3x3)
