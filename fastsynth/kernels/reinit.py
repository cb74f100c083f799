"""Triton kernel of fastsynth.ops.reinit_: one multi-tensor launch per dtype in the list.

Each program fills BLOCK consecutive elements of one tensor, located through a block table
(tensor id and first local element of every program) and a tensor table (data pointer, global
offset, numel, parameters). Draws come from Triton's Philox (``tl.randn``/``tl.rand``) keyed by the
seed read from its tensor and by the element's global index (its offset in the concatenated list),
so the values depend neither on BLOCK nor on how the list is split into launches; the stream is
Triton's, not the CPU/CUDA kernels' (tested statistically).

The tables depend only on the sizes, distributions and parameters of the call: they are built on
the device once per such key and cached (``_tables``); the data pointers, which change between
calls, reach the device as kernel arguments (fastsynth/kernels/addresses.py). No call copies host
memory to the device, so a CUDA graph that captures reinit replays no host copy.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from .addresses import addresses, capturing

# 8 warps (2 values per thread at BLOCK 1024): with 4, Triton 3.8's ptxas spills 4 bytes on sm_80
# (Triton 3.9 does not); registers stay at 32 either way.
_NUM_WARPS = 8

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


_CACHE_MAX = 64
_CACHE: collections.OrderedDict = collections.OrderedDict()
_BUILDS = 0  # tables built so far (tests: a repeated call builds nothing)


def _tables(device, numels, begins, dists, params, block):
    """(begin, numel, dist, lo, hi, block_tensor, block_start) device tables of one dtype group,
    built with device-side fills (no host-to-device copy) and cached per (device, sizes, offsets,
    distributions, parameters, block): a CUDA graph capturing the call replays no host copy, and a
    repeated call builds nothing."""
    global _BUILDS
    key = (device, tuple(numels), tuple(begins), tuple(dists), tuple(params), block)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    _BUILDS += 1
    t = len(numels)
    per = [(torch.int64, begins), (torch.int64, numels), (torch.int32, dists),
           (torch.float64, [p[0] for p in params]), (torch.float64, [p[1] for p in params])]
    out = []
    for dt, vals in per:
        tab = torch.empty(t, dtype=dt, device=device)
        for j, v in enumerate(vals):
            tab[j:j + 1].fill_(v)
        out.append(tab)
    nblocks = [triton.cdiv(n, block) for n in numels]
    blk_t = torch.empty(sum(nblocks), dtype=torch.int32, device=device)
    blk_s = torch.empty(sum(nblocks), dtype=torch.int64, device=device)
    pos = 0
    for j, nb in enumerate(nblocks):
        blk_t[pos:pos + nb].fill_(j)
        torch.arange(0, nb * block, block, dtype=torch.int64, device=device, out=blk_s[pos:pos + nb])
        pos += nb
    tables = tuple(out) + (blk_t, blk_s)
    if not capturing(device):  # tables made inside a capture live in the graph's pool: not kept
        _CACHE[key] = tables
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return tables


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
        begin_t, numel_t, dist_t, lo_t, hi_t, blk_t, blk_s = _tables(
            device, [tensors[i].numel() for i in idx], [begins[i] for i in idx], [int(dists[i]) for i in idx],
            [(float(params[i][0]), float(params[i][1])) for i in idx], block)
        w = torch.finfo(dtype).bits
        _reinit_kernel[(blk_t.shape[0],)](
            addresses([tensors[i] for i in idx], device), begin_t, numel_t, dist_t, lo_t, hi_t, blk_t, blk_s, seed,
            OUT=_TL_DTYPE[dtype], OUT_INT=_TL_INT[dtype], MAXPOS=(1 << (w - 1)) - 1,
            MIN_NEG_PLUS_1=-(1 << (w - 1)) + 1, IS_F64=dtype == torch.float64, BLOCK=block,
            num_warps=_NUM_WARPS,
        )
