// CUDA kernel of fastsynth.ops.reinit_; see reinit.cuh. Bit-identical to the CPU kernel: every
// float operation goes through the exactly rounded intrinsics of philox.h (unaffected by
// --use_fast_math), and conversions to fp16/bf16 round to nearest even like c10::Half/BFloat16.
// Caveat: under --use_fast_math (-ftz) a float32 result that is subnormal (|v| < 1.2e-38, only
// possible with a tiny std or bound) is flushed to zero here but kept by the CPU kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/philox.h"
#include "cuda/reinit.cuh"

namespace fastsynth {
namespace cuda {
namespace {

namespace ph = fastsynth::philox;

__device__ __forceinline__ int find_tensor(const ReinitTable& tab, int64_t e) {
  // first tensor whose end is > e (ends are increasing; empty tensors are never found)
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tab.end[mid] > e) hi = mid; else lo = mid + 1;
  }
  return lo;
}

__device__ __forceinline__ void store_lane(const ReinitTable& tab, int t, int64_t local, float draw) {
  const int dist = tab.dist[t];
  const double lo = tab.lo[t], hi = tab.hi[t];
  const double scale = dist == ph::kNormal ? hi : hi - lo;
  switch (tab.dtype[t]) {
    case kF64: {
      double v = ph::affine_f64(dist, draw, lo, scale);
      if (dist == ph::kUniform && v >= hi)
        v = __longlong_as_double(static_cast<long long>(ph::step_down_bits<uint64_t>(
            static_cast<uint64_t>(__double_as_longlong(v)))));
      static_cast<double*>(tab.ptr[t])[local] = v;
      break;
    }
    case kF32: {
      float v = ph::affine_f32(dist, draw, static_cast<float>(lo), static_cast<float>(scale));
      if (dist == ph::kUniform && static_cast<double>(v) >= hi)
        v = __uint_as_float(ph::step_down_bits<uint32_t>(__float_as_uint(v)));
      static_cast<float*>(tab.ptr[t])[local] = v;
      break;
    }
    case kF16: {
      __half v = __float2half_rn(ph::affine_f32(dist, draw, static_cast<float>(lo), static_cast<float>(scale)));
      if (dist == ph::kUniform && static_cast<double>(__half2float(v)) >= hi)
        v = __ushort_as_half(ph::step_down_bits<unsigned short>(__half_as_ushort(v)));
      static_cast<__half*>(tab.ptr[t])[local] = v;
      break;
    }
    default: {  // kBF16
      __nv_bfloat16 v =
          __float2bfloat16_rn(ph::affine_f32(dist, draw, static_cast<float>(lo), static_cast<float>(scale)));
      if (dist == ph::kUniform && static_cast<double>(__bfloat162float(v)) >= hi)
        v = __ushort_as_bfloat16(ph::step_down_bits<unsigned short>(__bfloat16_as_ushort(v)));
      static_cast<__nv_bfloat16*>(tab.ptr[t])[local] = v;
      break;
    }
  }
}

__global__ void __launch_bounds__(256) reinit_kernel(const ReinitTable tab, const int64_t* __restrict__ seed_ptr,
                                                     int64_t g_begin, int64_t g_end) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t first = tab.begin[0], last = tab.end[tab.count - 1];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = g_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < g_end; g += stride) {
    const ph::U32x4 x = ph::group_bits(static_cast<uint64_t>(g), seed);
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (tab.any_normal) {
      ph::box_muller(x.v[0], x.v[1], &z[0], &z[1]);
      ph::box_muller(x.v[2], x.v[3], &z[2], &z[3]);
    }
    int t = find_tensor(tab, 4 * g < first ? first : 4 * g);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = 4 * g + l;
      if (e < first || e >= last) continue;
      while (tab.end[t] <= e) ++t;  // the group may straddle tensors
      const float draw = tab.dist[t] == ph::kNormal ? z[l] : ph::uniform01(x.v[l]);
      store_lane(tab, t, e - tab.begin[t], draw);
    }
  }
}

}  // namespace

cudaError_t launch_reinit(const ReinitTable& table, const int64_t* seed, cudaStream_t stream) {
  if (table.count <= 0) return cudaSuccess;
  const int64_t first = table.begin[0], last = table.end[table.count - 1];
  if (last <= first) return cudaSuccess;
  const int64_t g_begin = first / 4, g_end = (last + 3) / 4;
  const int threads = 256;
  const int64_t want = (g_end - g_begin + threads - 1) / threads;
  int device = 0, sms = 80;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t cap = static_cast<int64_t>(sms) * 16;  // grid-stride beyond 16 blocks per SM
  const unsigned blocks = static_cast<unsigned>(want < cap ? want : cap);
  reinit_kernel<<<blocks, threads, 0, stream>>>(table, seed, g_begin, g_end);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastsynth
