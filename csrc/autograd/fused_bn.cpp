// Autograd of the fused teacher BatchNorm (fastsynth/ops/fused_bn.py has the math), for every
// backend of the C++ ops (CPU and CUDA): registered for the Autograd key, so each of the
// teacher's BatchNorm layers costs one dispatcher call forward and one backward, without a
// Python autograd wrapper per layer.
//
//   (y, mean, var, inst_mean) = fused_bn_forward(x, weight, bias, running_mean, running_var, eps, relu, stats, inst)
//   (dx, dweight, dbias) = fused_bn_backward(dy, x, ..., mean, dmean, dvar, dinst_mean, eps, relu, stats, inst, wgrad)
// dweight/dbias are computed (in the same pass) only when weight or bias needs a gradient; the
// instance-mean term only when inst_mean received a gradient (it needs no saved tensor).
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include <typeinfo>

#include "binding/autograd.h"

namespace fastsynth {
namespace {

using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// A second handle on a fresh output's storage (same sizes, strides and version counter) with no
// autograd history, made without a dispatcher call. Saving the batch mean -- an output of this
// function -- as it is makes autograd keep it through a detach when saving and again when
// unpacking (an aten::detach each under a dispatch mode, a TensorImpl copy each otherwise); the
// alias is saved as a plain input-like tensor (no grad_fn: no reference cycle, no detach). Only
// for plain dense tensors; any other tensor (fake, functional, batched) takes the detach.
Tensor history_free_alias(const Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (typeid(*impl) != typeid(c10::TensorImpl) || !impl->has_storage() ||
      impl->key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                                  c10::DispatchKey::Functionalize})))
    return t.detach();
  auto alias = c10::make_intrusive<c10::TensorImpl>(c10::Storage(impl->storage()), impl->key_set(), impl->dtype());
  alias->set_sizes_and_strides(impl->sizes(), impl->strides(), impl->storage_offset());
  alias->set_version_counter(impl->version_counter());
  return Tensor(std::move(alias));
}

struct FusedBnFunction : public torch::autograd::Function<FusedBnFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& running_mean, const Tensor& running_var, double eps, bool apply_relu,
                               bool with_stats, bool with_instance_means) {
    static const auto op = find_op<Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           double, bool, bool, bool)>("fastsynth::fused_bn_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, var, inst] =
        op.call(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats, with_instance_means);
    // mean: not yet an output here (no history); saved through an alias, see history_free_alias
    ctx->save_for_backward({x, weight, bias, running_mean, running_var, with_stats ? history_free_alias(mean) : mean});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["apply_relu"] = apply_relu;
    ctx->saved_data["with_stats"] = with_stats;
    ctx->saved_data["with_instance_means"] = with_instance_means;
    ctx->set_materialize_grads(false);  // zeros only where a kernel input needs them, below
    variable_list placeholders;  // empty outputs (one call: each call replaces the set)
    if (!with_stats) placeholders.insert(placeholders.end(), {mean, var});
    if (!with_instance_means) placeholders.push_back(inst);
    ctx->mark_non_differentiable(placeholders);
    return {y, mean, var, inst};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool, bool, bool, bool)>(
            "fastsynth::fused_bn_backward");
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
    // an unused inst_mean adds nothing: no term, no zeros
    const bool inst = ctx->saved_data["with_instance_means"].toBool() && grads[3].defined();
    auto [gx, gw, gb] = op.call(grad_y, x, weight, bias, running_mean, running_var, mean, grad_mean, grad_var,
                                inst ? grads[3] : mean, eps, apply_relu, with_stats, inst, need_wgrad);
    variable_list out(9);
    if (ctx->needs_input_grad(0)) out[0] = gx;
    if (ctx->needs_input_grad(1)) out[1] = gw;
    if (ctx->needs_input_grad(2)) out[2] = gb;
    return out;
  }
};

Tensor4 fused_bn_forward_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  const Tensor& running_mean, const Tensor& running_var, double eps, bool apply_relu,
                                  bool with_stats, bool with_instance_means) {
  const auto o = FusedBnFunction::apply(x, weight, bias, running_mean, running_var, eps, apply_relu, with_stats,
                                        with_instance_means);
  return {o[0], o[1], o[2], o[3]};
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("fused_bn_forward", &fastsynth::fused_bn_forward_autograd);
}
