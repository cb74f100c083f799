// Counter-based random numbers shared by the CPU and CUDA re-initialisation kernels
// (fastsynth.ops.reinit_): Philox4x32-10 plus a Box-Muller transform written with exactly
// rounded float32 operations only, so that the host and the device produce bit-identical values.
//
// Stream layout (the contract of fastsynth.ops.reinit_):
//   key     = (seed & 0xffffffff, seed >> 32)                   seed: int64, read from a tensor
//   counter = (g & 0xffffffff, g >> 32, 0, 0)                   g = element_index / 4
//   lanes   = philox4x32_10(counter, key) = (x0, x1, x2, x3)    element 4g+l takes lane l
// where element_index is the element's offset in the concatenation of the tensor list.
//   uniform:  u_l = (x_l >> 8) * 2^-24                          in [0, 1), 24 random bits
//   normal:   (z0, z1) = box_muller(x0, x1), (z2, z3) = box_muller(x2, x3) with
//             r = sqrt(-2 ln u1), u1 = ((x_r >> 8) + 1) * 2^-24 in (0, 1]
//             theta = 2 pi u2,    u2 = (x_a >> 8) * 2^-24      in [0, 1)
//             z_even = r cos(theta), z_odd = r sin(theta)
//
// Why not logf/sinf/cosf: their last bit differs between glibc, CUDA's libdevice and
// --use_fast_math. Here ln, sin and cos are short polynomials evaluated with +, -, *, / and sqrt
// only, each correctly rounded IEEE float32 on both sides: on the device through the _rn
// intrinsics (never contracted into FMAs, unaffected by --use_fast_math); on the host through
// plain operators in a translation unit compiled without FP contraction (see fs_no_contract in
// csrc/cpu/reinit.cpp). The polynomials are accurate to a few float32 ulps (|error| < 2e-7 on
// cos/sin, < 3e-7 relative on ln), far below what a statistical test of N(0,1) can see.
// The same arithmetic is mirrored op for op by the eager reference in fastsynth/ops/reinit.py.
#pragma once

#include <stdint.h>
#include <string.h>

#include "common/macros.h"

namespace fastsynth {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // Philox4x32 multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments (golden ratio, sqrt(3)-1)
constexpr uint32_t kW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

FS_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11; Random123's philox4x32_R(10, ...)).
FS_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, &hi0, &lo0);
    mulhilo32(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// The four lanes of group g (elements 4g .. 4g+3) for a 64-bit seed.
FS_HD U32x4 group_bits(uint64_t group, uint64_t seed) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ---- exactly rounded float32 primitives (never contracted into an FMA) ----
#if defined(__CUDA_ARCH__)
FS_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
FS_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
FS_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
FS_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
FS_HD float fsqrt(float a) { return __fsqrt_rn(a); }
FS_HD uint32_t float_bits(float f) { return __float_as_uint(f); }
FS_HD float bits_float(uint32_t u) { return __uint_as_float(u); }
#else
FS_HD float fadd(float a, float b) { return a + b; }
FS_HD float fsub(float a, float b) { return a - b; }
FS_HD float fmul(float a, float b) { return a * b; }
FS_HD float fdiv(float a, float b) { return a / b; }
// Exactly rounded float32 sqrt without libm, for builds with math-errno on: there sqrtf's errno
// branch keeps compilers from vectorising the Box-Muller loops. Four Newton steps on 1/sqrt in
// float64 from a bit-trick start (3.4% -> 1.8e-3 -> 4.6e-6 -> 3e-11 -> rounding level) give
// sqrt(a) to a few float64 ulps, which rounds to the correctly rounded float32 value (checked
// exhaustively over [2^-23, 64) in csrc/tests/test_philox.cpp).
FS_HD float fsqrt_newton(float a) {
  const double d = static_cast<double>(a);
  uint64_t bits;
  memcpy(&bits, &d, sizeof bits);
  bits = 0x5fe6eb50c7b537a9ull - (bits >> 1);
  double y;
  memcpy(&y, &bits, sizeof y);
  y = y * (1.5 - 0.5 * d * y * y);
  y = y * (1.5 - 0.5 * d * y * y);
  y = y * (1.5 - 0.5 * d * y * y);
  y = y * (1.5 - 0.5 * d * y * y);
  return static_cast<float>(d * y);  // a = +-0: y stays finite (1.3e154 * 1.5^4), d * y = +-0
}
// The extension is built with -fno-math-errno (setup.py): then sqrt is the IEEE instruction
// (sqrtss / vsqrtps, correctly rounded like the device's __fsqrt_rn) and still vectorises; the
// Newton form costs twice the whole Box-Muller transform.
FS_HD float fsqrt(float a) {
#if defined(__NO_MATH_ERRNO__)
  return __builtin_sqrtf(a);
#else
  return fsqrt_newton(a);
#endif
}
FS_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
FS_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
#endif

// float32 constants (exact float32 values, written in hex so both compilers read the same bits)
constexpr float kTwoPowMinus24 = 0x1p-24f;
constexpr float kTwoPowMinus22 = 0x1p-22f;
constexpr float kLn2Hi = 0x1.62e4p-1f;       // 0.693145751953125, few bits: e * kLn2Hi is exact
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;    // ln 2 - kLn2Hi
constexpr float kL3 = 0x1.555556p-1f;        // 2/3
constexpr float kL5 = 0x1.99999ap-2f;        // 2/5
constexpr float kL7 = 0x1.24924ap-2f;        // 2/7
constexpr float kL9 = 0x1.c71c72p-3f;        // 2/9
constexpr float kHalfPi = 0x1.921fb6p+0f;    // pi/2
constexpr float kS1 = -0x1.555556p-3f;       // -1/3!
constexpr float kS2 = 0x1.111112p-7f;        // 1/5!
constexpr float kS3 = -0x1.a01a02p-13f;      // -1/7!
constexpr float kS4 = 0x1.71de3ap-19f;       // 1/9!
constexpr float kC1 = -0.5f;                 // -1/2!
constexpr float kC2 = 0x1.555556p-5f;        // 1/4!
constexpr float kC3 = -0x1.6c16c2p-10f;      // -1/6!
constexpr float kC4 = 0x1.a01a02p-16f;       // 1/8!
constexpr float kC5 = -0x1.27e4fcp-22f;      // -1/10!

// Uniform in [0, 1) from the top 24 bits (exact in float32).
FS_HD float uniform01(uint32_t x) { return static_cast<float>(x >> 8) * kTwoPowMinus24; }

// ln(u) for a normal float u > 0 (here u in [2^-24, 1]):
//   u = m 2^e with m in [sqrt(1/2), sqrt(2)],  s = (m - 1)/(m + 1),
//   ln m = 2s + s * s^2 (2/3 + s^2 (2/5 + s^2 (2/7 + s^2 2/9))),   |s| <= 0.1716
//   ln u = e ln2_hi + (ln m + e ln2_lo)
FS_HD float log_f32(float u) {
  const uint32_t bits = float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 127;
  uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;  // m in [1, 2)
  const uint32_t big = mbits > 0x3fb504f3u ? 1u : 0u;  // m > sqrt(2): use m/2, e+1 (branch-free)
  mbits -= big << 23;
  e += static_cast<int32_t>(big);
  const float m = bits_float(mbits);
  const float s = fdiv(fsub(m, 1.0f), fadd(m, 1.0f));
  const float s2 = fmul(s, s);
  float p = fmul(s2, kL9);
  p = fmul(s2, fadd(kL7, p));
  p = fmul(s2, fadd(kL5, p));
  p = fmul(s2, fadd(kL3, p));
  const float lnm = fadd(fadd(s, s), fmul(s, p));
  const float ef = static_cast<float>(e);
  return fadd(fmul(ef, kLn2Hi), fadd(lnm, fmul(ef, kLn2Lo)));
}

// cos(2 pi u) and sin(2 pi u) for u = k 2^-24, k = x >> 8 in [0, 2^24):
//   4u = j + r with j = round(4u) (quarter turns), r in [-1/2, 1/2] exact;  a = r pi/2
//   sin a, cos a by Taylor polynomials on |a| <= pi/4, then rotated by j quarter turns.
FS_HD void sincos_2pi(uint32_t x, float* c, float* s) {
  const int32_t k = static_cast<int32_t>(x >> 8);
  const int32_t j = (k + (1 << 21)) >> 22;                     // 0 .. 4
  const float r = static_cast<float>(k - j * (1 << 22)) * kTwoPowMinus22;
  const float a = fmul(r, kHalfPi);
  const float a2 = fmul(a, a);
  float ps = fmul(a2, kS4);
  ps = fmul(a2, fadd(kS3, ps));
  ps = fmul(a2, fadd(kS2, ps));
  ps = fadd(kS1, ps);
  const float sa = fadd(a, fmul(fmul(a, a2), ps));
  float pc = fmul(a2, kC5);
  pc = fmul(a2, fadd(kC4, pc));
  pc = fmul(a2, fadd(kC3, pc));
  pc = fmul(a2, fadd(kC2, pc));
  pc = fmul(a2, fadd(kC1, pc));
  const float ca = fadd(1.0f, pc);
  // rotate (cos a, sin a) by q = j mod 4 quarter turns, branch-free (so loops vectorise):
  //   q = 0: (ca, sa)   q = 1: (-sa, ca)   q = 2: (-ca, -sa)   q = 3: (sa, -ca)
  const uint32_t q = static_cast<uint32_t>(j) & 3u;
  const uint32_t odd = 0u - (q & 1u);                        // all ones when q is odd
  const uint32_t cb = float_bits(ca), sb = float_bits(sa);
  const uint32_t c_sign = ((q + 1u) & 2u) << 30;             // negative for q = 1, 2
  const uint32_t s_sign = (q & 2u) << 30;                    // negative for q = 2, 3
  *c = bits_float(((sb & odd) | (cb & ~odd)) ^ c_sign);
  *s = bits_float(((cb & odd) | (sb & ~odd)) ^ s_sign);
}

// Two standard normals from two lanes: x_r sets the radius, x_a the angle.
FS_HD void box_muller(uint32_t x_r, uint32_t x_a, float* z_cos, float* z_sin) {
  const float u1 = static_cast<float>((x_r >> 8) + 1u) * kTwoPowMinus24;  // (0, 1]
  const float radius = fsqrt(fmul(-2.0f, log_f32(u1)));
  float c, s;
  sincos_2pi(x_a, &c, &s);
  *z_cos = fmul(radius, c);
  *z_sin = fmul(radius, s);
}

// The next representable value below the one whose IEEE bits are x (toward -inf), for any
// sign-magnitude binary format held in the unsigned type U (fp16, bf16, fp32, fp64). Used to keep
// uniform draws strictly below b after rounding to the output type.
template <typename U>
FS_HD U step_down_bits(U x) {
  const U sign = static_cast<U>(static_cast<U>(1) << (sizeof(U) * 8 - 1));
  if ((x & static_cast<U>(~sign)) == 0) return static_cast<U>(sign | 1u);  // +-0 -> -smallest subnormal
  return (x & sign) ? static_cast<U>(x + 1u) : static_cast<U>(x - 1u);
}

// Distribution codes shared by the CPU and CUDA kernels (and fastsynth/ops/reinit.py).
enum Dist : int { kNormal = 0, kUniform = 1, kConstant = 2 };

// ---- from a lane's draw to the stored value ----
// normal:   v = mean + std * z                 (lo = mean, hi = std)
// uniform:  v = a + (b - a) * u, u in [0, 1)   (lo = a, hi = b; scale = b - a rounded once)
// constant: v = a
// Outputs of 32 bits or fewer are computed in float32 and rounded to the output type; float64
// outputs are computed in float64 from the same float32 draw.
#if defined(__CUDA_ARCH__)
FS_HD double dadd(double a, double b) { return __dadd_rn(a, b); }
FS_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
#else
FS_HD double dadd(double a, double b) { return a + b; }
FS_HD double dmul(double a, double b) { return a * b; }
#endif

FS_HD float affine_f32(int dist, float draw, float lo, float scale) {
  return dist == kConstant ? lo : fadd(lo, fmul(scale, draw));
}
FS_HD double affine_f64(int dist, float draw, double lo, double scale) {
  return dist == kConstant ? lo : dadd(lo, dmul(scale, static_cast<double>(draw)));
}

}  // namespace philox
}  // namespace fastsynth
