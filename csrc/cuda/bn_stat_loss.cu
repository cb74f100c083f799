// CUDA kernels of the BatchNorm-statistics loss; see bn_stat_loss.cuh for the design.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/bn_stat_loss_math.h"
#include "common/welford.h"
#include "cuda/bn_stat_loss.cuh"

// The double-precision statistics kernel spills a few bytes on sm_90 under ptxas' default
// heuristics; FS_KERNEL_REGS (common/macros.h) gives it room.
#define FS_BN_STATS_BOUNDS FS_KERNEL_REGS(96, kBnThreads)

namespace fastsynth {
namespace cuda {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

// 16-byte vector of scalar_t for contiguous, aligned runs
template <typename T> struct alignas(16) Vec16 { T v[16 / sizeof(T)]; };

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(const Welford<acc_t>& w, int delta) {
  return Welford<acc_t>(__shfl_down_sync(0xffffffffu, w.mean, delta), __shfl_down_sync(0xffffffffu, w.m2, delta),
                        __shfl_down_sync(0xffffffffu, w.n, delta));
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> w) {
  for (int d = 16; d > 0; d >>= 1) w = welford_merge(w, shfl_down(w, d));
  return w;
}

// A thread's walk over a channel's N*P*Q values m = (n*P + p)*Q + q, from m0 in steps of
// `step`: (p, q) and the element offsets of NT tensors advance by carrying, so the loop has no
// division. The start and the step are split once per thread with 32-bit divisions (a 64-bit
// division is a called subroutine on the GPU): M < 2^31, checked on the host
// (bn_stat_loss_binding.cpp). The step is below P*Q or not, the carries handle both: dq < Q and
// dp < P, so each advance carries at most once from q into p and once from p into n.
template <int NT>
struct Walk {
  int32_t p, q;
  int64_t off[NT];
};

template <int NT>
struct WalkStep {
  int32_t dp, dq;
  int64_t step[NT];     // offset change of a step without carries
  int64_t carry_q[NT];  // q wraps: q -= Q, p += 1
  int64_t carry_p[NT];  // p wraps: p -= P, n += 1
};

// m = (n*P + p)*Q + q with 32-bit divisions (m < 2^31, P*Q < 2^31).
__device__ __forceinline__ void split_index(int64_t m, const BnLayer& L, uint32_t* n, uint32_t* p, uint32_t* q) {
  const uint32_t mm = uint32_t(m), PQ = uint32_t(L.P * L.Q), Q = uint32_t(L.Q);
  *n = mm / PQ;
  const uint32_t r = mm - *n * PQ;
  *p = r / Q;
  *q = r - *p * Q;
}

// Walk over x (NT = 1) or x and g (NT = 2).
template <int NT>
__device__ __forceinline__ void walk_init(const BnLayer& L, int64_t m0, int32_t step, Walk<NT>& w, WalkStep<NT>& s) {
  const int64_t sn[2] = {L.xs_n, L.gs_n}, sp[2] = {L.xs_p, L.gs_p}, sq[2] = {L.xs_q, L.gs_q};
  uint32_t n, p, q, dn, dp, dq;
  split_index(m0, L, &n, &p, &q);
  split_index(step, L, &dn, &dp, &dq);
  w.p = int32_t(p);
  w.q = int32_t(q);
  s.dp = int32_t(dp);
  s.dq = int32_t(dq);
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    w.off[t] = int64_t(n) * sn[t] + int64_t(p) * sp[t] + int64_t(q) * sq[t];
    s.step[t] = int64_t(dn) * sn[t] + int64_t(dp) * sp[t] + int64_t(dq) * sq[t];
    s.carry_q[t] = sp[t] - L.Q * sq[t];
    s.carry_p[t] = sn[t] - L.P * sp[t];
  }
}

template <int NT>
__device__ __forceinline__ void walk_advance(const BnLayer& L, Walk<NT>& w, const WalkStep<NT>& s) {
  w.q += s.dq;
  w.p += s.dp;
#pragma unroll
  for (int t = 0; t < NT; ++t) w.off[t] += s.step[t];
  if (w.q >= L.Q) {
    w.q -= int32_t(L.Q);
    ++w.p;
#pragma unroll
    for (int t = 0; t < NT; ++t) w.off[t] += s.carry_q[t];
  }
  if (w.p >= L.P) {
    w.p -= int32_t(L.P);
#pragma unroll
    for (int t = 0; t < NT; ++t) w.off[t] += s.carry_p[t];
  }
}

// f(off) at the values m_begin, m_begin + step, ... below m_end of a channel, off[t] the element
// offset of tensor t there (nothing when m_begin >= m_end).
template <int NT, typename F>
__device__ __forceinline__ void walk(const BnLayer& L, int64_t m_begin, int64_t m_end, int32_t step, F&& f) {
  if (m_begin >= m_end) return;
  Walk<NT> wk;
  WalkStep<NT> st;
  walk_init<NT>(L, m_begin, step, wk, st);
  for (int64_t m = m_begin; m < m_end; m += step) {
    f(wk.off);
    walk_advance<NT>(L, wk, st);
  }
}

template <typename scalar_t, typename acc_t>
__device__ void stats_plane(const BnLayer& L, const BnItem& it, Welford<acc_t>& w) {
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0 * L.xs_c;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk), m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  const int64_t PQ = L.P * L.Q;
  constexpr int V = 16 / sizeof(scalar_t);
  if (L.P == 1 && L.xs_q == 1) {
    // NCHW-like: the chunk is a union of contiguous runs (one per sample); vectorise the aligned middle
    int64_t m = m0;
    while (m < m1) {
      const int64_t n = uint32_t(m) / uint32_t(PQ), q0 = m - n * PQ, len = imin64(PQ - q0, m1 - m);  // M < 2^31
      const scalar_t* run = x + n * L.xs_n + q0;
      const int64_t head = imin64(len, (V - (reinterpret_cast<uintptr_t>(run) / sizeof(scalar_t)) % V) % V);
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) w.update(to_acc(run[i]));
      const int64_t nvec = (len - head) / V;
      const Vec16<scalar_t>* vrun = reinterpret_cast<const Vec16<scalar_t>*>(run + head);
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec16<scalar_t> v = vrun[i];
#pragma unroll
        for (int j = 0; j < V; ++j) w.update(to_acc(v.v[j]));
      }
      for (int64_t i = head + nvec * V + threadIdx.x; i < len; i += blockDim.x) w.update(to_acc(run[i]));
      m += len;
    }
  } else {
    walk<1>(L, m0 + threadIdx.x, m1, int32_t(blockDim.x), [&](const int64_t* off) { w.update(to_acc(x[off[0]])); });
  }
}

template <typename scalar_t, typename acc_t>
__global__ void FS_BN_STATS_BOUNDS bn_stats_kernel(const BnLayer* __restrict__ layers,
                                                              const BnItem* __restrict__ items, acc_t* partials,
                                                              int* counters, acc_t* mean_out, acc_t* var_out) {
  __shared__ acc_t sh_mean[kBnThreads], sh_m2[kBnThreads], sh_n[kBnThreads];
  __shared__ bool is_last;
  const BnItem it = items[blockIdx.x];
  const BnLayer& L = layers[it.layer];
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  Welford<acc_t> w;
  if (!L.channel_inner) {
    stats_plane<scalar_t, acc_t>(L, it, w);
    w = warp_merge(w);
    if (lane == 0) { sh_mean[wid] = w.mean; sh_m2[wid] = w.m2; sh_n[wid] = w.n; }
    __syncthreads();
    if (wid == 0) {
      w = lane < kBnThreads / 32 ? Welford<acc_t>(sh_mean[lane], sh_m2[lane], sh_n[lane]) : Welford<acc_t>();
      w = warp_merge(w);
      if (lane == 0) {
        acc_t* p = partials + 3 * (L.partial_offset + int64_t(it.c0) * L.chunks + it.chunk);
        p[0] = w.mean; p[1] = w.m2; p[2] = w.n;
      }
    }
  } else {
    // rows path: lane = channel within the block of 32, wid = row lane
    const int64_t c = it.c0 + lane;
    const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk), m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
    if (c < L.C) {
      const scalar_t* x = static_cast<const scalar_t*>(L.x) + c;
      walk<1>(L, m0 + wid, m1, kBnThreads / 32, [&](const int64_t* off) { w.update(to_acc(x[off[0]])); });
    }
    sh_mean[tid] = w.mean; sh_m2[tid] = w.m2; sh_n[tid] = w.n;
    __syncthreads();
    if (wid == 0) {
      for (int r = 1; r < kBnThreads / 32; ++r)
        w = welford_merge(w, Welford<acc_t>(sh_mean[r * 32 + lane], sh_m2[r * 32 + lane], sh_n[r * 32 + lane]));
      if (c < L.C) {
        acc_t* p = partials + 3 * (L.partial_offset + c * L.chunks + it.chunk);
        p[0] = w.mean; p[1] = w.m2; p[2] = w.n;
      }
    }
  }
  // grid-level merge: the last block of this (layer, channel group) merges its chunks
  if (L.chunks == 1) {
    if (tid < L.cblock && it.c0 + tid < L.C) {
      const int64_t c = it.c0 + tid;
      const acc_t* p = partials + 3 * (L.partial_offset + c * L.chunks);
      mean_out[L.chan_offset + c] = p[0];
      var_out[L.chan_offset + c] = p[1] / p[2];
    }
    return;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int64_t group = L.group_offset + it.c0 / L.cblock;
    is_last = atomicAdd(counters + group, 1) == static_cast<int>(L.chunks) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (tid < L.cblock && it.c0 + tid < L.C) {
    const int64_t c = it.c0 + tid;
    const acc_t* p = partials + 3 * (L.partial_offset + c * L.chunks);
    Welford<acc_t> acc;
    for (int64_t k = 0; k < L.chunks; ++k)
      acc = welford_merge(acc, Welford<acc_t>(__ldcg(p + 3 * k), __ldcg(p + 3 * k + 1), __ldcg(p + 3 * k + 2)));
    mean_out[L.chan_offset + c] = acc.mean;
    var_out[L.chan_offset + c] = acc.m2 / acc.n;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t grad_of(scalar_t xv, const BnGradCoeffs<acc_t>& cf) {
  if constexpr (sizeof(acc_t) == 8) return static_cast<scalar_t>(bn_grad_elem(to_acc(xv), cf));
  else return from_acc<scalar_t>(bn_grad_elem(to_acc(xv), cf));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBnThreads) bn_backward_kernel(const BnLayer* __restrict__ layers,
                                                                 const BnItem* __restrict__ items,
                                                                 const acc_t* __restrict__ mean,
                                                                 const acc_t* __restrict__ g_mean,
                                                                 const acc_t* __restrict__ g_var) {
  const BnItem it = items[blockIdx.x];
  const BnLayer& L = layers[it.layer];
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk), m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  const int64_t PQ = L.P * L.Q;
  const acc_t count = static_cast<acc_t>(L.M);
  if (!L.channel_inner) {
    const int64_t gc = L.chan_offset + it.c0;
    const BnGradCoeffs<acc_t> cf = bn_grad_coeffs<acc_t>(mean[gc], g_mean[gc], g_var[gc], count);
    const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0 * L.xs_c;
    scalar_t* g = static_cast<scalar_t*>(L.g) + it.c0 * L.gs_c;
    constexpr int V = 16 / sizeof(scalar_t);
    if (L.P == 1 && L.xs_q == 1 && L.gs_q == 1) {
      int64_t m = m0;
      while (m < m1) {
        const int64_t n = uint32_t(m) / uint32_t(PQ), q0 = m - n * PQ, len = imin64(PQ - q0, m1 - m);  // M < 2^31
        const scalar_t* xr = x + n * L.xs_n + q0;
        scalar_t* gr = g + n * L.gs_n + q0;
        const uintptr_t xa = reinterpret_cast<uintptr_t>(xr) / sizeof(scalar_t) % V;
        const bool same_phase = xa == reinterpret_cast<uintptr_t>(gr) / sizeof(scalar_t) % V;
        const int64_t head = same_phase ? imin64(len, (V - xa) % V) : len;
        for (int64_t i = threadIdx.x; i < head; i += blockDim.x) gr[i] = grad_of<scalar_t, acc_t>(xr[i], cf);
        const int64_t nvec = (len - head) / V;
        const Vec16<scalar_t>* xv = reinterpret_cast<const Vec16<scalar_t>*>(xr + head);
        Vec16<scalar_t>* gv = reinterpret_cast<Vec16<scalar_t>*>(gr + head);
        for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
          const Vec16<scalar_t> v = xv[i];
          Vec16<scalar_t> o;
#pragma unroll
          for (int j = 0; j < V; ++j) o.v[j] = grad_of<scalar_t, acc_t>(v.v[j], cf);
          gv[i] = o;
        }
        for (int64_t i = head + nvec * V + threadIdx.x; i < len; i += blockDim.x) gr[i] = grad_of<scalar_t, acc_t>(xr[i], cf);
        m += len;
      }
    } else {
      walk<2>(L, m0 + threadIdx.x, m1, int32_t(blockDim.x),
              [&](const int64_t* off) { g[off[1]] = grad_of<scalar_t, acc_t>(x[off[0]], cf); });
    }
  } else {
    const int64_t c = it.c0 + lane;
    if (c >= L.C) return;
    const int64_t gc = L.chan_offset + c;
    const BnGradCoeffs<acc_t> cf = bn_grad_coeffs<acc_t>(mean[gc], g_mean[gc], g_var[gc], count);
    const scalar_t* x = static_cast<const scalar_t*>(L.x) + c;
    scalar_t* g = static_cast<scalar_t*>(L.g) + c;
    walk<2>(L, m0 + wid, m1, kBnThreads / 32,
            [&](const int64_t* off) { g[off[1]] = grad_of<scalar_t, acc_t>(x[off[0]], cf); });
  }
}

template <typename scalar_t>
cudaError_t launch_stats(const BnLayer* l, const BnItem* it, int64_t n, void* partials, int* counters, void* mean,
                         void* var, cudaStream_t s) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (n == 0) return cudaSuccess;
  bn_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n), kBnThreads, 0, s>>>(
      l, it, static_cast<acc_t*>(partials), counters, static_cast<acc_t*>(mean), static_cast<acc_t*>(var));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const BnLayer* l, const BnItem* it, int64_t n, const void* mean, const void* gm,
                            const void* gv, cudaStream_t s) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (n == 0) return cudaSuccess;
  bn_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n), kBnThreads, 0, s>>>(
      l, it, static_cast<const acc_t*>(mean), static_cast<const acc_t*>(gm), static_cast<const acc_t*>(gv));
  return cudaGetLastError();
}

__global__ void bn_write_bytes_kernel(unsigned char* __restrict__ dst, BnByteChunk chunk, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = chunk.b[i];
}

__global__ void bn_set_pointers_kernel(BnLayer* __restrict__ layers, BnPointerChunk chunk, int n) {
  const int i = threadIdx.x;
  if (i < n) {
    layers[i].x = chunk.x[i];
    layers[i].g = chunk.g[i];
  }
}

}  // namespace

cudaError_t bn_write_bytes(void* dst, const BnByteChunk& chunk, int n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  bn_write_bytes_kernel<<<1, 256, 0, stream>>>(static_cast<unsigned char*>(dst), chunk, n);
  return cudaGetLastError();
}

cudaError_t bn_set_pointers(BnLayer* layers, int64_t first, const BnPointerChunk& chunk, int n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  bn_set_pointers_kernel<<<1, 128, 0, stream>>>(layers + first, chunk, n);
  return cudaGetLastError();
}

int64_t bn_plan(std::vector<BnLayer>& layers, std::vector<BnItem>& items, int64_t* n_groups, int64_t* n_channels) {
  constexpr int64_t kPlaneChunk = int64_t(kBnThreads) * 64;   // values of one channel per block
  constexpr int64_t kRowsChunk = 1024;                        // rows (x 32 channels) per block
  int64_t partials = 0, groups = 0, channels = 0;
  items.clear();
  for (size_t l = 0; l < layers.size(); ++l) {
    BnLayer& L = layers[l];
    L.cblock = L.channel_inner ? kBnRowChannels : 1;
    L.chunks = num_chunks<int64_t>(L.M, L.channel_inner ? kRowsChunk : kPlaneChunk);
    L.chan_offset = channels;
    L.partial_offset = partials;
    L.group_offset = groups;
    channels += L.C;
    partials += L.C * L.chunks;
    groups += (L.C + L.cblock - 1) / L.cblock;
    for (int64_t c0 = 0; c0 < L.C; c0 += L.cblock)
      for (int64_t k = 0; k < L.chunks; ++k) items.push_back(BnItem{static_cast<int32_t>(l), static_cast<int32_t>(c0), k});
  }
  *n_groups = groups;
  *n_channels = channels;
  return partials;
}

cudaError_t bn_stats_multi_launch(const BnLayer* d_layers, const BnItem* d_items, int64_t n_items, void* partials,
                                  int* counters, void* mean, void* var, BnDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case BnDtype::f32: return launch_stats<float>(d_layers, d_items, n_items, partials, counters, mean, var, stream);
    case BnDtype::f64: return launch_stats<double>(d_layers, d_items, n_items, partials, counters, mean, var, stream);
    case BnDtype::f16: return launch_stats<__half>(d_layers, d_items, n_items, partials, counters, mean, var, stream);
    case BnDtype::bf16: return launch_stats<__nv_bfloat16>(d_layers, d_items, n_items, partials, counters, mean, var, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bn_backward_multi_launch(const BnLayer* d_layers, const BnItem* d_items, int64_t n_items,
                                     const void* mean, const void* g_mean, const void* g_var, BnDtype dtype,
                                     cudaStream_t stream) {
  switch (dtype) {
    case BnDtype::f32: return launch_backward<float>(d_layers, d_items, n_items, mean, g_mean, g_var, stream);
    case BnDtype::f64: return launch_backward<double>(d_layers, d_items, n_items, mean, g_mean, g_var, stream);
    case BnDtype::f16: return launch_backward<__half>(d_layers, d_items, n_items, mean, g_mean, g_var, stream);
    case BnDtype::bf16: return launch_backward<__nv_bfloat16>(d_layers, d_items, n_items, mean, g_mean, g_var, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastsynth
