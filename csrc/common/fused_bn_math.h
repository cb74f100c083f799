// Per-channel arithmetic of the fused teacher BatchNorm, shared by the CPU and CUDA kernels.
//
// Eval-mode BatchNorm with the batch statistics of its input riding on the same passes:
//   scale = gamma / sqrt(running_var + eps),  shift = beta - running_mean * scale
//   y     = x * scale + shift                      (then max(y, 0) when ReLU is fused)
//   mean, biased var of x per channel              (Welford, csrc/common/welford.h)
//   inst_mean[n, c] = mean_{h,w} x[n, c]            (optional, the same pass)
// Backward, one elementwise pass, with g_mean/g_var the gradients reaching the returned stats:
//   g_pre  = grad_y * [pre-activation > 0]          (only when ReLU is fused)
//   grad_x = g_pre * scale + g_mean / M + 2 g_var (x - mean) / M  (+ g_inst[n, c] / (H W))
//   dbeta  = sum g_pre,  dgamma = sum g_pre * (x - running_mean) / sqrt(running_var + eps)
#pragma once

#include <cmath>

#include "macros.h"

namespace fastsynth {

template <typename acc_t>
FS_HD acc_t fbn_sqrt(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return std::sqrt(v);
#endif
}

template <typename acc_t>
struct BnEvalAffine {
  acc_t invstd;  // 1 / sqrt(running_var + eps)
  acc_t scale;   // gamma * invstd
  acc_t shift;   // beta - running_mean * scale
};

template <typename acc_t>
FS_HD BnEvalAffine<acc_t> bn_eval_affine(acc_t gamma, acc_t beta, acc_t running_mean, acc_t running_var, acc_t eps) {
  BnEvalAffine<acc_t> a;
  a.invstd = acc_t(1) / fbn_sqrt(running_var + eps);
  a.scale = gamma * a.invstd;
  a.shift = beta - running_mean * a.scale;
  return a;
}

// Forward value; ReLU keeps NaN (like torch.relu) and maps negatives to 0.
template <typename acc_t>
FS_HD acc_t bn_eval_apply(acc_t x, acc_t scale, acc_t shift, bool relu) {
  const acc_t y = x * scale + shift;
  return (relu && y < acc_t(0)) ? acc_t(0) : y;
}

// Per-channel coefficients of the statistics-loss gradient: grad_x += c_mean + c_var * (x - mean).
template <typename acc_t>
struct StatGradCoef {
  acc_t c_mean;  // g_mean / M
  acc_t c_var;   // 2 g_var / M
};

template <typename acc_t>
FS_HD StatGradCoef<acc_t> stat_grad_coef(acc_t g_mean, acc_t g_var, acc_t m) {
  StatGradCoef<acc_t> c;
  c.c_mean = g_mean / m;
  c.c_var = acc_t(2) * g_var / m;
  return c;
}

// Upstream gradient after the fused ReLU's mask (the pre-activation recomputed from x; the mask
// is pre > 0 like threshold_backward on the ReLU output).
template <typename acc_t>
FS_HD acc_t bn_relu_grad(acc_t grad_y, acc_t x, acc_t scale, acc_t shift, bool relu) {
  if (!relu) return grad_y;
  return (x * scale + shift > acc_t(0)) ? grad_y : acc_t(0);
}

// The instance-mean term of grad_x over plane (n, c): inst_mean[n, c] = mean_{h,w} x[n, c], so
// grad_x[n, c, h, w] += g_inst[n, c] / (H W) (hw = H*W).
template <typename acc_t>
FS_HD acc_t inst_grad_term(acc_t g_inst, acc_t hw) {
  return g_inst / hw;
}

// grad_x of one element; g_pre from bn_relu_grad. with_stats=false drops the statistics term.
template <typename acc_t>
FS_HD acc_t bn_grad_input(acc_t g_pre, acc_t x, acc_t scale, acc_t mean, StatGradCoef<acc_t> c, bool with_stats) {
  acc_t g = g_pre * scale;
  if (with_stats) g += c.c_mean + c.c_var * (x - mean);
  return g;
}

}  // namespace fastsynth
