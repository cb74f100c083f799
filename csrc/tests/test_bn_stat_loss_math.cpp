// Unit tests of csrc/common/bn_stat_loss_math.h (run by CTest).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/bn_stat_loss_math.h"
#include "tests/check.h"

using namespace fastsynth;

int main() {
  // chunking covers [0, total) exactly, chunks differ by at most one, no chunk exceeds the cap
  for (long total : {1L, 7L, 64L, 1000L, 262144L, 262147L}) {
    for (long cap : {1L, 3L, 4096L, 100000L}) {
      const long parts = num_chunks(total, cap);
      long covered = 0, lo = total, hi = 0;
      for (long k = 0; k < parts; ++k) {
        const long b = chunk_begin(total, parts, k), e = chunk_begin(total, parts, k + 1);
        if (b != covered) { std::printf("FAIL chunk gap total=%ld cap=%ld k=%ld\n", total, cap, k); ++failures; }
        covered = e;
        lo = std::min(lo, e - b);
        hi = std::max(hi, e - b);
      }
      if (covered != total || hi - lo > 1 || hi > cap) {
        std::printf("FAIL chunking total=%ld cap=%ld parts=%ld covered=%ld lo=%ld hi=%ld\n", total, cap, parts, covered, lo, hi);
        ++failures;
      }
    }
  }

  // block two-pass + merge in chunk order == float64 two-pass over everything (large mean, tiny spread)
  std::mt19937_64 rng(7);
  std::normal_distribution<double> dist(1000.0, 0.01);
  std::vector<double> xs(12345);
  for (auto& x : xs) x = dist(rng);
  const auto [mean, var] = two_pass_mean_var(xs);

  const long parts = num_chunks(static_cast<long>(xs.size()), 1000L);
  Welford<double> acc;
  for (long k = 0; k < parts; ++k) {
    const long b = chunk_begin(static_cast<long>(xs.size()), parts, k), e = chunk_begin(static_cast<long>(xs.size()), parts, k + 1);
    float s = 0;  // fp32 block sums as the fp32/fp16/bf16 kernels do
    for (long i = b; i < e; ++i) s += static_cast<float>(xs[i]);
    const float bm = s / float(e - b);
    float q = 0;
    for (long i = b; i < e; ++i) { const float d = static_cast<float>(xs[i]) - bm; q += d * d; }
    acc = welford_merge(acc, Welford<double>(bm, q, double(e - b)));
  }
  CHECK_CLOSE(acc.mean, mean, 0.0, 1e-6);
  CHECK_CLOSE(acc.var_biased(), var, 0.0, 2e-2);  // fp32 inputs of std 0.01 at mean 1000: ~1e-4 quantisation
  CHECK_CLOSE(acc.n, double(xs.size()), 0.0, 0.0);

  // backward coefficients: dL/da = g_mu/M + 2 g_var (a - mu)/M
  const double M = 37, mu = 1000.5, g_mu = -0.25, g_var = 3.0;
  const auto c = bn_grad_coeffs(mu, g_mu, g_var, M);
  for (double a : {999.0, 1000.5, 1001.25}) {
    CHECK_CLOSE(bn_grad_elem(a, c), g_mu / M + 2 * g_var * (a - mu) / M, 1e-15, 1e-12);
  }
  // the gradient of the block/merge pipeline equals a finite difference of the biased variance
  {
    std::vector<double> v = {1.0, 2.5, -0.5, 4.0, 3.25};
    auto var_of = [](const std::vector<double>& w) {
      Welford<double> s;
      for (double x : w) s.update(x);
      return s.var_biased();
    };
    Welford<double> s;
    for (double x : v) s.update(x);
    const auto cv = bn_grad_coeffs(s.mean, 0.0, 1.0, double(v.size()));
    for (size_t i = 0; i < v.size(); ++i) {
      auto p = v, m = v;
      p[i] += 1e-6;
      m[i] -= 1e-6;
      CHECK_CLOSE(bn_grad_elem(v[i], cv), (var_of(p) - var_of(m)) / 2e-6, 1e-7, 1e-6);
    }
  }
  // NaN propagates through a block and a merge (never silently dropped)
  {
    Welford<double> a(1.0, 0.5, 4.0);
    const Welford<double> nan_block(std::nan(""), 0.0, 2.0);
    if (!std::isnan(welford_merge(a, nan_block).mean)) { std::printf("FAIL NaN dropped by merge\n"); ++failures; }
  }

  if (failures) { std::printf("%d failure(s)\n", failures); return 1; }
  std::printf("test_bn_stat_loss_math: all checks passed\n");
  return 0;
}
