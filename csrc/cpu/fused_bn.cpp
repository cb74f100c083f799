// CPU kernels of the fused teacher BatchNorm (fastsynth/ops/fused_bn.py has the math).
//
// forward : one read pass of x writes y = x*scale+shift (ReLU optional) and, when with_stats,
//           accumulates the per-channel batch mean / biased variance of x in the same pass:
//           each cache-sized segment is summed, then re-read from cache for the centred sum of
//           squares and the y write, and the segment results are merged with Chan's formula
//           (csrc/common/welford.h) in a fixed order (deterministic).
// backward: one pass reads grad_y (and x when the ReLU mask, the statistics term or dgamma need
//           it) and writes grad_x; dgamma/dbeta partial sums ride on the same pass.
// Work is split over channels AND batch (NCHW / strided: tasks of (channel, batch block);
// channels_last: tasks of row blocks), so a layer with few channels still uses every core.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "binding/fused_bn.h"
#include "common/fused_bn_math.h"
#include "common/welford.h"
#include "cpu/large_alloc.h"

namespace fastsynth {
namespace {

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// Calls f(std::bool_constant<a>): a runtime flag as a compile-time one, so the loop inside is
// compiled once per value without a branch per element.
template <typename F>
inline void dispatch_bool(bool a, F&& f) {
  if (a) f(std::true_type{}); else f(std::false_type{});
}

// Calls f(std::bool_constant<a>, std::bool_constant<b>).
template <typename F>
inline void dispatch_bool2(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{}); else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{}); else f(std::false_type{}, std::false_type{});
  }
}

constexpr int64_t kSegment = 4096;       // elements re-read from cache in the second sweep
constexpr int64_t kTaskElems = 16384;    // minimum elements per parallel task (NCHW path)
constexpr int64_t kRowBlockElems = 16384;  // elements per row block (channels_last path)
constexpr int64_t kRowBlockStatsElems = 8192;  // the same for the forward with statistics
// Dense NCHW planes of fewer elements (the 8x8 and 4x4 maps of a CIFAR ResNet's last stages, and
// 16x16) are walked in memory order, tasks being blocks of samples: channel-major tasks visit one
// short plane per sample, C*H*W elements apart, and paid a cache miss and a loop setup every
// 16-256 elements (4x4 x 512 channels: 9x the time of a copy; docs/PERFORMANCE.md).
constexpr int64_t kSmallPlane = 1024;

using fbn_binding::use_channels_last;  // channels_last path, or the strided plane path

struct Shape {
  int64_t N, C, H, W, HW, M;
  int64_t sN, sC, sH, sW;  // strides of x in elements
};

Shape shape_of(const at::Tensor& x) {
  Shape s;
  s.N = x.size(0); s.C = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.HW = s.H * s.W; s.M = s.N * s.HW;
  s.sN = x.stride(0); s.sC = x.stride(1); s.sH = x.stride(2); s.sW = x.stride(3);
  return s;
}

// Rows of one (n, c) plane: a dense plane is one row of H*W elements, otherwise H rows of W.
struct PlaneRows {
  int64_t rows, len, row_stride, elem_stride;
};

PlaneRows plane_rows(const Shape& s) {
  if (s.sW == 1 && (s.H == 1 || s.sH == s.W)) return {1, s.HW, 0, 1};
  return {s.H, s.W, s.sH, s.sW};
}

template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> scale, shift, invstd;
};

template <typename acc_t>
ChannelAffine<acc_t> channel_affine(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& rm,
                                    const at::Tensor& rv, double eps, int64_t C) {
  const auto dt = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(dt).contiguous(), b = bias.to(dt).contiguous();
  const at::Tensor m = rm.to(dt).contiguous(), v = rv.to(dt).contiguous();
  const acc_t *wp = w.data_ptr<acc_t>(), *bp = b.data_ptr<acc_t>(), *mp = m.data_ptr<acc_t>(), *vp = v.data_ptr<acc_t>();
  ChannelAffine<acc_t> a;
  a.scale.resize(C); a.shift.resize(C); a.invstd.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto e = bn_eval_affine<acc_t>(wp[c], bp[c], mp[c], vp[c], acc_t(eps));
    a.scale[c] = e.scale; a.shift[c] = e.shift; a.invstd[c] = e.invstd;
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// forward

// Sweeps over one run of `len` elements of one channel (x strided by `st`, y dense). The sums
// are `omp simd` reductions so the compiler may vectorise them (floating-point reassociation is
// otherwise forbidden); Contig selects the unit-stride loops.
template <bool Contig, typename scalar_t, typename acc_t>
inline acc_t run_sum(const scalar_t* xp, int64_t xstride, int64_t len) {
  const int64_t st = Contig ? 1 : xstride;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += acc_t(xp[i * st]);
  return sum;
}

template <bool Contig, typename scalar_t, typename acc_t>
inline acc_t run_m2_and_write(const scalar_t* xp, int64_t xstride, int64_t len, scalar_t* yp, acc_t centre,
                              acc_t scale, acc_t shift, bool relu) {
  const int64_t st = Contig ? 1 : xstride;
  acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t v = acc_t(xp[i * st]);
    const acc_t d = v - centre;
    m2 += d * d;
    yp[i] = static_cast<scalar_t>(bn_eval_apply<acc_t>(v, scale, shift, relu));
  }
  return m2;
}

// y of one run; with Sum also the run's sum of x (the instance means without the statistics).
template <bool Contig, bool Sum = false, typename scalar_t, typename acc_t>
inline acc_t run_write(const scalar_t* xp, int64_t xstride, int64_t len, scalar_t* yp, acc_t scale, acc_t shift,
                       bool relu) {
  const int64_t st = Contig ? 1 : xstride;
  acc_t sum = 0;
  if constexpr (Sum) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = acc_t(xp[i * st]);
      sum += v;
      yp[i] = static_cast<scalar_t>(bn_eval_apply<acc_t>(v, scale, shift, relu));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) yp[i] = static_cast<scalar_t>(bn_eval_apply<acc_t>(acc_t(xp[i * st]), scale, shift, relu));
  }
  return sum;
}

// One task: channel c, planes [n0, n1). Planes that fit one segment are handled as one block
// (sum over all the task's planes, then the centred squares and y from cache: one Welford state
// per task); larger planes are cut into segments merged with Chan's formula. With `inst` (the
// [N, C] instance means) each plane's sum, which the statistics already take, is kept per plane:
// a plane belongs to one task, so inst[n, c] is written once (deterministic).
template <bool Contig, typename scalar_t, typename acc_t>
Welford<acc_t> forward_task(const scalar_t* xd, scalar_t* yd, const Shape& s, const PlaneRows& pr, int64_t c,
                            int64_t n0, int64_t n1, acc_t scale, acc_t shift, bool relu, bool with_stats,
                            acc_t* inst) {
  auto xrow = [&](int64_t n, int64_t r) { return xd + n * s.sN + c * s.sC + r * pr.row_stride; };
  auto yrow = [&](int64_t n, int64_t r) { return yd + (n * s.C + c) * s.HW + r * pr.len; };  // y NCHW-dense
  auto put_inst = [&](int64_t n, acc_t plane_sum) {
    if (inst) inst[n * s.C + c] = plane_sum / acc_t(s.HW);
  };
  if (!with_stats) {
    for (int64_t n = n0; n < n1; ++n) {
      acc_t ps = 0;
      for (int64_t r = 0; r < pr.rows; ++r)
        ps += inst ? run_write<Contig, true>(xrow(n, r), pr.elem_stride, pr.len, yrow(n, r), scale, shift, relu)
                   : run_write<Contig>(xrow(n, r), pr.elem_stride, pr.len, yrow(n, r), scale, shift, relu);
      put_inst(n, ps);
    }
    return Welford<acc_t>();
  }
  if (s.HW <= kSegment) {
    acc_t sum = 0;
    for (int64_t n = n0; n < n1; ++n) {
      acc_t ps = 0;
      for (int64_t r = 0; r < pr.rows; ++r) ps += run_sum<Contig, scalar_t, acc_t>(xrow(n, r), pr.elem_stride, pr.len);
      sum += ps;
      put_inst(n, ps);
    }
    const acc_t cnt = acc_t((n1 - n0) * s.HW);
    const acc_t bmean = sum / cnt;
    acc_t m2 = 0;
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t r = 0; r < pr.rows; ++r)
        m2 += run_m2_and_write<Contig>(xrow(n, r), pr.elem_stride, pr.len, yrow(n, r), bmean, scale, shift, relu);
    return Welford<acc_t>(bmean, m2, cnt);
  }
  Welford<acc_t> acc;
  for (int64_t n = n0; n < n1; ++n) {
    acc_t ps = 0;
    for (int64_t r = 0; r < pr.rows; ++r) {
      for (int64_t off = 0; off < pr.len; off += kSegment) {
        const int64_t len = std::min(kSegment, pr.len - off);
        const scalar_t* xp = xrow(n, r) + off * pr.elem_stride;
        const acc_t bsum = run_sum<Contig, scalar_t, acc_t>(xp, pr.elem_stride, len);
        const acc_t bmean = bsum / acc_t(len);
        const acc_t m2 = run_m2_and_write<Contig>(xp, pr.elem_stride, len, yrow(n, r) + off, bmean, scale, shift, relu);
        acc = welford_merge(acc, Welford<acc_t>(bmean, m2, acc_t(len)));
        ps += bsum;
      }
    }
    put_inst(n, ps);
  }
  return acc;
}

// Small dense planes in memory order. Each plane's mean and centred sum of squares (two sweeps
// from L1) go into per-task, per-channel sums in double, combined with Chan's formula for k
// groups of equal size HW:  M2 = sum_p m2_p + HW (sum_p mean_p^2 - (sum_p mean_p)^2 / k);
// the task states are then merged per channel in task order (deterministic: the split depends on
// the shape only).
template <typename scalar_t>
void forward_small_planes(const scalar_t* xd, scalar_t* yd, const Shape& s, const ChannelAffine<acc_of<scalar_t>>& aff,
                          bool relu, bool with_stats, at::Tensor& mean, at::Tensor& var, acc_of<scalar_t>* inst) {
  using acc_t = acc_of<scalar_t>;
  struct PlaneSums {
    double s1 = 0, s2 = 0, m2 = 0;
  };
  const int64_t nb = std::max<int64_t>(1, kTaskElems / (s.C * s.HW));  // samples per task
  const int64_t ntasks = (s.N + nb - 1) / nb;
  std::vector<PlaneSums> part(with_stats ? ntasks * s.C : 0);
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t n = t * nb; n < std::min(s.N, (t + 1) * nb); ++n) {
        for (int64_t c = 0; c < s.C; ++c) {
          const scalar_t* xp = xd + n * s.sN + c * s.sC;
          scalar_t* yp = yd + (n * s.C + c) * s.HW;
          const acc_t scale = aff.scale[c], shift = aff.shift[c];
          if (!with_stats) {
            if (inst)
              inst[n * s.C + c] = run_write<true, true>(xp, 1, s.HW, yp, scale, shift, relu) / acc_t(s.HW);
            else
              run_write<true>(xp, 1, s.HW, yp, scale, shift, relu);
            continue;
          }
          const acc_t pm = run_sum<true, scalar_t, acc_t>(xp, 1, s.HW) / acc_t(s.HW);
          if (inst) inst[n * s.C + c] = pm;
          const acc_t m2 = run_m2_and_write<true>(xp, 1, s.HW, yp, pm, scale, shift, relu);
          PlaneSums& ps = part[t * s.C + c];
          ps.s1 += double(pm);
          ps.s2 += double(pm) * double(pm);
          ps.m2 += double(m2);
        }
      }
    }
  });
  if (!with_stats) return;
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* vp = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < s.C; ++c) {
    Welford<acc_t> acc;
    for (int64_t t = 0; t < ntasks; ++t) {
      const PlaneSums& ps = part[t * s.C + c];
      const double k = double(std::min(s.N, (t + 1) * nb) - t * nb);
      const double m2 = ps.m2 + double(s.HW) * std::max(0.0, ps.s2 - ps.s1 * ps.s1 / k);
      acc = welford_merge(acc, Welford<acc_t>(acc_t(ps.s1 / k), acc_t(m2), acc_t(k * double(s.HW))));
    }
    mp[c] = acc.mean;
    vp[c] = acc.var_biased();
  }
}

template <typename scalar_t>
void forward_planes(const at::Tensor& x, at::Tensor& y, const ChannelAffine<acc_of<scalar_t>>& aff, bool relu,
                    bool with_stats, at::Tensor& mean, at::Tensor& var, acc_of<scalar_t>* inst) {
  using acc_t = acc_of<scalar_t>;
  const Shape s = shape_of(x);
  const PlaneRows pr = plane_rows(s);
  if (pr.rows == 1 && pr.elem_stride == 1 && s.HW < kSmallPlane) {  // dense planes only (H == 1 may be strided)
    forward_small_planes<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s, aff, relu, with_stats, mean, var,
                                   inst);
    return;
  }
  const int64_t nb = std::min<int64_t>(s.N, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(s.HW, 1)));
  const int64_t nblocks = (s.N + nb - 1) / nb;
  const int64_t ntasks = s.C * nblocks;
  std::vector<Welford<acc_t>> partial(with_stats ? ntasks : 0);
  const scalar_t* xd = x.data_ptr<scalar_t>();
  scalar_t* yd = y.data_ptr<scalar_t>();

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / nblocks, blk = t % nblocks;
      const acc_t scale = aff.scale[c], shift = aff.shift[c];
      const int64_t n0 = blk * nb, n1 = std::min(s.N, (blk + 1) * nb);
      const Welford<acc_t> acc =
          pr.elem_stride == 1
              ? forward_task<true, scalar_t, acc_t>(xd, yd, s, pr, c, n0, n1, scale, shift, relu, with_stats, inst)
              : forward_task<false, scalar_t, acc_t>(xd, yd, s, pr, c, n0, n1, scale, shift, relu, with_stats, inst);
      if (with_stats) partial[t] = acc;
    }
  });

  if (with_stats) {
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    at::parallel_for(0, s.C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Welford<acc_t> acc;
        for (int64_t b = 0; b < nblocks; ++b) acc = welford_merge(acc, partial[c * nblocks + b]);
        mp[c] = acc.mean;
        vp[c] = acc.var_biased();
      }
    });
  }
}

constexpr int64_t kClChunk = 16;  // channels per register-resident chunk (channels_last forward)

// K channels [c0, c0 + K) of `nrows` channels_last rows (x, y point at channel c0 of row 0):
// the block means and centred sums of squares of the K channels, the block sums when `bsum`
// is given, and y.
template <int64_t K, bool Relu, typename scalar_t, typename acc_t>
inline void forward_cl_chunk(const scalar_t* x, scalar_t* y, int64_t nrows, int64_t C, const acc_t* scale,
                             const acc_t* shift, acc_t inv, acc_t* bmean, acc_t* m2, acc_t* bsum) {
  acc_t sum[K], mu[K], sq[K], sc[K], sh[K];
  for (int64_t k = 0; k < K; ++k) { sum[k] = 0; sq[k] = 0; sc[k] = scale[k]; sh[k] = shift[k]; }
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* xr = x + r * C;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) sum[k] += acc_t(xr[k]);
  }
  for (int64_t k = 0; k < K; ++k) mu[k] = sum[k] * inv;
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* xr = x + r * C;
    scalar_t* yr = y + r * C;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const acc_t v = acc_t(xr[k]);
      const acc_t d = v - mu[k];
      sq[k] += d * d;
      yr[k] = static_cast<scalar_t>(bn_eval_apply<acc_t>(v, sc[k], sh[k], Relu));
    }
  }
  for (int64_t k = 0; k < K; ++k) { bmean[k] = mu[k]; m2[k] = sq[k]; }
  if (bsum)
    for (int64_t k = 0; k < K; ++k) bsum[k] = sum[k];
}

// Row blocks of the channels_last paths: blocks of `rows` rows over all M = N*H*W rows; with
// per_sample (the instance means) the blocks of each sample start at its first row, so no block
// straddles two samples and a block's channel sums belong to one (n, c).
struct ClBlocks {
  int64_t rows, HW, M, per;  // per: blocks per sample (per_sample), else 0
  int64_t count() const { return per ? (M / HW) * per : (M + rows - 1) / rows; }
  std::pair<int64_t, int64_t> range(int64_t t) const {
    if (!per) return {t * rows, std::min(M, (t + 1) * rows)};
    const int64_t n = t / per, r0 = n * HW + (t - n * per) * rows;
    return {r0, std::min((n + 1) * HW, r0 + rows)};
  }
};

ClBlocks cl_blocks(int64_t rows, const Shape& s, bool per_sample) {
  return {rows, s.HW, s.M, per_sample ? (s.HW + rows - 1) / rows : 0};
}

template <typename scalar_t>
void forward_channels_last(const at::Tensor& x, at::Tensor& y, const ChannelAffine<acc_of<scalar_t>>& aff, bool relu,
                           bool with_stats, at::Tensor& mean, at::Tensor& var, acc_of<scalar_t>* inst) {
  using acc_t = acc_of<scalar_t>;
  const Shape s = shape_of(x);
  const int64_t C = s.C;
  // with statistics a block is swept twice: 8192 elements (32 KB in fp32) keep the second sweep in L1
  const ClBlocks blk =
      cl_blocks(std::max<int64_t>(16, (with_stats ? kRowBlockStatsElems : kRowBlockElems) / C), s, inst != nullptr);
  const int64_t ntasks = blk.count();
  std::vector<acc_t> pmean(with_stats ? ntasks * C : 0), pm2(with_stats ? ntasks * C : 0);
  std::vector<acc_t> psum(inst ? ntasks * C : 0);  // per block and channel: the sum of x (instance means)
  const scalar_t* xd = x.data_ptr<scalar_t>();
  scalar_t* yd = y.data_ptr<scalar_t>();
  const acc_t* scale = aff.scale.data();
  const acc_t* shift = aff.shift.data();

  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [r0, r1] = blk.range(t);
      const scalar_t* xb = xd + r0 * C;
      scalar_t* yb = yd + r0 * C;
      const int64_t nrows = r1 - r0;
      acc_t* bsum = inst ? psum.data() + t * C : nullptr;
      if (!with_stats) {
        dispatch_bool2(relu, inst != nullptr, [&](auto relu_c, auto sum_c) {
          constexpr bool Relu = decltype(relu_c)::value, Sum = decltype(sum_c)::value;
          if constexpr (Sum) std::fill(bsum, bsum + C, acc_t(0));
          for (int64_t i = 0; i < nrows * C; i += C) {  // row by row
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = acc_t(xb[i + c]);
              if constexpr (Sum) bsum[c] += v;
              yb[i + c] = static_cast<scalar_t>(bn_eval_apply<acc_t>(v, scale[c], shift[c], Relu));
            }
          }
        });
        continue;
      }
      // per channel, a sum over the block's rows, then the centred squares and y from cache.
      // Channels go in chunks of kClChunk whose sums, means and affine coefficients stay in
      // registers while the rows stream by (a whole row of channels at once needed ~7 loads and
      // stores per element). Per channel the order of operations is the scalar loop's.
      acc_t* bmean = pmean.data() + t * C;
      acc_t* m2 = pm2.data() + t * C;
      const acc_t inv = acc_t(1) / acc_t(nrows);
      dispatch_bool(relu, [&](auto relu_c) {
        constexpr bool Relu = decltype(relu_c)::value;
        int64_t c0 = 0;
        for (; c0 + kClChunk <= C; c0 += kClChunk)
          forward_cl_chunk<kClChunk, Relu>(xb + c0, yb + c0, nrows, C, scale + c0, shift + c0, inv, bmean + c0,
                                            m2 + c0, bsum ? bsum + c0 : nullptr);
        for (; c0 < C; ++c0)  // channels past the last full chunk, one at a time
          forward_cl_chunk<1, Relu>(xb + c0, yb + c0, nrows, C, scale + c0, shift + c0, inv, bmean + c0, m2 + c0,
                                    bsum ? bsum + c0 : nullptr);
      });
    }
  });

  if (with_stats) {
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Welford<acc_t> acc;
        for (int64_t t = 0; t < ntasks; ++t) {
          const auto [r0, r1] = blk.range(t);
          acc = welford_merge(acc, Welford<acc_t>(pmean[t * C + c], pm2[t * C + c], acc_t(r1 - r0)));
        }
        mp[c] = acc.mean;
        vp[c] = acc.var_biased();
      }
    });
  }
  if (inst) {  // the blocks of sample n, in order (deterministic)
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t* out = inst + n * C;
        std::fill(out, out + C, acc_t(0));
        for (int64_t t = n * blk.per; t < (n + 1) * blk.per; ++t)
          for (int64_t c = 0; c < C; ++c) out[c] += psum[t * C + c];
        for (int64_t c = 0; c < C; ++c) out[c] /= acc_t(s.HW);
      }
    });
  }
}

void check_params(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& rm, const at::Tensor& rv) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating");
  const int64_t C = x.size(1);
  for (const auto* p : {&weight, &bias, &rm, &rv}) {
    TORCH_CHECK(p->dim() == 1 && p->size(0) == C, op, ": weight/bias/running stats must be 1-D of size C=", C);
    TORCH_CHECK(at::isFloatingType(p->scalar_type()), op, ": weight/bias/running stats must be floating");
    TORCH_CHECK(p->device() == x.device(), op, ": parameters must be on x's device");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bn_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps, bool apply_relu, bool with_stats, bool with_instance_means) {
  check_params("fused_bn_forward", x, weight, bias, running_mean, running_var);
  const bool cl = use_channels_last(x);
  const int64_t C = x.size(1);
  auto y = empty_large(x.sizes(), x.options(), fbn_binding::out_format(x));
  auto [mean, var, inst] = fbn_binding::stat_outputs(x, with_stats, with_instance_means, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_bn_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto aff = channel_affine<acc_t>(weight, bias, running_mean, running_var, eps, C);
    acc_t* ip = with_instance_means ? inst.data_ptr<acc_t>() : nullptr;
    if (cl)
      forward_channels_last<scalar_t>(x, y, aff, apply_relu, with_stats, mean, var, ip);
    else
      forward_planes<scalar_t>(x, y, aff, apply_relu, with_stats, mean, var, ip);
  });
  return {y, mean, var, inst};
}

// ---------------------------------------------------------------------------------------------
// backward

template <typename acc_t>
struct BackwardCoef {
  ChannelAffine<acc_t> aff;
  std::vector<acc_t> mean, rm;
  std::vector<StatGradCoef<acc_t>> stat;
};

// Elementwise backward of one segment; accumulates sum g_pre and sum g_pre * (x - rm) when asked.
// `inst` is the plane's instance-mean term g_inst[n, c] / (H W) (0 without instance means).
template <bool Contig, typename scalar_t, typename acc_t>
inline void backward_segment_impl(const scalar_t* gyp, const scalar_t* xp, int64_t xstride, int64_t len,
                                  scalar_t* gxp, acc_t scale, acc_t shift, acc_t mean, acc_t rm,
                                  StatGradCoef<acc_t> sc, acc_t inst, bool relu, bool with_stats, bool need_wgrad,
                                  bool need_x, acc_t& sum_g, acc_t& sum_gx) {
  const int64_t st = Contig ? 1 : xstride;
  if (!need_x) {  // plain BatchNorm backward (need_x is true whenever need_wgrad is)
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) gxp[i] = static_cast<scalar_t>(acc_t(gyp[i]) * scale + inst);
    return;
  }
  if (!need_wgrad) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = acc_t(xp[i * st]);
      const acc_t gp = bn_relu_grad<acc_t>(acc_t(gyp[i]), v, scale, shift, relu);
      gxp[i] = static_cast<scalar_t>(bn_grad_input<acc_t>(gp, v, scale, mean, sc, with_stats) + inst);
    }
    return;
  }
  acc_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t v = acc_t(xp[i * st]);
    const acc_t gp = bn_relu_grad<acc_t>(acc_t(gyp[i]), v, scale, shift, relu);
    gxp[i] = static_cast<scalar_t>(bn_grad_input<acc_t>(gp, v, scale, mean, sc, with_stats) + inst);
    sg += gp;
    sgx += gp * (v - rm);
  }
  sum_g += sg;
  sum_gx += sgx;
}

template <typename scalar_t, typename acc_t>
inline void backward_segment(const scalar_t* gyp, const scalar_t* xp, int64_t xstride, int64_t len, scalar_t* gxp,
                             acc_t scale, acc_t shift, acc_t mean, acc_t rm, StatGradCoef<acc_t> sc, acc_t inst,
                             bool relu, bool with_stats, bool need_wgrad, bool need_x, acc_t& sum_g, acc_t& sum_gx) {
  if (xstride == 1)
    backward_segment_impl<true>(gyp, xp, 1, len, gxp, scale, shift, mean, rm, sc, inst, relu, with_stats, need_wgrad,
                                need_x, sum_g, sum_gx);
  else
    backward_segment_impl<false>(gyp, xp, xstride, len, gxp, scale, shift, mean, rm, sc, inst, relu, with_stats,
                                 need_wgrad, need_x, sum_g, sum_gx);
}

// channels_last backward of `nrows` rows of C channels. NeedX=false: grad_x = grad_y * scale.
// Otherwise the same per-element math as backward_segment_impl (bn_relu_grad, bn_grad_input),
// with dgamma/dbeta partial sums per channel when WGrad. Inst: plus the instance-mean term of
// the row's sample, inst[c] (the rows of one call belong to one sample).
template <bool NeedX, bool Relu, bool Stats, bool WGrad, bool Inst, typename scalar_t, typename acc_t>
inline void backward_cl_rows(const scalar_t* xb, const scalar_t* gyb, scalar_t* gxb, int64_t nrows, int64_t C,
                             const acc_t* scale, const acc_t* shift, const acc_t* mean, const acc_t* rm,
                             const acc_t* c_mean, const acc_t* c_var, const acc_t* inst, acc_t* sg, acc_t* sgx) {
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* xr = xb + r * C;
    const scalar_t* gr = gyb + r * C;
    scalar_t* gxr = gxb + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t add = Inst ? inst[c] : acc_t(0);
      if constexpr (!NeedX) {
        gxr[c] = static_cast<scalar_t>(Inst ? acc_t(gr[c]) * scale[c] + add : acc_t(gr[c]) * scale[c]);
      } else {
        const acc_t v = acc_t(xr[c]);
        const acc_t gp = bn_relu_grad<acc_t>(acc_t(gr[c]), v, scale[c], shift[c], Relu);
        const acc_t g =
            bn_grad_input<acc_t>(gp, v, scale[c], mean[c], StatGradCoef<acc_t>{c_mean[c], c_var[c]}, Stats);
        gxr[c] = static_cast<scalar_t>(Inst ? g + add : g);
        if constexpr (WGrad) {
          sg[c] += gp;
          sgx[c] += gp * (v - rm[c]);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_bn_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean_in,
    const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& grad_inst_mean, double eps,
    bool apply_relu, bool with_stats, bool with_instance_means, bool need_weight_grad) {
  check_params("fused_bn_backward", x, weight, bias, running_mean, running_var);
  TORCH_CHECK(grad_y_in.sizes() == x.sizes(), "fused_bn_backward: grad_y must have x's shape");
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "fused_bn_backward: grad_y must have x's dtype");
  const int64_t C = x.size(1);
  if (with_stats) {
    for (const auto* p : {&mean_in, &grad_mean, &grad_var})
      TORCH_CHECK(p->dim() == 1 && p->size(0) == C, "fused_bn_backward: mean/grad_mean/grad_var must be 1-D of size C");
  }
  if (with_instance_means)
    TORCH_CHECK(grad_inst_mean.dim() == 2 && grad_inst_mean.size(0) == x.size(0) && grad_inst_mean.size(1) == C,
                "fused_bn_backward: grad_inst_mean must be (N, C) = (", x.size(0), ", ", C, "), got ",
                grad_inst_mean.sizes());
  const bool cl = use_channels_last(x);
  const auto fmt = fbn_binding::out_format(x);
  const at::Tensor grad_y = grad_y_in.contiguous(fmt);
  auto grad_x = empty_large(x.sizes(), x.options(), fmt);  // large blocks recycled (cpu/large_alloc.h)
  const bool need_x = apply_relu || with_stats || need_weight_grad;
  const Shape s = shape_of(x);
  at::Tensor gw, gb;  // dgamma, dbeta in the accumulation dtype (need_weight_grad)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_bn_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto adt = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    BackwardCoef<acc_t> k;
    k.aff = channel_affine<acc_t>(weight, bias, running_mean, running_var, eps, C);
    k.mean.assign(C, acc_t(0));
    k.stat.assign(C, StatGradCoef<acc_t>{acc_t(0), acc_t(0)});
    {
      const at::Tensor rmv = running_mean.to(adt).contiguous();
      k.rm.assign(rmv.data_ptr<acc_t>(), rmv.data_ptr<acc_t>() + C);
    }
    if (with_stats) {
      const at::Tensor mv = mean_in.to(adt).contiguous(), gm = grad_mean.to(adt).contiguous(),
                       gv = grad_var.to(adt).contiguous();
      for (int64_t c = 0; c < C; ++c) {
        k.mean[c] = mv.data_ptr<acc_t>()[c];
        k.stat[c] = stat_grad_coef<acc_t>(gm.data_ptr<acc_t>()[c], gv.data_ptr<acc_t>()[c], acc_t(s.M));
      }
    }
    // the instance-mean term g_inst[n, c] / (H W), [N][C]
    std::vector<acc_t> inst_term;
    if (with_instance_means) {
      const at::Tensor gi = grad_inst_mean.to(adt).contiguous();
      const acc_t* gip = gi.data_ptr<acc_t>();
      inst_term.resize(s.N * C);
      for (int64_t i = 0; i < s.N * C; ++i) inst_term[i] = inst_grad_term<acc_t>(gip[i], acc_t(s.HW));
    }
    auto inst_at = [&](int64_t n, int64_t c) { return with_instance_means ? inst_term[n * C + c] : acc_t(0); };
    const scalar_t* xd = x.data_ptr<scalar_t>();
    const scalar_t* gyd = grad_y.data_ptr<scalar_t>();
    scalar_t* gxd = grad_x.data_ptr<scalar_t>();
    std::vector<acc_t> psum_g, psum_gx;
    int64_t ntasks, nblocks = 0;

    const PlaneRows pr = plane_rows(s);
    if (!cl && pr.rows == 1 && pr.elem_stride == 1 && s.HW < kSmallPlane) {
      // small dense planes in memory order (see kSmallPlane); partial sums laid out as the
      // channel-major path's, [c][task], so the reduction below serves both
      const int64_t nb = std::max<int64_t>(1, kTaskElems / (C * s.HW));  // samples per task
      nblocks = (s.N + nb - 1) / nb;
      ntasks = C * nblocks;
      if (need_weight_grad) { psum_g.assign(ntasks, 0); psum_gx.assign(ntasks, 0); }
      at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          for (int64_t n = blk * nb; n < std::min(s.N, (blk + 1) * nb); ++n) {
            for (int64_t c = 0; c < C; ++c) {
              const int64_t dense = (n * C + c) * s.HW;
              acc_t sg = 0, sgx = 0;
              backward_segment<scalar_t, acc_t>(gyd + dense, xd + n * s.sN + c * s.sC, 1, s.HW, gxd + dense,
                                                k.aff.scale[c], k.aff.shift[c], k.mean[c], k.rm[c], k.stat[c],
                                                inst_at(n, c), apply_relu, with_stats, need_weight_grad, need_x, sg,
                                                sgx);
              if (need_weight_grad) {
                psum_g[c * nblocks + blk] += sg;
                psum_gx[c * nblocks + blk] += sgx;
              }
            }
          }
        }
      });
    } else if (!cl) {
      const int64_t nb = std::min<int64_t>(s.N, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(s.HW, 1)));
      nblocks = (s.N + nb - 1) / nb;
      ntasks = C * nblocks;
      if (need_weight_grad) { psum_g.assign(ntasks, 0); psum_gx.assign(ntasks, 0); }
      at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t c = t / nblocks, blk = t % nblocks;
          acc_t sg = 0, sgx = 0;
          for (int64_t n = blk * nb; n < std::min(s.N, (blk + 1) * nb); ++n) {
            const scalar_t* xplane = xd + n * s.sN + c * s.sC;
            const int64_t dense = (n * C + c) * s.HW;
            for (int64_t r = 0; r < pr.rows; ++r) {
              for (int64_t off = 0; off < pr.len; off += kSegment) {
                const int64_t len = std::min(kSegment, pr.len - off);
                backward_segment<scalar_t, acc_t>(gyd + dense + r * pr.len + off,
                                                  xplane + r * pr.row_stride + off * pr.elem_stride, pr.elem_stride, len,
                                                  gxd + dense + r * pr.len + off, k.aff.scale[c], k.aff.shift[c],
                                                  k.mean[c], k.rm[c], k.stat[c], inst_at(n, c), apply_relu,
                                                  with_stats, need_weight_grad, need_x, sg, sgx);
              }
            }
          }
          if (need_weight_grad) { psum_g[t] = sg; psum_gx[t] = sgx; }
        }
      });
    } else {
      // with instance means each block lies in one sample (cl_blocks), whose terms it adds
      const ClBlocks blk = cl_blocks(std::max<int64_t>(64, kRowBlockElems / C), s, with_instance_means);
      ntasks = blk.count();
      if (need_weight_grad) { psum_g.assign(ntasks * C, 0); psum_gx.assign(ntasks * C, 0); }
      const acc_t* scale = k.aff.scale.data();
      const acc_t* shift = k.aff.shift.data();
      const acc_t* mean = k.mean.data();
      const acc_t* rm = k.rm.data();
      std::vector<acc_t> c_mean(C), c_var(C);  // the statistics coefficients as two arrays
      for (int64_t c = 0; c < C; ++c) { c_mean[c] = k.stat[c].c_mean; c_var[c] = k.stat[c].c_var; }
      const acc_t* cm = c_mean.data();
      const acc_t* cv = c_var.data();
      at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const auto [r0, r1] = blk.range(t);
          const scalar_t* xb = xd + r0 * C;
          const scalar_t* gyb = gyd + r0 * C;
          scalar_t* gxb = gxd + r0 * C;
          acc_t* sg = need_weight_grad ? psum_g.data() + t * C : nullptr;
          acc_t* sgx = need_weight_grad ? psum_gx.data() + t * C : nullptr;
          const acc_t* it = with_instance_means ? inst_term.data() + (r0 / s.HW) * C : nullptr;
          const int64_t nrows = r1 - r0;
          // the flags are template arguments so each variant is one branch-free `omp simd` loop
          // over the channels of a row (contiguous in channels_last)
          dispatch_bool2(need_weight_grad, with_instance_means, [&](auto wgrad_c, auto inst_c) {
            constexpr bool WGrad = decltype(wgrad_c)::value, Inst = decltype(inst_c)::value;
            if (!need_x) {
              backward_cl_rows<false, false, false, false, Inst>(xb, gyb, gxb, nrows, C, scale, shift, mean, rm, cm,
                                                                 cv, it, sg, sgx);
              return;
            }
            dispatch_bool2(apply_relu, with_stats, [&](auto relu_c, auto stats_c) {
              backward_cl_rows<true, decltype(relu_c)::value, decltype(stats_c)::value, WGrad, Inst>(
                  xb, gyb, gxb, nrows, C, scale, shift, mean, rm, cm, cv, it, sg, sgx);
            });
          });
        }
      });
    }

    if (need_weight_grad) {
      gw = at::empty({C}, x.options().dtype(adt));
      gb = at::empty({C}, x.options().dtype(adt));
      acc_t* gwp = gw.data_ptr<acc_t>();
      acc_t* gbp = gb.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        double a = 0, b = 0;  // fixed-order double sum of the partials: deterministic
        if (!cl) {
          for (int64_t t = c * nblocks; t < (c + 1) * nblocks; ++t) { a += psum_g[t]; b += psum_gx[t]; }
        } else {
          for (int64_t t = 0; t < ntasks; ++t) { a += psum_g[t * C + c]; b += psum_gx[t * C + c]; }
        }
        gbp[c] = acc_t(a);
        gwp[c] = acc_t(b) * k.aff.invstd[c];
      }
    }
  });
  return fbn_binding::backward_result(grad_x, gw, gb, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) {
  m.impl("fused_bn_forward", &fused_bn_forward_cpu);
  m.impl("fused_bn_backward", &fused_bn_backward_cpu);
}

}  // namespace fastsynth
