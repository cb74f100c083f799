// Unit tests of csrc/common/logit_loss_math.h (run by CTest).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/logit_loss_math.h"
#include "tests/check.h"

using namespace fastsynth;

// float64 oracle of KL(softmax(t) || softmax(s)) of one row
static double kl_reference(const std::vector<double>& t, const std::vector<double>& s) {
  double mt = -INFINITY, ms = -INFINITY;
  for (size_t c = 0; c < t.size(); ++c) {
    mt = std::fmax(mt, t[c]);
    ms = std::fmax(ms, s[c]);
  }
  double zt = 0, zs = 0;
  for (size_t c = 0; c < t.size(); ++c) {
    zt += std::exp(t[c] - mt);
    zs += std::exp(s[c] - ms);
  }
  double kl = 0;
  for (size_t c = 0; c < t.size(); ++c) {
    const double lpt = t[c] - mt - std::log(zt), lps = s[c] - ms - std::log(zs);
    kl += std::exp(lpt) * (lpt - lps);
  }
  return kl;
}

template <typename acc_t>
static KlState<acc_t> stream_chunked(const std::vector<double>& t, const std::vector<double>& s,
                                     const std::vector<size_t>& chunks) {
  KlState<acc_t> total = kl_state_empty<acc_t>();
  size_t pos = 0;
  for (size_t len : chunks) {
    KlState<acc_t> part = kl_state_empty<acc_t>();
    for (size_t i = 0; i < len && pos < t.size(); ++i, ++pos)
      part = kl_state_push(part, static_cast<acc_t>(t[pos]), static_cast<acc_t>(s[pos]));
    total = kl_state_merge(total, part);
  }
  return total;
}

int main() {
  // exp / log polynomials against libm (float inputs, compared in double)
  double worst_exp = 0, worst_log = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f + 87.0f * static_cast<float>(i) / 200000.0f;
    const double ref = std::exp(static_cast<double>(x));
    worst_exp = std::fmax(worst_exp, std::fabs(exp_poly(x) - ref) / ref);
    const float y = 1e-6f + static_cast<float>(i) / 100000.0f;
    const double lref = std::log(static_cast<double>(y));
    worst_log = std::fmax(worst_log, std::fabs(log_poly(y) - lref) / std::fmax(std::fabs(lref), 1.0));
  }
  std::printf("exp_poly max rel err %.3g, log_poly max err %.3g\n", worst_exp, worst_log);
  CHECK(worst_exp < 5e-7);
  CHECK(worst_log < 5e-7);
  // the double log of the short-row finish: within a few ulps of libm over the row sums' range
  // [1, 2^16] and beyond (powers of two, the sqrt(2) split, values just below 1)
  double worst_log64 = 0;
  for (int i = 0; i <= 400000; ++i) {
    const double x = std::exp(-3.0 + 15.0 * static_cast<double>(i) / 400000.0);
    const double ref = std::log(x);
    worst_log64 = std::fmax(worst_log64, std::fabs(log_f64_poly(x) - ref) / std::fmax(std::fabs(ref), 1.0));
  }
  for (double x : {1.0, 2.0, 64.0, 1.4142135623730951, 1.4142135623730949, 0.9999999999999999, 1.0000000000000002})
    worst_log64 = std::fmax(worst_log64, std::fabs(log_f64_poly(x) - std::log(x)) / std::fmax(std::fabs(std::log(x)), 1.0));
  std::printf("log_f64_poly max err %.3g\n", worst_log64);
  CHECK(worst_log64 < 1e-15);
  CHECK(log_f64_poly(1.0) == 0.0);
  CHECK(exp_poly(-1e4f) == 0.0f);
  CHECK(exp_poly(-INFINITY) == 0.0f);
  CHECK_CLOSE(exp_poly(0.0f), 1.0, 0, 1e-7);

  // online LSE: push and merge agree with the direct sum
  {
    std::mt19937_64 rng(7);
    std::normal_distribution<double> d(0.0, 5.0);
    std::vector<double> xs(1000);
    for (auto& x : xs) x = d(rng);
    double m = -INFINITY;
    for (double x : xs) m = std::fmax(m, x);
    double z = 0;
    for (double x : xs) z += std::exp(x - m);
    LseState<double> a = lse_empty<double>(), b = lse_empty<double>();
    for (size_t i = 0; i < xs.size(); ++i) {
      if (i < 300) a = lse_push(a, xs[i]);
      else b = lse_push(b, xs[i]);
    }
    CHECK_CLOSE(lse_value(lse_merge(a, b)), m + std::log(z), 1e-12, 1e-12);
    CHECK_CLOSE(lse_value(lse_merge(lse_empty<double>(), b)), lse_value(b), 0, 0);
  }

  // streamed KL state, split into uneven chunks (one empty), against the oracle
  const size_t sizes[] = {2, 10, 100, 1000, 1023, 21843};
  for (size_t C : sizes) {
    for (double scale : {1.0, 30.0, 1e4}) {
      std::mt19937_64 rng(1000 + C);
      std::normal_distribution<double> d(0.0, 1.0);
      std::vector<double> t(C), s(C);
      for (size_t c = 0; c < C; ++c) {
        t[c] = static_cast<float>(scale * d(rng));  // values representable in float
        s[c] = static_cast<float>(0.7 * t[c] + 0.5 * scale * d(rng));
      }
      const double ref = kl_reference(t, s);
      const std::vector<size_t> chunks = {1, 0, 7, 64, 333, C};
      const double k64 = kl_state_value(stream_chunked<double>(t, s, chunks));
      const double k32 = kl_state_value(stream_chunked<float>(t, s, chunks));
      CHECK_CLOSE(k64, ref, 1e-12 * scale, 1e-10);
      // fp32: a few ulps of the logits' magnitude (the fp32 reference formulation has the same)
      CHECK_CLOSE(k32, ref, 2e-6 * scale, 1e-5);
    }
  }
  // identical rows: KL is 0, never negative
  {
    std::vector<double> t = {1.0, 2.0, 3.0, -4.0};
    CHECK(kl_state_value(stream_chunked<float>(t, t, {4})) == 0.0f);
  }

  // argmax tie rule: the first maximal index wins, whatever the merge order
  {
    ArgMax<float> a{3.0f, 5}, b{3.0f, 2}, c{1.0f, 0};
    CHECK(argmax_merge(a, b).i == 2);
    CHECK(argmax_merge(b, a).i == 2);
    CHECK(argmax_merge(c, a).i == 5);
  }

  // NaN-aware argmax: NaN is the maximum, the first NaN wins, whatever the merge order
  {
    const float nan = NAN;
    ArgMax<float> big{9.0f, 0}, n3{nan, 3}, n5{nan, 5}, init{-INFINITY, INT64_MAX};
    CHECK(argmax_merge(big, n3).i == 3);
    CHECK(argmax_merge(n3, big).i == 3);
    CHECK(argmax_merge(n5, n3).i == 3);
    CHECK(argmax_merge(n3, n5).i == 3);
    CHECK(argmax_merge(init, n5).i == 5);
    CHECK(argmax_merge(init, ArgMax<float>{-INFINITY, 4}).i == 4);  // a -inf row: its first index
  }

  // exp / log polynomials at the special values
  CHECK(std::isnan(exp_poly(NAN)));
  CHECK(exp_poly(-INFINITY) == 0.0f);
  // p * x of a probability: exactly 0 where p is 0 whatever x holds; NaN where p is NaN
  CHECK(prob_times(0.0f, INFINITY) == 0.0f);
  CHECK(prob_times(0.0, static_cast<double>(NAN)) == 0.0);
  CHECK(std::isnan(prob_times(static_cast<double>(NAN), 1.0)));
  CHECK(prob_times(0.25f, -INFINITY) == -INFINITY);
  // a NaN element makes the online LSE NaN (the maximum skips it, the sum does not)
  {
    LseState<float> st = lse_empty<float>();
    st = lse_push(st, 1.0f);
    st = lse_push(st, NAN);
    st = lse_push(st, 2.0f);
    CHECK(std::isnan(lse_value(st)));
  }
  CHECK(exp_poly(INFINITY) > 1e38f);
  CHECK(std::isnan(log_poly(NAN)));
  CHECK(log_poly(INFINITY) == INFINITY);
  CHECK(log_poly(0.0f) == -INFINITY);
  CHECK(std::isnan(log_f64_poly(NAN)));
  CHECK(log_f64_poly(INFINITY) == INFINITY);
  CHECK(log_f64_poly(0.0) == -INFINITY);

  // non-finite logits in the streamed KL state, split into chunks in several ways
  {
    const double ninf = -INFINITY;
    std::vector<double> t = {ninf, 1.0, 2.5, ninf, ninf, ninf, 0.3, -1.0, ninf, 4.0};
    std::vector<double> s = {0.5, ninf, 1.0, 2.0, -0.5, 3.0, ninf, 1.5, 0.2, 2.2};
    // oracle: classes with p_t = 0 contribute 0 (the limit), here only where t = -inf
    auto limit = [&](std::vector<double> tt, const std::vector<double>& ss) {
      for (auto& v : tt) v = v == ninf ? -1e5 : v;
      std::vector<double> s2 = ss;
      for (auto& v : s2) v = v == ninf ? -1e5 : v;
      return kl_reference(tt, s2);
    };
    std::vector<double> t2 = t;  // student -inf only where the teacher is -inf too: finite KL
    t2[1] = ninf;
    t2[6] = ninf;
    std::vector<double> s_both = s;  // -inf in both at 1 and 6
    const double ref = limit(t2, s_both);
    for (const auto& chunks : std::vector<std::vector<size_t>>{{10}, {1, 9}, {4, 0, 6}, {1, 1, 1, 1, 6}, {5, 5}}) {
      CHECK_CLOSE(kl_state_value(stream_chunked<double>(t2, s_both, chunks)), ref, 1e-12, 1e-12);
      CHECK_CLOSE(kl_state_value(stream_chunked<float>(t2, s_both, chunks)), ref, 1e-6, 1e-5);
      // student -inf where the teacher has mass: +inf
      CHECK(kl_state_value(stream_chunked<double>(t, s, chunks)) == INFINITY);
      CHECK(kl_state_value(stream_chunked<float>(t, s, chunks)) == INFINITY);
      // NaN anywhere: NaN
      std::vector<double> tn = t2;
      tn[7] = NAN;
      CHECK(std::isnan(kl_state_value(stream_chunked<double>(tn, s_both, chunks))));
      CHECK(std::isnan(kl_state_value(stream_chunked<float>(s_both, tn, chunks))));
    }
    // a whole row of -inf: NaN (softmax of nothing), as the reference
    std::vector<double> all(5, ninf), fin = {1.0, 2.0, 3.0, 4.0, 5.0};
    CHECK(std::isnan(kl_state_value(stream_chunked<double>(all, fin, {2, 3}))));
    CHECK(std::isnan(kl_state_value(stream_chunked<double>(fin, all, {2, 3}))));
    // logits below -1e38 (fp64) are ordinary values
    std::vector<double> low = {-1e300, -1e300 + 1e285, -2e300}, low_s = {-1e300, -1e300, -1e300};
    CHECK(std::isfinite(kl_state_value(stream_chunked<double>(low, low_s, {1, 2}))));
    // online LSE with -inf elements, first or in a chunk of their own
    LseState<double> a = lse_empty<double>(), b = lse_empty<double>();
    a = lse_push(a, ninf);
    a = lse_push(a, 1.0);
    b = lse_push(b, ninf);
    CHECK_CLOSE(lse_value(lse_merge(a, b)), 1.0, 0, 1e-15);
    CHECK(lse_value(b) == ninf);
  }

  // row gradient coefficients: finite differences of ce_w*CE + kl_w*KL (double)
  {
    const double T = 2.0, ce_w = 0.3, kl_w = -1.7;
    std::vector<double> t = {0.3, -1.2, 2.5, 0.1, 0.9}, s = {1.1, 0.4, -0.3, 2.2, -0.5};
    const size_t y = 2;
    auto loss = [&](const std::vector<double>& tt, const std::vector<double>& ss) {
      std::vector<double> a(tt.size()), b(ss.size());
      for (size_t c = 0; c < tt.size(); ++c) a[c] = tt[c] / T, b[c] = ss[c] / T;
      double m = -INFINITY, z = 0;
      for (double v : a) m = std::fmax(m, v);
      for (double v : a) z += std::exp(v - m);
      return ce_w * (m + std::log(z) - a[y]) + kl_w * kl_reference(a, b);
    };
    std::vector<double> tp(t.size()), sp(s.size());
    for (size_t c = 0; c < t.size(); ++c) tp[c] = t[c] / T, sp[c] = s[c] / T;
    const double kl = kl_reference(tp, sp);
    const KlRowCoef k = kl_row_coef(ce_w, kl_w, 1.0, 1.0 / T, kl);
    double mt = -INFINITY, ms = -INFINITY, zt = 0, zs = 0;
    for (size_t c = 0; c < t.size(); ++c) mt = std::fmax(mt, tp[c]), ms = std::fmax(ms, sp[c]);
    for (size_t c = 0; c < t.size(); ++c) zt += std::exp(tp[c] - mt), zs += std::exp(sp[c] - ms);
    for (size_t c = 0; c < t.size(); ++c) {
      const double lpt = tp[c] - mt - std::log(zt), lps = sp[c] - ms - std::log(zs);
      const double pt = std::exp(lpt), ps = std::exp(lps);
      const double gt = k.g_pt * pt + k.g_ptd * pt * (lpt - lps) - (c == y ? k.g_y : 0.0);
      const double gs = k.g_ps * (ps - pt);
      const double h = 1e-6;
      std::vector<double> t1 = t, t2 = t, s1 = s, s2 = s;
      t1[c] += h, t2[c] -= h, s1[c] += h, s2[c] -= h;
      CHECK_CLOSE(gt, (loss(t1, s) - loss(t2, s)) / (2 * h), 1e-7, 1e-6);
      CHECK_CLOSE(gs, (loss(t, s1) - loss(t, s2)) / (2 * h), 1e-7, 1e-6);
    }
  }

  // JS element: dP, dQ are the derivatives of f (M = (P + Q) / 2 moving with P and Q),
  // including points where P, Q or M is clamped; the clamp boundaries themselves pass gradient.
  {
    const double lo = 0.01, hi = 0.99;
    auto f_of = [&](double p, double q) {
      return js_element<double>(p, q, std::log(p), std::log(q), lo, hi, std::log(lo), std::log(hi)).f;
    };
    const double pts[][2] = {{0.3, 0.2}, {0.005, 0.4}, {0.995, 0.5}, {0.001, 0.002}, {0.6, 0.995}, {0.2, 0.0}};
    for (auto& pq : pts) {
      const double p = pq[0], q = pq[1] > 0 ? pq[1] : 1e-30;
      const JsElem<double> e = js_element<double>(p, q, std::log(p), std::log(q), lo, hi, std::log(lo), std::log(hi));
      const double h = 1e-7;
      CHECK_CLOSE(e.dp, (f_of(p + h, q) - f_of(p - h, q)) / (2 * h), 1e-6, 1e-5);
      if (q - h > 0) CHECK_CLOSE(e.dq, (f_of(p, q + h) - f_of(p, q - h)) / (2 * h), 1e-6, 1e-5);
    }
    const JsElem<double> edge = js_element<double>(lo, 0.5, std::log(lo), std::log(0.5), lo, hi, std::log(lo), std::log(hi));
    CHECK_CLOSE(edge.dp, -0.5 * (0.5 * (lo + 0.5)) / lo + 0.5 * (std::log(0.5 * (lo + 0.5)) - 0.5 * std::log(lo) - 0.5 * std::log(0.5) + 1.0), 1e-12, 1e-12);
    // float version agrees with double (uses log_poly on the host)
    const JsElem<float> ef = js_element<float>(0.3f, 0.2f, std::log(0.3f), std::log(0.2f), 0.01f, 0.99f,
                                               std::log(0.01f), std::log(0.99f));
    const JsElem<double> ed = js_element<double>(0.3f, 0.2f, std::log(0.3f), std::log(0.2f), 0.01f, 0.99f,
                                                 std::log(0.01f), std::log(0.99f));
    CHECK_CLOSE(ef.f, ed.f, 1e-7, 1e-6);
    CHECK_CLOSE(ef.dp, ed.dp, 1e-6, 1e-6);
  }

  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all logit_loss_math tests passed\n");
  return 0;
}
