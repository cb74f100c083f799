"""Triton kernel of fastsynth.ops.reinit_: one multi-tensor launch per dtype in the list.

Each program fills BLOCK consecutive elements of one tensor, located through a block table
(tensor id and first local element of every program) and a tensor table (data pointer, global
offset, numel, parameters). Draws come from Triton's Philox (``tl.randn``/``tl.rand``) keyed by the
seed read from its tensor and by the element's global index (its offset in the concatenated list),
so the values depend neither on BLOCK nor on how the list is split into launches; the stream is
Triton's, not the CPU/CUDA kernels' (tested statistically).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TL_INT = {torch.float32: tl.int32, torch.float64: tl.int64, torch.float16: tl.int16, torch.bfloat16: tl.int16}


@triton.jit
def _reinit_kernel(
    ptr_table,      # [T] int64: data pointer of each tensor (all of dtype OUT)
    begin_table,    # [T] int64: global index of each tensor's first element
    numel_table,    # [T] int64: number of elements of each tensor
    dist_table,     # [T] int32: 0 normal, 1 uniform, 2 constant
    lo_table,       # [T] float64: normal mean / uniform a / constant value
    hi_table,       # [T] float64: normal std / uniform b
    block_tensor,   # [P] int32: tensor filled by program p
    block_start,    # [P] int64: first local element filled by program p
    seed_ptr,       # [1] int64: Philox key
    OUT: tl.constexpr,      # output dtype
    OUT_INT: tl.constexpr,  # integer type of OUT's width (bit manipulation)
    MAXPOS: tl.constexpr,   # 2^(w-1) - 1: mask of the magnitude bits
    MIN_NEG_PLUS_1: tl.constexpr,  # bits of the smallest negative subnormal, as a signed integer
    IS_F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    # stored through an integer pointer of the same width (bitcast): the interpreter has no bf16
    base = tl.load(ptr_table + t).to(tl.pointer_type(OUT_INT))
    n = tl.load(numel_table + t)
    begin = tl.load(begin_table + t)
    dist = tl.load(dist_table + t)
    lo = tl.load(lo_table + t)
    hi = tl.load(hi_table + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    seed = tl.load(seed_ptr)
    gidx = begin + offs
    if dist == 0:
        v = lo + hi * tl.randn(seed, gidx).to(tl.float64)
    elif dist == 1:
        v = lo + (hi - lo) * tl.rand(seed, gidx).to(tl.float64)
    else:
        v = lo + tl.zeros([BLOCK], tl.float64)
    # narrow outputs go through float32 (the interpreter converts float64 -> bfloat16 wrongly)
    if IS_F64:
        out = v.to(OUT)
        back = out
    else:
        out = v.to(tl.float32).to(OUT)
        back = out.to(tl.float32).to(tl.float64)
    if dist == 1:
        # keep the value strictly below b after rounding: step to the next value toward -inf
        bits = out.to(OUT_INT, bitcast=True)
        mag_zero = (bits & MAXPOS) == 0
        stepped = tl.where(bits < 0, bits + 1, bits - 1)
        stepped = tl.where(mag_zero, MIN_NEG_PLUS_1, stepped).to(OUT_INT)
        out = tl.where(back >= hi, stepped.to(OUT, bitcast=True), out)
    tl.store(base + offs, out.to(OUT_INT, bitcast=True), mask=mask)


def reinit(tensors, seed: torch.Tensor, dists, params, block: int = 1024) -> None:
    """Launch the kernel once per dtype present in ``tensors``. ``dists``: per-tensor codes (0 normal,
    1 uniform, 2 constant); ``params``: per-tensor (lo, hi)."""
    device = tensors[0].device
    begins, pos = [], 0
    for t in tensors:
        begins.append(pos)
        pos += t.numel()
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype and t.numel() > 0]
        if not idx:
            continue
        blk_t, blk_s = [], []
        for j, i in enumerate(idx):
            for s in range(0, tensors[i].numel(), block):
                blk_t.append(j)
                blk_s.append(s)
        w = torch.finfo(dtype).bits

        def table(xs, dt):
            return torch.tensor(xs, dtype=dt, device=device)

        _reinit_kernel[(len(blk_t),)](
            table([tensors[i].data_ptr() for i in idx], torch.int64), table([begins[i] for i in idx], torch.int64),
            table([tensors[i].numel() for i in idx], torch.int64), table([dists[i] for i in idx], torch.int32),
            table([params[i][0] for i in idx], torch.float64), table([params[i][1] for i in idx], torch.float64),
            table(blk_t, torch.int32), table(blk_s, torch.int64), seed,
            OUT=_TL_DTYPE[dtype], OUT_INT=_TL_INT[dtype], MAXPOS=(1 << (w - 1)) - 1,
            MIN_NEG_PLUS_1=-(1 << (w - 1)) + 1, IS_F64=dtype == torch.float64, BLOCK=block,
        )
