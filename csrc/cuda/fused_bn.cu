// CUDA kernels of the fused teacher BatchNorm; see fused_bn.cuh for the scheme.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/fused_bn_math.h"
#include "common/welford.h"
#include "cuda/fused_bn.cuh"

namespace fastsynth {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Loads widen to the accumulation type, stores round from it (fp16/bf16 through float).
__device__ __forceinline__ float load_acc(const float* p) { return *p; }
__device__ __forceinline__ double load_acc(const double* p) { return *p; }
__device__ __forceinline__ float load_acc(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_acc(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A thread's walk over the tiles [t0, t1) of its block: its position inside a tile is fixed
// (row dr of the tile's rows, value dl of the tile's values); the tile index advances by carrying
// (lc, rg), so the loop has no division; the row start needs one division by R0 per row group.
struct TileWalk {
  int64_t lc, rg, r, l, ox, oy;  // value chunk, row group, row, value index, row starts in x and y

  __device__ __forceinline__ void row_start(const FusedBnRows& g, int tr_log2, int64_t dr) {
    r = (rg << tr_log2) + dr;
    // 32-bit: R < 2^31 (checked on the host); a 64-bit division would be a called subroutine.
    const int64_t q = g.R0 == 1 ? r : int64_t(uint32_t(r) / uint32_t(g.R0)), rem = r - q * g.R0;
    ox = q * g.x.s1 + rem * g.x.s0;
    oy = q * g.y.s1 + rem * g.y.s0;
  }
};

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> a) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    Welford<acc_t> b(__shfl_down_sync(0xffffffffu, a.mean, d), __shfl_down_sync(0xffffffffu, a.m2, d),
                     __shfl_down_sync(0xffffffffu, a.n, d));
    a = welford_merge(a, b);
  }
  return a;
}

// Block-wide Welford merge; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> block_merge(Welford<acc_t> a) {
  __shared__ acc_t s_mean[kWarps], s_m2[kWarps], s_n[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_merge(a);
  if (lane == 0) { s_mean[warp] = a.mean; s_m2[warp] = a.m2; s_n[warp] = a.n; }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? Welford<acc_t>(s_mean[lane], s_m2[lane], s_n[lane]) : Welford<acc_t>();
    a = warp_merge(a);
  }
  return a;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* s_buf) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_buf[warp] = v;
  __syncthreads();
  v = (warp == 0 && lane < kWarps) ? s_buf[lane] : acc_t(0);
  if (warp == 0) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  }
  __syncthreads();
  return v;
}

// Channel-contiguous tiles: 32 channels (lanes) x 8 positions (warps); other maps: 1 channel.
constexpr int kClChannels = 32, kClLpLog2 = 3;

// Merge of the per-thread Welford states of each channel of the block; valid in the threads
// that own channel slot tid < channels (CL: lane tc of warp 0; else thread 0).
template <typename acc_t, bool CL>
__device__ __forceinline__ Welford<acc_t> merge_channels(Welford<acc_t> a) {
  if (!CL) return block_merge(a);
  __shared__ acc_t s_mean[kThreads], s_m2[kThreads], s_n[kThreads];
  s_mean[threadIdx.x] = a.mean;
  s_m2[threadIdx.x] = a.m2;
  s_n[threadIdx.x] = a.n;
  __syncthreads();
  if (threadIdx.x < kClChannels) {
    for (int k = 1; k < kWarps; ++k) {
      const int i = threadIdx.x + k * kClChannels;
      a = welford_merge(a, Welford<acc_t>(s_mean[i], s_m2[i], s_n[i]));
    }
  }
  return a;
}

template <typename acc_t, bool CL>
__device__ __forceinline__ acc_t sum_channels(acc_t v, acc_t* s_buf /* kThreads */) {
  if (!CL) return block_sum(v, s_buf);
  __syncthreads();  // s_buf may hold a previous sum
  s_buf[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < kClChannels) {
    for (int k = 1; k < kWarps; ++k) v += s_buf[threadIdx.x + k * kClChannels];
  }
  return v;
}

template <bool CL>
struct ThreadSlot {
  int64_t c, dl, dr;  // channel, value and row inside the tile
  __device__ __forceinline__ ThreadSlot(int64_t cb, int lp_log2) {
    if (CL) {
      c = cb * kClChannels + (threadIdx.x & (kClChannels - 1));
      dl = threadIdx.x >> 5;
      dr = 0;
    } else {
      c = cb;
      dl = threadIdx.x & ((1 << lp_log2) - 1);
      dr = threadIdx.x >> lp_log2;
    }
  }
};

// Runs elem(w, l) over this thread's elements of the tiles [t0, t1) and row_end(w) each time the
// tile walk leaves a row group (and after the last tile of an unfinished one). The row group
// advances at the same tile in every thread of the block, so row_end may shuffle (non-CL
// blocks: one channel, every thread walks).
template <bool CL, class Elem, class RowEnd>
__device__ __forceinline__ void walk_tiles(const FusedBnRows& g, const FusedBnPlan& p, const ThreadSlot<CL>& ts,
                                           int64_t t0, int64_t t1, Elem&& elem, RowEnd&& row_end) {
  TileWalk w;
  w.rg = uint32_t(t0) / uint32_t(p.lt);  // tiles < 2^31 (checked on the host)
  w.lc = t0 - w.rg * p.lt;
  w.row_start(g, p.tr_log2, ts.dr);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t l = (w.lc << (CL ? kClLpLog2 : p.lp_log2)) + ts.dl;
    if (w.r < g.R && l < g.L) elem(w, l);
    if (++w.lc == p.lt) {
      row_end(w);
      w.lc = 0;
      ++w.rg;
      w.row_start(g, p.tr_log2, ts.dr);
    }
  }
  if (w.lc != 0) row_end(w);
}

// Sample of row r (instance means: rows never straddle samples, RS rows each; r < 2^31).
__device__ __forceinline__ int64_t sample_of(const FusedBnRows& g, int64_t r) {
  return g.RS == 1 ? r : int64_t(uint32_t(r) / uint32_t(g.RS));
}

// Adds this thread's instance-mean partial sum of row w.r to inst[n, c] and clears it. Non-CL:
// the lanes of one row (LP of them, or the warp) are summed by shuffles first, and their first
// lane adds; CL: each thread adds (its warp is one position of 32 channels).
template <typename acc_t, bool CL>
__device__ __forceinline__ void flush_inst(acc_t& isum, const TileWalk& w, const FusedBnRows& g,
                                           const FusedBnPlan& p, int64_t c, acc_t inv_hw, acc_t* inst) {
  int lead = 1;
  if (!CL) {
    const int group = p.lp_log2 < 5 ? (1 << p.lp_log2) : 32;
    for (int d = group >> 1; d > 0; d >>= 1) isum += __shfl_down_sync(0xffffffffu, isum, d);
    lead = (threadIdx.x & (group - 1)) == 0;
  }
  if (lead && w.r < g.R && isum != acc_t(0)) atomicAdd(inst + sample_of(g, w.r) * g.C + c, isum * inv_hw);
  isum = acc_t(0);
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kThreads) fused_bn_forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ bias, const acc_t* __restrict__ running_mean, const acc_t* __restrict__ running_var,
    acc_t eps, bool apply_relu, bool with_stats, acc_t* __restrict__ partial /* [3][C][splits] */,
    acc_t* __restrict__ inst /* [N][C] zeroed, or null */, acc_t inv_hw, FusedBnRows g, FusedBnPlan p) {
  const ThreadSlot<CL> ts(blockIdx.x, p.lp_log2);
  const int s = blockIdx.y;
  const bool active = ts.c < g.C;
  const int64_t c = active ? ts.c : 0;
  const auto aff = bn_eval_affine<acc_t>(weight[c], bias[c], running_mean[c], running_var[c], eps);
  const scalar_t* xc = x + c * g.x.c;
  scalar_t* yc = y + c * g.y.c;
  const int64_t t0 = s * p.per, t1 = t0 + p.per < p.tiles ? t0 + p.per : p.tiles;
  Welford<acc_t> acc;
  acc_t isum = acc_t(0);  // this thread's sum of x in its current row (instance means)
  if (active && t0 < t1) {
    walk_tiles<CL>(
        g, p, ts, t0, t1,
        [&](const TileWalk& w, int64_t l) {
          const acc_t v = load_acc(xc + w.ox + l * g.x.l);
          if (with_stats) acc.update(v);
          if (inst) isum += v;
          store_acc(yc + w.oy + l * g.y.l, bn_eval_apply<acc_t>(v, aff.scale, aff.shift, apply_relu));
        },
        [&](const TileWalk& w) {
          if (inst) flush_inst<acc_t, CL>(isum, w, g, p, c, inv_hw, inst);
        });
  }
  if (!with_stats) return;
  acc = merge_channels<acc_t, CL>(acc);
  if ((CL ? threadIdx.x < kClChannels : threadIdx.x == 0) && active) {
    const int64_t C = g.C;
    partial[(0 * C + c) * p.splits + s] = acc.mean;
    partial[(1 * C + c) * p.splits + s] = acc.m2;
    partial[(2 * C + c) * p.splits + s] = acc.n;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) welford_partials_merge_kernel(const acc_t* __restrict__ partial, int64_t C,
                                                                          int splits, acc_t* __restrict__ mean,
                                                                          acc_t* __restrict__ var) {
  const int64_t c = blockIdx.x;
  Welford<acc_t> acc;
  for (int i = threadIdx.x; i < splits; i += kThreads)
    acc = welford_merge(acc, Welford<acc_t>(partial[(0 * C + c) * splits + i], partial[(1 * C + c) * splits + i],
                                            partial[(2 * C + c) * splits + i]));
  acc = block_merge(acc);
  if (threadIdx.x == 0) {
    mean[c] = acc.mean;
    var[c] = acc.var_biased();
  }
}

template <typename scalar_t, typename acc_t, bool CL>
// 128 registers: with __launch_bounds__ alone ptxas spills the fp64 and channels_last builds
// inside the element loop at ~48 registers; uncapped they use at most 60.
__global__ void FS_KERNEL_REGS(128, kThreads) fused_bn_backward_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_x,
    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, const acc_t* __restrict__ running_mean,
    const acc_t* __restrict__ running_var, const acc_t* __restrict__ mean, const acc_t* __restrict__ grad_mean,
    const acc_t* __restrict__ grad_var, const acc_t* __restrict__ grad_inst /* [N][C] or null */, acc_t eps, bool apply_relu, bool with_stats, bool need_weight_grad, acc_t* __restrict__ partial_g,
    acc_t* __restrict__ partial_gx, FusedBnRows g, FusedBnPlan p) {
  __shared__ acc_t s_buf[CL ? kThreads : kWarps];
  const ThreadSlot<CL> ts(blockIdx.x, p.lp_log2);
  const int s = blockIdx.y;
  const bool active = ts.c < g.C;
  const int64_t c = active ? ts.c : 0;
  const auto aff = bn_eval_affine<acc_t>(weight[c], bias[c], running_mean[c], running_var[c], eps);
  StatGradCoef<acc_t> sc{acc_t(0), acc_t(0)};
  acc_t mu = acc_t(0);
  if (with_stats) {
    sc = stat_grad_coef<acc_t>(grad_mean[c], grad_var[c], acc_t(g.M));
    mu = mean[c];
  }
  const bool need_x = apply_relu || with_stats || need_weight_grad;
  const acc_t rm = running_mean[c];
  const scalar_t* xc = x + c * g.x.c;
  const scalar_t* gyc = grad_y + c * g.y.c;
  scalar_t* gxc = grad_x + c * g.y.c;
  const int64_t t0 = s * p.per, t1 = t0 + p.per < p.tiles ? t0 + p.per : p.tiles;
  acc_t sg = 0, sgx = 0;
  if (active && t0 < t1) {
    int64_t row = -1;
    acc_t gi = acc_t(0);  // the instance-mean term of the current row's sample
    walk_tiles<CL>(
        g, p, ts, t0, t1,
        [&](const TileWalk& w, int64_t l) {
          if (grad_inst && w.r != row) {
            row = w.r;
            gi = inst_grad_term<acc_t>(grad_inst[sample_of(g, w.r) * g.C + c], acc_t(g.HW));
          }
          const int64_t oy = w.oy + l * g.y.l;
          const acc_t gy = load_acc(gyc + oy);
          acc_t gx;
          if (need_x) {
            const acc_t v = load_acc(xc + w.ox + l * g.x.l);
            const acc_t gp = bn_relu_grad<acc_t>(gy, v, aff.scale, aff.shift, apply_relu);
            gx = bn_grad_input<acc_t>(gp, v, aff.scale, mu, sc, with_stats);
            sg += gp;
            sgx += gp * (v - rm);
          } else {
            gx = gy * aff.scale;
          }
          store_acc(gxc + oy, gx + gi);
        },
        [](const TileWalk&) {});
  }
  if (!need_weight_grad) return;
  sg = sum_channels<acc_t, CL>(sg, s_buf);
  sgx = sum_channels<acc_t, CL>(sgx, s_buf);
  if ((CL ? threadIdx.x < kClChannels : threadIdx.x == 0) && active) {
    partial_g[c * p.splits + s] = sg;
    partial_gx[c * p.splits + s] = sgx * aff.invstd;
  }
}

}  // namespace

FusedBnRows fused_bn_rows(const int64_t* sizes, const int64_t* xs, const int64_t* ys, bool keep_batch) {
  // positions (n, h, w) of size > 1, outermost first, merged where both x and y nest; with
  // keep_batch the batch (then index 0) is never merged, so no row straddles two samples
  int64_t sz[3], sx[3], sy[3];
  int n = 0;
  for (int d : {0, 2, 3}) {
    if (sizes[d] == 1) continue;
    sz[n] = sizes[d];
    sx[n] = xs[d];
    sy[n] = ys[d];
    ++n;
  }
  const bool batch_row = keep_batch && sizes[0] != 1;
  if (n == 0 || (batch_row && n == 1)) {  // no position dim, or the batch alone: rows of one value
    sz[n] = 1;
    sx[n] = sy[n] = 0;
    ++n;
  }
  int64_t mz[3], mx[3], my[3];  // merged dims, innermost at index k - 1
  int k = 0;
  for (int i = n - 1; i >= 0; --i) {
    if (k > 0 && sx[i] == mz[0] * mx[0] && sy[i] == mz[0] * my[0] && !(batch_row && i == 0)) {
      mz[0] *= sz[i];
    } else {
      for (int j = k; j > 0; --j) {
        mz[j] = mz[j - 1];
        mx[j] = mx[j - 1];
        my[j] = my[j - 1];
      }
      mz[0] = sz[i];
      mx[0] = sx[i];
      my[0] = sy[i];
      ++k;
    }
  }
  FusedBnRows g{};
  g.C = sizes[1];
  g.L = mz[k - 1];
  g.x = {xs[1], 0, 0, mx[k - 1]};
  g.y = {ys[1], 0, 0, my[k - 1]};
  g.R = 1;
  g.R0 = 1;
  if (k >= 2) {
    g.R = mz[0];
    g.x.s1 = mx[0];
    g.y.s1 = my[0];
  }
  if (k == 3) {
    g.R = mz[0] * mz[1];
    g.R0 = mz[1];
    g.x.s0 = mx[1];
    g.y.s0 = my[1];
  }
  g.M = g.L * g.R;
  g.HW = sizes[2] * sizes[3];
  g.RS = keep_batch ? g.R / sizes[0] : g.R;
  return g;
}

FusedBnPlan fused_bn_plan(const FusedBnRows& g, int num_sms) {
  FusedBnPlan p{};
  p.cl = g.x.c == 1 && g.C > 1;
  if (p.cl) {
    p.lp_log2 = kClLpLog2;
    p.tr_log2 = 0;
    p.cblocks = (g.C + kClChannels - 1) / kClChannels;
  } else {
    int lp = 0;
    while ((int64_t(1) << lp) < g.L && lp < 8) ++lp;  // LP = next power of two of L, at most 256
    p.lp_log2 = lp;
    p.tr_log2 = 8 - lp;  // 256 threads = TR rows x LP values
    p.cblocks = g.C;
  }
  p.lt = (g.L + (int64_t(1) << p.lp_log2) - 1) >> p.lp_log2;
  p.tiles = ((g.R + (int64_t(1) << p.tr_log2) - 1) >> p.tr_log2) * p.lt;
  const int64_t want_blocks = int64_t(num_sms) * 4;
  int64_t splits = (want_blocks + p.cblocks - 1) / p.cblocks;
  const int64_t max_splits = (p.tiles + 3) / 4;  // >= 4 tiles (elements per thread) per block
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  p.per = (p.tiles + splits - 1) / splits;
  p.splits = int((p.tiles + p.per - 1) / p.per);
  if (p.splits < 1) p.splits = 1;
  return p;
}

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_forward_launch(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias,
                                    const acc_t* running_mean, const acc_t* running_var, acc_t eps, bool apply_relu,
                                    bool with_stats, acc_t* mean_out, acc_t* var_out, acc_t* workspace,
                                    acc_t* inst_out, const FusedBnRows& g, const FusedBnPlan& p,
                                    cudaStream_t stream) {
  const dim3 grid(unsigned(p.cblocks), unsigned(p.splits));
  const acc_t inv_hw = acc_t(1) / acc_t(g.HW);
  if (p.cl)
    fused_bn_forward_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
        x, y, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, workspace, inst_out, inv_hw, g, p);
  else
    fused_bn_forward_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
        x, y, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, workspace, inst_out, inv_hw, g, p);
  if (with_stats)
    welford_partials_merge_kernel<acc_t><<<unsigned(g.C), kThreads, 0, stream>>>(workspace, g.C, p.splits, mean_out,
                                                                                 var_out);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_backward_launch(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, const acc_t* weight,
                                     const acc_t* bias, const acc_t* running_mean, const acc_t* running_var,
                                     const acc_t* mean, const acc_t* grad_mean, const acc_t* grad_var,
                                     const acc_t* grad_inst, acc_t eps, bool apply_relu, bool with_stats,
                                     bool need_weight_grad, acc_t* partial_g, acc_t* partial_gx, const FusedBnRows& g,
                                     const FusedBnPlan& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.cblocks), unsigned(p.splits));
  if (p.cl)
    fused_bn_backward_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
        grad_y, x, grad_x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst, eps,
        apply_relu, with_stats, need_weight_grad, partial_g, partial_gx, g, p);
  else
    fused_bn_backward_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
        grad_y, x, grad_x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, grad_inst, eps,
        apply_relu, with_stats, need_weight_grad, partial_g, partial_gx, g, p);
  return cudaGetLastError();
}

#define FS_INSTANTIATE(scalar_t, acc_t)                                                                           \
  template cudaError_t fused_bn_forward_launch<scalar_t, acc_t>(                                                  \
      const scalar_t*, scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t, bool, bool,      \
      acc_t*, acc_t*, acc_t*, acc_t*, const FusedBnRows&, const FusedBnPlan&, cudaStream_t);                      \
  template cudaError_t fused_bn_backward_launch<scalar_t, acc_t>(                                                 \
      const scalar_t*, const scalar_t*, scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*,        \
      const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t, bool, bool, bool, acc_t*, acc_t*,            \
      const FusedBnRows&, const FusedBnPlan&, cudaStream_t);

FS_INSTANTIATE(double, double)
FS_INSTANTIATE(float, float)
FS_INSTANTIATE(__half, float)
FS_INSTANTIATE(__nv_bfloat16, float)
#undef FS_INSTANTIATE

}  // namespace cuda
}  // namespace fastsynth
