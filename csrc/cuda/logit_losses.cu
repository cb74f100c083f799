// CUDA kernels and launchers of the teacher/student logit losses (see logit_losses.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/logit_loss_math.h"
#include "cuda/logit_losses.cuh"

namespace fastsynth {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpRowsPerBlock = 4;  // warp-per-row configuration: 4 rows per 128-thread block
constexpr int kBlockGroup = 512;      // block-per-row configuration: 512 threads per row
constexpr int kSumThreads = 256;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

// VEC consecutive elements; 16-byte aligned when VEC * sizeof(T) == 16 (checked by the launcher)
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// p[0 .. VEC) in the accumulator type: one vector load, or a plain load when VEC == 1
template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void load_pack(const T* p, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_acc(*p);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_acc(pk.v[k]);
  }
}

// p[0 .. VEC) = in, converted to T
template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void store_pack(T* p, const acc_t (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_acc<T>(in[0]);
  } else {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_acc<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// ---------------------------------------------------------------------------------------------
// Payloads of the group reductions: shuffle and merge
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct KlPass1 {
  KlState<acc_t> st;
  ArgMax<acc_t> at, as;
};

template <typename acc_t>
struct JsPass1 {
  LseState<acc_t> ls, lt;
};

template <typename acc_t>
struct Sums3 {
  acc_t f, sp, sq;
};

template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> shfl(ArgMax<acc_t> x, int o) {
  return {__shfl_xor_sync(kFullMask, x.v, o), static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(x.i), o))};
}
template <typename acc_t>
__device__ __forceinline__ KlPass1<acc_t> shfl(const KlPass1<acc_t>& x, int o) {
  KlPass1<acc_t> r;
  r.st = {__shfl_xor_sync(kFullMask, x.st.mt, o), __shfl_xor_sync(kFullMask, x.st.zt, o),
          __shfl_xor_sync(kFullMask, x.st.ms, o), __shfl_xor_sync(kFullMask, x.st.zs, o),
          __shfl_xor_sync(kFullMask, x.st.a, o)};
  r.at = shfl(x.at, o);
  r.as = shfl(x.as, o);
  return r;
}
template <typename acc_t>
__device__ __forceinline__ KlPass1<acc_t> merge(const KlPass1<acc_t>& x, const KlPass1<acc_t>& y) {
  return {kl_state_merge(x.st, y.st), argmax_merge(x.at, y.at), argmax_merge(x.as, y.as)};
}
template <typename acc_t>
__device__ __forceinline__ JsPass1<acc_t> shfl(const JsPass1<acc_t>& x, int o) {
  return {{__shfl_xor_sync(kFullMask, x.ls.m, o), __shfl_xor_sync(kFullMask, x.ls.z, o)},
          {__shfl_xor_sync(kFullMask, x.lt.m, o), __shfl_xor_sync(kFullMask, x.lt.z, o)}};
}
template <typename acc_t>
__device__ __forceinline__ JsPass1<acc_t> merge(const JsPass1<acc_t>& x, const JsPass1<acc_t>& y) {
  return {lse_merge(x.ls, y.ls), lse_merge(x.lt, y.lt)};
}
template <typename acc_t>
__device__ __forceinline__ Sums3<acc_t> shfl(const Sums3<acc_t>& x, int o) {
  return {__shfl_xor_sync(kFullMask, x.f, o), __shfl_xor_sync(kFullMask, x.sp, o),
          __shfl_xor_sync(kFullMask, x.sq, o)};
}
template <typename acc_t>
__device__ __forceinline__ Sums3<acc_t> merge(const Sums3<acc_t>& x, const Sums3<acc_t>& y) {
  return {x.f + y.f, x.sp + y.sp, x.sq + y.sq};
}

// All-reduce over a group of G threads (G = 32: one warp; G > 32: the whole block, G/32 warps,
// through `smem` of G/32 + 1 payloads). Every thread of the group gets the result. The merge
// order is fixed, so results are reproducible.
template <int G, typename P>
__device__ __forceinline__ P group_allreduce(P v, P* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl(v, o));
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
      P w = smem[lane < kWarps ? lane : 0];
      // lanes >= kWarps duplicate warp 0's value; merged only among the first kWarps lanes below
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const P other = shfl(w, o);
        if (o < kWarps) w = merge(w, other);
      }
      if (lane == 0) smem[kWarps] = w;
    }
    __syncthreads();
    v = smem[kWarps];
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Row kernels
// ---------------------------------------------------------------------------------------------

// The row's partial results (a_i, b_i, c_i) of the batch sum (see RowSumOutputs).
template <typename acc_t>
__device__ __forceinline__ void store_partials(void* partials, int64_t row, acc_t a, acc_t b, acc_t c) {
  acc_t* part = static_cast<acc_t*>(partials) + row * 3;
  part[0] = a;
  part[1] = b;
  part[2] = c;
}

// The clamped JS element at logits (s, t) of a row with log-sum-exps lse_s, lse_t (temperature
// 1/inv_t); p and q receive P and Q.
template <typename acc_t>
struct JsRow {
  acc_t inv_t, lse_s, lse_t, lo, hi, log_lo, log_hi;
  __device__ __forceinline__ JsElem<acc_t> element(acc_t s, acc_t t, acc_t& p, acc_t& q) const {
    const acc_t lp = s * inv_t - lse_s, lq = t * inv_t - lse_t;
    p = fs_exp(lp);
    q = fs_exp(lq);
    return js_element<acc_t>(p, q, lp, lq, lo, hi, log_lo, log_hi);
  }
};

// Launch bounds name min 1 block per SM: without it ptxas caps the fp64 instantiations at 80
// registers and spills.
template <int G>
struct GroupShape {
  static constexpr int kRows = G == 32 ? kWarpRowsPerBlock : 1;
  static constexpr int kThreads = G * kRows;
  static constexpr int kSmem = G > 32 ? G / 32 + 1 : 1;
};

// This thread's share of a row pair x, y of C elements (group of G threads, thread `lane`): for
// each pack of VEC elements from `base`, f(base, xv, yv) with the elements in the accumulator type.
template <int G, int VEC, typename T, typename F>
__device__ __forceinline__ void for_each_pack(const T* x, const T* y, int64_t C, int lane, const F& f) {
  using acc_t = typename AccOf<T>::type;
  for (int64_t base = static_cast<int64_t>(lane) * VEC; base < C; base += static_cast<int64_t>(G) * VEC) {
    acc_t xv[VEC], yv[VEC];
    load_pack<T, VEC>(x + base, xv);
    load_pack<T, VEC>(y + base, yv);
    f(base, xv, yv);
  }
}

// Row `row` of a gradient buffer of rows of C elements, or null when the gradient is not wanted.
template <typename T>
__device__ __forceinline__ T* grad_row(void* grad, int64_t row, int64_t C) {
  return grad ? static_cast<T*>(grad) + row * C : nullptr;
}

template <typename T, int G, int VEC>
__global__ void __launch_bounds__(GroupShape<G>::kThreads, 1) kl_rows_kernel(KlRowsArgs a, void* partials) {
  using acc_t = typename AccOf<T>::type;
  using Vals = acc_t[VEC];
  __shared__ KlPass1<acc_t> smem[GroupShape<G>::kSmem];
  const int lane = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * GroupShape<G>::kRows + threadIdx.x / G;
  if (row >= a.N) return;  // G == 32 only (warp-uniform); G > 32 launches exactly N blocks
  const int64_t C = a.C;
  const T* t = static_cast<const T*>(a.t) + row * a.stride_t;
  const T* s = static_cast<const T*>(a.s) + row * a.stride_s;
  const acc_t inv_t = static_cast<acc_t>(a.inv_t);

  // pass 1: one read of both rows
  KlPass1<acc_t> p{kl_state_empty<acc_t>(), {-INFINITY, INT64_MAX}, {-INFINITY, INT64_MAX}};
  for_each_pack<G, VEC>(t, s, C, lane, [&](int64_t base, const Vals& tv, const Vals& sv) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      p.at = argmax_merge(p.at, ArgMax<acc_t>{tv[k], base + k});
      p.as = argmax_merge(p.as, ArgMax<acc_t>{sv[k], base + k});
      p.st = kl_state_push(p.st, tv[k] * inv_t, sv[k] * inv_t);
    }
  });
  p = group_allreduce<G>(p, smem);

  const acc_t kl = kl_state_value(p.st);
  const acc_t lzt = fs_log(p.st.zt), lzs = fs_log(p.st.zs);
  const acc_t mt = p.st.mt, ms = p.st.ms;
  const acc_t agree = a.agree_mask ? (p.at.i == p.as.i ? acc_t(1) : acc_t(0)) : acc_t(1);
  int64_t y = -1;
  acc_t ce = 0;
  if (a.targets != nullptr) {
    const int64_t yy = a.targets[row];
    const bool bad = yy < 0 || yy >= C;
    ce = bad ? static_cast<acc_t>(NAN) : mt + lzt - to_acc(t[bad ? 0 : yy]) * inv_t;
    y = bad ? -1 : yy;
  }
  // a masked row counts 0, or NaN when its KL is not finite (as the reference)
  if (lane == 0) store_partials(partials, row, ce, kl * agree, agree);
  if (a.grad_t == nullptr && a.grad_s == nullptr) return;

  // pass 2: gradients for a unit grad_loss
  const KlRowCoef k = kl_row_coef(a.ce_w, a.kl_w, static_cast<double>(agree), a.inv_t, static_cast<double>(kl));
  const acc_t g_pt = static_cast<acc_t>(k.g_pt), g_ptd = static_cast<acc_t>(k.g_ptd);
  const acc_t g_y = static_cast<acc_t>(k.g_y);
  T* gt_row = grad_row<T>(a.grad_t, row, C);
  T* gs_row = grad_row<T>(a.grad_s, row, C);
  for_each_pack<G, VEC>(t, s, C, lane, [&](int64_t base, const Vals& tv, const Vals& sv) {
    acc_t gt[VEC], gs[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t lpt = tv[j] * inv_t - mt - lzt;
      const acc_t lps = sv[j] * inv_t - ms - lzs;
      const acc_t pt = fs_exp(lpt), ps = fs_exp(lps);
      gt[j] = prob_times(pt, g_pt + g_ptd * (lpt - lps)) - (base + j == y ? g_y : acc_t(0));
      gs[j] = g_ptd * (ps - pt);
    }
    if (gt_row) store_pack<T, VEC>(gt_row + base, gt);
    if (gs_row) store_pack<T, VEC>(gs_row + base, gs);
  });
}

template <typename T, int G, int VEC>
__global__ void __launch_bounds__(GroupShape<G>::kThreads, 1) js_rows_kernel(JsRowsArgs a, void* partials) {
  using acc_t = typename AccOf<T>::type;
  using Vals = acc_t[VEC];
  __shared__ JsPass1<acc_t> smem1[GroupShape<G>::kSmem];
  __shared__ Sums3<acc_t> smem2[GroupShape<G>::kSmem];
  const int lane = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * GroupShape<G>::kRows + threadIdx.x / G;
  if (row >= a.N) return;
  const int64_t C = a.C;
  const T* s = static_cast<const T*>(a.s) + row * a.stride_s;
  const T* t = static_cast<const T*>(a.t) + row * a.stride_t;
  const acc_t inv_t = static_cast<acc_t>(a.inv_t);
  const acc_t lo = static_cast<acc_t>(a.lo), hi = static_cast<acc_t>(a.hi);
  const acc_t log_lo = static_cast<acc_t>(log(a.lo)), log_hi = static_cast<acc_t>(log(a.hi));

  // pass 1: log-sum-exp of both rows
  JsPass1<acc_t> p{lse_empty<acc_t>(), lse_empty<acc_t>()};
  for_each_pack<G, VEC>(s, t, C, lane, [&](int64_t, const Vals& sv, const Vals& tv) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      p.ls = lse_push(p.ls, sv[k] * inv_t);
      p.lt = lse_push(p.lt, tv[k] * inv_t);
    }
  });
  p = group_allreduce<G>(p, smem1);
  const JsRow<acc_t> r{inv_t, lse_value(p.ls), lse_value(p.lt), lo, hi, log_lo, log_hi};

  // pass 2: the row's JS and <P, dP>, <Q, dQ>
  Sums3<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
  for_each_pack<G, VEC>(s, t, C, lane, [&](int64_t, const Vals& sv, const Vals& tv) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t pp, qq;
      const JsElem<acc_t> e = r.element(sv[k], tv[k], pp, qq);
      sums.f += e.f;
      sums.sp += pp * e.dp;
      sums.sq += qq * e.dq;
    }
  });
  sums = group_allreduce<G>(sums, smem2);
  if (lane == 0) store_partials(partials, row, acc_t(0), sums.f, acc_t(1));
  if (a.grad_s == nullptr && a.grad_t == nullptr) return;

  // pass 3: gradients (elements recomputed: cheaper than a round trip through memory)
  const acc_t wt = static_cast<acc_t>(a.w * a.inv_t);
  T* gs_row = grad_row<T>(a.grad_s, row, C);
  T* gt_row = grad_row<T>(a.grad_t, row, C);
  for_each_pack<G, VEC>(s, t, C, lane, [&](int64_t base, const Vals& sv, const Vals& tv) {
    acc_t gs[VEC], gt[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t pp, qq;
      const JsElem<acc_t> e = r.element(sv[k], tv[k], pp, qq);
      gs[k] = wt * pp * (e.dp - sums.sp);
      gt[k] = wt * qq * (e.dq - sums.sq);
    }
    if (gs_row) store_pack<T, VEC>(gs_row + base, gs);
    if (gt_row) store_pack<T, VEC>(gt_row + base, gt);
  });
}

// Batch sums of the [N, 3] row partials in a fixed order: thread i takes rows i, i + 256, ...,
// then a shared-memory tree. Deterministic; no atomics.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) row_sum_kernel(int64_t N, RowSumOutputs out) {
  __shared__ acc_t sh[3][kSumThreads];
  const acc_t* part = static_cast<const acc_t*>(out.partials);
  acc_t a = 0, b = 0, c = 0;
  for (int64_t i = threadIdx.x; i < N; i += kSumThreads) {
    a += part[i * 3 + 0];
    b += part[i * 3 + 1];
    c += part[i * 3 + 2];
  }
  sh[0][threadIdx.x] = a;
  sh[1][threadIdx.x] = b;
  sh[2][threadIdx.x] = c;
  __syncthreads();
  for (int o = kSumThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) {
      sh[0][threadIdx.x] += sh[0][threadIdx.x + o];
      sh[1][threadIdx.x] += sh[1][threadIdx.x + o];
      sh[2][threadIdx.x] += sh[2][threadIdx.x + o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t sa = sh[0][0], sb = sh[1][0], sc = sh[2][0];
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    *static_cast<acc_t*>(out.loss) = static_cast<acc_t>(out.w_a) * sa + static_cast<acc_t>(out.w_b) * sb;
    if (out.a_mean) *static_cast<acc_t*>(out.a_mean) = sa * inv_n;
    if (out.b_mean) *static_cast<acc_t*>(out.b_mean) = acc_t(0) - sb * inv_n;
    if (out.c_mean) *static_cast<acc_t*>(out.c_mean) = sc * inv_n;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) scale_grad_kernel(const typename AccOf<T>::type* g, const T* x, T* out,
                                                         int64_t n) {
  using acc_t = typename AccOf<T>::type;
  const acc_t gv = *g;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[k] = from_acc<T>(gv * to_acc(x[k]));
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <typename T>
bool aligned16(const void* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// The row kernel over the rows (p0, p1: the two logit matrices, row strides st0, st1), then the
// batch sum of its partials into `out`.
template <typename T, template <typename, int, int> class Kernel, typename Args>
cudaError_t launch_rows(const Args& a, const void* p0, int64_t st0, const void* p1, int64_t st1,
                        const RowSumOutputs& out, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const bool vec = a.C % V == 0 && aligned16<T>(p0, st0) && aligned16<T>(p1, st1);
  if (a.C <= 1024) {
    const unsigned grid = static_cast<unsigned>((a.N + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
    if (vec) Kernel<T, 32, V>::launch(a, out.partials, grid, stream);
    else Kernel<T, 32, 1>::launch(a, out.partials, grid, stream);
  } else {
    const unsigned grid = static_cast<unsigned>(a.N);
    if (vec) Kernel<T, kBlockGroup, V>::launch(a, out.partials, grid, stream);
    else Kernel<T, kBlockGroup, 1>::launch(a, out.partials, grid, stream);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  row_sum_kernel<typename AccOf<T>::type><<<1, kSumThreads, 0, stream>>>(a.N, out);
  return cudaGetLastError();
}

template <typename T, int G, int VEC>
struct KlLaunch {
  static void launch(const KlRowsArgs& a, void* partials, unsigned grid, cudaStream_t stream) {
    kl_rows_kernel<T, G, VEC><<<grid, GroupShape<G>::kThreads, 0, stream>>>(a, partials);
  }
};
template <typename T, int G, int VEC>
struct JsLaunch {
  static void launch(const JsRowsArgs& a, void* partials, unsigned grid, cudaStream_t stream) {
    js_rows_kernel<T, G, VEC><<<grid, GroupShape<G>::kThreads, 0, stream>>>(a, partials);
  }
};

template <typename T>
cudaError_t scale_typed(const void* g, const void* x, void* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  scale_grad_kernel<T><<<grid, 256, 0, stream>>>(static_cast<const typename AccOf<T>::type*>(g),
                                                 static_cast<const T*>(x), static_cast<T*>(out), n);
  return cudaGetLastError();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for the element type T of `dtype`
template <typename F>
cudaError_t with_dtype(LogitDtype dtype, const F& f) {
  switch (dtype) {
    case LogitDtype::f32: return f(TypeTag<float>{});
    case LogitDtype::f64: return f(TypeTag<double>{});
    case LogitDtype::f16: return f(TypeTag<__half>{});
    case LogitDtype::bf16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t kl_rows_launch(const KlRowsArgs& args, const RowSumOutputs& out, LogitDtype dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_rows<T, KlLaunch>(args, args.t, args.stride_t, args.s, args.stride_s, out, stream);
  });
}

cudaError_t js_rows_launch(const JsRowsArgs& args, const RowSumOutputs& out, LogitDtype dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_rows<T, JsLaunch>(args, args.s, args.stride_s, args.t, args.stride_t, out, stream);
  });
}

cudaError_t scale_grad_launch(const void* grad_loss, const void* x, void* out, int64_t n, LogitDtype dtype,
                              cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    return scale_typed<typename decltype(tag)::type>(grad_loss, x, out, n, stream);
  });
}

}  // namespace cuda
}  // namespace fastsynth
