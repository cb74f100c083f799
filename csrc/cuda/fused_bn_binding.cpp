// ATen glue for the CUDA kernels of the fused teacher BatchNorm (csrc/cuda/fused_bn.cu).
// Built only where torch has CUDA (setup.py); the kernels themselves are torch-free.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>

#include "binding/fused_bn.h"
#include "cuda/fused_bn.cuh"

namespace fastsynth {
namespace {

// The kernels index rows and tiles with 32-bit divisions (a 64-bit division is a called
// subroutine on the GPU and makes the fp64 kernels spill), so rows per channel stay below 2^31.
cuda::FusedBnRows rows_of(const at::Tensor& x, const at::Tensor& y, bool keep_batch) {
  const auto g = cuda::fused_bn_rows(x.sizes().data(), x.strides().data(), y.strides().data(), keep_batch);
  TORCH_CHECK(g.R < (int64_t(1) << 31), "fused_bn (cuda): x of shape ", x.sizes(), " and strides ", x.strides(),
              " has ", g.R, " rows per channel after merging its dimensions; at most 2^31 - 1 are supported "
              "(make x contiguous or channels_last)");
  return g;
}

cuda::FusedBnPlan plan_of(const cuda::FusedBnRows& g) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto p = cuda::fused_bn_plan(g, sms);
  TORCH_CHECK(p.tiles < (int64_t(1) << 31), "fused_bn (cuda): ", g.M, " values per channel in ", g.R,
              " rows make ", p.tiles, " tiles; at most 2^31 - 1 are supported");
  return p;
}

struct Named {
  const char* name;
  const at::Tensor* t;
};

// Every tensor on x's CUDA device (a kernel would otherwise read another device's memory through
// unified addressing, or fault), per-channel tensors 1-D of size C.
void check_inputs(const char* op, const at::Tensor& x, std::initializer_list<Named> per_channel) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got a tensor on ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, op, ": x must be a non-empty 4-D tensor, got shape ", x.sizes());
  for (const auto& p : per_channel) {
    TORCH_CHECK(p.t->device() == x.device(), op, ": ", p.name, " must be on x's device ", x.device(), ", got ",
                p.t->device());
    TORCH_CHECK(p.t->dim() == 1 && p.t->size(0) == x.size(1), op, ": ", p.name, " must be 1-D of size C = ",
                x.size(1), ", got shape ", p.t->sizes());
  }
}

// Calls f(scalar_ptr_type_tag, acc_tag) with the CUDA element type of x.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble: f(double(), double()); break;
    case at::kFloat: f(float(), float()); break;
    case at::kHalf: f(__half(), float()); break;
    case at::kBFloat16: f(__nv_bfloat16(), float()); break;
    default: TORCH_CHECK(false, "fused_bn: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bn_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps, bool apply_relu, bool with_stats, bool with_instance_means) {
  check_inputs("fused_bn_forward", x,
               {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean}, {"running_var", &running_var}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty(x.sizes(), x.options().memory_format(fbn_binding::out_format(x)));
  const auto adt = fbn_binding::stat_dtype(x.scalar_type());
  const auto w = weight.to(adt).contiguous(), b = bias.to(adt).contiguous();
  const auto rm = running_mean.to(adt).contiguous(), rv = running_var.to(adt).contiguous();
  const auto g = rows_of(x, y, with_instance_means);
  const auto plan = plan_of(g);
  const int64_t splits = plan.splits;
  // inst_mean is accumulated by atomic adds (fused_bn.cuh): zeroed
  auto [mean, var, inst] = fbn_binding::stat_outputs(x, with_stats, with_instance_means, true);
  auto workspace = at::empty({with_stats ? 3 * x.size(1) * splits : 0}, x.options().dtype(adt));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    C10_CUDA_CHECK((cuda::fused_bn_forward_launch<scalar_t, acc_t>(
        reinterpret_cast<const scalar_t*>(x.const_data_ptr()), reinterpret_cast<scalar_t*>(y.data_ptr()),
        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), rm.const_data_ptr<acc_t>(), rv.const_data_ptr<acc_t>(),
        acc_t(eps), apply_relu, with_stats, with_stats ? mean.data_ptr<acc_t>() : nullptr,
        with_stats ? var.data_ptr<acc_t>() : nullptr, with_stats ? workspace.data_ptr<acc_t>() : nullptr,
        with_instance_means ? inst.data_ptr<acc_t>() : nullptr, g, plan, stream)));
  });
  return {y, mean, var, inst};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_bn_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean_in,
    const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in, const at::Tensor& grad_inst_in, double eps,
    bool apply_relu, bool with_stats, bool with_instance_means, bool need_weight_grad) {
  check_inputs("fused_bn_backward", x,
               {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean}, {"running_var", &running_var}});
  if (with_stats)
    check_inputs("fused_bn_backward", x, {{"mean", &mean_in}, {"grad_mean", &grad_mean_in}, {"grad_var", &grad_var_in}});
  if (with_instance_means)
    TORCH_CHECK(grad_inst_in.device() == x.device() && grad_inst_in.dim() == 2 && grad_inst_in.size(0) == x.size(0) &&
                    grad_inst_in.size(1) == x.size(1),
                "fused_bn_backward: grad_inst_mean must be (N, C) = (", x.size(0), ", ", x.size(1), ") on ",
                x.device(), ", got ", grad_inst_in.sizes(), " on ", grad_inst_in.device());
  TORCH_CHECK(grad_y_in.device() == x.device(), "fused_bn_backward: grad_y must be on x's device ", x.device(),
              ", got ", grad_y_in.device());
  TORCH_CHECK(grad_y_in.sizes() == x.sizes() && grad_y_in.scalar_type() == x.scalar_type(),
              "fused_bn_backward: grad_y must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              grad_y_in.sizes(), " ", grad_y_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = fbn_binding::out_format(x);
  const auto grad_y = grad_y_in.contiguous(fmt);
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t C = x.size(1);
  const auto adt = fbn_binding::stat_dtype(x.scalar_type());
  const auto w = weight.to(adt).contiguous(), b = bias.to(adt).contiguous();
  const auto rm = running_mean.to(adt).contiguous(), rv = running_var.to(adt).contiguous();
  at::Tensor mean, gmean, gvar, ginst;
  if (with_stats) {
    mean = mean_in.to(adt).contiguous();
    gmean = grad_mean_in.to(adt).contiguous();
    gvar = grad_var_in.to(adt).contiguous();
  }
  if (with_instance_means) ginst = grad_inst_in.to(adt).contiguous();
  // grad_y and grad_x share strides (both dense in the same format)
  const auto g = rows_of(x, grad_y, with_instance_means);
  const auto plan = plan_of(g);
  const int64_t splits = plan.splits;
  auto pg = at::empty({need_weight_grad ? C : 0, splits}, x.options().dtype(adt));
  auto pgx = at::empty({need_weight_grad ? C : 0, splits}, x.options().dtype(adt));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto s_tag, auto a_tag) {
    using scalar_t = decltype(s_tag);
    using acc_t = decltype(a_tag);
    C10_CUDA_CHECK((cuda::fused_bn_backward_launch<scalar_t, acc_t>(
        reinterpret_cast<const scalar_t*>(grad_y.const_data_ptr()), reinterpret_cast<const scalar_t*>(x.const_data_ptr()),
        reinterpret_cast<scalar_t*>(grad_x.data_ptr()), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        rm.const_data_ptr<acc_t>(), rv.const_data_ptr<acc_t>(), with_stats ? mean.const_data_ptr<acc_t>() : nullptr,
        with_stats ? gmean.const_data_ptr<acc_t>() : nullptr, with_stats ? gvar.const_data_ptr<acc_t>() : nullptr,
        with_instance_means ? ginst.const_data_ptr<acc_t>() : nullptr, acc_t(eps), apply_relu, with_stats,
        need_weight_grad, need_weight_grad ? pg.data_ptr<acc_t>() : nullptr,
        need_weight_grad ? pgx.data_ptr<acc_t>() : nullptr, g, plan, stream)));
  });
  return fbn_binding::backward_result(grad_x, need_weight_grad ? pgx.sum(1) : at::Tensor(),
                                     need_weight_grad ? pg.sum(1) : at::Tensor(), weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsynth, CUDA, m) {
  m.impl("fused_bn_forward", &fused_bn_forward_cuda);
  m.impl("fused_bn_backward", &fused_bn_backward_cuda);
}

}  // namespace fastsynth
