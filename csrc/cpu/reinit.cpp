// CPU kernel of fastsynth.ops.reinit_: fills a list of tensors in place from the counter-based
// Philox stream of csrc/common/philox.h (one parallel pass over the concatenated index space).
//
// Work is cut into blocks of kBlock consecutive global elements (aligned to Philox groups of 4).
// A block first generates its kBlock draws into a stack buffer with straight-line loops the
// compiler vectorises (Philox rounds, then Box-Muller on whole arrays), then scatters them into
// the one or few tensors that the block overlaps, converting to each tensor's dtype.
//
// Bit-identity with the CUDA kernel needs every float operation of philox.h to be one IEEE
// rounding: no a*b+c contracted into an FMA. The x86-64 baseline and the AVX2/AVX-512F clones
// below have no FMA instructions enabled, and contraction is switched off explicitly for other
// compilers/targets. Without math-errno, sqrt is a plain instruction and the Box-Muller loops
// vectorise (they are branch-free by construction).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-math-errno")
#endif

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "binding/reinit.h"
#include "common/philox.h"
#include "cpu/simd.h"

namespace fastsynth {
namespace {

namespace ph = fastsynth::philox;

constexpr int64_t kGroups = 256;          // Philox groups per block
constexpr int64_t kBlock = 4 * kGroups;   // elements per block
constexpr int64_t kStreamMinElements = int64_t{1} << 21;  // 8 MB of float32

// ---- Philox lanes of kGroups consecutive groups g0 .. g0+kGroups-1 (g0 a multiple of 16) ----
// Compilers vectorise the 32x32->64-bit products of Philox poorly, so the x86 paths use the
// even/odd-lane unsigned multiply directly (same integer results as philox4x32_10, checked by
// tests/test_reinit.py against the eager reference).
void philox_lanes_generic(int64_t g0, uint64_t seed, uint32_t* x0, uint32_t* x1, uint32_t* x2, uint32_t* x3) {
  for (int64_t i = 0; i < kGroups; ++i) {
    const ph::U32x4 r = ph::group_bits(static_cast<uint64_t>(g0 + i), seed);
    x0[i] = r.v[0];
    x1[i] = r.v[1];
    x2[i] = r.v[2];
    x3[i] = r.v[3];
  }
}

#ifdef FS_X86_GCC
#define FS_HAVE_X86_PHILOX 1
// 0xB1 swaps the two 32-bit words of each 64-bit lane. Masked swaps merge the halves of the
// even- and odd-lane products in one instruction each (shuffles run on a different port than the
// multiplies, the 512-bit shifts do not).
FS_TARGET_AVX512F inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const auto swap = static_cast<_MM_PERM_ENUM>(0xB1);
  const __m512i even = _mm512_mul_epu32(a, m);                              // 64-bit products of lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, swap), m);  // lanes 1, 3, ...
  *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, swap);  // odd lanes: low word of the odd product
  *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, swap);  // even lanes: high word of the even product
}

// Four independent 16-lane counters per iteration: one Philox round is a chain of multiply,
// shift/blend and xor (about 8 cycles of latency), so a single vector leaves the multiplier idle.
FS_TARGET_AVX512F void philox_lanes_avx512(int64_t g0, uint64_t seed, uint32_t* x0, uint32_t* x1,
                                                             uint32_t* x2, uint32_t* x3) {
  constexpr int kWays = 4;
  static_assert(kGroups % (16 * kWays) == 0, "kGroups must be a multiple of 64");
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(ph::kM0)), m1 = _mm512_set1_epi32(static_cast<int>(ph::kM1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = 0; i < kGroups; i += 16 * kWays) {
    __m512i c0[kWays], c1[kWays], c2[kWays], c3[kWays];
    for (int w = 0; w < kWays; ++w) {
      const uint64_t g = static_cast<uint64_t>(g0 + i + 16 * w);  // a multiple of 16: no wrap inside the vector
      c0[w] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
      c1[w] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
      c2[w] = _mm512_setzero_si512();
      c3[w] = _mm512_setzero_si512();
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k0 += ph::kW0;
        k1 += ph::kW1;
      }
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int w = 0; w < kWays; ++w) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo16(c0[w], m0, &hi0, &lo0);
        mulhilo16(c2[w], m1, &hi1, &lo1);
        // 0x96 = a ^ b ^ c in one ternary-logic instruction
        c0[w] = _mm512_ternarylogic_epi32(hi1, c1[w], key0, 0x96);
        c2[w] = _mm512_ternarylogic_epi32(hi0, c3[w], key1, 0x96);
        c1[w] = lo1;
        c3[w] = lo0;
      }
    }
    for (int w = 0; w < kWays; ++w) {
      _mm512_storeu_si512(x0 + i + 16 * w, c0[w]);
      _mm512_storeu_si512(x1 + i + 16 * w, c1[w]);
      _mm512_storeu_si512(x2 + i + 16 * w, c2[w]);
      _mm512_storeu_si512(x3 + i + 16 * w, c3[w]);
    }
  }
}

FS_TARGET_AVX2 inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

FS_TARGET_AVX2 void philox_lanes_avx2(int64_t g0, uint64_t seed, uint32_t* x0, uint32_t* x1,
                                                        uint32_t* x2, uint32_t* x3) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(ph::kM0)), m1 = _mm256_set1_epi32(static_cast<int>(ph::kM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < kGroups; i += 8) {
    const uint64_t g = static_cast<uint64_t>(g0 + i);
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k0 += ph::kW0;
        k1 += ph::kW1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, &hi0, &lo0);
      mulhilo8(c2, m1, &hi1, &lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0 + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1 + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x2 + i), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x3 + i), c3);
  }
}
#endif

using PhiloxLanesFn = void (*)(int64_t, uint64_t, uint32_t*, uint32_t*, uint32_t*, uint32_t*);

PhiloxLanesFn pick_philox_lanes() {
#ifdef FS_HAVE_X86_PHILOX
  if (simd::cpu_has_avx512f()) return philox_lanes_avx512;
  if (simd::cpu_has_avx2()) return philox_lanes_avx2;
#endif
  return philox_lanes_generic;
}

// Box-Muller / uniform conversion of the lanes of one block: kBlock normals into `normal` when
// want_normal, kBlock uniforms into `uniform` when want_uniform. Branch-free loops, vectorised
// per ISA by the clones.
// No FMA-capable clone (FS_SIMD_CLONES_NO_FMA): the transforms stay bit-identical to the CUDA kernel.
FS_SIMD_CLONES_NO_FMA
void transform_block(const uint32_t* x0, const uint32_t* x1, const uint32_t* x2, const uint32_t* x3,
                     bool want_normal, bool want_uniform, float* normal, float* uniform) {
  if (want_normal) {
    float z0[kGroups], z1[kGroups], z2[kGroups], z3[kGroups];
    for (int64_t i = 0; i < kGroups; ++i) ph::box_muller(x0[i], x1[i], &z0[i], &z1[i]);
    for (int64_t i = 0; i < kGroups; ++i) ph::box_muller(x2[i], x3[i], &z2[i], &z3[i]);
    for (int64_t i = 0; i < kGroups; ++i) {
      normal[4 * i + 0] = z0[i];
      normal[4 * i + 1] = z1[i];
      normal[4 * i + 2] = z2[i];
      normal[4 * i + 3] = z3[i];
    }
  }
  if (want_uniform) {
    for (int64_t i = 0; i < kGroups; ++i) {
      uniform[4 * i + 0] = ph::uniform01(x0[i]);
      uniform[4 * i + 1] = ph::uniform01(x1[i]);
      uniform[4 * i + 2] = ph::uniform01(x2[i]);
      uniform[4 * i + 3] = ph::uniform01(x3[i]);
    }
  }
}

template <typename T, typename Bits>
T from_bits(Bits b) {
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
template <typename Bits, typename T>
Bits to_bits(T v) {
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// Convert count draws to dtype T and store them (T = float, c10::Half, c10::BFloat16). Uniform
// values that round up to b step to the next value below it, branch-free so the loop vectorises.
template <typename T, typename Bits>
void store_f32(T* dst, const float* draw, int64_t count, int dist, double lo, double hi) {
  const float lo_f = static_cast<float>(lo);
  const float scale_f = static_cast<float>(dist == ph::kNormal ? hi : hi - lo);
  if (dist != ph::kUniform) {
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<T>(ph::affine_f32(dist, draw[i], lo_f, scale_f));
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const T v = static_cast<T>(ph::affine_f32(dist, draw[i], lo_f, scale_f));
    const Bits bits = to_bits<Bits>(v);
    const bool up = static_cast<double>(static_cast<float>(v)) >= hi;
    dst[i] = from_bits<T>(up ? ph::step_down_bits<Bits>(bits) : bits);
  }
}

void store_f64(double* dst, const float* draw, int64_t count, int dist, double lo, double hi) {
  const double scale = dist == ph::kNormal ? hi : hi - lo;
  if (dist != ph::kUniform) {
    for (int64_t i = 0; i < count; ++i) dst[i] = ph::affine_f64(dist, draw[i], lo, scale);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const double v = ph::affine_f64(dist, draw[i], lo, scale);
    const uint64_t bits = to_bits<uint64_t>(v);
    dst[i] = from_bits<double>(v >= hi ? ph::step_down_bits<uint64_t>(bits) : bits);
  }
}

// float32 outputs on AVX-512 machines: 16 values per instruction for every distribution, with
// plain or (for large lists) non-temporal stores. A large re-initialisation writes more than the
// caches hold, and a plain store first reads each line in (read-for-ownership), doubling the
// memory traffic. Same arithmetic as store_f32 (mul then add, two roundings; uniform values that
// reach b step down), so every path gives the same bits.
#ifdef FS_X86_GCC
#define FS_HAVE_AVX512_STORE 1
FS_TARGET_AVX512F inline __m512 value16_f32(__m512 draw, int dist, __m512 lo, __m512 scale,
                                                             __m512 hi_ceil) {
  if (dist == ph::kConstant) return lo;
  const __m512 v = _mm512_add_ps(lo, _mm512_mul_ps(scale, draw));
  if (dist != ph::kUniform) return v;
  // (double)v >= b  <=>  v >= hi_ceil, the smallest float32 >= b (v is a float32)
  const __mmask16 up = _mm512_cmp_ps_mask(v, hi_ceil, _CMP_GE_OQ);
  if (up == 0) return v;
  const __m512i bits = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __mmask16 zero = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                 _mm512_setzero_si512());
  const __mmask16 negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
  // step_down_bits: magnitude +1 for negatives, -1 for positives, +-0 -> -smallest subnormal
  __m512i stepped = _mm512_mask_add_epi32(_mm512_sub_epi32(bits, one), negative, bits, one);
  stepped = _mm512_mask_mov_epi32(stepped, zero, _mm512_set1_epi32(static_cast<int>(0x80000001u)));
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(bits, up, stepped));
}

FS_TARGET_AVX512F void store_f32_avx512(float* dst, const float* draw, int64_t count, int dist,
                                                          double lo, double hi, bool stream) {
  const float lo_f = static_cast<float>(lo);
  const float scale_f = static_cast<float>(dist == ph::kNormal ? hi : hi - lo);
  float hi_ceil = static_cast<float>(hi);
  if (static_cast<double>(hi_ceil) < hi) hi_ceil = std::nextafter(hi_ceil, INFINITY);
  const __m512 lo_v = _mm512_set1_ps(lo_f), scale_v = _mm512_set1_ps(scale_f), hi_v = _mm512_set1_ps(hi_ceil);
  int64_t i = 0;
  if (stream) {
    // up to a 64-byte line with a masked plain store, then whole lines non-temporally
    const int64_t head = std::min<int64_t>(count, ((64 - (reinterpret_cast<uintptr_t>(dst) & 63u)) & 63u) / 4);
    if (head > 0) {
      const __mmask16 m = static_cast<__mmask16>((1u << head) - 1u);
      _mm512_mask_storeu_ps(dst, m, value16_f32(_mm512_maskz_loadu_ps(m, draw), dist, lo_v, scale_v, hi_v));
    }
    i = head;
    for (; i + 16 <= count; i += 16)
      _mm512_stream_ps(dst + i, value16_f32(_mm512_loadu_ps(draw + i), dist, lo_v, scale_v, hi_v));
  } else {
    for (; i + 16 <= count; i += 16)
      _mm512_storeu_ps(dst + i, value16_f32(_mm512_loadu_ps(draw + i), dist, lo_v, scale_v, hi_v));
  }
  if (i < count) {
    const __mmask16 m = static_cast<__mmask16>((1u << (count - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, m, value16_f32(_mm512_maskz_loadu_ps(m, draw + i), dist, lo_v, scale_v, hi_v));
  }
}
#endif

void store(const ReinitEntry& e, int64_t local, const float* draw, int64_t count, bool avx512, bool stream) {
  const int dist = e.dist;
  switch (e.dtype) {
    case at::kFloat:
#ifdef FS_HAVE_AVX512_STORE
      if (avx512) {
        store_f32_avx512(static_cast<float*>(e.ptr) + local, draw, count, dist, e.lo, e.hi, stream);
        break;
      }
#endif
      store_f32<float, uint32_t>(static_cast<float*>(e.ptr) + local, draw, count, dist, e.lo, e.hi);
      break;
    case at::kDouble:
      store_f64(static_cast<double*>(e.ptr) + local, draw, count, dist, e.lo, e.hi);
      break;
    case at::kHalf:
      store_f32<c10::Half, uint16_t>(static_cast<c10::Half*>(e.ptr) + local, draw, count, dist, e.lo, e.hi);
      break;
    case at::kBFloat16:
      store_f32<c10::BFloat16, uint16_t>(static_cast<c10::BFloat16*>(e.ptr) + local, draw, count, dist, e.lo,
                                         e.hi);
      break;
    default:
      break;  // rejected by reinit_entries
  }
}

void reinit_cpu(at::TensorList tensors, const at::Tensor& seed, std::vector<std::string> dist,
                c10::ArrayRef<double> a, c10::ArrayRef<double> b) {
  const std::vector<ReinitEntry> entries = reinit_entries(tensors, seed, dist, a, b);
  TORCH_CHECK(seed.device().is_cpu(), "fastsynth::reinit_ (CPU): seed must be a CPU tensor");
  const uint64_t seed_value = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  const int64_t total = entries.empty() ? 0 : entries.back().end;
  if (total == 0) return;
  const int64_t num_blocks = (total + kBlock - 1) / kBlock;
  static const PhiloxLanesFn philox_lanes = pick_philox_lanes();
  // The AVX-512 stores share the CPU check of the Philox pick above. Streaming stores only pay off
  // when the output does not stay in cache anyway (L2 is 2 MB per core here; a small
  // re-initialisation is read back right away by the next forward).
#ifdef FS_HAVE_AVX512_STORE
  const bool avx512 = philox_lanes == philox_lanes_avx512;
#else
  const bool avx512 = false;
#endif
  const bool stream = avx512 && total >= kStreamMinElements;

  at::parallel_for(0, num_blocks, 16, [&](int64_t b0, int64_t b1) {
    alignas(64) uint32_t x0[kGroups], x1[kGroups], x2[kGroups], x3[kGroups];
    alignas(64) float normal[kBlock];
    alignas(64) float uniform[kBlock];
    std::fill(normal, normal + kBlock, 0.0f);  // defined values for constant fills (unused there)
    std::fill(uniform, uniform + kBlock, 0.0f);
    // first tensor that ends after the first element of this range
    size_t t = std::upper_bound(entries.begin(), entries.end(), b0 * kBlock,
                                [](int64_t pos, const ReinitEntry& e) { return pos < e.end; }) -
               entries.begin();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t lo = blk * kBlock, hi = std::min(total, lo + kBlock);
      while (t < entries.size() && entries[t].end <= lo) ++t;
      bool want_normal = false, want_uniform = false;
      for (size_t u = t; u < entries.size() && entries[u].begin < hi; ++u) {
        want_normal |= entries[u].dist == ph::kNormal && entries[u].end > entries[u].begin;
        want_uniform |= entries[u].dist == ph::kUniform && entries[u].end > entries[u].begin;
      }
      if (want_normal || want_uniform) {
        philox_lanes(blk * kGroups, seed_value, x0, x1, x2, x3);
        transform_block(x0, x1, x2, x3, want_normal, want_uniform, normal, uniform);
      }
      for (size_t u = t; u < entries.size() && entries[u].begin < hi; ++u) {
        const int64_t s = std::max(lo, entries[u].begin), e = std::min(hi, entries[u].end);
        const float* draw = entries[u].dist == ph::kNormal ? normal : uniform;
        if (e > s) store(entries[u], s - entries[u].begin, draw + (s - lo), e - s, avx512, stream);
      }
    }
#ifdef FS_HAVE_AVX512_STORE
    if (stream) _mm_sfence();  // order the weakly ordered streaming stores before the join
#endif
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) { m.impl("reinit_", &reinit_cpu); }

}  // namespace fastsynth
