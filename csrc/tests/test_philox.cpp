// Unit tests of csrc/common/philox.h (run by CTest): Philox4x32-10 against the Random123
// known-answer vectors, and the accuracy of the float32 ln / sincos / Box-Muller arithmetic.
#include <cmath>
#include <cstdio>
#include <initializer_list>

#include "common/philox.h"

using namespace fastsynth::philox;

static int failures = 0;

static void check_kat(const char* name, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                      uint32_t k1, uint32_t e0, uint32_t e1, uint32_t e2, uint32_t e3) {
  const U32x4 r = philox4x32_10(c0, c1, c2, c3, k0, k1);
  if (r.v[0] != e0 || r.v[1] != e1 || r.v[2] != e2 || r.v[3] != e3) {
    std::printf("FAIL KAT %s: got %08x %08x %08x %08x, expected %08x %08x %08x %08x\n", name, r.v[0], r.v[1],
                r.v[2], r.v[3], e0, e1, e2, e3);
    ++failures;
  }
}

int main() {
  // Random123 kat_vectors, philox4x32 10 rounds
  check_kat("zeros", 0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u);
  check_kat("ones", 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0x408f276du,
            0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu);
  check_kat("pi", 0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u, 0xd16cfe09u,
            0x94fdccebu, 0x5001e420u, 0x24126ea1u);

  // group_bits is Philox with counter (g lo, g hi, 0, 0) and key (seed lo, seed hi)
  {
    const uint64_t g = 0x0000000500000007ull, seed = 0x1234567890abcdefull;
    const U32x4 a = group_bits(g, seed);
    const U32x4 b = philox4x32_10(7u, 5u, 0u, 0u, 0x90abcdefu, 0x12345678u);
    for (int l = 0; l < 4; ++l)
      if (a.v[l] != b.v[l]) { std::printf("FAIL group_bits lane %d\n", l); ++failures; }
  }

  // both host sqrts (the Newton form and the one the build selects) are exactly rounded on every
  // float of [2^-23, 64) (covers -2 ln u, u in [2^-24, 1))
  {
    long bad = 0;
    const uint32_t lo = fastsynth::philox::float_bits(0x1p-23f), hi = fastsynth::philox::float_bits(64.0f);
    for (uint32_t b = lo; b < hi; ++b) {
      const float x = bits_float(b);
      if (fsqrt(x) != std::sqrt(x) || fsqrt_newton(x) != std::sqrt(x)) ++bad;
    }
    for (float x : {0.0f, -0.0f, 1.0f, 4.0f, 0x1p-30f, 1e30f}) {
      if (fsqrt(x) != std::sqrt(x) || std::signbit(fsqrt(x)) != std::signbit(std::sqrt(x))) ++bad;
      if (fsqrt_newton(x) != std::sqrt(x) || std::signbit(fsqrt_newton(x)) != std::signbit(std::sqrt(x))) ++bad;
    }
    if (bad) { std::printf("FAIL fsqrt differs from sqrtf on %ld inputs\n", bad); ++failures; }
  }

  // ln over the whole input range the kernels use: u = k 2^-24, k in [1, 2^24]
  double max_log_err = 0;
  for (uint32_t k = 1; k <= (1u << 24); k += (k < 4096 ? 1u : 997u)) {
    const float u = static_cast<float>(k) * 0x1p-24f;
    const double ref = std::log(static_cast<double>(u));
    const double err = std::fabs(log_f32(u) - ref) / std::fmax(std::fabs(ref), 1e-30);
    if (ref != 0) max_log_err = std::fmax(max_log_err, err);
    if (k == (1u << 24) && log_f32(u) != 0.0f) { std::printf("FAIL ln(1) = %g\n", log_f32(u)); ++failures; }
  }
  if (max_log_err > 3e-7) { std::printf("FAIL ln max relative error %g\n", max_log_err); ++failures; }

  // cos/sin of 2 pi u on a fine grid, including the quadrant boundaries
  double max_trig_err = 0;
  for (uint32_t k = 0; k < (1u << 24); k += 251u) {
    float c, s;
    sincos_2pi(k << 8, &c, &s);
    const double th = 2.0 * M_PI * static_cast<double>(k) * 0x1p-24;
    max_trig_err = std::fmax(max_trig_err, std::fabs(c - std::cos(th)));
    max_trig_err = std::fmax(max_trig_err, std::fabs(s - std::sin(th)));
  }
  for (uint32_t k : {0u, 1u << 22, 1u << 23, 3u << 22, (1u << 24) - 1u, (1u << 21), (1u << 21) - 1u}) {
    float c, s;
    sincos_2pi(k << 8, &c, &s);
    const double th = 2.0 * M_PI * static_cast<double>(k) * 0x1p-24;
    max_trig_err = std::fmax(max_trig_err, std::fmax(std::fabs(c - std::cos(th)), std::fabs(s - std::sin(th))));
  }
  if (max_trig_err > 2e-7) { std::printf("FAIL sincos max abs error %g\n", max_trig_err); ++failures; }

  // Box-Muller moments over one million normals from the stream of seed 42
  double s1 = 0, s2 = 0, s4 = 0, zmax = 0;
  const int groups = 1 << 18;
  for (int g = 0; g < groups; ++g) {
    const U32x4 x = group_bits(static_cast<uint64_t>(g), 42u);
    float z[4];
    box_muller(x.v[0], x.v[1], &z[0], &z[1]);
    box_muller(x.v[2], x.v[3], &z[2], &z[3]);
    for (float v : z) {
      s1 += v; s2 += double(v) * v; s4 += double(v) * v * v * v;
      zmax = std::fmax(zmax, std::fabs(v));
    }
  }
  const double n = 4.0 * groups;
  const double mean = s1 / n, var = s2 / n - mean * mean, kurt = s4 / n;
  // standard errors: mean 1e-3, var 1.4e-3, E z^4 (=3) 4.9e-3; allow 5 sigma
  if (std::fabs(mean) > 5e-3 || std::fabs(var - 1) > 7e-3 || std::fabs(kurt - 3) > 2.5e-2 || zmax > 5.8) {
    std::printf("FAIL normal moments: mean %g var %g E[z^4] %g max|z| %g\n", mean, var, kurt, zmax);
    ++failures;
  }

  if (failures) { std::printf("%d failure(s)\n", failures); return 1; }
  std::printf("test_philox: all checks passed (ln rel err %.3g, sincos abs err %.3g)\n", max_log_err, max_trig_err);
  return 0;
}
