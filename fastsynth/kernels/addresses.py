"""Device vector of tensor addresses, shared by the multi-tensor kernels (bn_stat_loss, reinit).

A multi-tensor launch reaches its tensors through a device vector of their data addresses. The
addresses change between calls, so they are written per call by ``_addresses_kernel`` from its
pointer arguments (kernel arguments, captured by value in a CUDA graph): no host-to-device copy,
so a graph that captures a call replays no read of host memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ADDR_ARGS = 16  # tensors per _addresses_kernel launch


@triton.jit(do_not_specialize_on_alignment=[f"p{i}" for i in range(16)])
def _addresses_kernel(out_ptr, count, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15):
    """out[i] = address of p_i for i < count (unused arguments repeat a valid tensor)."""
    tl.store(out_ptr + 0, p0.to(tl.int64), mask=0 < count)
    tl.store(out_ptr + 1, p1.to(tl.int64), mask=1 < count)
    tl.store(out_ptr + 2, p2.to(tl.int64), mask=2 < count)
    tl.store(out_ptr + 3, p3.to(tl.int64), mask=3 < count)
    tl.store(out_ptr + 4, p4.to(tl.int64), mask=4 < count)
    tl.store(out_ptr + 5, p5.to(tl.int64), mask=5 < count)
    tl.store(out_ptr + 6, p6.to(tl.int64), mask=6 < count)
    tl.store(out_ptr + 7, p7.to(tl.int64), mask=7 < count)
    tl.store(out_ptr + 8, p8.to(tl.int64), mask=8 < count)
    tl.store(out_ptr + 9, p9.to(tl.int64), mask=9 < count)
    tl.store(out_ptr + 10, p10.to(tl.int64), mask=10 < count)
    tl.store(out_ptr + 11, p11.to(tl.int64), mask=11 < count)
    tl.store(out_ptr + 12, p12.to(tl.int64), mask=12 < count)
    tl.store(out_ptr + 13, p13.to(tl.int64), mask=13 < count)
    tl.store(out_ptr + 14, p14.to(tl.int64), mask=14 < count)
    tl.store(out_ptr + 15, p15.to(tl.int64), mask=15 < count)


def addresses(tensors, device) -> torch.Tensor:
    """int64 device vector of the data addresses of ``tensors`` (16 per launch)."""
    out = torch.empty(len(tensors), dtype=torch.int64, device=device)
    for s in range(0, len(tensors), _ADDR_ARGS):
        part = list(tensors[s:s + _ADDR_ARGS])
        n = len(part)
        part += [part[0]] * (_ADDR_ARGS - n)
        _addresses_kernel[(1,)](out[s:], n, *part)
    return out


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph (tables built then live
    in the graph's memory pool and are not cached)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
