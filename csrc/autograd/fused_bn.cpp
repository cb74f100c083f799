// Autograd of the fused teacher BatchNorm (fastsynth/ops/fused_bn.py has the math), for every
// backend of the C++ ops (CPU and CUDA): registered for the Autograd key, so each of the
// teacher's BatchNorm layers costs one dispatcher call forward and one backward, without a
// Python autograd wrapper per layer.
//
//   (y, mean, var) = fused_bn_forward(x, weight, bias, running_mean, running_var, eps, relu, stats)
//   (dx, dweight, dbias) = fused_bn_backward(dy, x, ..., mean, dmean, dvar, eps, relu, stats, wgrad)
// dweight/dbias are computed (in the same pass) only when weight or bias needs a gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastsynth {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::fused_bn_forward", "")
                             .typed<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, double, bool, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastsynth::fused_bn_backward", "")
          .typed<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&, double, bool, bool, bool)>();
  return op;
}

struct FusedBnFunction : public torch::autograd::Function<FusedBnFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& running_mean, const Tensor& running_var, double eps, bool apply_relu,
                               bool with_stats) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, var] = forward_op().call(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats);
    ctx->save_for_backward({x, weight, bias, running_mean, running_var, mean});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["apply_relu"] = apply_relu;
    ctx->saved_data["with_stats"] = with_stats;
    ctx->set_materialize_grads(false);  // zeros only where a kernel input needs them, below
    if (!with_stats) ctx->mark_non_differentiable({mean, var});  // empty placeholders
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1], &bias = s[2], &running_mean = s[3], &running_var = s[4], &mean = s[5];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool apply_relu = ctx->saved_data["apply_relu"].toBool();
    const bool with_stats = ctx->saved_data["with_stats"].toBool();
    const bool need_wgrad = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    Tensor grad_y = grads[0].defined() ? grads[0].to(x.scalar_type()) : at::zeros_like(x);
    Tensor grad_mean = grads[1], grad_var = grads[2];
    if (with_stats) {
      if (!grad_mean.defined()) grad_mean = at::zeros_like(mean);
      if (!grad_var.defined()) grad_var = at::zeros_like(mean);
    } else {
      grad_mean = grad_var = mean;  // empty; unused by the kernels
    }
    auto [gx, gw, gb] = backward_op().call(grad_y, x, weight, bias, running_mean, running_var, mean, grad_mean,
                                           grad_var, eps, apply_relu, with_stats, need_wgrad);
    variable_list out(8);
    if (ctx->needs_input_grad(0)) out[0] = gx;
    if (ctx->needs_input_grad(1)) out[1] = gw;
    if (ctx->needs_input_grad(2)) out[2] = gb;
    return out;
  }
};

Tensor3 fused_bn_forward_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  const Tensor& running_mean, const Tensor& running_var, double eps, bool apply_relu,
                                  bool with_stats) {
  const variable_list o =
      FusedBnFunction::apply(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats);
  return {o[0], o[1], o[2]};
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("fused_bn_forward", &fastsynth::fused_bn_forward_autograd);
}
