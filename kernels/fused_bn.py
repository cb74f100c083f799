"""Triton kernels of the fused teacher BatchNorm (math: fastsynth/ops/fused_bn.py).

Forward: grid (C, SPLITS); program (c, s) walks its slice of the M = N*H*W elements of channel c
in tiles of BLOCK, writes y and merges each tile's (count, mean, M2) into a running Welford state
(Chan's formula); a second tiny kernel merges the SPLITS partial states of each channel.
Backward: grid (C, SPLITS), one elementwise pass; dgamma/dbeta partial sums per program.
Inputs are read through their strides (NCHW, channels_last, sliced); y/grad_x are dense.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_bn_fwd_kernel(
    x_ptr,  # [N, C, H, W] any strides (sxn, sxc, sxh, sxw)
    y_ptr,  # [N, C, H, W] dense, strides (syn, syc, syh, syw)
    w_ptr, b_ptr, rm_ptr, rv_ptr,  # [C] each
    pcnt_ptr, pmean_ptr, pm2_ptr,  # [C, SPLITS] partial Welford states (ACC dtype)
    HW, W, M,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    eps, per_split, SPLITS,
    APPLY_RELU: tl.constexpr, WITH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    gamma = tl.load(w_ptr + c).to(ACC)
    beta = tl.load(b_ptr + c).to(ACC)
    rmean = tl.load(rm_ptr + c).to(ACC)
    rvar = tl.load(rv_ptr + c).to(ACC)
    scale = gamma / tl.sqrt(rvar + eps)
    shift = beta - rmean * scale
    cnt = tl.zeros([], dtype=ACC)
    mean = tl.zeros([], dtype=ACC)
    m2 = tl.zeros([], dtype=ACC)
    start = s * per_split
    for off in range(0, per_split, BLOCK):
        m = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = m < M
        n = m // HW
        hw = m % HW
        h = hw // W
        w = hw % W
        v = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(ACC)
        yv = v * scale + shift
        if APPLY_RELU:
            yv = tl.where(yv < 0, 0.0, yv)
        tl.store(y_ptr + n * syn + c * syc + h * syh + w * syw, yv.to(y_ptr.dtype.element_ty), mask=mask)
        if WITH_STATS:
            bc = tl.sum(mask.to(ACC), axis=0)
            bmean = tl.sum(v, axis=0) / tl.maximum(bc, 1.0)
            d = tl.where(mask, v - bmean, 0.0)
            bm2 = tl.sum(d * d, axis=0)
            ncnt = cnt + bc
            delta = bmean - mean
            frac = bc / tl.maximum(ncnt, 1.0)
            mean = mean + delta * frac
            m2 = m2 + bm2 + delta * delta * cnt * frac
            cnt = ncnt
    if WITH_STATS:
        tl.store(pcnt_ptr + c * SPLITS + s, cnt)
        tl.store(pmean_ptr + c * SPLITS + s, mean)
        tl.store(pm2_ptr + c * SPLITS + s, m2)


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
    gy_ptr,  # [N, C, H, W] dense (sgn, sgc, sgh, sgw)
    x_ptr,  # [N, C, H, W] any strides
    gx_ptr,  # [N, C, H, W] dense, same strides as gy
    w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, gmean_ptr, gvar_ptr,  # [C] each (mean/gmean/gvar unused without stats)
    psg_ptr, psgx_ptr,  # [C, SPLITS] partial sums of g_pre and g_pre*(x - rm)
    HW, W, M,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    eps, per_split, SPLITS,
    APPLY_RELU: tl.constexpr, WITH_STATS: tl.constexpr, NEED_WGRAD: tl.constexpr, NEED_X: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    gamma = tl.load(w_ptr + c).to(ACC)
    beta = tl.load(b_ptr + c).to(ACC)
    rmean = tl.load(rm_ptr + c).to(ACC)
    rvar = tl.load(rv_ptr + c).to(ACC)
    invstd = 1.0 / tl.sqrt(rvar + eps)
    scale = gamma * invstd
    shift = beta - rmean * scale
    if WITH_STATS:
        bmean = tl.load(mean_ptr + c).to(ACC)
        c_mean = tl.load(gmean_ptr + c).to(ACC) / M
        c_var = 2.0 * tl.load(gvar_ptr + c).to(ACC) / M
    sg = tl.zeros([], dtype=ACC)
    sgx = tl.zeros([], dtype=ACC)
    start = s * per_split
    for off in range(0, per_split, BLOCK):
        m = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = m < M
        n = m // HW
        hw = m % HW
        h = hw // W
        w = hw % W
        go = n * sgn + c * sgc + h * sgh + w * sgw
        gp = tl.load(gy_ptr + go, mask=mask, other=0.0).to(ACC)
        if NEED_X:
            v = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(ACC)
            if APPLY_RELU:
                gp = tl.where(v * scale + shift > 0, gp, 0.0)
            g = gp * scale
            if WITH_STATS:
                g = g + c_mean + c_var * (v - bmean)
            if NEED_WGRAD:
                sg += tl.sum(gp, axis=0)
                sgx += tl.sum(tl.where(mask, gp * (v - rmean), 0.0), axis=0)
        else:
            g = gp * scale
        tl.store(gx_ptr + go, g.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_WGRAD:
        tl.store(psg_ptr + c * SPLITS + s, sg)
        tl.store(psgx_ptr + c * SPLITS + s, sgx * invstd)


def _launch_config(M: int, C: int, device: torch.device):
    """(BLOCK, SPLITS, per_split, num_warps): enough programs to fill a GPU, few under the interpreter."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    block = min(1024 if not interpreting else 256, triton.next_power_of_2(M))
    tiles = triton.cdiv(M, block)
    if interpreting or device.type != "cuda":
        splits = min(tiles, 4)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(tiles, triton.cdiv(4 * sms, C)))
    per_split = triton.cdiv(tiles, splits) * block
    splits = triton.cdiv(M, per_split)
    return block, splits, per_split, 4


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, out_format, stat_dtype):
    N, C, H, W = x.shape
    M = N * H * W
    weight, bias, running_mean, running_var = (t.contiguous() for t in (weight, bias, running_mean, running_var))
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format)
    block, splits, per_split, warps = _launch_config(M, C, x.device)
    if with_stats:
        pcnt = torch.empty((C, splits), dtype=stat_dtype, device=x.device)
        pmean, pm2 = torch.empty_like(pcnt), torch.empty_like(pcnt)
        mean = torch.empty((C,), dtype=stat_dtype, device=x.device)
        var = torch.empty_like(mean)
    else:
        pcnt = pmean = pm2 = torch.empty((1,), dtype=stat_dtype, device=x.device)
        mean = torch.empty((0,), dtype=stat_dtype, device=x.device)
        var = torch.empty_like(mean)
    _fused_bn_fwd_kernel[(C, splits)](
        x, y, weight, bias, running_mean, running_var, pcnt, pmean, pm2,
        H * W, W, M, *x.stride(), *y.stride(), float(eps), per_split, splits,
        APPLY_RELU=apply_relu, WITH_STATS=with_stats, ACC=_acc(x.dtype), BLOCK=block, num_warps=warps,
    )
    if with_stats:
        _welford_merge_kernel[(C,)](pcnt, pmean, pm2, mean, var, splits,
                                    BLOCK_S=max(triton.next_power_of_2(splits), 2))
    return y, mean, var


def backward(grad_y, x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, eps, apply_relu,
             with_stats, need_weight_grad, out_format):
    N, C, H, W = x.shape
    M = N * H * W
    grad_y = grad_y.contiguous(memory_format=out_format)
    # per-channel vectors may arrive as strided views (e.g. expanded gradients under AOT autograd)
    weight, bias, running_mean, running_var, mean, grad_mean, grad_var = (
        t.contiguous() for t in (weight, bias, running_mean, running_var, mean, grad_mean, grad_var))
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format)
    block, splits, per_split, warps = _launch_config(M, C, x.device)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if need_weight_grad:
        psg = torch.empty((C, splits), dtype=acc_dtype, device=x.device)
        psgx = torch.empty_like(psg)
    else:
        psg = psgx = torch.empty((1,), dtype=acc_dtype, device=x.device)
    if not with_stats:
        mean = grad_mean = grad_var = running_mean  # unread placeholders (WITH_STATS is off)
    _fused_bn_bwd_kernel[(C, splits)](
        grad_y, x, gx, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, psg, psgx,
        H * W, W, M, *x.stride(), *grad_y.stride(), float(eps), per_split, splits,
        APPLY_RELU=apply_relu, WITH_STATS=with_stats, NEED_WGRAD=need_weight_grad,
        NEED_X=bool(apply_relu or with_stats or need_weight_grad), ACC=_acc(x.dtype), BLOCK=block, num_warps=warps,
    )
    if need_weight_grad:
        gw = psgx.sum(dim=1).to(weight.dtype)
        gb = psg.sum(dim=1).to(bias.dtype)
    else:
        gw, gb = weight.new_empty((0,)), bias.new_empty((0,))
    return gx, gw, gb
