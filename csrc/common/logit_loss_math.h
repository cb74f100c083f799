// Arithmetic of the teacher/student logit losses, shared by the CPU and CUDA kernels
// (fastsynth/ops/logit_losses.py has the math in full).
//
// Per row i of teacher logits t and student logits s (C classes, temperature T, x' = x / T):
//   lse_t = log sum_c exp(t'_c),  p_t = exp(t' - lse_t)          (same for s)
//   KL_i  = sum_c p_t,c (log p_t,c - log p_s,c)
//         = A / Z_t - log Z_t + log Z_s,   A = sum_c exp(t'_c - m_t) ((t'_c - m_t) - (s'_c - m_s))
//   CE_i  = lse_t - t'_y
// The loss of a row is  ce_w * CE_i + kl_w * m_i * KL_i  and its gradient
//   dL/dt_c = (1/T) [ ce_w (p_t,c - [c = y]) + kl_w m_i p_t,c (d_c - KL_i) ],  d_c = log p_t,c - log p_s,c
//   dL/ds_c = (1/T) kl_w m_i (p_s,c - p_t,c)
//
// Online form (CUDA, Triton): each thread streams its elements into a KlState holding the
// running maxima, the running sums Z_t, Z_s and A centred on the running maxima; states merge
// exactly (kl_state_merge), so a row can be split over lanes, warps and chunks in any way.
// Centring A on the maxima keeps it exact for logits of magnitude 1e4 in fp32.
//
// Non-finite logits follow the float64 reference: a NaN anywhere in a row makes the row's values
// NaN (never clamped away), and the argmax treats NaN as the maximum (torch.argmax). A -inf logit
// is a probability of exactly 0: its class contributes p log p = 0 to the KL whatever the other
// row holds (the limit; no 0 * inf), and the running maxima start at the lowest finite value, not
// at -inf, so that a -inf element never meets a -inf maximum (exp(-inf - -inf) would be NaN).
//
// JS element (clamped Jensen-Shannon of the DeepInversion synthesizers), with P, Q the softmax of
// s', t', M = (P + Q) / 2 and X^ = clamp(X, lo, hi):
//   f_c  = M^ (log M^ - log P^ / 2 - log Q^ / 2)            (0.5 KL(M^||P^) + 0.5 KL(M^||Q^))
//   dP_c = [lo <= P <= hi] (-M^ / (2 P)) + [lo <= M <= hi] (log M^ + 1 - log P^ / 2 - log Q^ / 2) / 2
//   dQ_c = same with P and Q swapped
// and the softmax backward  ds_c = (1/T) P_c (dP_c - sum_k P_k dP_k)  (dt with Q, dQ).
// torch.clamp passes the gradient on the closed interval [lo, hi], and so do these formulas.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace fastsynth {

// ---------------------------------------------------------------------------------------------
// exp / log. On the device the hardware versions; on the host a branchless float exp and log
// that GCC vectorises inside `omp simd` loops (libm's expf/logf are calls that block it).
// ---------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__)
FS_HD float bits_to_float(int32_t i) { return __int_as_float(i); }
FS_HD int32_t float_to_bits(float f) { return __float_as_int(f); }
#else
FS_HD float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
FS_HD int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
#endif

// c0 + x (c1 + x (c2 + ...)): a polynomial by Horner's rule, lowest coefficient first.
template <typename F>
FS_HD F horner(F, F c) {
  return c;
}
template <typename F, typename... Cs>
FS_HD F horner(F x, F c, Cs... cs) {
  return horner(x, cs...) * x + c;
}

// exp(x) for float: x = n ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series to degree 7
// (truncation error below 1e-8 relative), times 2^n assembled in the exponent bits.
// Results below exp(-87) (the smallest normal floats) are flushed to 0.
FS_HD float exp_poly(float x) {
  // comparisons, not fminf/fmaxf: those are library calls (NaN rules) that stop vectorisation
  const float xlo = x < -87.0f ? -87.0f : x;
  const float xhi = xlo > 88.0f ? 88.0f : xlo;
  const float xc = xhi == xhi ? xhi : 0.0f;  // NaN: no float->int conversion of NaN (UB); NaN below
  const float n = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693145751953125f;  // ln2 split in a high part exact in float ...
  r = r - n * 1.42860682030941723212e-6f;  // ... and the remainder
  const float p = horner(r, 1.0f, 1.0f, 0.5f, 1.0f / 6.0f, 1.0f / 24.0f, 1.0f / 120.0f, 1.0f / 720.0f, 1.0f / 5040.0f);
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  const float result = p * scale;  // computed unconditionally: a select, not a branch, vectorises
  return x < -87.0f ? 0.0f : (x == x ? result : x);
}

// log(x) for positive normal floats: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(u), u = (m - 1) / (m + 1), |u| <= 0.1716, series to u^11 (error ~1e-9 relative).
// NaN and +inf pass through and 0 gives -inf, as libm (a row sum can be NaN, or 0 when every
// logit of the row is -inf).
FS_HD float log_poly(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const bool big = m > 1.41421356237309505f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float u = (m - 1.0f) / (m + 1.0f);
  const float u2 = u * u;
  const float p = horner(u2, 1.0f, 1.0f / 3.0f, 1.0f / 5.0f, 1.0f / 7.0f, 1.0f / 9.0f, 1.0f / 11.0f);
  const float r = static_cast<float>(e) * 0.693147180559945309f + 2.0f * u * p;
  return x == 0.0f ? -INFINITY : (x < INFINITY ? r : x);
}

// exp, log and 1/x of the kernels: on the device the hardware versions, on the host the float
// polynomials above and libm's double functions.
// The device's 1/x in fp64: a correctly rounded fp64 division or reciprocal compiles to a
// slow-path subroutine call whose saved registers show up as spills; this is the hardware
// approximation refined by two Newton steps (error below 1 ulp), for positive normal x.
#if defined(__CUDA_ARCH__)
FS_HD float fs_exp(float x) { return __expf(x); }
FS_HD float fs_log(float x) { return __logf(x); }
FS_HD float fs_recip(float x) { return __frcp_rn(x); }
FS_HD double fs_recip(double x) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
  r = fma(r, fma(-x, r, 1.0), r);
  r = fma(r, fma(-x, r, 1.0), r);
  return r;
}
#else
FS_HD float fs_exp(float x) { return exp_poly(x); }
FS_HD float fs_log(float x) { return log_poly(x); }
FS_HD float fs_recip(float x) { return 1.0f / x; }
FS_HD double fs_recip(double x) { return 1.0 / x; }
#endif
FS_HD double fs_exp(double x) { return exp(x); }
FS_HD double fs_log(double x) { return log(x); }

// ln(x) in double for a positive normal x, branch-free so that it vectorises on the host (the
// per-row log-sum-exp finish of the short-row CPU kernels runs 16 rows at once):
//   x = m 2^e with m in [sqrt(1/2), sqrt(2)],  s = (m - 1)/(m + 1),  |s| <= 0.1716,
//   ln m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^21/21)   (truncation below 1e-18 relative),
//   ln x = e ln2_hi + (ln m + e ln2_lo).
// Within a few ulps of libm's log (checked in csrc/tests/test_logit_loss_math.cpp). NaN, +inf
// and 0 as libm (NaN, +inf, -inf).
FS_HD double log_f64_poly(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int64_t e = static_cast<int64_t>((bits >> 52) & 0x7ffu) - 1023;
  uint64_t mbits = (bits & 0xfffffffffffffull) | 0x3ff0000000000000ull;  // m in [1, 2)
  const uint64_t big = mbits > 0x3ff6a09e667f3bcdull ? 1u : 0u;           // m > sqrt(2): m/2, e+1
  mbits -= big << 52;
  e += static_cast<int64_t>(big);
  double m;
  std::memcpy(&m, &mbits, sizeof m);
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  const double p = horner(s2, 1.0 / 3, 1.0 / 5, 1.0 / 7, 1.0 / 9, 1.0 / 11, 1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19,
                          1.0 / 21);
  const double lnm = 2.0 * s + 2.0 * s * s2 * p;
  const double ef = static_cast<double>(e);
  const double r = ef * 0x1.62e42fefa3800p-1 + (lnm + ef * 0x1.ef35793c76730p-45);  // ln 2 = hi + lo
  return x == 0.0 ? -INFINITY : (x < INFINITY ? r : x);
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp and the streamed KL state
// ---------------------------------------------------------------------------------------------

// The lowest finite value: the running maximum of an empty stream. Finite, so that a -inf element
// gives exp(-inf - m) = 0 and never exp(-inf - -inf) = NaN; every finite logit is >= it.
template <typename acc_t>
FS_HD acc_t lowest_finite();
template <>
FS_HD float lowest_finite<float>() {
  return -3.40282346638528859812e+38f;
}
template <>
FS_HD double lowest_finite<double>() {
  return -1.79769313486231570815e+308;
}

// Running (max, sum exp(x - max)) of a stream of values; the empty state is (lowest, 0).
template <typename acc_t>
struct LseState {
  acc_t m;
  acc_t z;
};

template <typename acc_t>
FS_HD LseState<acc_t> lse_empty() {
  return {lowest_finite<acc_t>(), acc_t(0)};
}

template <typename acc_t>
FS_HD LseState<acc_t> lse_push(LseState<acc_t> st, acc_t x) {
  if (x > st.m) {
    st.z = st.z * fs_exp(st.m - x) + acc_t(1);  // the empty state has z = 0
    st.m = x;
  } else {
    st.z += fs_exp(x - st.m);
  }
  return st;
}

template <typename acc_t>
FS_HD LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (b.z == acc_t(0)) return a;
  if (a.z == acc_t(0)) return b;
  const acc_t m = a.m > b.m ? a.m : b.m;
  return {m, a.z * fs_exp(a.m - m) + b.z * fs_exp(b.m - m)};
}

template <typename acc_t>
FS_HD acc_t lse_value(LseState<acc_t> st) {
  return st.m + fs_log(st.z);
}

// Streamed state of one teacher/student row pair for the KL (temperature already applied):
// maxima mt, ms, sums zt = sum exp(t - mt), zs = sum exp(s - ms), and
// a = sum exp(t - mt) ((t - mt) - (s - ms)), all relative to the CURRENT maxima.
template <typename acc_t>
struct KlState {
  acc_t mt, zt, ms, zs, a;
};

template <typename acc_t>
FS_HD KlState<acc_t> kl_state_empty() {
  return {lowest_finite<acc_t>(), acc_t(0), lowest_finite<acc_t>(), acc_t(0), acc_t(0)};
}

// Re-express a state relative to new maxima (mt_new >= st.mt, ms_new >= st.ms). The teacher and
// student sums rescale separately: a state may hold student mass and no teacher mass (its teacher
// elements were -inf), and that mass must not be dropped.
template <typename acc_t>
FS_HD KlState<acc_t> kl_state_rebase(KlState<acc_t> st, acc_t mt_new, acc_t ms_new) {
  // (t - mt_old) - (s - ms_old) = (t - mt_new) - (s - ms_new) + (mt_new - mt_old) - (ms_new - ms_old)
  const acc_t shift = (mt_new - st.mt) - (ms_new - st.ms);
  const acc_t ft = fs_exp(st.mt - mt_new);
  const acc_t fs = fs_exp(st.ms - ms_new);
  // a is 0 without teacher mass; the shift from the lowest finite maximum may overflow (0 * inf)
  const acc_t a = st.zt == acc_t(0) ? acc_t(0) : (st.a - st.zt * shift) * ft;
  return {mt_new, st.zt * ft, ms_new, st.zs * fs, a};
}

template <typename acc_t>
FS_HD KlState<acc_t> kl_state_push(KlState<acc_t> st, acc_t t, acc_t s) {
  if (t > st.mt || s > st.ms) {
    st = kl_state_rebase(st, t > st.mt ? t : st.mt, s > st.ms ? s : st.ms);
  }
  const acc_t dt = t - st.mt, ds = s - st.ms;  // NaN for a NaN element (the maxima skip it)
  const acc_t et = fs_exp(dt);
  st.zt += et;
  st.zs += fs_exp(ds);
  st.a += et == acc_t(0) ? acc_t(0) : et * (dt - ds);  // p_t = 0: no term (0 * inf for s = -inf)
  return st;
}

template <typename acc_t>
FS_HD KlState<acc_t> kl_state_merge(KlState<acc_t> x, KlState<acc_t> y) {
  const acc_t mt = x.mt > y.mt ? x.mt : y.mt;
  const acc_t ms = x.ms > y.ms ? x.ms : y.ms;
  x = kl_state_rebase(x, mt, ms);
  y = kl_state_rebase(y, mt, ms);
  return {mt, x.zt + y.zt, ms, x.zs + y.zs, x.a + y.a};
}

// KL(p_t || p_s) of a finished row state. Never below 0 by more than rounding; clamp at 0, NaN
// stays NaN (a comparison that is false for NaN selects the KL itself).
// log Z_s - log Z_t is taken as one log of the ratio (near 1 for close distributions), which
// avoids the cancellation of two logs of magnitude log C when the KL is small (high T).
template <typename acc_t>
FS_HD acc_t kl_state_value(KlState<acc_t> st) {
  const acc_t rz = fs_recip(st.zt);
  const acc_t kl = st.a * rz + fs_log(st.zs * rz);
  return kl < acc_t(0) ? acc_t(0) : kl;
}

// p * x where p is a probability: exactly 0 where p is 0 (a -inf logit, or an underflow), where x
// (a log-ratio) can be infinite or NaN; NaN where p is NaN.
template <typename acc_t>
FS_HD acc_t prob_times(acc_t p, acc_t x) {
  return p == acc_t(0) ? acc_t(0) : p * x;
}

// ---------------------------------------------------------------------------------------------
// argmax with torch.argmax's rules: NaN is the maximum, and the first maximal index wins
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct ArgMax {
  acc_t v;
  int64_t i;
};

template <typename acc_t>
FS_HD ArgMax<acc_t> argmax_merge(ArgMax<acc_t> a, ArgMax<acc_t> b) {
  const bool a_nan = a.v != a.v, b_nan = b.v != b.v;
  if (a_nan || b_nan) return (b_nan && (!a_nan || b.i < a.i)) ? b : a;
  if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
  return a;
}

// ---------------------------------------------------------------------------------------------
// Per-row finishing arithmetic
// ---------------------------------------------------------------------------------------------

// Coefficients of one row's gradient (see the header comment):
//   dL/dt_c = g_pt * p_t,c + g_ptd * p_t,c * d_c  - [c = y] g_y
//   dL/ds_c = g_ps * p_s,c - g_ps * p_t,c
struct KlRowCoef {
  double g_pt, g_ptd, g_ps, g_y;
};

// ce_w, kl_w: weights of CE_i and of KL_i in the loss; m: the row's mask (0 or 1);
// inv_t: 1 / temperature; kl: KL_i.
FS_HD KlRowCoef kl_row_coef(double ce_w, double kl_w, double m, double inv_t, double kl) {
  const double klm = kl_w * m;
  KlRowCoef c;
  c.g_pt = inv_t * (ce_w - klm * kl);
  c.g_ptd = inv_t * klm;
  c.g_ps = inv_t * klm;
  c.g_y = inv_t * ce_w;
  return c;
}

// The JS element: value f and the gradients dP, dQ w.r.t. the unclamped probabilities, from
// P, Q and their exact logs (log P = s' - lse_s from the logits).
template <typename acc_t>
struct JsElem {
  acc_t f, dp, dq;
};

template <typename acc_t>
FS_HD JsElem<acc_t> js_element(acc_t p, acc_t q, acc_t log_p, acc_t log_q, acc_t lo, acc_t hi, acc_t log_lo,
                               acc_t log_hi) {
  const acc_t mid = acc_t(0.5) * (p + q);
  const bool p_in = p >= lo && p <= hi;
  const bool q_in = q >= lo && q <= hi;
  const bool m_in = mid >= lo && mid <= hi;
  const acc_t pc = p < lo ? lo : (p > hi ? hi : p);
  const acc_t qc = q < lo ? lo : (q > hi ? hi : q);
  const acc_t mc = mid < lo ? lo : (mid > hi ? hi : mid);
  const acc_t log_pc = p < lo ? log_lo : (p > hi ? log_hi : log_p);
  const acc_t log_qc = q < lo ? log_lo : (q > hi ? log_hi : log_q);
  const acc_t log_mc = fs_log(mc);
  const acc_t inner = log_mc - acc_t(0.5) * log_pc - acc_t(0.5) * log_qc;
  JsElem<acc_t> r;
  r.f = mc * inner;
  const acc_t dm = m_in ? acc_t(0.5) * (inner + acc_t(1)) : acc_t(0);
  r.dp = (p_in ? acc_t(-0.5) * mc * fs_recip(pc) : acc_t(0)) + dm;
  r.dq = (q_in ? acc_t(-0.5) * mc * fs_recip(qc) : acc_t(0)) + dm;
  return r;
}

}  // namespace fastsynth
