// ATen glue shared by the CPU kernels (csrc/cpu/fused_bn.cpp) and the CUDA binding
// (csrc/cuda/fused_bn_binding.cpp) of the fused teacher BatchNorm: the layout decision (the fake
// kernels in fastsynth/ops/fused_bn.py make the same), the statistics outputs and the backward's
// result. One copy, so the two backends cannot drift apart.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastsynth {
namespace fbn_binding {

// channels_last path only when x is channels_last-dense and not also NCHW-dense; every other
// layout is read through its strides. The outputs (y, grad_x) are dense in this format.
inline bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat out_format(const at::Tensor& x) {
  return use_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Statistics and instance means are kept in fp32 for fp16/bf16/fp32 maps, fp64 for fp64.
inline at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// (mean, var, inst_mean) of the forward: [C], [C] with statistics and [N, C] with instance
// means (zeroed when the kernel accumulates into it), empty [0] tensors otherwise.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> stat_outputs(const at::Tensor& x, bool with_stats,
                                                                   bool with_instance_means, bool zero_inst) {
  const auto opt = x.options().dtype(stat_dtype(x.scalar_type()));
  const int64_t C = x.size(1);
  at::Tensor inst = !with_instance_means ? at::empty({0}, opt)
                    : zero_inst          ? at::zeros({x.size(0), C}, opt)
                                         : at::empty({x.size(0), C}, opt);
  return {at::empty({with_stats ? C : 0}, opt), at::empty({with_stats ? C : 0}, opt), inst};
}

// (grad_x, grad_weight, grad_bias) of the backward: the reduced sums gw/gb (accumulation dtype)
// in weight's and bias's dtypes, or empty [0] tensors where they were not computed (undefined).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(const at::Tensor& grad_x, const at::Tensor& gw,
                                                                      const at::Tensor& gb, const at::Tensor& weight,
                                                                      const at::Tensor& bias) {
  if (!gw.defined()) return {grad_x, at::empty({0}, weight.options()), at::empty({0}, bias.options())};
  return {grad_x, gw.to(weight.scalar_type()), gb.to(bias.scalar_type())};
}

}  // namespace fbn_binding
}  // namespace fastsynth
