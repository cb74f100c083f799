"""fastsynth's CPU-only tuning, in one optional room.

What a CPU synthesis step gains here, each measured against its absence (docs/PERFORMANCE.md):

- convolution inputs laid out by map size (``layout``: channels_last from
  ``config.channels_last_min_hw`` pixels up, NCHW below);
- frozen 3x3 stride-1 convolutions by Winograd F(2x2, 3x3), forward and input gradient
  (``winograd``; csrc/cpu/winograd_conv.cpp, with the BLAS's GEMM looked up at run time);
- the generators' nearest-2x upsample + 3x3 convolution fused above a size
  (``config.upsample_fuse_min_macs``);
- recycled large output blocks of the C++ kernels (csrc/cpu/large_alloc.h).

Every knob is a field of ``config`` (``CPUConfig``). Nothing on the GPU path imports this package
when it is imported itself: ``fastsynth.fuse`` asks ``convs.rewrite_convs`` which convolution to
run only when it builds the graph of a model on the CPU, ``fastsynth.nn.UpsampleConvSequential``
comes here only for CPU tensors, and the synthesizers call
``prepare_winograd`` only on the CPU.
"""
from __future__ import annotations

from ._config import CPUConfig, config, configured, resolve_min_hw
from .convs import conv, rewrite_convs
from .layout import conv_input_layout, conv_output_layout
from .winograd import prepare_winograd, winograd_conv3x3

__all__ = ["CPUConfig", "config", "configured", "resolve_min_hw", "conv", "rewrite_convs", "conv_input_layout",
           "conv_output_layout", "prepare_winograd", "winograd_conv3x3", "upsample_worth_fusing",
           "forget"]


def upsample_worth_fusing(x, conv_module) -> bool:
    """Whether ``UpsampleConvSequential`` (``fuse=None``) fuses a nearest-2x upsample of ``x`` with
    ``conv_module``: CPU tensors where the convolution on the upsampled map has at least
    ``config.upsample_fuse_min_macs`` multiply-adds (a threshold set for an earlier fused form
    that dispatched more ops; ``fastsynth.cpu.CPUConfig``)."""
    n, c, h, w = x.shape
    return x.device.type == "cpu" and n * c * conv_module.out_channels * 4 * h * w * 9 >= config.upsample_fuse_min_macs


def forget(model) -> None:
    """Drop the per-convolution Winograd transforms this package keeps on ``model``'s modules."""
    for m in model.modules():
        m.__dict__.pop("_fs_winograd", None)
