// Welford running statistics and the parallel (Chan et al.) merge, shared by the CPU and CUDA
// kernels. Computing the variance as E[x^2] - E[x]^2 in fp32 loses everything when the mean is
// large against the spread (7.7% relative error at mean 100, std 0.1); Welford does not.
//
//   update(x):  n += 1; d = x - mean; mean += d / n; m2 += d * (x - mean)
//   merge(a,b): n = na + nb; d = mb - ma; mean = ma + d * nb / n; m2 = m2a + m2b + d^2 * na * nb / n
//   biased variance = m2 / n
#pragma once

#include "macros.h"

namespace fastsynth {

template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  acc_t n;  // kept in the accumulator type: merges divide by it, and fp counts are exact to 2^24/2^53

  FS_HD Welford() : mean(acc_t(0)), m2(acc_t(0)), n(acc_t(0)) {}
  FS_HD Welford(acc_t mean_, acc_t m2_, acc_t n_) : mean(mean_), m2(m2_), n(n_) {}

  FS_HD void update(acc_t x) {
    n += acc_t(1);
    const acc_t delta = x - mean;
    mean += delta / n;
    m2 += delta * (x - mean);
  }

  FS_HD acc_t var_biased() const { return n > acc_t(0) ? m2 / n : acc_t(0); }
};

template <typename acc_t>
FS_HD Welford<acc_t> welford_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return Welford<acc_t>();
  if (a.n == acc_t(0)) return b;
  if (b.n == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean;
  const acc_t nb_over_n = b.n / n;
  return Welford<acc_t>(a.mean + delta * nb_over_n, a.m2 + b.m2 + delta * delta * a.n * nb_over_n, n);
}

}  // namespace fastsynth
