// Checks shared by the C++ unit tests of csrc/common (one test executable per source file).
#pragma once
#include <cmath>
#include <cstdio>
#include <vector>

static int failures = 0;

// |a - b| <= atol + rtol * |b|, else the expression, both values and the line are printed
#define CHECK_CLOSE(a, b, atol, rtol)                                                             \
  do {                                                                                            \
    double _a = (a), _b = (b);                                                                    \
    if (!(std::fabs(_a - _b) <= (atol) + (rtol) * std::fabs(_b))) {                               \
      std::printf("FAIL %s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #a, _a, _b);    \
      ++failures;                                                                                 \
    }                                                                                             \
  } while (0)
#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);        \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

// float64 two-pass mean and biased variance of xs: the statistics tests' oracle
struct TwoPass {
  double mean, var;
};
inline TwoPass two_pass_mean_var(const std::vector<double>& xs) {
  double mean = 0;
  for (double x : xs) mean += x;
  mean /= xs.size();
  double m2 = 0;
  for (double x : xs) m2 += (x - mean) * (x - mean);
  return {mean, m2 / xs.size()};
}
