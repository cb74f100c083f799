// Unit tests of csrc/common/welford.h (run by CTest).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/welford.h"
#include "tests/check.h"

using fastsynth::Welford;
using fastsynth::welford_merge;

int main() {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> dist(100.0, 0.1);  // large mean, tiny spread
  std::vector<double> xs(10007);
  for (auto& x : xs) x = dist(rng);

  const auto [mean, var] = two_pass_mean_var(xs);  // float64 two-pass oracle

  // single fp32 Welford stream
  Welford<float> wf;
  for (double x : xs) wf.update(static_cast<float>(x));
  CHECK_CLOSE(wf.mean, mean, 0.0, 1e-6);
  CHECK_CLOSE(wf.var_biased(), var, 0.0, 2e-3);

  // chunked fp32 Welford + merge (how the kernels reduce), uneven chunks, an empty chunk
  Welford<float> merged;
  size_t pos = 0;
  const size_t chunks[] = {1, 0, 33, 4096, 5000, 877};
  for (size_t c : chunks) {
    Welford<float> w;
    for (size_t i = 0; i < c; ++i) w.update(static_cast<float>(xs[pos + i]));
    pos += c;
    merged = welford_merge(merged, w);
  }
  CHECK_CLOSE(merged.n, static_cast<double>(xs.size()), 0.0, 0);
  CHECK_CLOSE(merged.mean, mean, 0.0, 1e-6);
  CHECK_CLOSE(merged.var_biased(), var, 0.0, 2e-3);

  // the naive E[x^2]-E[x]^2 in fp32 is what this header exists to avoid: check it really fails
  float s = 0, s2 = 0;
  for (double x : xs) { s += float(x); s2 += float(x) * float(x); }
  const double naive = double(s2) / xs.size() - (double(s) / xs.size()) * (double(s) / xs.size());
  if (std::fabs(naive - var) / var < 0.05) { std::printf("FAIL: naive variance unexpectedly accurate\n"); ++failures; }

  // double accumulation is exact to rounding
  Welford<double> wd;
  for (double x : xs) wd.update(x);
  CHECK_CLOSE(wd.var_biased(), var, 0.0, 1e-9);

  // merging with empty states is the identity
  Welford<double> empty;
  CHECK_CLOSE(welford_merge(empty, wd).m2, wd.m2, 0.0, 0);
  CHECK_CLOSE(welford_merge(wd, empty).mean, wd.mean, 0.0, 0);

  if (failures) { std::printf("%d failure(s)\n", failures); return 1; }
  std::printf("test_welford: all checks passed\n");
  return 0;
}
