// ATen glue shared by the CPU kernels (csrc/cpu/logit_losses.cpp) and the CUDA binding
// (csrc/cuda/logit_losses_binding.cpp) of the teacher/student logit losses: the argument checks
// both backends make, and their registration. Each backend adds its own device and size checks.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace fastsynth {
namespace logit_binding {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// a and b: one shape [N, C] (non-empty), one floating dtype.
inline void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": ", a_name, " must be 2-D [N, C], got shape ", a.sizes());
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": ", b_name, " must have the shape of ", a_name, " ", a.sizes(),
                    ", got ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()), op, ": ", a_name, " must be floating, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.size(0) > 0 && a.size(1) > 0, op, ": ", a_name, " must not be empty, got shape ", a.sizes());
}

// targets: int64 of shape [N] (the values are checked by the backend that can read them).
inline void check_targets(const char* op, const at::Tensor& targets, int64_t N) {
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64 class indices, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == N, op, ": targets must have shape [", N, "], got ",
                    targets.sizes());
}

inline void check_temperature(const char* op, double T) {
  TORCH_CHECK_VALUE(T > 0 && std::isfinite(T), op, ": T must be a positive finite temperature, got ", T);
}

// js_divergence's temperature and clamp bounds.
inline void check_js_scalars(double T, double clamp_min, double clamp_max) {
  const char* op = "js_divergence";
  check_temperature(op, T);
  TORCH_CHECK_VALUE(clamp_min > 0 && clamp_min <= clamp_max && clamp_max <= 1, op,
                    ": clamp must satisfy 0 < min <= max <= 1, got (", clamp_min, ", ", clamp_max, ")");
}

// A view with unit column stride (rows may be strided); copies only when columns are strided.
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  if (x.size(1) <= 1 || x.stride(1) == 1) return x;
  return x.contiguous();
}

// The accumulator dtype of the kernels: float, or double for double inputs.
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace logit_binding
}  // namespace fastsynth

// Registers the four logit-loss ops of one backend: the functions fastsynth::<op>_<suffix>.
#define FS_REGISTER_LOGIT_LOSSES(dispatch_key, suffix)                                 \
  TORCH_LIBRARY_IMPL(fastsynth, dispatch_key, m) {                                     \
    m.impl("synthesis_logit_loss", &fastsynth::synthesis_logit_loss_##suffix);        \
    m.impl("kd_loss", &fastsynth::kd_loss_##suffix);                                   \
    m.impl("js_divergence", &fastsynth::js_divergence_##suffix);                       \
    m.impl("logit_loss_backward", &fastsynth::logit_loss_backward_##suffix);           \
  }
