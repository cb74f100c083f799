// Autograd of the CMI ops (fastsynth/ops/contrastive_loss.py has the math), for the Autograd key.
//
// contrastive_ce returns (loss, unit grad_q, unit grad_k); backward scales the saved unit
// gradients by grad_loss with fastsynth::logit_loss_backward (read on the device, no sync), as
// the logit losses do. instance_mean_multi's backward is instance_mean_multi_backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastsynth {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

const auto& ce_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::contrastive_ce", "")
                             .typed<Tensor3(const Tensor&, const Tensor&, double, int64_t, bool, bool)>();
  return op;
}

const auto& scale_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::logit_loss_backward", "")
                             .typed<Tensor2(const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

const auto& mean_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::instance_mean_multi", "")
                             .typed<Tensor(at::TensorList)>();
  return op;
}

const auto& mean_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::instance_mean_multi_backward", "")
                             .typed<std::vector<Tensor>(at::TensorList, const Tensor&)>();
  return op;
}

struct ContrastiveCeFunction : public torch::autograd::Function<ContrastiveCeFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, double scale,
                               int64_t n_split, bool need_grad_q, bool need_grad_k) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, gq, gk] = ce_op().call(q, k, scale, n_split, need_grad_q, need_grad_k);
    ctx->save_for_backward({gq, gk});
    ctx->mark_non_differentiable({gq, gk});
    ctx->set_materialize_grads(false);
    return {loss, gq, gk};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    auto [gq, gk] = scale_op().call(grads[0], saved[0], saved[1]);
    if (saved[0].sym_numel() != 0) out[0] = gq;  // empty: the gradient was not requested
    if (saved[1].sym_numel() != 0) out[1] = gk;
    return out;
  }
};

struct InstanceMeanMultiFunction : public torch::autograd::Function<InstanceMeanMultiFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList xs) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor means = mean_op().call(xs);
    ctx->save_for_backward(variable_list(xs.begin(), xs.end()));
    return {means};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    return mean_backward_op().call(saved, grads[0]);
  }
};

Tensor3 contrastive_ce_autograd(const Tensor& q, const Tensor& k, double scale, int64_t n_split, bool need_grad_q,
                                bool need_grad_k) {
  const variable_list o = ContrastiveCeFunction::apply(q, k, scale, n_split, need_grad_q, need_grad_k);
  return {o[0], o[1], o[2]};
}

Tensor instance_mean_multi_autograd(at::TensorList xs) { return InstanceMeanMultiFunction::apply(xs)[0]; }

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("contrastive_ce", &fastsynth::contrastive_ce_autograd);
  m.impl("instance_mean_multi", &fastsynth::instance_mean_multi_autograd);
}
