// Unit tests of csrc/common/fused_bn_math.h (run by CTest): the per-channel arithmetic the CPU
// and CUDA kernels of the fused teacher BatchNorm share, against float64 formulas written out
// here, and the one-pass statistics-loss gradient against a finite difference of the loss.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/fused_bn_math.h"
#include "common/welford.h"

using namespace fastsynth;

static int failures = 0;
#define CHECK_CLOSE(a, b, tol)                                                                    \
  do {                                                                                            \
    double _a = (a), _b = (b);                                                                    \
    if (!(std::fabs(_a - _b) <= (tol) * std::fmax(1.0, std::fabs(_b)))) {                         \
      std::printf("FAIL %s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #a, _a, _b);    \
      ++failures;                                                                                 \
    }                                                                                             \
  } while (0)

int main() {
  // affine coefficients and forward values
  const double gamma = 1.3, beta = -0.2, rm = 0.7, rv = 2.5, eps = 1e-5;
  const auto a = bn_eval_affine<double>(gamma, beta, rm, rv, eps);
  CHECK_CLOSE(a.invstd, 1.0 / std::sqrt(rv + eps), 1e-15);
  CHECK_CLOSE(a.scale, gamma / std::sqrt(rv + eps), 1e-15);
  CHECK_CLOSE(a.shift, beta - rm * gamma / std::sqrt(rv + eps), 1e-15);
  for (double x : {-3.0, -0.1, 0.0, 0.4, 2.0}) {
    const double ref = (x - rm) / std::sqrt(rv + eps) * gamma + beta;
    CHECK_CLOSE(bn_eval_apply<double>(x, a.scale, a.shift, false), ref, 1e-14);
    CHECK_CLOSE(bn_eval_apply<double>(x, a.scale, a.shift, true), ref > 0 ? ref : 0.0, 1e-14);
    CHECK_CLOSE(bn_relu_grad<double>(2.0, x, a.scale, a.shift, true), ref > 0 ? 2.0 : 0.0, 0.0);
    CHECK_CLOSE(bn_relu_grad<double>(2.0, x, a.scale, a.shift, false), 2.0, 0.0);
  }
  // ReLU keeps NaN like torch.relu
  if (!std::isnan(bn_eval_apply<float>(NAN, 1.f, 0.f, true))) { std::printf("FAIL relu(NaN) is not NaN\n"); ++failures; }

  // one-pass gradient of L = sum_c (g_mean_c * mean_c + g_var_c * var_c) against finite differences
  std::mt19937_64 rng(7);
  std::normal_distribution<double> dist(3.0, 2.0);
  const int M = 37;
  std::vector<double> xs(M);
  for (auto& x : xs) x = dist(rng);
  const double g_mean = 0.8, g_var = -1.7;
  auto loss = [&](const std::vector<double>& v) {
    Welford<double> w;
    for (double x : v) w.update(x);
    return g_mean * w.mean + g_var * w.var_biased();
  };
  Welford<double> w;
  for (double x : xs) w.update(x);
  const auto coef = stat_grad_coef<double>(g_mean, g_var, double(M));
  for (int i = 0; i < M; i += 5) {
    const double analytic = bn_grad_input<double>(0.0, xs[i], a.scale, w.mean, coef, true);
    std::vector<double> p = xs, m = xs;
    const double h = 1e-5;
    p[i] += h;
    m[i] -= h;
    CHECK_CLOSE(analytic, (loss(p) - loss(m)) / (2 * h), 1e-8);
    // with grad_y: g_pre * scale is added; without statistics only that term remains
    CHECK_CLOSE(bn_grad_input<double>(0.5, xs[i], a.scale, w.mean, coef, true), analytic + 0.5 * a.scale, 1e-14);
    CHECK_CLOSE(bn_grad_input<double>(0.5, xs[i], a.scale, w.mean, coef, false), 0.5 * a.scale, 1e-15);
  }

  // instance-mean term: d/dx[i] of g_inst * mean(plane) by central differences, per element
  {
    const int hw = 12;
    const double g_inst = -0.9;
    auto plane_loss = [&](const std::vector<double>& v) {
      double sum = 0;
      for (int j = 0; j < hw; ++j) sum += v[j];
      return g_inst * sum / hw;
    };
    std::vector<double> plane(xs.begin(), xs.begin() + hw);
    for (int i = 0; i < hw; ++i) {
      std::vector<double> p = plane, m = plane;
      p[i] += 1e-5;
      m[i] -= 1e-5;
      CHECK_CLOSE(inst_grad_term<double>(g_inst, double(hw)), (plane_loss(p) - plane_loss(m)) / 2e-5, 1e-9);
    }
  }

  // the float path agrees with the double path
  const auto af = bn_eval_affine<float>(1.3f, -0.2f, 0.7f, 2.5f, 1e-5f);
  CHECK_CLOSE(af.scale, a.scale, 1e-6);
  CHECK_CLOSE(af.shift, a.shift, 1e-6);

  if (failures == 0) std::printf("test_fused_bn_math: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
