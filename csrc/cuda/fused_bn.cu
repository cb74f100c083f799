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

// Offset of element m (flat index over n, h, w) of channel c.
__device__ __forceinline__ int64_t offset_of(int64_t m, int64_t c, int64_t HW, int64_t W, const Strides4& s) {
  const int64_t n = m / HW, hw = m - n * HW;
  const int64_t h = hw / W, w = hw - h * W;
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

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

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fused_bn_forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ bias, const acc_t* __restrict__ running_mean, const acc_t* __restrict__ running_var,
    acc_t eps, bool apply_relu, bool with_stats, acc_t* __restrict__ partial /* [3][C][splits] */, int splits,
    FusedBnGeometry g) {
  const int64_t c = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t HW = g.H * g.W, M = g.N * HW;
  const int64_t per = (M + splits - 1) / splits;
  const int64_t begin = s * per, end = begin + per < M ? begin + per : M;
  const auto aff = bn_eval_affine<acc_t>(weight[c], bias[c], running_mean[c], running_var[c], eps);
  Welford<acc_t> acc;
  for (int64_t m = begin + threadIdx.x; m < end; m += kThreads) {
    const acc_t v = load_acc(x + offset_of(m, c, HW, g.W, g.x));
    if (with_stats) acc.update(v);
    store_acc(y + offset_of(m, c, HW, g.W, g.y), bn_eval_apply<acc_t>(v, aff.scale, aff.shift, apply_relu));
  }
  if (!with_stats) return;
  acc = block_merge(acc);
  if (threadIdx.x == 0) {
    const int64_t C = g.C;
    partial[(0 * C + c) * splits + s] = acc.mean;
    partial[(1 * C + c) * splits + s] = acc.m2;
    partial[(2 * C + c) * splits + s] = acc.n;
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

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fused_bn_backward_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_x,
    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, const acc_t* __restrict__ running_mean,
    const acc_t* __restrict__ running_var, const acc_t* __restrict__ mean, const acc_t* __restrict__ grad_mean,
    const acc_t* __restrict__ grad_var, acc_t eps, bool apply_relu, bool with_stats, bool need_weight_grad,
    acc_t* __restrict__ partial_g, acc_t* __restrict__ partial_gx, int splits, FusedBnGeometry g) {
  __shared__ acc_t s_buf[kWarps];
  const int64_t c = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t HW = g.H * g.W, M = g.N * HW;
  const int64_t per = (M + splits - 1) / splits;
  const int64_t begin = s * per, end = begin + per < M ? begin + per : M;
  const auto aff = bn_eval_affine<acc_t>(weight[c], bias[c], running_mean[c], running_var[c], eps);
  StatGradCoef<acc_t> sc{acc_t(0), acc_t(0)};
  acc_t mu = acc_t(0);
  if (with_stats) {
    sc = stat_grad_coef<acc_t>(grad_mean[c], grad_var[c], acc_t(M));
    mu = mean[c];
  }
  const bool need_x = apply_relu || with_stats || need_weight_grad;
  const acc_t rm = running_mean[c];
  acc_t sg = 0, sgx = 0;
  for (int64_t m = begin + threadIdx.x; m < end; m += kThreads) {
    const int64_t oy = offset_of(m, c, HW, g.W, g.y);
    const acc_t gy = load_acc(grad_y + oy);
    acc_t gx;
    if (need_x) {
      const acc_t v = load_acc(x + offset_of(m, c, HW, g.W, g.x));
      const acc_t gp = bn_relu_grad<acc_t>(gy, v, aff.scale, aff.shift, apply_relu);
      gx = bn_grad_input<acc_t>(gp, v, aff.scale, mu, sc, with_stats);
      sg += gp;
      sgx += gp * (v - rm);
    } else {
      gx = gy * aff.scale;
    }
    store_acc(grad_x + oy, gx);
  }
  if (!need_weight_grad) return;
  sg = block_sum(sg, s_buf);
  sgx = block_sum(sgx, s_buf);
  if (threadIdx.x == 0) {
    partial_g[c * splits + s] = sg;
    partial_gx[c * splits + s] = sgx * aff.invstd;
  }
}

}  // namespace

int fused_bn_splits(int64_t M, int64_t C, int num_sms) {
  const int64_t want_blocks = int64_t(num_sms) * 4;
  int64_t splits = (want_blocks + C - 1) / C;
  const int64_t max_splits = (M + 4 * kThreads - 1) / (4 * kThreads);  // >= 4 elements per thread
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  return int(splits);
}

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_forward_launch(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias,
                                    const acc_t* running_mean, const acc_t* running_var, acc_t eps, bool apply_relu,
                                    bool with_stats, acc_t* mean_out, acc_t* var_out, acc_t* workspace, int splits,
                                    const FusedBnGeometry& g, cudaStream_t stream) {
  const dim3 grid(unsigned(g.C), unsigned(splits));
  fused_bn_forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      x, y, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, workspace, splits, g);
  if (with_stats)
    welford_partials_merge_kernel<acc_t><<<unsigned(g.C), kThreads, 0, stream>>>(workspace, g.C, splits, mean_out, var_out);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_backward_launch(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, const acc_t* weight,
                                     const acc_t* bias, const acc_t* running_mean, const acc_t* running_var,
                                     const acc_t* mean, const acc_t* grad_mean, const acc_t* grad_var, acc_t eps,
                                     bool apply_relu, bool with_stats, bool need_weight_grad, acc_t* partial_g,
                                     acc_t* partial_gx, int splits, const FusedBnGeometry& g, cudaStream_t stream) {
  const dim3 grid(unsigned(g.C), unsigned(splits));
  fused_bn_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      grad_y, x, grad_x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var, eps, apply_relu,
      with_stats, need_weight_grad, partial_g, partial_gx, splits, g);
  return cudaGetLastError();
}

#define FS_INSTANTIATE(scalar_t, acc_t)                                                                           \
  template cudaError_t fused_bn_forward_launch<scalar_t, acc_t>(                                                  \
      const scalar_t*, scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t, bool, bool,      \
      acc_t*, acc_t*, acc_t*, int, const FusedBnGeometry&, cudaStream_t);                                         \
  template cudaError_t fused_bn_backward_launch<scalar_t, acc_t>(                                                 \
      const scalar_t*, const scalar_t*, scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*,        \
      const acc_t*, const acc_t*, const acc_t*, acc_t, bool, bool, bool, acc_t*, acc_t*, int,                     \
      const FusedBnGeometry&, cudaStream_t);

FS_INSTANTIATE(double, double)
FS_INSTANTIATE(float, float)
FS_INSTANTIATE(__half, float)
FS_INSTANTIATE(__nv_bfloat16, float)
#undef FS_INSTANTIATE

}  // namespace cuda
}  // namespace fastsynth
