"""Triton kernels of the BatchNorm-statistics loss (fastsynth/ops/bn_stat_loss.py has the math).

All layers of a call are served by one statistics launch per tile shape (at most a few: the tile
follows each map's layout and row length), one merge launch and one backward launch per tile
shape. The feature maps have different shapes, strides and addresses, so each launch reads a small
int64 *work table* with one row per work item = (layer, block of BLOCK_C channels, range of
tiles), and an *address vector* with the data address of every layer (and of every gradient);
the kernels turn an address into a typed pointer (``.to(tl.pointer_type(...), bitcast=True)``;
this works on GPUs and under TRITON_INTERPRET=1).

Indexing (as in fastsynth/kernels/fused_bn.py). The (n, h, w) positions of a channel are collapsed on the
host into rows of L values (dimensions whose strides nest are merged: NCHW dense gives N rows of
H*W, channels_last dense one row of N*H*W, sliced maps N*H rows of W); row r starts at
(r // R0) * s1 + (r % R0) * s0. A tile is BLOCK_C channels x BLOCK_L consecutive values of one
row; its element offsets (channel * s_c + l * s_l) are computed once per program, each tile adds
a scalar row offset: two 32-bit divisions per tile, none per element (the per-element int64
division and modulo of a flat index cost ~100 registers). channels_last maps read up to 16
contiguous channels per position (coalesced), other maps read along their rows.

Device tables. The work tables depend only on the shapes, strides, dtype and device of the maps:
they are built once per such key with device-side ops (no host-to-device copy) and kept in a
bounded cache, so a CUDA graph that captures a call replays no host copy and later calls build
nothing. Only the addresses change between calls: fastsynth/kernels/addresses.py writes them
from kernel arguments into a device vector (captured by value in a graph).

  _bn_stats_chunk_kernel   one program per work item: blocked two-pass statistics of each tile,
                           merged across tiles with Chan's formula -> (mean, m2, n) per channel
  _bn_stats_merge_kernel   one program per channel: exact parallel merge of its chunk partials
  _bn_backward_kernel      one program per work item: g = 2 g_var (x - mu)/M + g_mu/M
"""
from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl

from .addresses import addresses, capturing

_MAX_CHUNK = 16384      # values of one channel per work item
_TILE = 1024            # values per tile (NCHW-like maps)
_CL_TILE = 256          # values per tile of channels_last maps (see fastsynth/kernels/fused_bn.py: registers)
_MAX_BLOCK_C = 16       # channels per tile
_CACHE_MAX = 64         # work tables kept (keys: shapes/strides/dtype/device of a call)
_CACHE: collections.OrderedDict = collections.OrderedDict()
_BUILDS = 0             # work tables built so far (tests: a repeated shape builds nothing)

# stats work-table columns
_S_COLS = ("layer", "c0", "C", "t0", "t1", "LT", "L", "R0", "sc", "s1", "s0", "sl", "p0", "pstride")
# backward work-table columns
_B_COLS = ("layer", "c0", "C", "t0", "t1", "LT", "L", "R0", "sc", "s1", "s0", "sl",
           "ch0", "gsc", "g1", "g0", "gl", "M")


@triton.jit
def _tile_setup(table_ptr, addr_ptr, dtype_ref_ptr, NCOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                OFF64: tl.constexpr, UNIT: tl.constexpr):
    """The program's work-table row and its columns 0..11: pointer to the item's first channel, the
    tile's element offsets (computed once), channel mask, value index and stride along a row, the
    tile range [t0, t1) and the row geometry (LT tiles and L values per row, R0, row strides s1, s0)."""
    row = table_ptr + tl.program_id(0) * NCOL
    c0 = tl.load(row + 1)
    sc = tl.load(row + 8)
    elem = dtype_ref_ptr.dtype.element_ty
    base = tl.load(addr_ptr + tl.load(row + 0)).to(tl.pointer_type(elem), bitcast=True) + c0 * sc
    nc = (tl.load(row + 2) - c0).to(tl.int32)
    ci = tl.arange(0, BLOCK_C)
    li = tl.arange(0, BLOCK_L)
    sl = tl.load(row + 11)
    off = _offsets(ci, li, sc, sl, OFF64, UNIT)
    t0 = tl.load(row + 3).to(tl.int32)
    t1 = tl.load(row + 4).to(tl.int32)
    LT = tl.load(row + 5).to(tl.int32)
    L = tl.load(row + 6).to(tl.int32)
    R0 = tl.load(row + 7).to(tl.int32)
    return row, base, off, ci < nc, li, sl, t0, t1, LT, L, R0, tl.load(row + 9), tl.load(row + 10)


@triton.jit
def _offsets(ci, li, sc, sl, OFF64: tl.constexpr, UNIT: tl.constexpr):
    """ci * sc + li * sl as a [BLOCK_C, BLOCK_L] tile. UNIT (a launch constant): 1 when every map of
    the launch has sc == 1 (channels_last), 2 when sl == 1 (rows contiguous), 0 otherwise; the
    compiler then knows which dimension is contiguous and vectorises the loads and stores."""
    if UNIT == 1:
        if OFF64:
            return ci.to(tl.int64)[:, None] + li.to(tl.int64)[None, :] * sl
        else:
            return ci[:, None] + li[None, :] * sl.to(tl.int32)
    elif UNIT == 2:
        if OFF64:
            return ci.to(tl.int64)[:, None] * sc + li.to(tl.int64)[None, :]
        else:
            return ci[:, None] * sc.to(tl.int32) + li[None, :]
    else:
        if OFF64:
            return ci.to(tl.int64)[:, None] * sc + li.to(tl.int64)[None, :] * sl
        else:
            return ci[:, None] * sc.to(tl.int32) + li[None, :] * sl.to(tl.int32)


@triton.jit
def _tile_pos(t, LT, R0, BLOCK_L: tl.constexpr):
    """Tile t as (r // R0, r % R0, l0) of its row r (int64, int64, int32): two 32-bit divisions."""
    r = t // LT
    l0 = (t - r * LT) * BLOCK_L
    q = r // R0
    return q.to(tl.int64), (r - q * R0).to(tl.int64), l0


@triton.jit
def _merge_tile(mean, m2, cnt, v, mask, bn):
    """Per-channel (mean, m2, count) after merging a tile of ``bn`` values per channel (``v``, zero
    where ``mask`` is off): the tile's mean and centred sum of squares (two passes over registers),
    then Chan's parallel update."""
    bmean = tl.sum(v, axis=1) / bn
    d = tl.where(mask, v - bmean[:, None], 0.0)
    bm2 = tl.sum(d * d, axis=1)
    tot = cnt + bn
    delta = bmean - mean
    return mean + delta * (bn / tot), m2 + bm2 + delta * delta * (cnt * bn / tot), tot


@triton.jit
def _bn_stats_chunk_kernel(table_ptr, addr_ptr, dtype_ref_ptr, partial_ptr, NCOL: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_L: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr, UNIT: tl.constexpr):
    """Statistics of one work item (a row of the [n_items, NCOL] int64 work table, _S_COLS) of the
    maps at the addresses ``addr_ptr`` ([n_layers] int64; ``dtype_ref_ptr``, any tensor of the
    input dtype, gives the element type): (mean, m2, n) of each of its channels into
    ``partial_ptr`` ([n_partials, 3], accumulator dtype)."""
    row, base, off, cmask, li, sl, t0, t1, LT, L, R0, s1, s0 = _tile_setup(table_ptr, addr_ptr, dtype_ref_ptr, NCOL,
                                                                          BLOCK_C, BLOCK_L, OFF64, UNIT)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    cnt = tl.zeros([], dtype=ACC)
    for t in range(t0, t1):
        q, rr, l0 = _tile_pos(t, LT, R0, BLOCK_L)
        mask = cmask[:, None] & (li < L - l0)[None, :]
        v = tl.load(base + (q * s1 + rr * s0 + l0.to(tl.int64) * sl) + off, mask=mask, other=0.0).to(ACC)
        mean, m2, cnt = _merge_tile(mean, m2, cnt, v, mask, tl.minimum(L - l0, BLOCK_L).to(ACC))
    po = (tl.load(row + 12) + tl.arange(0, BLOCK_C).to(tl.int64) * tl.load(row + 13)) * 3
    tl.store(partial_ptr + po + 0, mean, mask=cmask)
    tl.store(partial_ptr + po + 1, m2, mask=cmask)
    tl.store(partial_ptr + po + 2, cnt + tl.zeros([BLOCK_C], dtype=ACC), mask=cmask)


@triton.jit
def _bn_stats_merge_kernel(
    partial_ptr,  # [n_partials, 3] (mean, m2, n) of every chunk, each channel's chunks adjacent
    chan_ptr,     # [n_channels, 2] int64: first partial of the channel, number of chunks
    mean_ptr,     # [n_channels] statistics dtype
    var_ptr,      # [n_channels] statistics dtype
    BLOCK_K: tl.constexpr,
):
    ch = tl.program_id(0)
    first = tl.load(chan_ptr + ch * 2)
    k = tl.load(chan_ptr + ch * 2 + 1)
    idx = tl.arange(0, BLOCK_K)
    mask = idx < k
    pm = tl.load(partial_ptr + (first + idx) * 3 + 0, mask=mask, other=0.0)
    pq = tl.load(partial_ptr + (first + idx) * 3 + 1, mask=mask, other=0.0)
    pn = tl.load(partial_ptr + (first + idx) * 3 + 2, mask=mask, other=0.0)
    total = tl.sum(pn, axis=0)
    mean = tl.sum(pm * pn, axis=0) / total
    d = tl.where(mask, pm - mean, 0.0)
    m2 = tl.sum(pq, axis=0) + tl.sum(pn * d * d, axis=0)
    tl.store(mean_ptr + ch, mean.to(mean_ptr.dtype.element_ty))
    tl.store(var_ptr + ch, (m2 / total).to(var_ptr.dtype.element_ty))


@triton.jit
def _bn_backward_kernel(table_ptr, addr_ptr, n_layers, dtype_ref_ptr, mean_ptr, gmean_ptr, gvar_ptr,
                        NCOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
                        OFF64: tl.constexpr, UNIT: tl.constexpr):
    """Gradient of one work item (a row of the work table, _B_COLS): ``addr_ptr`` ([2 * n_layers]
    int64) holds the addresses of the maps, then of their gradients; ``mean_ptr``, ``gmean_ptr``,
    ``gvar_ptr`` ([n_channels]) the batch means, dL/dmean and dL/dvar."""
    row, base, off, cmask, li, sl, t0, t1, LT, L, R0, s1, s0 = _tile_setup(table_ptr, addr_ptr, dtype_ref_ptr, NCOL,
                                                                          BLOCK_C, BLOCK_L, OFF64, UNIT)
    elem = dtype_ref_ptr.dtype.element_ty
    gsc = tl.load(row + 13)
    g1 = tl.load(row + 14)
    g0 = tl.load(row + 15)
    gl = tl.load(row + 16)
    gbase = tl.load(addr_ptr + n_layers + tl.load(row + 0)).to(tl.pointer_type(elem), bitcast=True) + \
        tl.load(row + 1) * gsc
    ci = tl.arange(0, BLOCK_C)
    goff = _offsets(ci, li, gsc, gl, OFF64, UNIT)
    ch = tl.load(row + 12) + ci
    count = tl.load(row + 17).to(ACC)  # M = N*H*W of the layer
    mu = tl.load(mean_ptr + ch, mask=cmask, other=0.0).to(ACC)
    scale = 2.0 * tl.load(gvar_ptr + ch, mask=cmask, other=0.0).to(ACC) / count
    shift = tl.load(gmean_ptr + ch, mask=cmask, other=0.0).to(ACC) / count
    for t in range(t0, t1):
        q, rr, l0 = _tile_pos(t, LT, R0, BLOCK_L)
        l64 = l0.to(tl.int64)
        mask = cmask[:, None] & (li < L - l0)[None, :]
        v = tl.load(base + (q * s1 + rr * s0 + l64 * sl) + off, mask=mask, other=0.0).to(ACC)
        g = scale[:, None] * (v - mu[:, None]) + shift[:, None]
        tl.store(gbase + (q * g1 + rr * g0 + l64 * gl) + goff, g.to(elem), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rows(shape, xstride, gstride):
    """Row geometry of the positions (all dims but 1) of a 2/3/4-D map and its gradient:
    (L, R, R0, (s1, s0, sl) of x, (s1, s0, sl) of g). Dims whose strides nest in both are merged."""
    dims = [(shape[d], xstride[d], gstride[d]) for d in [0] + list(range(2, len(shape))) if shape[d] != 1]
    if not dims:
        dims = [(1, 0, 0)]
    merged = [dims[-1]]
    for size, sx, sg in reversed(dims[:-1]):
        isz, isx, isg = merged[0]
        if sx == isz * isx and sg == isz * isg:
            merged[0] = (size * isz, isx, isg)
        else:
            merged.insert(0, (size, sx, sg))
    L, sxl, sgl = merged[-1]
    if len(merged) == 1:
        return L, 1, 1, (0, 0, sxl), (0, 0, sgl)
    if len(merged) == 2:
        r, sx1, sg1 = merged[0]
        return L, r, 1, (sx1, 0, sxl), (sg1, 0, sgl)
    (r1, sx1, sg1), (r0, sx0, sg0) = merged[0], merged[1]
    return L, r1 * r0, r0, (sx1, sx0, sxl), (sg1, sg0, sgl)


def _tile_shape(C: int, L: int, sc: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_L) of a map: channels_last reads up to 16 contiguous channels per position
    in tiles of 256 values; other maps read along their rows (tiles of 1024, up to 16 channels of
    short rows)."""
    if sc == 1 and C > 1:
        block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
        return block_c, min(triton.next_power_of_2(L), _CL_TILE // block_c)
    block_l = min(triton.next_power_of_2(L), _TILE)
    if block_l == _TILE:
        return 1, block_l
    return min(triton.next_power_of_2(C), _CL_TILE // block_l, _MAX_BLOCK_C) if block_l < _CL_TILE else 1, block_l


def _plan(xs, grads):
    """The work tables of a call, built with device-side ops (no host-to-device copy) and cached
    per (shapes, strides, dtype, device). Returns (groups, chans, n_partials, max_chunks):
    ``groups``: (table, n_items, BLOCK_C, BLOCK_L, OFF64, UNIT) per tile shape and contiguous dim; ``chans``: [n_channels, 2]
    (first partial, chunk count) of every channel (None for the backward)."""
    global _BUILDS
    dev = xs[0].device
    backward = grads is not None
    gs = grads if backward else xs
    key = (backward, xs[0].dtype, dev, _interpreting(),
           tuple((tuple(x.shape), tuple(x.stride()), tuple(g.stride())) for x, g in zip(xs, gs)))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    _BUILDS += 1
    ncol = len(_B_COLS if backward else _S_COLS)
    parts: dict = {}  # (BLOCK_C, BLOCK_L) -> [item tables], OFF64
    chans = []
    partial = channel = max_chunks = 0
    for li, (x, g) in enumerate(zip(xs, gs)):
        C = x.shape[1]
        L, R, R0, (s1, s0, sl), (g1, g0, gl) = _rows(x.shape, x.stride(), g.stride())
        sc, gsc = x.stride(1), g.stride(1)
        bc, bl = _tile_shape(C, L, sc)
        lt = triton.cdiv(L, bl)
        tiles = R * lt
        per_item = max(1, _MAX_CHUNK // bl)
        chunks = max(1, triton.cdiv(tiles, per_item))
        cblocks = triton.cdiv(C, bc)
        i = torch.arange(cblocks * chunks, dtype=torch.int64, device=dev)
        b = i // chunks
        k = i - b * chunks
        c0 = b * bc
        t0 = k * per_item
        cols = {"layer": li, "c0": c0, "C": C, "t0": t0, "t1": torch.clamp(t0 + per_item, max=tiles), "LT": lt,
                "L": L, "R0": R0, "sc": sc, "s1": s1, "s0": s0, "sl": sl}
        if backward:
            cols.update({"ch0": channel + c0, "gsc": gsc, "g1": g1, "g0": g0, "gl": gl, "M": x.numel() // max(C, 1)})
        else:
            cols.update({"p0": partial + c0 * chunks + k, "pstride": chunks})
            ci = torch.arange(C, dtype=torch.int64, device=dev)
            chans.append(torch.stack([partial + ci * chunks, torch.full_like(ci, chunks)], dim=1))
        tab = torch.empty((i.numel(), ncol), dtype=torch.int64, device=dev)
        for j, name in enumerate(_B_COLS if backward else _S_COLS):
            v = cols[name]
            if isinstance(v, torch.Tensor):
                tab[:, j] = v
            else:
                tab[:, j].fill_(v)
        off64 = any((bc - 1) * abs(a) + (bl - 1) * abs(c) >= 2 ** 31 for a, c in ((sc, sl), (gsc, gl)))
        unit = 1 if sc == gsc == 1 else 2 if sl == gl == 1 else 0
        entry = parts.setdefault((bc, bl, unit), [[], False])
        entry[0].append(tab)
        entry[1] = entry[1] or off64
        partial += C * chunks
        channel += C
        max_chunks = max(max_chunks, chunks)
    groups = []
    for (bc, bl, unit), (tabs, off64) in parts.items():
        tab = torch.cat(tabs) if len(tabs) > 1 else tabs[0]
        groups.append((tab, tab.shape[0], bc, bl, off64, unit))
    plan = (groups, (torch.cat(chans) if len(chans) > 1 else chans[0]) if not backward else None,
            partial, max_chunks)
    if not capturing(dev):  # tables made inside a capture live in the graph's pool: not kept
        _CACHE[key] = plan
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return plan


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_batch_stats_multi(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated per-channel (mean, biased var) of every map in ``xs`` (same dtype/device)."""
    dev = xs[0].device
    groups, chans, n_partials, max_chunks = _plan(xs, None)
    addr = addresses(xs, dev)
    sdt = _stat_dtype(xs[0].dtype)
    partials = torch.empty(n_partials, 3, dtype=sdt, device=dev)
    n_ch = chans.shape[0]
    means = torch.empty(n_ch, dtype=sdt, device=dev)
    variances = torch.empty(n_ch, dtype=sdt, device=dev)
    acc = _acc(xs[0].dtype)
    for table, n_items, bc, bl, off64, unit in groups:
        _bn_stats_chunk_kernel[(n_items,)](table, addr, xs[0], partials, NCOL=len(_S_COLS), BLOCK_C=bc, BLOCK_L=bl,
                                           ACC=acc, OFF64=off64, UNIT=unit)
    _bn_stats_merge_kernel[(n_ch,)](partials, chans, means, variances, BLOCK_K=triton.next_power_of_2(max_chunks))
    return means, variances


def bn_batch_stats_multi_backward(xs, means, g_means, g_vars) -> list[torch.Tensor]:
    """Gradients of the maps in ``xs`` given dL/dmean and dL/dvar of every channel."""
    dev = xs[0].device
    grads = [torch.empty_like(x) for x in xs]
    groups, _, _, _ = _plan(xs, grads)
    addr = addresses(list(xs) + grads, dev)
    acc = _acc(xs[0].dtype)
    means, g_means, g_vars = means.contiguous(), g_means.contiguous(), g_vars.contiguous()
    for table, n_items, bc, bl, off64, unit in groups:
        _bn_backward_kernel[(n_items,)](table, addr, len(xs), xs[0], means, g_means, g_vars, NCOL=len(_B_COLS),
                                        BLOCK_C=bc, BLOCK_L=bl, ACC=acc, OFF64=off64, UNIT=unit)
    return grads
