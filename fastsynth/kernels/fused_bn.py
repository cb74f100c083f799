"""Triton kernels of the fused teacher BatchNorm (math: fastsynth/ops/fused_bn.py).

Indexing. The (n, h, w) positions of a channel are collapsed on the host into rows of L values
(``_geometry``): dimensions whose strides nest in x and in the output are merged (NCHW dense: N
rows of H*W; channels_last dense: one row of N*H*W; sliced maps: N*H rows of W), and a row r
starts at (r // R0) * s1 + (r % R0) * s0 (R0 == 1, a Triton constant, when at most two dimensions
remain). A program owns a block of BLOCK_C channels and a contiguous range of tiles; a tile is
BLOCK_C channels x BLOCK_L consecutive values of one row. Its element offsets
(channel * s_c + l * s_l) do not depend on the tile: they are computed once, and each tile adds a
scalar row offset (one 32-bit division per tile, none per element). BLOCK_C/BLOCK_L follow the
layout (``_launch_config``): channels_last reads up to 16 contiguous channels per position
(coalesced), NCHW reads along the rows with as many channels (up to 16) as fill a tile of short
rows.

Forward: grid (channel blocks, SPLITS); each program writes y and merges the (count, mean, M2) of
each tile into per-channel running Welford states (Chan's formula); a second tiny kernel merges
the SPLITS partial states of each channel. Backward: the same grid, one elementwise pass;
dgamma/dbeta partial sums per program and channel. y/grad_x are dense in the output format.

Instance means (WITH_INST): the batch dimension is kept out of the row merging, so a row -- and
every tile -- lies in one sample n = r // RS (RS rows per sample); the forward adds each tile's
channel sums / (H W) to inst[n, c] (an atomic add per tile and channel into a zeroed [N, C]
buffer: the order of the additions, and so the last bits, may vary between runs), the backward
adds g_inst[n, c] / (H W) to each element of the tile.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_offsets(C, c0, L, sc, sl, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, OFF64: tl.constexpr):
    """Offsets of a [BLOCK_C, BLOCK_L] tile relative to (channel c0, row start), and the channel mask."""
    ci = tl.arange(0, BLOCK_C)
    li = tl.arange(0, BLOCK_L)
    cmask = (c0 + ci) < C
    if OFF64:
        off = ci.to(tl.int64)[:, None] * sc + li.to(tl.int64)[None, :] * sl
    else:
        off = ci[:, None] * sc + li[None, :] * sl
    return off, cmask, li


@triton.jit
def _split_tiles(s, per_split, T):
    """The tiles [t0, t1) of split s."""
    t0 = s * per_split
    return t0, tl.minimum(t0 + per_split, T)


@triton.jit
def _tile_at(t, LT, L, cmask, li, BLOCK_L: tl.constexpr):
    """Row r, first value l0 and element mask of tile t (LT tiles per row)."""
    r = t // LT
    l0 = (t - r * LT) * BLOCK_L
    mask = cmask[:, None] & (li < L - l0)[None, :]
    return r, l0, mask


@triton.jit
def _channel_affine(w_ptr, b_ptr, rm_ptr, rv_ptr, cidx, cmask, eps, ACC: tl.constexpr):
    """(scale, shift, invstd, running mean) of the channels cidx (csrc/common/fused_bn_math.h)."""
    gamma = tl.load(w_ptr + cidx, mask=cmask, other=1.0).to(ACC)
    beta = tl.load(b_ptr + cidx, mask=cmask, other=0.0).to(ACC)
    rmean = tl.load(rm_ptr + cidx, mask=cmask, other=0.0).to(ACC)
    rvar = tl.load(rv_ptr + cidx, mask=cmask, other=1.0).to(ACC)
    invstd = 1.0 / tl.sqrt(rvar + eps)
    scale = gamma * invstd
    return scale, beta - rmean * scale, invstd, rmean


@triton.jit
def _row_start(r, R0, s1, s0):
    """Offset (int64) of the first value of row r: (r // R0) * s1 + (r % R0) * s0."""
    q = r // R0
    return q.to(tl.int64) * s1 + (r - q * R0).to(tl.int64) * s0


@triton.jit
def _fused_bn_fwd_kernel(
    x_ptr,  # [N, C, H, W] any strides
    y_ptr,  # [N, C, H, W] dense in the output format
    w_ptr, b_ptr, rm_ptr, rv_ptr,  # [C] each
    pcnt_ptr, pmean_ptr, pm2_ptr,  # [C, SPLITS] partial Welford states (ACC dtype)
    inst_ptr,  # [N, C] zeroed (ACC dtype), with WITH_INST
    C, L, R0, LT, T,  # channels, row length, inner row count, tiles per row, tiles (rows * LT)
    sxc, sx1, sx0, sxl, syc, sy1, sy0, syl,  # channel / row / value strides of x and y
    eps, per_split, SPLITS, RS, inv_hw,  # rows per sample, 1 / (H W) (instance means)
    APPLY_RELU: tl.constexpr, WITH_STATS: tl.constexpr, WITH_INST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, OFF64: tl.constexpr,
):
    c0 = tl.program_id(0) * BLOCK_C
    s = tl.program_id(1)
    ox, cmask, li = _tile_offsets(C, c0, L, sxc, sxl, BLOCK_C, BLOCK_L, OFF64)
    oy, _, _ = _tile_offsets(C, c0, L, syc, syl, BLOCK_C, BLOCK_L, OFF64)
    xc = x_ptr + c0.to(tl.int64) * sxc
    yc = y_ptr + c0.to(tl.int64) * syc
    cidx = c0 + tl.arange(0, BLOCK_C)
    scale, shift, _, _ = _channel_affine(w_ptr, b_ptr, rm_ptr, rv_ptr, cidx, cmask, eps, ACC)
    cnt = tl.zeros([], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    t0, t1 = _split_tiles(s, per_split, T)
    for t in range(t0, t1):
        r, l0, mask = _tile_at(t, LT, L, cmask, li, BLOCK_L)
        bx = xc + _row_start(r, R0, sx1, sx0) + l0.to(tl.int64) * sxl
        by = yc + _row_start(r, R0, sy1, sy0) + l0.to(tl.int64) * syl
        v = tl.load(bx + ox, mask=mask, other=0.0).to(ACC)
        yv = v * scale[:, None] + shift[:, None]
        if APPLY_RELU:
            yv = tl.where(yv < 0, 0.0, yv)
        tl.store(by + oy, yv.to(y_ptr.dtype.element_ty), mask=mask)
        if WITH_STATS or WITH_INST:
            bsum = tl.sum(v, axis=1)  # masked values are 0
        if WITH_INST:
            tl.atomic_add(inst_ptr + (r // RS).to(tl.int64) * C + cidx, bsum * inv_hw, mask=cmask)
        if WITH_STATS:
            bc = tl.minimum(L - l0, BLOCK_L).to(ACC)
            bmean = bsum / bc
            d = tl.where(mask, v - bmean[:, None], 0.0)
            bm2 = tl.sum(d * d, axis=1)
            ncnt = cnt + bc
            delta = bmean - mean
            frac = bc / ncnt
            mean = mean + delta * frac
            m2 = m2 + bm2 + delta * delta * (cnt * frac)
            cnt = ncnt
    if WITH_STATS:
        po = cidx.to(tl.int64) * SPLITS + s
        tl.store(pcnt_ptr + po, cnt + tl.zeros([BLOCK_C], dtype=ACC), mask=cmask)
        tl.store(pmean_ptr + po, mean, mask=cmask)
        tl.store(pm2_ptr + po, m2, mask=cmask)


@triton.jit
def _welford_merge_kernel(
    pcnt_ptr, pmean_ptr, pm2_ptr,  # [C, SPLITS]
    mean_ptr, var_ptr,  # [C]
    SPLITS, BLOCK_S: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_S)
    mask = i < SPLITS
    n = tl.load(pcnt_ptr + c * SPLITS + i, mask=mask, other=0.0)
    mu = tl.load(pmean_ptr + c * SPLITS + i, mask=mask, other=0.0)
    m2 = tl.load(pm2_ptr + c * SPLITS + i, mask=mask, other=0.0)
    total = tl.sum(n, axis=0)
    mean = tl.sum(n * mu, axis=0) / total
    d = tl.where(mask, mu - mean, 0.0)
    m2_tot = tl.sum(m2 + n * d * d, axis=0)
    tl.store(mean_ptr + c, mean)
    tl.store(var_ptr + c, m2_tot / total)


@triton.jit
def _fused_bn_bwd_kernel(
    gy_ptr,  # [N, C, H, W] dense in the output format (strides of y)
    x_ptr,  # [N, C, H, W] any strides
    gx_ptr,  # [N, C, H, W] dense, same strides as gy
    w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, gmean_ptr, gvar_ptr,  # [C] each (mean/gmean/gvar unused without stats)
    ginst_ptr,  # [N, C] gradient of the instance means (with WITH_INST)
    psg_ptr, psgx_ptr,  # [C, SPLITS] partial sums of g_pre and g_pre*(x - rm)
    C, L, R0, LT, T, M,
    sxc, sx1, sx0, sxl, sgc, sg1, sg0, sgl,
    eps, per_split, SPLITS, RS, inv_hw,
    APPLY_RELU: tl.constexpr, WITH_STATS: tl.constexpr, WITH_INST: tl.constexpr, NEED_WGRAD: tl.constexpr,
    NEED_X: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, OFF64: tl.constexpr,
):
    c0 = tl.program_id(0) * BLOCK_C
    s = tl.program_id(1)
    og, cmask, li = _tile_offsets(C, c0, L, sgc, sgl, BLOCK_C, BLOCK_L, OFF64)
    gc = gy_ptr + c0.to(tl.int64) * sgc
    gxc = gx_ptr + c0.to(tl.int64) * sgc
    cidx = c0 + tl.arange(0, BLOCK_C)
    scale, shift, invstd, rmean = _channel_affine(w_ptr, b_ptr, rm_ptr, rv_ptr, cidx, cmask, eps, ACC)
    if NEED_X:
        ox, _, _ = _tile_offsets(C, c0, L, sxc, sxl, BLOCK_C, BLOCK_L, OFF64)
        xc = x_ptr + c0.to(tl.int64) * sxc
    if WITH_STATS:
        bmean = tl.load(mean_ptr + cidx, mask=cmask, other=0.0).to(ACC)
        c_mean = tl.load(gmean_ptr + cidx, mask=cmask, other=0.0).to(ACC) / M
        c_var = 2.0 * tl.load(gvar_ptr + cidx, mask=cmask, other=0.0).to(ACC) / M
    sg = tl.zeros([BLOCK_C], dtype=ACC)
    sgx = tl.zeros([BLOCK_C], dtype=ACC)
    t0, t1 = _split_tiles(s, per_split, T)
    for t in range(t0, t1):
        r, l0, mask = _tile_at(t, LT, L, cmask, li, BLOCK_L)
        rg = _row_start(r, R0, sg1, sg0) + l0.to(tl.int64) * sgl
        gp = tl.load(gc + rg + og, mask=mask, other=0.0).to(ACC)
        if NEED_X:
            bx = xc + _row_start(r, R0, sx1, sx0) + l0.to(tl.int64) * sxl
            v = tl.load(bx + ox, mask=mask, other=0.0).to(ACC)
            if APPLY_RELU:
                gp = tl.where(v * scale[:, None] + shift[:, None] > 0, gp, 0.0)
            g = gp * scale[:, None]
            if WITH_STATS:
                g = g + c_mean[:, None] + c_var[:, None] * (v - bmean[:, None])
            if NEED_WGRAD:
                sg += tl.sum(gp, axis=1)
                sgx += tl.sum(tl.where(mask, gp * (v - rmean[:, None]), 0.0), axis=1)
        else:
            g = gp * scale[:, None]
        if WITH_INST:
            gi = tl.load(ginst_ptr + (r // RS).to(tl.int64) * C + cidx, mask=cmask, other=0.0).to(ACC)
            g = g + (gi * inv_hw)[:, None]
        tl.store(gxc + rg + og, g.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_WGRAD:
        po = cidx.to(tl.int64) * SPLITS + s
        tl.store(psg_ptr + po, sg, mask=cmask)
        tl.store(psgx_ptr + po, sgx * invstd, mask=cmask)


# Tile sizes (values per program and loop step). Every per-channel quantity of a tile (scale,
# shift, statistics, gradient sums) lives in registers once per channel a thread touches; a thread
# touches as many channels as it holds contiguous values of a channels_last tile (the load vector
# width), so channels_last tiles are kept at 256 values (2 per thread at 4 warps) and every tile at
# <= 16 channels: <= 64 registers at 4 warps in all variants (docs/TRITON_KERNELS.md).
_TILE = 1024
_CL_TILE = 256
_MAX_BLOCK_C = 16


def _sm_count(device: torch.device):
    """Multiprocessor count of a CUDA device; None elsewhere (the AOT check substitutes a GPU's)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _geometry(x: torch.Tensor, y: torch.Tensor, keep_batch: bool = False):
    """Rows of the (n, h, w) positions valid for both x and y (same shape, own strides):
    (L, R, R0, x strides (s1, s0, sl), y strides (s1, s0, sl)); row r starts at
    (r // R0) * s1 + (r % R0) * s0, its values are sl apart. ``keep_batch``: the batch dimension
    is never merged into the others, so every row lies in one sample (R // N rows each)."""
    n, _, h, w = x.shape
    dims = [(size, sx, sy) for size, sx, sy in zip((n, h, w), (x.stride(0), x.stride(2), x.stride(3)),
                                                   (y.stride(0), y.stride(2), y.stride(3))) if size != 1]
    if not dims:
        dims = [(1, 0, 0)]
    batch_outer = keep_batch and n != 1  # dims[0] is the batch and must stay a row dimension
    if batch_outer and len(dims) == 1:  # H = W = 1: rows of one value
        dims.append((1, 0, 0))
    merged = [dims[-1]]
    for i, (size, sx, sy) in reversed(list(enumerate(dims[:-1]))):  # merge an outer dim into the next when both strides nest
        isz, isx, isy = merged[0]
        if sx == isz * isx and sy == isz * isy and not (batch_outer and i == 0):
            merged[0] = (size * isz, isx, isy)
        else:
            merged.insert(0, (size, sx, sy))
    (L, sxl, syl) = merged[-1]
    if len(merged) == 1:
        return L, 1, 1, (0, 0, sxl), (0, 0, syl)
    if len(merged) == 2:
        (r, sx1, sy1) = merged[0]
        return L, r, 1, (sx1, 0, sxl), (sy1, 0, syl)
    (r1, sx1, sy1), (r0, sx0, sy0) = merged[0], merged[1]
    return L, r1 * r0, r0, (sx1, sx0, sxl), (sy1, sy0, syl)


def _launch_config(C: int, L: int, R: int, sc: int, device: torch.device):
    """(BLOCK_C, BLOCK_L, SPLITS, per_split tiles, num_warps) for rows of L values, R rows per
    channel, channel stride sc. Tiles of up to 1024 values (256 under the interpreter);
    channel-contiguous maps (channels_last) take up to 16 channels per position (a contiguous
    32..64-byte segment: coalesced reads) in tiles of 256 values; other maps read along their rows
    with as many channels (up to 16) as fill a tile of short rows. Enough programs to fill the GPU
    (4 per SM), few under the interpreter."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    tile = 256 if interpreting else _TILE
    if sc == 1 and C > 1:
        block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
        block_l = min(triton.next_power_of_2(L), min(tile, _CL_TILE) // block_c)
    else:
        block_l = min(triton.next_power_of_2(L), tile)
        # several channels per tile only for short rows, and then in tiles of 256 (see _TILE)
        block_c = 1 if block_l >= min(tile, _CL_TILE) else min(triton.next_power_of_2(C), _CL_TILE // block_l,
                                                                 _MAX_BLOCK_C)
    tiles = R * triton.cdiv(L, block_l)
    cblocks = triton.cdiv(C, block_c)
    sms = None if interpreting else _sm_count(device)
    if sms is None:
        splits = min(tiles, 4)
    else:
        splits = max(1, min(tiles, triton.cdiv(4 * sms, cblocks)))
    per_split = triton.cdiv(tiles, splits)
    return block_c, block_l, triton.cdiv(tiles, per_split), per_split, 4


def _off64(block_c, block_l, *stride_pairs) -> bool:
    """Whether tile offsets (c * sc + l * sl, c < block_c, l < block_l) can leave int32."""
    return any((block_c - 1) * abs(sc) + (block_l - 1) * abs(sl) >= 2 ** 31 for sc, sl in stride_pairs)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _plan(x: torch.Tensor, out: torch.Tensor, keep_batch: bool):
    """Geometry and launch configuration of a pass over x writing out (same shape): (grid,
    kernel arguments from C to the value strides, per_split, splits, RS, constexpr kwargs)."""
    N, C, H, W = x.shape
    L, R, R0, (sx1, sx0, sxl), (so1, so0, sol) = _geometry(x, out, keep_batch)
    block_c, block_l, splits, per_split, warps = _launch_config(C, L, R, x.stride(1), x.device)
    lt = triton.cdiv(L, block_l)
    geo = (C, L, R0, lt, R * lt)
    strides = (x.stride(1), sx1, sx0, sxl, out.stride(1), so1, so0, sol)
    meta = dict(BLOCK_C=block_c, BLOCK_L=block_l, num_warps=warps, ACC=_acc(x.dtype),
                OFF64=_off64(block_c, block_l, (x.stride(1), sxl), (out.stride(1), sol)))
    return (triton.cdiv(C, block_c), splits), geo, strides, per_split, splits, max(R // N, 1), meta


def forward(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, with_instance_means, out_format,
            stat_dtype):
    N, C, H, W = x.shape
    weight, bias, running_mean, running_var = (t.contiguous() for t in (weight, bias, running_mean, running_var))
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format)
    grid, geo, strides, per_split, splits, rs, meta = _plan(x, y, with_instance_means)
    if with_stats:
        pcnt = torch.empty((C, splits), dtype=stat_dtype, device=x.device)
        pmean, pm2 = torch.empty_like(pcnt), torch.empty_like(pcnt)
        mean = torch.empty((C,), dtype=stat_dtype, device=x.device)
        var = torch.empty_like(mean)
    else:
        pcnt = pmean = pm2 = torch.empty((1,), dtype=stat_dtype, device=x.device)
        mean = torch.empty((0,), dtype=stat_dtype, device=x.device)
        var = torch.empty_like(mean)
    # the instance means are accumulated by atomic adds: a zeroed buffer
    inst = torch.zeros((N, C) if with_instance_means else (0,), dtype=stat_dtype, device=x.device)
    _fused_bn_fwd_kernel[grid](
        x, y, weight, bias, running_mean, running_var, pcnt, pmean, pm2, inst if with_instance_means else pcnt,
        *geo, *strides, float(eps), per_split, splits, rs, 1.0 / (H * W),
        APPLY_RELU=apply_relu, WITH_STATS=with_stats, WITH_INST=with_instance_means, **meta,
    )
    if with_stats:
        _welford_merge_kernel[(C,)](pcnt, pmean, pm2, mean, var, splits,
                                    BLOCK_S=max(triton.next_power_of_2(splits), 2))
    return y, mean, var, inst


def backward(grad_y, x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst_mean, eps,
             apply_relu, with_stats, with_instance_means, need_weight_grad, out_format):
    N, C, H, W = x.shape
    grad_y = grad_y.contiguous(memory_format=out_format)
    # per-channel vectors may arrive as strided views (e.g. expanded gradients under AOT autograd)
    weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst_mean = (
        t.contiguous() for t in (weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst_mean))
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format)
    grid, geo, strides, per_split, splits, rs, meta = _plan(x, grad_y, with_instance_means)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if need_weight_grad:
        psg = torch.empty((C, splits), dtype=acc_dtype, device=x.device)
        psgx = torch.empty_like(psg)
    else:
        psg = psgx = torch.empty((1,), dtype=acc_dtype, device=x.device)
    if not with_stats:
        mean = grad_mean = grad_var = running_mean  # unread placeholders (WITH_STATS is off)
    if not with_instance_means:
        grad_inst_mean = running_mean  # unread placeholder (WITH_INST is off)
    _fused_bn_bwd_kernel[grid](
        grad_y, x, gx, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst_mean, psg, psgx,
        *geo, N * H * W, *strides, float(eps), per_split, splits, rs, 1.0 / (H * W),
        APPLY_RELU=apply_relu, WITH_STATS=with_stats, WITH_INST=with_instance_means, NEED_WGRAD=need_weight_grad,
        NEED_X=bool(apply_relu or with_stats or need_weight_grad), **meta,
    )
    if need_weight_grad:
        gw = psgx.sum(dim=1).to(weight.dtype)
        gb = psg.sum(dim=1).to(bias.dtype)
    else:
        gw, gb = weight.new_empty((0,)), bias.new_empty((0,))
    return gx, gw, gb
