// CPU kernels of the teacher/student logit losses (fastsynth/ops/logit_losses.py has the math).
//
// Rows are independent: at::parallel_for over rows, each row handled by one thread in a few
// sweeps that stay in L1/L2 (a row pair of C = 21843 floats is 175 KB), so memory sees one read
// of the logits and one write of the gradients:
//   1. max and argmax of both rows (SIMD max, then a SIMD search for its first index);
//   2. e = exp(x' - max) of both rows into the gradient buffers, with the sums Z_t, Z_s and
//      A = sum e_t ((t' - m_t) - (s' - m_s));
//   3. the gradients from the stored e (no second exp).
// The max-first scheme costs one exp per element; an online (running-max) log-sum-exp costs a
// second exp per element for the rescaling when vectorised, which is the dominant cost here.
// The CUDA and Triton kernels, which read from memory once per sweep, use the online form.
//
// Float rows run in functions cloned for AVX-512, AVX2 and baseline x86-64 (FS_SIMD_CLONES of
// cpu/simd.h: GCC target_clones, picked at load time) so the exp/log polynomials of logit_loss_math.h vectorise.
// fp16/bf16 rows are converted to fp32 scratch first (fp32 math); fp64 rows use fp64 math.
//
// Batch sums are taken over per-row partial results in row order, in double, after the parallel
// loop: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Floating-point operations may be speculated (as in torch's own build): with the default
// -ftrapping-math GCC keeps every select of the exp/log polynomials a branch and vectorises
// nothing (measured 11x slower). Applies to the functions of this file only.
#pragma GCC optimize("no-trapping-math")

#include "binding/logit_losses.h"
#include "common/logit_loss_math.h"
#include "cpu/large_alloc.h"
#include "cpu/simd.h"

namespace fastsynth {
namespace {

using logit_binding::acc_scalar_type;
using logit_binding::Tensor3;
using logit_binding::unit_column_stride;

// ---------------------------------------------------------------------------------------------
// Row kernels on contiguous acc_t rows
// ---------------------------------------------------------------------------------------------

constexpr int64_t kSumBlock = 64;  // elements per fp32 partial sum / argmax search block

template <typename acc_t>
FS_ALWAYS_INLINE acc_t row_max(const acc_t* x, int64_t C) {
  acc_t m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// Whether x[0..C) holds a NaN (one SIMD pass; the max above skips NaN).
template <typename acc_t>
FS_ALWAYS_INLINE bool row_has_nan(const acc_t* x, int64_t C) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t c = 0; c < C; ++c) nan |= x[c] != x[c] ? 1 : 0;
  return nan != 0;
}

// max and first argmax of x[0..C) with torch.argmax's rules: NaN is the maximum (the first NaN
// wins), else the first maximal index. A SIMD NaN test and max, then a SIMD search for the first
// index holding it, block by block with an early exit. For a NaN row the value is NaN, so every
// exp of the row is NaN and the row's loss terms are NaN.
template <typename acc_t>
FS_ALWAYS_INLINE ArgMax<acc_t> row_argmax(const acc_t* x, int64_t C) {
  const bool nan = row_has_nan(x, C);
  const acc_t m = nan ? std::numeric_limits<acc_t>::quiet_NaN() : row_max(x, C);
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  for (int64_t b = 0; b < C; b += kSumBlock) {
    const int64_t e = b + kSumBlock < C ? b + kSumBlock : C;
    int32_t first = kNone;
#pragma omp simd reduction(min : first)
    for (int64_t c = b; c < e; ++c) {
      const bool hit = nan ? x[c] != x[c] : x[c] == m;
      const int32_t cand = hit ? static_cast<int32_t>(c) : kNone;
      first = cand < first ? cand : first;
    }
    if (first != kNone) return {m, first};
  }
  return {m, 0};  // unreachable: some element is the max or NaN
}

struct KlRowResult {
  double ce;     // CE_i (0 without targets)
  double kl;     // KL_i
  double agree;  // m_i
};

// One row of  ce_w * CE_i + kl_w * m_i * KL_i  (temperature 1/inv_t). gt, gs: C-element buffers
// that receive the gradients (written when with_grad).
template <typename acc_t>
FS_ALWAYS_INLINE KlRowResult kl_row(const acc_t* t, const acc_t* s, int64_t C, acc_t inv_t, int64_t y, double ce_w,
                                    double kl_w, bool agree_mask, bool with_grad, acc_t* gt, acc_t* gs) {
  const ArgMax<acc_t> at = row_argmax(t, C);
  const ArgMax<acc_t> as = row_argmax(s, C);
  const acc_t mt = at.v, ms = as.v;

  // Sums: SIMD lanes over blocks of kSumBlock elements, the block sums added in double. At high
  // temperature the KL is small against log Z, and fp32 lane sums over a whole row leave a
  // relative error of 1e-4 on it (C = 1000, T = 20); a fp32->fp64 sum inside the SIMD loop does
  // not vectorise.
  double zt = 0, zs = 0, a = 0;
  for (int64_t b = 0; b < C; b += kSumBlock) {
    const int64_t e = b + kSumBlock < C ? b + kSumBlock : C;
    acc_t zt_b = 0, zs_b = 0, a_b = 0;
#pragma omp simd reduction(+ : zt_b, zs_b, a_b)
    for (int64_t c = b; c < e; ++c) {
      const acc_t dt = (t[c] - mt) * inv_t;
      const acc_t ds = (s[c] - ms) * inv_t;
      const acc_t et = fs_exp(dt);
      const acc_t es = fs_exp(ds);
      gt[c] = et;
      gs[c] = es;
      zt_b += et;
      zs_b += es;
      a_b += prob_times(et, dt - ds);  // a -inf teacher logit: no term (not 0 * inf)
    }
    zt += static_cast<double>(zt_b);
    zs += static_cast<double>(zs_b);
    a += static_cast<double>(a_b);
  }
  const double lzt = std::log(zt), lzs = std::log(zs);
  double kl = a / zt + std::log(zs / zt);
  kl = kl < 0 ? 0 : kl;  // KL >= 0; rounding can leave -1e-8. NaN stays NaN.
  KlRowResult r;
  r.kl = kl;
  r.agree = agree_mask ? (at.i == as.i ? 1.0 : 0.0) : 1.0;
  r.ce = y >= 0 ? lzt - static_cast<double>((t[y] - mt) * inv_t) : 0.0;
  if (!with_grad) return r;

  const KlRowCoef k = kl_row_coef(ce_w, kl_w, r.agree, static_cast<double>(inv_t), kl);
  const acc_t g_pt = static_cast<acc_t>(k.g_pt), g_ptd = static_cast<acc_t>(k.g_ptd);
  const acc_t g_ps = static_cast<acc_t>(k.g_ps);
  const acc_t rzt = static_cast<acc_t>(1.0 / zt), rzs = static_cast<acc_t>(1.0 / zs);
  const acc_t lz_diff = static_cast<acc_t>(lzs - lzt);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t pt = gt[c] * rzt;
    const acc_t ps = gs[c] * rzs;
    const acc_t d = ((t[c] - mt) - (s[c] - ms)) * inv_t + lz_diff;  // log p_t - log p_s
    gt[c] = prob_times(pt, g_pt + g_ptd * d);
    gs[c] = g_ps * (ps - pt);
  }
  if (y >= 0) gt[y] -= static_cast<acc_t>(k.g_y);
  return r;
}

// One row of the clamped JS divergence sum_c f_c (see logit_loss_math.h), P from s, Q from t.
// gs, gt receive  w * dJS/ds, w * dJS/dt; pbuf, qbuf: C-element scratch.
template <typename acc_t>
FS_ALWAYS_INLINE double js_row(const acc_t* s, const acc_t* t, int64_t C, acc_t inv_t, acc_t lo, acc_t hi, acc_t w,
                               bool with_grad, acc_t* gs, acc_t* gt, acc_t* pbuf, acc_t* qbuf) {
  const acc_t ms = row_max(s, C), mt = row_max(t, C);
  double zs = 0, zt = 0;
  for (int64_t b = 0; b < C; b += kSumBlock) {
    const int64_t e = b + kSumBlock < C ? b + kSumBlock : C;
    acc_t zs_b = 0, zt_b = 0;
#pragma omp simd reduction(+ : zs_b, zt_b)
    for (int64_t c = b; c < e; ++c) {
      const acc_t es = fs_exp((s[c] - ms) * inv_t);
      const acc_t et = fs_exp((t[c] - mt) * inv_t);
      pbuf[c] = es;
      qbuf[c] = et;
      zs_b += es;
      zt_b += et;
    }
    zs += static_cast<double>(zs_b);
    zt += static_cast<double>(zt_b);
  }
  const acc_t lzs = static_cast<acc_t>(std::log(zs));
  const acc_t lzt = static_cast<acc_t>(std::log(zt));
  const acc_t rzs = static_cast<acc_t>(1.0 / zs), rzt = static_cast<acc_t>(1.0 / zt);
  const acc_t log_lo = static_cast<acc_t>(std::log(static_cast<double>(lo)));
  const acc_t log_hi = static_cast<acc_t>(std::log(static_cast<double>(hi)));
  double f = 0, sp = 0, sq = 0;
  for (int64_t b = 0; b < C; b += kSumBlock) {
    const int64_t end = b + kSumBlock < C ? b + kSumBlock : C;
    acc_t f_b = 0, sp_b = 0, sq_b = 0;
#pragma omp simd reduction(+ : f_b, sp_b, sq_b)
    for (int64_t c = b; c < end; ++c) {
      const acc_t p = pbuf[c] * rzs;
      const acc_t q = qbuf[c] * rzt;
      const acc_t log_p = (s[c] - ms) * inv_t - lzs;
      const acc_t log_q = (t[c] - mt) * inv_t - lzt;
      const JsElem<acc_t> e = js_element<acc_t>(p, q, log_p, log_q, lo, hi, log_lo, log_hi);
      f_b += e.f;
      const acc_t pdp = p * e.dp, qdq = q * e.dq;
      gs[c] = pdp;
      gt[c] = qdq;
      sp_b += pdp;
      sq_b += qdq;
      pbuf[c] = p;
      qbuf[c] = q;
    }
    f += static_cast<double>(f_b);
    sp += static_cast<double>(sp_b);
    sq += static_cast<double>(sq_b);
  }
  if (with_grad) {
    const acc_t ws = w * inv_t;
    const acc_t spf = static_cast<acc_t>(sp), sqf = static_cast<acc_t>(sq);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      gs[c] = ws * (gs[c] - pbuf[c] * spf);
      gt[c] = ws * (gt[c] - qbuf[c] * sqf);
    }
  }
  return f;
}

// ---------------------------------------------------------------------------------------------
// Short rows (C <= kLaneMaxC, e.g. the 10 or 100 classes of CIFAR): one row per SIMD lane.
// Row by row, a 10-element row leaves the 16-lane loops above to their scalar remainders and
// pays the per-row reductions, about 350 ns a row. Here a block of kLanes rows is transposed
// into [C][kLanes] scratch and every sweep runs over the lanes, so each instruction serves 16
// rows. Same arithmetic as kl_row (max-first exp, fp32 lane sums, the row's scalars in double),
// summed over c in order rather than in 16-lane partial sums.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kLanes = 16;
constexpr int64_t kLaneMaxC = 64;

struct LaneResults {
  double ce[kLanes], kl[kLanes], agree[kLanes];
};

// One value per lane as a GCC vector (an attribute on a dependent type would be dropped).
template <typename acc_t>
struct LaneVec;
template <>
struct LaneVec<float> {
  typedef float values __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t indices __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t index_t;
};
template <>
struct LaneVec<double> {
  typedef double values __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t indices __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t index_t;
};

// Class c of every lane of [C][kLanes] blocks: the inputs t, s and the gradients gt, gs.
template <typename acc_t>
struct LaneColumn {
  const acc_t* t;
  const acc_t* s;
  acc_t* gt;
  acc_t* gs;
};

// t, s: [C][kLanes] (lane j holds row j of the block; unused lanes hold zeros). y: per-lane
// target, -1 for none. gt, gs: [C][kLanes] gradients (written when with_grad).
template <typename acc_t>
FS_ALWAYS_INLINE void kl_lanes(const acc_t* t, const acc_t* s, int64_t C, acc_t inv_t, const int64_t* y, double ce_w,
                               double kl_w, bool agree_mask, bool with_grad, acc_t* gt, acc_t* gs, LaneResults& out) {
  // Maxima and arg-maxima over the classes in whole-block vector values (GCC vector extensions,
  // lowered to the widest registers of each clone). Written as `omp simd` sweeps over lane arrays,
  // GCC turns `m = x > m ? x : m` into masked stores to the arrays, and every reload of a masked
  // store stalls on store forwarding: that sweep took longer than the exps.
  using lane_vec = typename LaneVec<acc_t>::values;
  using lane_ivec = typename LaneVec<acc_t>::indices;
  using lane_int = typename LaneVec<acc_t>::index_t;
  static_assert(sizeof(lane_vec) == kLanes * sizeof(acc_t) && sizeof(lane_ivec) == sizeof(lane_vec));
  acc_t mt[kLanes], ms[kLanes];
  int32_t it[kLanes], is[kLanes];
  {
    lane_vec m_t, m_s;
    std::memcpy(&m_t, t, sizeof m_t);
    std::memcpy(&m_s, s, sizeof m_s);
    lane_ivec i_t = {}, i_s = {};
    for (int64_t c = 1; c < C; ++c) {
      lane_vec tv, sv;
      std::memcpy(&tv, t + c * kLanes, sizeof tv);
      std::memcpy(&sv, s + c * kLanes, sizeof sv);
      // strict: the first maximum wins; a NaN replaces a non-NaN maximum and is never replaced
      const auto gt_t = (tv > m_t) | ((tv != tv) & (m_t == m_t));
      const auto gt_s = (sv > m_s) | ((sv != sv) & (m_s == m_s));
      const lane_ivec cv = lane_ivec{} + static_cast<lane_int>(c);
      m_t = gt_t ? tv : m_t;
      i_t = gt_t ? cv : i_t;
      m_s = gt_s ? sv : m_s;
      i_s = gt_s ? cv : i_s;
    }
    std::memcpy(mt, &m_t, sizeof m_t);
    std::memcpy(ms, &m_s, sizeof m_s);
    lane_int it_l[kLanes], is_l[kLanes];
    std::memcpy(it_l, &i_t, sizeof i_t);
    std::memcpy(is_l, &i_s, sizeof i_s);
    for (int64_t j = 0; j < kLanes; ++j) {
      it[j] = static_cast<int32_t>(it_l[j]);
      is[j] = static_cast<int32_t>(is_l[j]);
    }
  }
  acc_t zt[kLanes], zs[kLanes], a[kLanes];
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) zt[j] = zs[j] = a[j] = 0;
  for (int64_t c = 0; c < C; ++c) {
    const LaneColumn<acc_t> col{t + c * kLanes, s + c * kLanes, gt + c * kLanes, gs + c * kLanes};
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t dt = (col.t[j] - mt[j]) * inv_t;
      const acc_t ds = (col.s[j] - ms[j]) * inv_t;
      const acc_t et = fs_exp(dt);
      const acc_t es = fs_exp(ds);
      col.gt[j] = et;
      col.gs[j] = es;
      zt[j] += et;
      zs[j] += es;
      a[j] += prob_times(et, dt - ds);
    }
  }
  acc_t g_pt[kLanes], g_ptd[kLanes], g_ps[kLanes], rzt[kLanes], rzs[kLanes], lz_diff[kLanes];
  double g_y[kLanes], lzt[kLanes];
  // the rows' scalars in double, all lanes at once (Z >= 1: the maximum contributes exp(0))
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    const double zt_j = static_cast<double>(zt[j]), zs_j = static_cast<double>(zs[j]);
    const double lzt_j = log_f64_poly(zt_j), lzs_j = log_f64_poly(zs_j);
    double kl = static_cast<double>(a[j]) / zt_j + (lzs_j - lzt_j);
    kl = kl < 0 ? 0 : kl;  // KL >= 0; rounding can leave -1e-8. NaN stays NaN.
    const double agree = agree_mask ? (it[j] == is[j] ? 1.0 : 0.0) : 1.0;
    out.kl[j] = kl;
    out.agree[j] = agree;
    lzt[j] = lzt_j;
    const KlRowCoef k = kl_row_coef(ce_w, kl_w, agree, static_cast<double>(inv_t), kl);
    g_pt[j] = static_cast<acc_t>(k.g_pt);
    g_ptd[j] = static_cast<acc_t>(k.g_ptd);
    g_ps[j] = static_cast<acc_t>(k.g_ps);
    g_y[j] = k.g_y;
    rzt[j] = static_cast<acc_t>(1.0 / zt_j);
    rzs[j] = static_cast<acc_t>(1.0 / zs_j);
    lz_diff[j] = static_cast<acc_t>(lzs_j - lzt_j);
  }
  for (int64_t j = 0; j < kLanes; ++j)
    out.ce[j] = y[j] >= 0 ? lzt[j] - static_cast<double>((t[y[j] * kLanes + j] - mt[j]) * inv_t) : 0.0;
  if (!with_grad) return;
  for (int64_t c = 0; c < C; ++c) {
    const LaneColumn<acc_t> col{t + c * kLanes, s + c * kLanes, gt + c * kLanes, gs + c * kLanes};
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t pt = col.gt[j] * rzt[j];
      const acc_t ps = col.gs[j] * rzs[j];
      const acc_t d = ((col.t[j] - mt[j]) - (col.s[j] - ms[j])) * inv_t + lz_diff[j];  // log p_t - log p_s
      col.gt[j] = prob_times(pt, g_pt[j] + g_ptd[j] * d);
      col.gs[j] = g_ps[j] * (ps - pt);
    }
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    if (y[j] >= 0) gt[y[j] * kLanes + j] -= static_cast<acc_t>(g_y[j]);
  }
}

FS_SIMD_CLONES void kl_lanes_f32(const float* t, const float* s, int64_t C, float inv_t, const int64_t* y,
                                 double ce_w, double kl_w, bool agree_mask, bool with_grad, float* gt, float* gs,
                                 LaneResults& out) {
  kl_lanes<float>(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs, out);
}

// [C][kLanes] lane columns back to kLanes rows of C elements; nothing when rows is null.
FS_ALWAYS_INLINE void lanes_to_rows(const float* lanes, float* rows, int64_t C) {
  if (rows == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) rows[j * C + c] = lanes[c * kLanes + j];
  }
}

// A full block of kLanes float32 rows, transposed in and out inside the SIMD clones: the loops
// over lanes become gathers and scatters (strided rows), where the scalar transposition took as
// long as the whole kl_lanes sweep at C = 10. tp, sp: first row of the block (row strides
// t_stride, s_stride); gtp, gsp: first gradient row (contiguous rows of C) or null.
FS_SIMD_CLONES void kl_full_block_f32(const float* tp, int64_t t_stride, const float* sp, int64_t s_stride, int64_t C,
                                      float inv_t, const int64_t* y, double ce_w, double kl_w, bool agree_mask,
                                      bool with_grad, float* gtp, float* gsp, float* tt, float* ss, float* gt,
                                      float* gs, LaneResults& out) {
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      tt[c * kLanes + j] = tp[j * t_stride + c];
      ss[c * kLanes + j] = sp[j * s_stride + c];
    }
  }
  kl_lanes<float>(tt, ss, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs, out);
  lanes_to_rows(gt, gtp, C);
  lanes_to_rows(gs, gsp, C);
}
void kl_lanes_f64(const double* t, const double* s, int64_t C, double inv_t, const int64_t* y, double ce_w,
                  double kl_w, bool agree_mask, bool with_grad, double* gt, double* gs, LaneResults& out) {
  kl_lanes<double>(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs, out);
}
inline void kl_lanes_acc(const float* t, const float* s, int64_t C, float inv_t, const int64_t* y, double ce_w,
                         double kl_w, bool agree_mask, bool with_grad, float* gt, float* gs, LaneResults& out) {
  kl_lanes_f32(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs, out);
}
inline void kl_lanes_acc(const double* t, const double* s, int64_t C, double inv_t, const int64_t* y, double ce_w,
                         double kl_w, bool agree_mask, bool with_grad, double* gt, double* gs, LaneResults& out) {
  kl_lanes_f64(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs, out);
}

// float rows in SIMD-cloned functions, double rows plain
FS_SIMD_CLONES KlRowResult kl_row_f32(const float* t, const float* s, int64_t C, float inv_t, int64_t y, double ce_w,
                                      double kl_w, bool agree_mask, bool with_grad, float* gt, float* gs) {
  return kl_row<float>(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs);
}
KlRowResult kl_row_f64(const double* t, const double* s, int64_t C, double inv_t, int64_t y, double ce_w, double kl_w,
                       bool agree_mask, bool with_grad, double* gt, double* gs) {
  return kl_row<double>(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs);
}
FS_SIMD_CLONES double js_row_f32(const float* s, const float* t, int64_t C, float inv_t, float lo, float hi, float w,
                                 bool with_grad, float* gs, float* gt, float* pbuf, float* qbuf) {
  return js_row<float>(s, t, C, inv_t, lo, hi, w, with_grad, gs, gt, pbuf, qbuf);
}
double js_row_f64(const double* s, const double* t, int64_t C, double inv_t, double lo, double hi, double w,
                  bool with_grad, double* gs, double* gt, double* pbuf, double* qbuf) {
  return js_row<double>(s, t, C, inv_t, lo, hi, w, with_grad, gs, gt, pbuf, qbuf);
}

inline KlRowResult kl_row_acc(const float* t, const float* s, int64_t C, float inv_t, int64_t y, double ce_w,
                              double kl_w, bool agree_mask, bool with_grad, float* gt, float* gs) {
  return kl_row_f32(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs);
}
inline KlRowResult kl_row_acc(const double* t, const double* s, int64_t C, double inv_t, int64_t y, double ce_w,
                              double kl_w, bool agree_mask, bool with_grad, double* gt, double* gs) {
  return kl_row_f64(t, s, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs);
}
inline double js_row_acc(const float* s, const float* t, int64_t C, float inv_t, float lo, float hi, float w,
                         bool with_grad, float* gs, float* gt, float* pbuf, float* qbuf) {
  return js_row_f32(s, t, C, inv_t, lo, hi, w, with_grad, gs, gt, pbuf, qbuf);
}
inline double js_row_acc(const double* s, const double* t, int64_t C, double inv_t, double lo, double hi, double w,
                         bool with_grad, double* gs, double* gt, double* pbuf, double* qbuf) {
  return js_row_f64(s, t, C, inv_t, lo, hi, w, with_grad, gs, gt, pbuf, qbuf);
}

// ---------------------------------------------------------------------------------------------
// Rows of the input dtype as acc_t rows: direct pointers where the dtypes agree, converted
// scratch copies (fp16/bf16 -> fp32) otherwise.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
using acc_type_of = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t, typename acc_t>
struct RowPair {
  // a, b: input rows; ga, gb: gradient rows of the outputs (nullptr when not wanted)
  const scalar_t* a_base;
  const scalar_t* b_base;
  int64_t a_stride, b_stride;
  scalar_t* ga_base;
  scalar_t* gb_base;
  int64_t C;
  static constexpr bool direct = std::is_same<scalar_t, acc_t>::value;
  // scratch: [a, b] converted inputs (when !direct), [ga, gb] acc buffers, [x, y] extra
  std::vector<acc_t> scratch;

  RowPair(const scalar_t* a, int64_t as, const scalar_t* b, int64_t bs, scalar_t* ga, scalar_t* gb, int64_t C_, int extra)
      : a_base(a), b_base(b), a_stride(as), b_stride(bs), ga_base(ga), gb_base(gb), C(C_),
        scratch(static_cast<size_t>(C_) * (4 + extra)) {}

  acc_t* slot(int k) { return scratch.data() + static_cast<size_t>(k) * C; }

  const acc_t* in_a(int64_t i) { return load(a_base + i * a_stride, 0); }
  const acc_t* in_b(int64_t i) { return load(b_base + i * b_stride, 1); }
  acc_t* out_a(int64_t i) { return (direct && ga_base) ? reinterpret_cast<acc_t*>(ga_base + i * C) : slot(2); }
  acc_t* out_b(int64_t i) { return (direct && gb_base) ? reinterpret_cast<acc_t*>(gb_base + i * C) : slot(3); }

  void store(int64_t i) {
    if (direct) return;
    if (ga_base) convert_out(slot(2), ga_base + i * C);
    if (gb_base) convert_out(slot(3), gb_base + i * C);
  }

 private:
  const acc_t* load(const scalar_t* row, int k) {
    if (direct) return reinterpret_cast<const acc_t*>(row);
    acc_t* dst = slot(k);
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(row[c]);
    return dst;
  }
  void convert_out(const acc_t* src, scalar_t* dst) {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(src[c]);
  }
};

// rows per parallel task: about 16k elements, so small problems stay on one thread
inline int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// kl_lanes over the rows [0, N) in blocks of kLanes rows, in parallel over blocks: transposes
// each block into scratch (converting fp16/bf16 to fp32), and writes the gradients back as rows.
// collect(i0, nr, results) receives the per-row values of rows i0 .. i0 + nr - 1.
template <typename scalar_t, typename acc_t, typename Collect>
void kl_rows_by_lanes(const scalar_t* tp, int64_t t_stride, const scalar_t* sp, int64_t s_stride, const int64_t* yp,
                      int64_t N, int64_t C, acc_t inv_t, double ce_w, double kl_w, bool agree_mask, bool with_grad,
                      scalar_t* gtp, scalar_t* gsp, const Collect& collect) {
  const int64_t n_blocks = (N + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * kLanes));
  at::parallel_for(0, n_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> scratch(static_cast<size_t>(4 * C * kLanes));
    acc_t* tt = scratch.data();
    acc_t* ss = tt + C * kLanes;
    acc_t* gt = ss + C * kLanes;
    acc_t* gs = gt + C * kLanes;
    int64_t y[kLanes];
    LaneResults res;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t i0 = b * kLanes, nr = std::min(kLanes, N - i0);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (nr == kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) y[j] = yp ? yp[i0 + j] : -1;
          kl_full_block_f32(tp + i0 * t_stride, t_stride, sp + i0 * s_stride, s_stride, C, inv_t, y, ce_w, kl_w,
                            agree_mask, with_grad, gtp ? gtp + i0 * C : nullptr, gsp ? gsp + i0 * C : nullptr, tt, ss,
                            gt, gs, res);
          collect(i0, nr, res);
          continue;
        }
      }
      for (int64_t j = 0; j < kLanes; ++j) {
        if (j < nr) {
          const scalar_t* trow = tp + (i0 + j) * t_stride;
          const scalar_t* srow = sp + (i0 + j) * s_stride;
          for (int64_t c = 0; c < C; ++c) {
            tt[c * kLanes + j] = static_cast<acc_t>(trow[c]);
            ss[c * kLanes + j] = static_cast<acc_t>(srow[c]);
          }
          y[j] = yp ? yp[i0 + j] : -1;
        } else {  // padding lanes: finite values whose results are dropped
          for (int64_t c = 0; c < C; ++c) tt[c * kLanes + j] = ss[c * kLanes + j] = 0;
          y[j] = -1;
        }
      }
      kl_lanes_acc(tt, ss, C, inv_t, y, ce_w, kl_w, agree_mask, with_grad, gt, gs, res);
      for (int64_t j = 0; j < nr; ++j) {
        if (gtp) {
          scalar_t* row = gtp + (i0 + j) * C;
          for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(gt[c * kLanes + j]);
        }
        if (gsp) {
          scalar_t* row = gsp + (i0 + j) * C;
          for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(gs[c * kLanes + j]);
        }
      }
      collect(i0, nr, res);
    }
  });
}

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  logit_binding::check_pair(op, a, a_name, b, b_name);
  TORCH_CHECK_VALUE(a.size(1) < (int64_t(1) << 31), op, ": more than 2^31 classes");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": CPU kernel called with non-CPU tensors");
}

// the gradient of x for a unit grad_loss: [N, C] contiguous (large blocks recycled,
// cpu/large_alloc.h), or [0] when not wanted
at::Tensor grad_buffer(const at::Tensor& x, bool needed) {
  return needed ? empty_large({x.size(0), x.size(1)}, x.options()) : at::empty({0}, x.options());
}

double sum_in_order(const std::vector<double>& v) {
  double sum = 0;
  for (const double x : v) sum += x;
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> synthesis_logit_loss_cpu(
    const at::Tensor& teacher_logits, const at::Tensor& student_logits, const at::Tensor& targets, double oh,
    double adv, bool agree_mask, bool need_grad_teacher, bool need_grad_student) {
  const char* op = "synthesis_logit_loss";
  check_pair(op, teacher_logits, "teacher_logits", student_logits, "student_logits");
  const int64_t N = teacher_logits.size(0), C = teacher_logits.size(1);
  logit_binding::check_targets(op, targets, N);
  const at::Tensor y = targets.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(yp[i] >= 0 && yp[i] < C, op, ": targets must be class indices in [0, ", C, "), got ", yp[i],
                      " at position ", i);
  }
  const at::Tensor t = unit_column_stride(teacher_logits), s = unit_column_stride(student_logits);
  at::Tensor gt = grad_buffer(t, need_grad_teacher), gs = grad_buffer(s, need_grad_student);
  const bool with_grad = need_grad_teacher || need_grad_student;
  std::vector<double> ce(N), klm(N), agree(N);
  const double ce_w = oh / static_cast<double>(N), kl_w = -adv / static_cast<double>(N);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "synthesis_logit_loss_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* gtp = need_grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    scalar_t* gsp = need_grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    if (C <= kLaneMaxC) {
      kl_rows_by_lanes<scalar_t, acc_t>(tp, t.stride(0), sp, s.stride(0), yp, N, C, acc_t(1), ce_w, kl_w, agree_mask,
                                        with_grad, gtp, gsp, [&](int64_t i0, int64_t nr, const LaneResults& r) {
                                          for (int64_t j = 0; j < nr; ++j) {
                                            ce[i0 + j] = r.ce[j];
                                            klm[i0 + j] = r.kl[j] * r.agree[j];
                                            agree[i0 + j] = r.agree[j];
                                          }
                                        });
      return;
    }
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      RowPair<scalar_t, acc_t> rows(tp, t.stride(0), sp, s.stride(0), gtp, gsp, C, 0);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* ti = rows.in_a(i);
        const acc_t* si = rows.in_b(i);
        const KlRowResult r = kl_row_acc(ti, si, C, acc_t(1), yp[i], ce_w, kl_w, agree_mask, with_grad,
                                         rows.out_a(i), rows.out_b(i));
        ce[i] = r.ce;
        klm[i] = r.kl * r.agree;  // masked rows count 0, NaN when their KL is not finite (as the reference)
        agree[i] = r.agree;
        rows.store(i);
      }
    });
  });

  const double ce_sum = sum_in_order(ce), klm_sum = sum_in_order(klm), agree_sum = sum_in_order(agree);
  const auto sopts = t.options().dtype(acc_scalar_type(t.scalar_type()));
  const double oh_term = ce_sum / N, adv_term = klm_sum == 0 ? 0.0 : -klm_sum / N;  // +0, not -0; NaN stays NaN
  return {at::scalar_tensor(oh * oh_term + adv * adv_term, sopts), at::scalar_tensor(oh_term, sopts),
          at::scalar_tensor(adv_term, sopts), at::scalar_tensor(agree_sum / N, sopts), gt, gs};
}

// The row pairs of kd_loss and js_divergence as scalar_t rows: student row i at s + i * s_stride,
// teacher row i at t + i * t_stride; gradient rows of C elements (null where not wanted).
template <typename scalar_t_>
struct StudentTeacherRows {
  using scalar_t = scalar_t_;
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride, t_stride;
  scalar_t* gs;
  scalar_t* gt;
  int64_t N, C;
  bool with_grad;
};

// kd_loss and js_divergence: loss = scale * sum_i f_i over the row pairs, with the gradients of
// both logits for a unit grad_loss. row_values(rows, inv_t, f) fills f[i] and writes the gradients,
// for rows of every floating dtype (StudentTeacherRows<scalar_t>, inv_t in the accumulator type).
template <typename RowValues>
Tensor3 student_teacher_loss(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T,
                             double scale, bool need_grad_student, bool need_grad_teacher,
                             const RowValues& row_values) {
  const at::Tensor s = unit_column_stride(student_logits), t = unit_column_stride(teacher_logits);
  at::Tensor gs = grad_buffer(s, need_grad_student), gt = grad_buffer(t, need_grad_teacher);
  const int64_t N = s.size(0), C = s.size(1);
  std::vector<double> f(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "student_teacher_loss_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    scalar_t* gsp = need_grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = need_grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    const StudentTeacherRows<scalar_t> rows{s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), s.stride(0), t.stride(0),
                                            gsp, gtp, N, C, need_grad_student || need_grad_teacher};
    row_values(rows, static_cast<acc_t>(1.0 / T), f);
  });
  const auto sopts = s.options().dtype(acc_scalar_type(s.scalar_type()));
  return {at::scalar_tensor(scale * sum_in_order(f), sopts), gs, gt};
}

Tensor3 kd_loss_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T, double scale,
                    bool need_grad_student, bool need_grad_teacher) {
  const char* op = "kd_loss";
  check_pair(op, student_logits, "student_logits", teacher_logits, "teacher_logits");
  logit_binding::check_temperature(op, T);
  auto kl_rows = [&](const auto& r, auto inv_t, std::vector<double>& kl) {
    using scalar_t = typename std::decay_t<decltype(r)>::scalar_t;
    using acc_t = decltype(inv_t);
    if (r.C <= kLaneMaxC) {
      kl_rows_by_lanes<scalar_t, acc_t>(r.t, r.t_stride, r.s, r.s_stride, nullptr, r.N, r.C, inv_t, 0.0, scale, false,
                                        r.with_grad, r.gt, r.gs, [&](int64_t i0, int64_t nr, const LaneResults& res) {
                                          for (int64_t j = 0; j < nr; ++j) kl[i0 + j] = res.kl[j];
                                        });
      return;
    }
    at::parallel_for(0, r.N, grain_rows(r.C), [&](int64_t begin, int64_t end) {
      RowPair<scalar_t, acc_t> rows(r.t, r.t_stride, r.s, r.s_stride, r.gt, r.gs, r.C, 0);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* ti = rows.in_a(i);
        const acc_t* si = rows.in_b(i);
        const KlRowResult res =
            kl_row_acc(ti, si, r.C, inv_t, -1, 0.0, scale, false, r.with_grad, rows.out_a(i), rows.out_b(i));
        kl[i] = res.kl;
        rows.store(i);
      }
    });
  };
  return student_teacher_loss(student_logits, teacher_logits, T, scale, need_grad_student, need_grad_teacher,
                              kl_rows);
}

Tensor3 js_divergence_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T,
                          double clamp_min, double clamp_max, double scale, bool need_grad_student,
                          bool need_grad_teacher) {
  check_pair("js_divergence", student_logits, "student_logits", teacher_logits, "teacher_logits");
  logit_binding::check_js_scalars(T, clamp_min, clamp_max);
  auto js_rows = [&](const auto& r, auto inv_t, std::vector<double>& js) {
    using scalar_t = typename std::decay_t<decltype(r)>::scalar_t;
    using acc_t = decltype(inv_t);
    at::parallel_for(0, r.N, grain_rows(r.C), [&](int64_t begin, int64_t end) {
      RowPair<scalar_t, acc_t> rows(r.s, r.s_stride, r.t, r.t_stride, r.gs, r.gt, r.C, 2);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* si = rows.in_a(i);
        const acc_t* ti = rows.in_b(i);
        js[i] = js_row_acc(si, ti, r.C, inv_t, static_cast<acc_t>(clamp_min), static_cast<acc_t>(clamp_max),
                           static_cast<acc_t>(scale), r.with_grad, rows.out_a(i), rows.out_b(i), rows.slot(4),
                           rows.slot(5));
        rows.store(i);
      }
    });
  };
  return student_teacher_loss(student_logits, teacher_logits, T, scale, need_grad_student, need_grad_teacher,
                              js_rows);
}

template <typename scalar_t, typename acc_t>
void scale_range(const scalar_t* src, scalar_t* dst, acc_t g, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) dst[k] = static_cast<scalar_t>(g * static_cast<acc_t>(src[k]));
}

// Backward of every logit loss: the gradients were computed in the forward pass for a unit
// grad_loss; scale them by grad_loss, read here from the tensor (no host sync on a GPU: the CUDA
// kernel reads it from device memory). An empty saved gradient stays empty.
std::tuple<at::Tensor, at::Tensor> logit_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_a,
                                                           const at::Tensor& grad_b) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "logit_loss_backward: grad_loss must have one element, got shape ",
                    grad_loss.sizes());
  const double g = grad_loss.to(at::kDouble).item<double>();  // CPU tensor: a plain memory read
  auto scale = [&](const at::Tensor& x) {
    if (x.numel() == 0) return at::empty_like(x);
    const at::Tensor xc = x.contiguous();
    at::Tensor out = empty_like_large(xc);  // large blocks recycled (cpu/large_alloc.h)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "logit_loss_backward_cpu", [&] {
      using acc_t = acc_type_of<scalar_t>;
      const scalar_t* src = xc.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      const acc_t ga = static_cast<acc_t>(g);
      at::parallel_for(0, xc.numel(), 32768, [&](int64_t b, int64_t e) { scale_range(src, dst, ga, b, e); });
    });
    return out;
  };
  return {scale(grad_a), scale(grad_b)};
}

}  // namespace
}  // namespace fastsynth

FS_REGISTER_LOGIT_LOSSES(CPU, cpu)
