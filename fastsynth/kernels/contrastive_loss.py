"""Triton kernels of the fused contrastive cross-entropy (math: fastsynth/ops/contrastive_loss.py).

Flash-attention layout, three kernels, the M x M similarity matrix never stored:

  _lse_kernel     one program per block of BM query rows; loops over BN-key blocks with an online
                  log-sum-exp of S = scale * q k^T; picks the diagonal S_ii on the way; writes
                  lse_i and the weighted row loss w_i (lse_i - S_ii).
  _grad_q_kernel  per query block: recomputes S, G = w scale (exp(S - lse) - I), dq = G k.
  _grad_k_kernel  per key block: loops over query blocks, recomputes S^T = scale * k q^T (so
                  G^T is formed directly), dk = G^T q (written once per key block: no
                  atomics, deterministic).

The batch loss is the ordered sum of the row losses (one reduction by the launcher). The feature
dimension is held whole in a block (D <= MAX_D, padded to a power of two). fp32 products use
IEEE fp32 (input_precision="ieee", no TF32) to match torch's default; fp16/bf16 inputs go to
tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_D = 1024
# finite "minus infinity": exp(_NEG_BIG - m) is 0 and 0 * (m_new - m) stays 0 (a tl.constexpr so
# the compiler, not only the interpreter, accepts it inside @triton.jit code)
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _program(scale_hi, scale_lo, n_split, M, B: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """(idx, dcol, scale, w0, w1) of this program: its block of B rows (of q or of k) and the
    feature columns, then scale, w0, w1 in ACC. The scale arrives as two fp32-exact halves: float kernel arguments
    are fp32 under the interpreter (and when not annotated), which would round an fp64 1/temperature
    to 24 bits; hi + lo carries ~48. The row weights are computed here from the integer counts
    (exact divisions in ACC) rather than passed as rounded floats."""
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    # tl.cast: an argument equal to 1 may arrive as a constexpr (Triton's integer specialisation)
    w0 = 1.0 / tl.cast(n_split, ACC)
    w1 = 1.0 / tl.cast(tl.maximum(M - n_split, 1), ACC)  # unused (no row >= n_split) when n_split == M
    idx = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    return idx, tl.arange(0, BD), scale, w0, w1


@triton.jit
def _load_rows(ptr, idx, dcol, M, D, sm, sd, UPCAST: tl.constexpr):
    """Rows ``idx`` of an [M, D] matrix with strides (sm, sd) as an [len(idx), BD] block (zeros past
    M and D), widened to fp32 when UPCAST (see _sim)."""
    x = tl.load(ptr + idx[:, None] * sm + dcol[None, :] * sd, mask=(idx[:, None] < M) & (dcol[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(ptr, idx, dcol, M, D, x):
    """x into rows ``idx`` of a contiguous [M, D] matrix (in its dtype; rows past M and columns past
    D are not written)."""
    tl.store(ptr + idx[:, None] * D + dcol[None, :], x.to(ptr.dtype.element_ty),
             mask=(idx[:, None] < M) & (dcol[None, :] < D))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b; IEEE: full-precision fp32/fp64 products (no TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_weights(lse_ptr, rows, M, n_split, w0, w1, scale, ACC: tl.constexpr):
    """(lse, w * scale) of the query rows ``rows`` (both 0 past M)."""
    lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
    ws = (tl.where(rows < n_split, w0, w1) * scale).to(ACC)
    return lse, tl.where(rows < M, ws, 0.0)


@triton.jit
def _sim(q_ptr, k_ptr, rows, cols, dcol, M, D, sqm, sqd, skm, skd, scale, IEEE: tl.constexpr,
         UPCAST: tl.constexpr):
    """scale * q[rows] k[cols]^T as a [BM, BN] ACC block (rows/cols past M read zeros). UPCAST:
    the operands are widened to fp32 after the load (bf16 under the interpreter, whose tl.dot
    multiplies the raw uint16 storage of bf16; bf16 x bf16 products are exact in fp32, so the
    result is what tensor cores with fp32 accumulation give)."""
    q = _load_rows(q_ptr, rows, dcol, M, D, sqm, sqd, UPCAST)
    k = _load_rows(k_ptr, cols, dcol, M, D, skm, skd, UPCAST)
    return _dot(q, tl.trans(k), IEEE) * scale, q, k


@triton.jit
def _lse_kernel(
    q_ptr,  # [M, D] queries, strides (sqm, sqd)
    k_ptr,  # [M, D] keys, strides (skm, skd)
    lse_ptr,  # [M] ACC out: log-sum-exp of each similarity row
    loss_ptr,  # [M] ACC out: w_i (lse_i - S_ii)
    M, D, sqm, sqd, skm, skd,
    scale_hi, scale_lo, n_split,  # 1/temperature = scale_hi + scale_lo; rows < n_split weigh 1/n_split,
    # the others 1/(M - n_split)
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows, dcol, scale, w0, w1 = _program(scale_hi, scale_lo, n_split, M, BM, BD, ACC)
    m_i = tl.full([BM], _NEG_BIG, ACC)
    l_i = tl.zeros([BM], ACC)
    diag = tl.zeros([BM], ACC)
    for n0 in range(0, M, BN):
        cols = n0 + tl.arange(0, BN)
        s, q, k = _sim(q_ptr, k_ptr, rows, cols, dcol, M, D, sqm, sqd, skm, skd, scale, IEEE, UPCAST)
        s = s.to(ACC)
        s = tl.where(cols[None, :] < M, s, _NEG_BIG)
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    w = tl.where(rows < n_split, w0, w1).to(ACC)
    valid = rows < M
    tl.store(lse_ptr + rows, lse, mask=valid)
    tl.store(loss_ptr + rows, w * (lse - diag), mask=valid)


@triton.jit
def _grad_q_kernel(q_ptr, k_ptr, lse_ptr, gq_ptr, M, D, sqm, sqd, skm, skd, scale_hi, scale_lo, n_split,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
    # the arguments of _lse_kernel, lse_ptr its output; gq_ptr: [M, D] out, contiguous, d loss / d q
    # for a unit grad_loss
    rows, dcol, scale, w0, w1 = _program(scale_hi, scale_lo, n_split, M, BM, BD, ACC)
    lse, ws = _row_weights(lse_ptr, rows, M, n_split, w0, w1, scale, ACC)
    acc = tl.zeros([BM, BD], ACC)
    for n0 in range(0, M, BN):
        cols = n0 + tl.arange(0, BN)
        s, q, k = _sim(q_ptr, k_ptr, rows, cols, dcol, M, D, sqm, sqd, skm, skd, scale, IEEE, UPCAST)
        s = s.to(ACC)
        p = tl.where(cols[None, :] < M, tl.exp(s - lse[:, None]), 0.0)
        g = ws[:, None] * (p - tl.where(rows[:, None] == cols[None, :], 1.0, 0.0))
        acc += _dot(g.to(q_ptr.dtype.element_ty).to(k.dtype), k, IEEE).to(ACC)
    _store_rows(gq_ptr, rows, dcol, M, D, acc)


@triton.jit
def _grad_k_kernel(q_ptr, k_ptr, lse_ptr, gk_ptr, M, D, sqm, sqd, skm, skd, scale_hi, scale_lo, n_split,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
    # the arguments of _lse_kernel, lse_ptr its output; gk_ptr: [M, D] out, contiguous, d loss / d k
    # for a unit grad_loss
    cols, dcol, scale, w0, w1 = _program(scale_hi, scale_lo, n_split, M, BN, BD, ACC)
    acc = tl.zeros([BN, BD], ACC)
    # the key block is loop-invariant; the similarities are formed transposed (k q^T, [BN, BM])
    # so that the gradient block feeds the second dot as it is: a transposed operand of a
    # register FMA dot (fp32) costs a layout conversion that spills at BD = 256
    k = _load_rows(k_ptr, cols, dcol, M, D, skm, skd, UPCAST)
    for m0 in range(0, M, BM):
        rows = m0 + tl.arange(0, BM)
        lse, ws = _row_weights(lse_ptr, rows, M, n_split, w0, w1, scale, ACC)
        q = _load_rows(q_ptr, rows, dcol, M, D, sqm, sqd, UPCAST)
        s_t = (_dot(k, tl.trans(q), IEEE) * scale).to(ACC)
        p_t = tl.where(cols[:, None] < M, tl.exp(s_t - lse[None, :]), 0.0)
        g_t = ws[None, :] * (p_t - tl.where(rows[None, :] == cols[:, None], 1.0, 0.0))  # [BN, BM]
        acc += _dot(g_t.to(q_ptr.dtype.element_ty).to(q.dtype), q, IEEE).to(ACC)
    _store_rows(gk_ptr, cols, dcol, M, D, acc)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_sizes(m: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BN, BD): 16-row blocks under the interpreter (fast) and for fp32; on a GPU 64 x 64 for
    fp16/bf16 (32 for wide D) and 32 x 32 for fp64."""
    bd = max(16, triton.next_power_of_2(d))
    if q_interpreting():
        return 16, 16, bd
    if dtype == torch.float32:
        # fp32 runs the IEEE dot as FMAs on registers (no tensor cores): 64 x 64 or 32 x 32
        # blocks beside a [block, BD] operand tile spill on sm_80/sm_90; 16-row blocks do not
        return 16, 16, bd
    big = 64 if (bd <= 128 and dtype != torch.float64) else 32
    return big, big, bd


def q_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def contrastive_ce(q: torch.Tensor, k: torch.Tensor, scale: float, n_split: int, need_grad_q: bool,
                   need_grad_k: bool):
    """(loss, grad_q, grad_k) as the C++ op fastsynth::contrastive_ce (empty [0] grads where not asked)."""
    m, d = q.shape
    acc_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    bm, bn, bd = block_sizes(m, d, q.dtype)
    scale_hi = float(torch.tensor(scale, dtype=torch.float32))  # fp32-exact halves, see _program
    scale_lo = float(scale) - scale_hi
    upcast = q.dtype == torch.bfloat16 and q_interpreting()  # see _sim
    ieee = q.dtype in (torch.float32, torch.float64) or upcast
    lse = torch.empty(m, dtype=acc_dt, device=q.device)
    row_loss = torch.empty(m, dtype=acc_dt, device=q.device)
    args = (m, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale_hi, scale_lo, int(n_split))
    meta = dict(BM=bm, BN=bn, BD=bd, ACC=_acc(q.dtype), IEEE=ieee, UPCAST=upcast)
    if q.dtype == torch.float32 and bd >= 256:
        # three [16, BD] fp32 tiles live in registers across the loop: spread them over 8 warps
        meta["num_warps"] = 8
    _lse_kernel[(triton.cdiv(m, bm),)](q, k, lse, row_loss, *args, **meta)
    gq = torch.empty(0, dtype=q.dtype, device=q.device)
    gk = torch.empty(0, dtype=k.dtype, device=k.device)
    if need_grad_q:
        gq = torch.empty((m, d), dtype=q.dtype, device=q.device)
        _grad_q_kernel[(triton.cdiv(m, bm),)](q, k, lse, gq, *args, **meta)
    if need_grad_k:
        gk = torch.empty((m, d), dtype=k.dtype, device=k.device)
        _grad_k_kernel[(triton.cdiv(m, bn),)](q, k, lse, gk, *args, **meta)
    return row_loss.sum(), gq, gk
