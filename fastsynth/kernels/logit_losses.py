"""Triton kernels of the teacher/student logit losses (math: fastsynth/ops/logit_losses.py).

One program per row. Pass 1 streams the row pair in BLOCK-wide chunks with an online
log-sum-exp (running maxima, sums rescaled when a maximum grows; the KL accumulator is kept
centred on the running maxima, as KlState in csrc/common/logit_loss_math.h), plus the argmax of
both rows (first maximal index wins). Pass 2 writes the gradients. Each program writes its row's
partial results (CE_i, m_i KL_i, m_i) to a [N, 3] buffer; one more single-program kernel sums
them in row order, so the batch reduction is deterministic and needs no host sync.

Out-of-range targets: the index is clamped for the load and the row's CE is NaN (no host sync).

Non-finite logits as in csrc/common/logit_loss_math.h: NaN anywhere in a row makes the row NaN (the
KL clamp and the masking keep NaN) and is the argmax (torch.argmax); a -inf logit is a probability
of exactly 0 and contributes nothing (no 0 * inf); the running maxima start at the lowest finite
value of the compute dtype, so that no -inf element meets a -inf maximum.

Scalar arguments (1/T, weights, clamp bounds) reach the row kernels in their compute dtype: fp64
inputs launch the *_f64 entry points, whose scalars are annotated float64 (a plain Python float
argument is fp32 in a compiled kernel), so the fp64 path is fp64-accurate; fp32/fp16/bf16 inputs
launch the entry points with fp32 scalars (fp64 arguments there raise register pressure to spills).
The *_f64 entry points call the fp32-scalar ones, inlined; the body converts the scalars with tl.full
to ACC (the interpreter evaluates that in ACC too). The batch sum takes its weights as fp64 and converts them likewise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest chunk of a row processed at once; rows wider than this take several chunks (online
# LSE). Tests lower it to exercise the multi-chunk path under the interpreter.
MAX_BLOCK = 4096
SUM_BLOCK = 256
# Lowest finite values, the running maxima of empty rows (tl.constexpr globals: the compiler, not only
# the interpreter, accepts them inside @triton.jit code).
_LOWEST_F32 = tl.constexpr(-3.4028234663852886e38)
_LOWEST_F64 = tl.constexpr(-1.7976931348623157e308)


@triton.jit
def _lowest(ACC: tl.constexpr):
    if ACC == tl.float64:
        v = tl.full([], _LOWEST_F64, tl.float64)
    else:
        v = tl.full([], _LOWEST_F32, tl.float32)
    return v


@triton.jit
def _row_pair(a_ptr, b_ptr, stride_a, stride_b):
    # this program's row and where it starts in both logit matrices
    row = tl.program_id(0).to(tl.int64)
    return row, a_ptr + row * stride_a, b_ptr + row * stride_b


@triton.jit
def _load_chunk(a_row, b_row, start, C, inv_t, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # the elements start .. start + BLOCK of both rows, times inv_t, in ACC (0 past the row's end)
    offs = start + tl.arange(0, BLOCK)
    valid = offs < C
    a = tl.load(a_row + offs, mask=valid, other=0.0).to(ACC) * inv_t
    b = tl.load(b_row + offs, mask=valid, other=0.0).to(ACC) * inv_t
    return offs, valid, a, b


@triton.jit
def _kl_rows_kernel(
    t_ptr,  # [N, C] teacher logits, row stride stride_t, unit column stride
    s_ptr,  # [N, C] student logits, row stride stride_s
    y_ptr,  # [N] int64 targets (read when HAS_TARGETS)
    gt_ptr,  # [N, C] out: d loss / d teacher for a unit grad_loss (written when WRITE_GT)
    gs_ptr,  # [N, C] out: d loss / d student (written when WRITE_GS)
    part_ptr,  # [N, 3] ACC out: CE_i, m_i KL_i, m_i
    stride_t, stride_s, C,
    inv_t, ce_w, kl_w,  # 1/T; weights of CE_i and KL_i in the loss (fp32: fp32/fp16/bf16 inputs)
    HAS_TARGETS: tl.constexpr, AGREE_MASK: tl.constexpr,
    WRITE_GT: tl.constexpr, WRITE_GS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row, t_row, s_row = _row_pair(t_ptr, s_ptr, stride_t, stride_s)
    inv_t = tl.full([], inv_t, ACC)

    # ---- pass 1: online LSE of both rows, centred KL accumulator, argmax of both rows
    mt = _lowest(ACC)
    ms = _lowest(ACC)
    zt = tl.zeros([], ACC)
    zs = tl.zeros([], ACC)
    acc = tl.zeros([], ACC)
    at_v = tl.full([], float("-inf"), ACC)
    as_v = tl.full([], float("-inf"), ACC)
    at_i = tl.zeros([], tl.int32)
    as_i = tl.zeros([], tl.int32)
    for start in range(0, C, BLOCK):
        offs, valid, t, s = _load_chunk(t_row, s_row, start, C, inv_t, BLOCK, ACC)
        t_nan = valid & (t != t)
        s_nan = valid & (s != s)
        # maxima of the chunk without its NaNs (the NaNs reach the sums through exp)
        t_m = tl.where(valid & (t == t), t, float("-inf"))
        s_m = tl.where(valid & (s == s), s, float("-inf"))
        ct = tl.max(t_m, axis=0)
        cs = tl.max(s_m, axis=0)
        # argmax of the chunk as torch.argmax: the first NaN if any, else the first maximum
        it = tl.where(tl.max(t_nan.to(tl.int32), axis=0) > 0, tl.min(tl.where(t_nan, offs, C), axis=0),
                      tl.argmax(t_m, axis=0, tie_break_left=True) + start).to(tl.int32)
        is_ = tl.where(tl.max(s_nan.to(tl.int32), axis=0) > 0, tl.min(tl.where(s_nan, offs, C), axis=0),
                       tl.argmax(s_m, axis=0, tie_break_left=True) + start).to(tl.int32)
        ct_a = tl.where(tl.max(t_nan.to(tl.int32), axis=0) > 0, float("nan"), ct)
        cs_a = tl.where(tl.max(s_nan.to(tl.int32), axis=0) > 0, float("nan"), cs)
        # a later chunk wins if strictly greater, or NaN over a non-NaN (first maximum / first NaN)
        take_t = (ct_a > at_v) | ((ct_a != ct_a) & (at_v == at_v))
        take_s = (cs_a > as_v) | ((cs_a != cs_a) & (as_v == as_v))
        at_i = tl.where(take_t, it, at_i)
        at_v = tl.where(take_t, ct_a, at_v)
        as_i = tl.where(take_s, is_, as_i)
        as_v = tl.where(take_s, cs_a, as_v)

        mt_new = tl.maximum(mt, ct)
        ms_new = tl.maximum(ms, cs)
        ft = tl.exp(mt - mt_new)
        fs = tl.exp(ms - ms_new)
        # acc is 0 without teacher mass; the shift from the lowest maximum may overflow (0 * inf)
        acc = tl.where(zt == 0.0, 0.0, (acc - zt * ((mt_new - mt) - (ms_new - ms))) * ft)
        zt = zt * ft
        zs = zs * fs
        et = tl.where(valid, tl.exp(t - mt_new), 0.0)
        es = tl.where(valid, tl.exp(s - ms_new), 0.0)
        zt += tl.sum(et, axis=0)
        zs += tl.sum(es, axis=0)
        # p_t = 0 (a -inf teacher logit): no term, whatever the student holds (not 0 * inf)
        acc += tl.sum(tl.where(et == 0.0, 0.0, et * ((t - mt_new) - (s - ms_new))), axis=0)
        mt = mt_new
        ms = ms_new

    lzt = tl.log(zt)
    lzs = tl.log(zs)
    kl = acc / zt + tl.log(zs / zt)  # one log of a ratio near 1: no cancellation
    kl = tl.where(kl < 0.0, 0.0, kl)  # rounding can leave -1e-8; NaN stays NaN
    if AGREE_MASK:
        agree = (at_i == as_i).to(ACC)
    else:
        agree = tl.full([], 1.0, ACC)
    if HAS_TARGETS:
        y = tl.load(y_ptr + row)
        bad = (y < 0) | (y >= C)
        y_safe = tl.where(bad, 0, y)
        t_y = tl.load(t_row + y_safe).to(ACC) * inv_t
        ce = tl.where(bad, float("nan"), mt + lzt - t_y)
    else:
        y_safe = -1
        ce = tl.zeros([], ACC)
    tl.store(part_ptr + row * 3 + 0, ce)
    tl.store(part_ptr + row * 3 + 1, kl * agree)  # masked: 0, or NaN for a non-finite KL (as the reference)
    tl.store(part_ptr + row * 3 + 2, agree)

    # ---- pass 2: gradients
    if WRITE_GT or WRITE_GS:
        ce_w = tl.full([], ce_w, ACC)
        klm = tl.full([], kl_w, ACC) * agree
        g_pt = inv_t * (ce_w - klm * kl)
        g_ptd = inv_t * klm
        g_y = inv_t * ce_w
        for start in range(0, C, BLOCK):
            offs, valid, t, s = _load_chunk(t_row, s_row, start, C, inv_t, BLOCK, ACC)
            log_pt = t - mt - lzt
            log_ps = s - ms - lzs
            pt = tl.exp(log_pt)
            ps = tl.exp(log_ps)
            if WRITE_GT:
                gt = tl.where(pt == 0.0, 0.0, pt * (g_pt + g_ptd * (log_pt - log_ps)))
                gt = gt - tl.where(offs == y_safe, g_y, 0.0)
                tl.store(gt_ptr + row * C + offs, gt.to(gt_ptr.dtype.element_ty), mask=valid)
            if WRITE_GS:
                gs = g_ptd * (ps - pt)
                tl.store(gs_ptr + row * C + offs, gs.to(gs_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _kl_rows_kernel_f64(
    t_ptr, s_ptr, y_ptr, gt_ptr, gs_ptr, part_ptr,  # as _kl_rows_kernel, fp64 inputs
    stride_t, stride_s, C,
    inv_t: tl.float64, ce_w: tl.float64, kl_w: tl.float64,
    HAS_TARGETS: tl.constexpr, AGREE_MASK: tl.constexpr,
    WRITE_GT: tl.constexpr, WRITE_GS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    _kl_rows_kernel(t_ptr, s_ptr, y_ptr, gt_ptr, gs_ptr, part_ptr, stride_t, stride_s, C, inv_t, ce_w, kl_w,
                    HAS_TARGETS, AGREE_MASK, WRITE_GT, WRITE_GS, BLOCK, ACC)


@triton.jit
def _js_rows_kernel(
    s_ptr,  # [N, C] student logits (P), row stride stride_s
    t_ptr,  # [N, C] teacher logits (Q), row stride stride_t
    gs_ptr,  # [N, C] out: w * d js / d student (written when WRITE_GS)
    gt_ptr,  # [N, C] out: w * d js / d teacher (written when WRITE_GT)
    part_ptr,  # [N, 3] ACC out: 0, js_i, 1
    stride_s, stride_t, C,
    inv_t, lo, hi, w,  # fp32 (fp32/fp16/bf16 inputs)
    WRITE_GS: tl.constexpr, WRITE_GT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row, s_row, t_row = _row_pair(s_ptr, t_ptr, stride_s, stride_t)
    inv_t = tl.full([], inv_t, ACC)
    lo = tl.full([], lo, ACC)
    hi = tl.full([], hi, ACC)
    w = tl.full([], w, ACC)
    log_lo = tl.log(lo)
    log_hi = tl.log(hi)

    # ---- pass 1: online LSE of both rows
    ms = _lowest(ACC)
    mt = _lowest(ACC)
    zs = tl.zeros([], ACC)
    zt = tl.zeros([], ACC)
    for start in range(0, C, BLOCK):
        offs, valid, s, t = _load_chunk(s_row, t_row, start, C, inv_t, BLOCK, ACC)
        ms_new = tl.maximum(ms, tl.max(tl.where(valid, s, float("-inf")), axis=0))
        mt_new = tl.maximum(mt, tl.max(tl.where(valid, t, float("-inf")), axis=0))
        zs = zs * tl.exp(ms - ms_new) + tl.sum(tl.where(valid, tl.exp(s - ms_new), 0.0), axis=0)
        zt = zt * tl.exp(mt - mt_new) + tl.sum(tl.where(valid, tl.exp(t - mt_new), 0.0), axis=0)
        ms = ms_new
        mt = mt_new
    lse_s = ms + tl.log(zs)
    lse_t = mt + tl.log(zt)

    # ---- pass 2: the JS sum and <P, dP>, <Q, dQ>; pass 3 (gradients) recomputes the elements
    f_sum = tl.zeros([], ACC)
    sp = tl.zeros([], ACC)
    sq = tl.zeros([], ACC)
    for start in range(0, C, BLOCK):
        offs, valid, s, t = _load_chunk(s_row, t_row, start, C, inv_t, BLOCK, ACC)
        f, dp, dq, p, q = _js_element(s - lse_s, t - lse_t, lo, hi, log_lo, log_hi)
        f_sum += tl.sum(tl.where(valid, f, 0.0), axis=0)
        sp += tl.sum(tl.where(valid, p * dp, 0.0), axis=0)
        sq += tl.sum(tl.where(valid, q * dq, 0.0), axis=0)
    tl.store(part_ptr + row * 3 + 0, 0.0)
    tl.store(part_ptr + row * 3 + 1, f_sum)
    tl.store(part_ptr + row * 3 + 2, 1.0)

    if WRITE_GS or WRITE_GT:
        wt = w * inv_t
        for start in range(0, C, BLOCK):
            offs, valid, s, t = _load_chunk(s_row, t_row, start, C, inv_t, BLOCK, ACC)
            f, dp, dq, p, q = _js_element(s - lse_s, t - lse_t, lo, hi, log_lo, log_hi)
            if WRITE_GS:
                tl.store(gs_ptr + row * C + offs, (wt * p * (dp - sp)).to(gs_ptr.dtype.element_ty), mask=valid)
            if WRITE_GT:
                tl.store(gt_ptr + row * C + offs, (wt * q * (dq - sq)).to(gt_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _js_rows_kernel_f64(
    s_ptr, t_ptr, gs_ptr, gt_ptr, part_ptr,  # as _js_rows_kernel, fp64 inputs
    stride_s, stride_t, C,
    inv_t: tl.float64, lo: tl.float64, hi: tl.float64, w: tl.float64,
    WRITE_GS: tl.constexpr, WRITE_GT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    _js_rows_kernel(s_ptr, t_ptr, gs_ptr, gt_ptr, part_ptr, stride_s, stride_t, C, inv_t, lo, hi, w,
                    WRITE_GS, WRITE_GT, BLOCK, ACC)


@triton.jit
def _js_element(log_p, log_q, lo, hi, log_lo, log_hi):
    # js_element of csrc/common/logit_loss_math.h: value and gradients w.r.t. unclamped P, Q
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    mid = 0.5 * (p + q)
    p_in = (p >= lo) & (p <= hi)
    q_in = (q >= lo) & (q <= hi)
    m_in = (mid >= lo) & (mid <= hi)
    pc = tl.minimum(tl.maximum(p, lo), hi)
    qc = tl.minimum(tl.maximum(q, lo), hi)
    mc = tl.minimum(tl.maximum(mid, lo), hi)
    log_pc = tl.where(p < lo, log_lo, tl.where(p > hi, log_hi, log_p))
    log_qc = tl.where(q < lo, log_lo, tl.where(q > hi, log_hi, log_q))
    inner = tl.log(mc) - 0.5 * log_pc - 0.5 * log_qc
    f = mc * inner
    dm = tl.where(m_in, 0.5 * (inner + 1.0), 0.0)
    dp = tl.where(p_in, -0.5 * mc / pc, 0.0) + dm
    dq = tl.where(q_in, -0.5 * mc / qc, 0.0) + dm
    return f, dp, dq, p, q


@triton.jit
def _sum_rows_kernel(
    part_ptr,  # [N, 3] row partials a_i, b_i, c_i (fp32, or fp64 for fp64 inputs)
    loss_ptr, a_mean_ptr, b_mean_ptr, c_mean_ptr,  # 0-dim outputs (dtype of the pointer)
    N, w_a: tl.float64, w_b: tl.float64, inv_n: tl.float64,
    BLOCK_N: tl.constexpr,
):
    # loss = w_a sum a + w_b sum b; a_mean = sum a / N; b_mean = -sum b / N; c_mean = sum c / N.
    # One program, fixed order: deterministic.
    rows = tl.arange(0, BLOCK_N)
    w_a = tl.full([], w_a, part_ptr.dtype.element_ty)
    w_b = tl.full([], w_b, part_ptr.dtype.element_ty)
    inv_n = tl.full([], inv_n, part_ptr.dtype.element_ty)
    sa = tl.zeros([BLOCK_N], part_ptr.dtype.element_ty)
    sb = tl.zeros([BLOCK_N], part_ptr.dtype.element_ty)
    sc = tl.zeros([BLOCK_N], part_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        r = start + rows
        valid = r < N
        sa += tl.load(part_ptr + r * 3 + 0, mask=valid, other=0.0)
        sb += tl.load(part_ptr + r * 3 + 1, mask=valid, other=0.0)
        sc += tl.load(part_ptr + r * 3 + 2, mask=valid, other=0.0)
    a = tl.sum(sa, axis=0)
    b = tl.sum(sb, axis=0)
    c = tl.sum(sc, axis=0)
    tl.store(loss_ptr, (w_a * a + w_b * b).to(loss_ptr.dtype.element_ty))
    tl.store(a_mean_ptr, (a * inv_n).to(a_mean_ptr.dtype.element_ty))
    tl.store(b_mean_ptr, (0.0 - b * inv_n).to(b_mean_ptr.dtype.element_ty))
    tl.store(c_mean_ptr, (c * inv_n).to(c_mean_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(
    g_ptr,  # [] grad_loss (any float dtype)
    x_ptr,  # [n] saved gradient for a unit grad_loss
    out_ptr,  # [n] out: g * x
    n, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(g_ptr).to(ACC)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (g * x).to(out_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------

def _block(C: int) -> int:
    return min(triton.next_power_of_2(C), MAX_BLOCK)


def _num_warps(block: int) -> int:
    # 32 warps at BLOCK 4096: with 16, Triton 3.8's ptxas spills the bf16 kl_rows variant (4 bytes at
    # 64 registers; Triton 3.9 does not).
    return 4 if block <= 1024 else (8 if block <= 2048 else 32)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    return x if (x.shape[1] <= 1 or x.stride(1) == 1) else x.contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 math for fp16/bf16/fp32 inputs, fp64 math for fp64 inputs
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grad_buffer(x: torch.Tensor, needed: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if needed else x.new_empty((0,))


def _kl_rows_launcher(dtype: torch.dtype):
    # fp64 inputs: the scalars travel as fp64 (fp64-accurate 1/T and weights); others take them as
    # fp32 arguments, their compute dtype (fp64 arguments there cost registers and spill)
    return _kl_rows_kernel_f64 if dtype == torch.float64 else _kl_rows_kernel


def _js_rows_launcher(dtype: torch.dtype):
    return _js_rows_kernel_f64 if dtype == torch.float64 else _js_rows_kernel


def _finish(part: torch.Tensor, like: torch.Tensor, w_a: float, w_b: float):
    n = part.shape[0]
    dt = _acc_dtype(like.dtype)
    outs = [torch.empty((), dtype=dt, device=like.device) for _ in range(4)]
    _sum_rows_kernel[(1,)](part, *outs, n, w_a, w_b, 1.0 / n, BLOCK_N=SUM_BLOCK)
    return outs


def _rows(a, b, need_grad_a, need_grad_b):
    """The two logit matrices at unit column stride, their gradient buffers, the [N, 3] partials."""
    a, b = _unit_column_stride(a), _unit_column_stride(b)
    part = torch.empty((a.shape[0], 3), dtype=_acc_dtype(a.dtype), device=a.device)
    return a, b, _grad_buffer(a, need_grad_a), _grad_buffer(b, need_grad_b), part


def synthesis_logit_loss(t, s, targets, oh, adv, agree_mask, need_grad_teacher, need_grad_student):
    t, s, gt, gs, part = _rows(t, s, need_grad_teacher, need_grad_student)
    targets = targets.contiguous()  # the kernel reads targets[row] at unit stride
    n, c = t.shape
    block = _block(c)
    _kl_rows_launcher(t.dtype)[(n,)](
        t, s, targets, gt, gs, part, t.stride(0), s.stride(0), c, 1.0, oh / n, -adv / n,
        HAS_TARGETS=True, AGREE_MASK=bool(agree_mask), WRITE_GT=bool(need_grad_teacher),
        WRITE_GS=bool(need_grad_student), BLOCK=block, ACC=_acc_tl(t.dtype), num_warps=_num_warps(block),
    )
    loss, oh_term, adv_term, agree = _finish(part, t, oh / n, -adv / n)
    return loss, oh_term, adv_term, agree, gt, gs


def kd_loss(s, t, T, scale, need_grad_student, need_grad_teacher):
    s, t, gs, gt, part = _rows(s, t, need_grad_student, need_grad_teacher)
    n, c = s.shape
    block = _block(c)
    _kl_rows_launcher(s.dtype)[(n,)](
        t, s, t, gt, gs, part, t.stride(0), s.stride(0), c, 1.0 / T, 0.0, scale,
        HAS_TARGETS=False, AGREE_MASK=False, WRITE_GT=bool(need_grad_teacher),
        WRITE_GS=bool(need_grad_student), BLOCK=block, ACC=_acc_tl(s.dtype), num_warps=_num_warps(block),
    )
    loss = _finish(part, s, 0.0, scale)[0]
    return loss, gs, gt


def js_divergence(s, t, T, lo, hi, scale, need_grad_student, need_grad_teacher):
    s, t, gs, gt, part = _rows(s, t, need_grad_student, need_grad_teacher)
    n, c = s.shape
    block = _block(c)
    _js_rows_launcher(s.dtype)[(n,)](
        s, t, gs, gt, part, s.stride(0), t.stride(0), c, 1.0 / T, lo, hi, scale,
        WRITE_GS=bool(need_grad_student), WRITE_GT=bool(need_grad_teacher), BLOCK=block,
        ACC=_acc_tl(s.dtype), num_warps=_num_warps(block),
    )
    loss = _finish(part, s, 0.0, scale)[0]
    return loss, gs, gt


def logit_loss_backward(grad_loss, grad_a, grad_b):
    outs = []
    for x in (grad_a, grad_b):
        out = torch.empty_like(x)
        if x.numel():
            block = 1024
            _scale_kernel[(triton.cdiv(x.numel(), block),)](
                grad_loss, x, out, x.numel(), BLOCK=block, ACC=_acc_tl(x.dtype)
            )
        outs.append(out)
    return outs[0], outs[1]
