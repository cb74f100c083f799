"""Triton kernels of the BatchNorm-statistics loss (fastsynth/ops/bn_stat_loss.py has the math).

All layers of a call are served by one statistics launch, one merge launch and one backward
launch. The feature maps have different shapes, strides and addresses, so each launch reads a
small int64 *work table* (one row per work item = (layer, channel, chunk of the N*H*W values of
that channel)); each row holds the address of the channel's first element, the chunk range and
the strides, and the kernel turns the address into a typed pointer inside the kernel
(``.to(tl.pointer_type(...), bitcast=True)``; this works on GPUs and under TRITON_INTERPRET=1).

  _bn_stats_chunk_kernel   one program per work item: blocked two-pass statistics of the chunk
                           merged across blocks with Chan's formula -> (mean, m2, n) partial
  _bn_stats_merge_kernel   one program per channel: exact parallel merge of its chunk partials
  _bn_backward_kernel      one program per work item: g = 2 g_var (x - mu)/M + g_mu/M
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# work-table columns: 0 address of the channel's first element, 1-2 chunk [m0, m1) of its N*H*W
# values, 3 H*W, 4 W, 5-7 element strides of n, h, w; statistics: 8 partial index; backward:
# 8 global channel, 9 gradient address, 10-12 gradient strides, 13 M = N*H*W
_MAX_CHUNK = 16384  # values of one channel per work item


@triton.jit
def _bn_stats_chunk_kernel(
    table_ptr,      # [n_items, NCOL] int64 work table
    dtype_ref_ptr,  # any tensor of the input dtype (gives the element type)
    partial_ptr,    # [n_partials, 3] accumulator dtype: (mean, m2, n) of each chunk
    NCOL: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + pid * NCOL
    x_ptr = tl.load(row + 0).to(tl.pointer_type(dtype_ref_ptr.dtype.element_ty), bitcast=True)
    m0 = tl.load(row + 1)
    m1 = tl.load(row + 2)
    hw = tl.load(row + 3)
    w_size = tl.load(row + 4)
    s_n = tl.load(row + 5)
    s_h = tl.load(row + 6)
    s_w = tl.load(row + 7)
    out = tl.load(row + 8)
    mean = tl.zeros((), dtype=ACC)
    m2 = tl.zeros((), dtype=ACC)
    cnt = tl.zeros((), dtype=ACC)
    for start in range(m0, m1, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < m1
        n = m // hw
        p = m % hw
        off = n * s_n + (p // w_size) * s_h + (p % w_size) * s_w
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        bn = tl.minimum(m1 - start, BLOCK).to(ACC)
        bmean = tl.sum(v, axis=0) / bn
        d = tl.where(mask, v - bmean, 0.0)
        bm2 = tl.sum(d * d, axis=0)
        tot = cnt + bn
        delta = bmean - mean
        mean = mean + delta * (bn / tot)
        m2 = m2 + bm2 + delta * delta * (cnt * bn / tot)
        cnt = tot
    tl.store(partial_ptr + out * 3 + 0, mean)
    tl.store(partial_ptr + out * 3 + 1, m2)
    tl.store(partial_ptr + out * 3 + 2, cnt)


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
def _bn_backward_kernel(
    table_ptr,      # [n_items, NCOL] int64 work table (column OUT = global channel index)
    dtype_ref_ptr,  # any tensor of the input dtype
    mean_ptr,       # [n_channels] batch means
    gmean_ptr,      # [n_channels] dL/dmean
    gvar_ptr,       # [n_channels] dL/dvar
    NCOL: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + pid * NCOL
    elem = dtype_ref_ptr.dtype.element_ty
    x_ptr = tl.load(row + 0).to(tl.pointer_type(elem), bitcast=True)
    m0 = tl.load(row + 1)
    m1 = tl.load(row + 2)
    hw = tl.load(row + 3)
    w_size = tl.load(row + 4)
    s_n = tl.load(row + 5)
    s_h = tl.load(row + 6)
    s_w = tl.load(row + 7)
    ch = tl.load(row + 8)
    g_ptr = tl.load(row + 9).to(tl.pointer_type(elem), bitcast=True)
    g_n = tl.load(row + 10)
    g_h = tl.load(row + 11)
    g_w = tl.load(row + 12)
    count = tl.load(row + 13).to(ACC)  # M = N*H*W of the layer
    mu = tl.load(mean_ptr + ch).to(ACC)
    scale = 2.0 * tl.load(gvar_ptr + ch).to(ACC) / count
    shift = tl.load(gmean_ptr + ch).to(ACC) / count
    for start in range(m0, m1, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < m1
        n = m // hw
        p = m % hw
        h = p // w_size
        w = p % w_size
        v = tl.load(x_ptr + n * s_n + h * s_h + w * s_w, mask=mask, other=0.0).to(ACC)
        g = scale * (v - mu) + shift
        tl.store(g_ptr + n * g_n + h * g_h + w * g_w, g.to(elem), mask=mask)


def _geometry(t: torch.Tensor):
    """(N, C, HW, W, sN, sC, sH, sW) of a 2/3/4-D map, in elements."""
    if t.dim() == 2:
        return t.shape[0], t.shape[1], 1, 1, t.stride(0), t.stride(1), 0, 0
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.shape[2], t.shape[2], t.stride(0), t.stride(1), 0, t.stride(2)
    n, c, h, w = t.shape
    return n, c, h * w, w, t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _work_table(xs, grads=None):
    """int64 work table (CPU tensor) with one row per (layer, channel, chunk), built with a few
    vectorised ops per layer; the (first partial, chunk count) of every channel; the number of
    partials."""
    tables, chan_tables = [], []
    partial = 0
    channel = 0
    for li, x in enumerate(xs):
        n, c, hw, w, sn, sc, sh, sw = _geometry(x)
        m = n * hw
        chunks = max(1, -(-m // _MAX_CHUNK))
        ci = torch.arange(c, dtype=torch.int64).repeat_interleave(chunks)   # channel of each row
        k = torch.arange(chunks, dtype=torch.int64).repeat(c)               # chunk of each row
        base, rem = m // chunks, m % chunks
        m0 = base * k + torch.clamp(k, max=rem)
        m1 = base * (k + 1) + torch.clamp(k + 1, max=rem)
        rows = c * chunks
        cols = [x.data_ptr() + ci * sc * x.element_size(), m0, m1]
        cols += [torch.full((rows,), v, dtype=torch.int64) for v in (hw, w, sn, sh, sw)]
        if grads is None:
            cols.append(partial + torch.arange(rows, dtype=torch.int64))
        else:
            g = grads[li]
            _, _, _, _, gn, gc, gh, gw = _geometry(g)
            cols.append(channel + ci)
            cols.append(g.data_ptr() + ci * gc * g.element_size())
            cols += [torch.full((rows,), v, dtype=torch.int64) for v in (gn, gh, gw, m)]
        tables.append(torch.stack(cols, dim=1))
        chan_tables.append(torch.stack([partial + torch.arange(c, dtype=torch.int64) * chunks,
                                        torch.full((c,), chunks, dtype=torch.int64)], dim=1))
        partial += rows
        channel += c
    return torch.cat(tables), torch.cat(chan_tables), partial


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_batch_stats_multi(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated per-channel (mean, biased var) of every map in ``xs`` (same dtype/device)."""
    dev = xs[0].device
    table_cpu, chans_cpu, n_partials = _work_table(xs)
    table = table_cpu.to(dev, non_blocking=True)
    chans = chans_cpu.to(dev, non_blocking=True)
    sdt = _stat_dtype(xs[0].dtype)
    partials = torch.empty(n_partials, 3, dtype=sdt, device=dev)
    n_ch = chans_cpu.shape[0]
    means = torch.empty(n_ch, dtype=sdt, device=dev)
    variances = torch.empty(n_ch, dtype=sdt, device=dev)
    _bn_stats_chunk_kernel[(table_cpu.shape[0],)](table, xs[0], partials, NCOL=9, BLOCK=1024, ACC=_acc(xs[0].dtype))
    max_chunks = int(chans_cpu[:, 1].max())  # a CPU tensor: no device sync
    _bn_stats_merge_kernel[(n_ch,)](partials, chans, means, variances, BLOCK_K=triton.next_power_of_2(max_chunks))
    return means, variances


def bn_batch_stats_multi_backward(xs, means, g_means, g_vars) -> list[torch.Tensor]:
    """Gradients of the maps in ``xs`` given dL/dmean and dL/dvar of every channel."""
    dev = xs[0].device
    grads = [torch.empty_like(x) for x in xs]
    table_cpu, _, _ = _work_table(xs, grads)
    table = table_cpu.to(dev, non_blocking=True)
    _bn_backward_kernel[(table_cpu.shape[0],)](table, xs[0], means, g_means.contiguous(), g_vars.contiguous(),
                                      NCOL=14, BLOCK=1024, ACC=_acc(xs[0].dtype))
    return grads
