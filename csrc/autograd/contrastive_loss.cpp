// Autograd of the CMI ops (fastsynth/ops/contrastive_loss.py has the math), for the Autograd key.
//
// contrastive_ce returns (loss, unit grad_q, unit grad_k); backward scales the saved unit
// gradients by grad_loss with fastsynth::logit_loss_backward (read on the device, no sync), as
// the logit losses do. instance_mean_multi's backward is instance_mean_multi_backward.
#include <torch/library.h>

#include "binding/autograd.h"

namespace fastsynth {
namespace {

struct ContrastiveCeFunction
    : UnitGradLoss<ContrastiveCeFunction, Tensor3, const Tensor&, const Tensor&, double, int64_t, bool, bool> {
  static constexpr const char* kOp = "fastsynth::contrastive_ce";
};

struct InstanceMeanMultiFunction : public torch::autograd::Function<InstanceMeanMultiFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList xs) {
    static const auto op = find_op<Tensor(at::TensorList)>("fastsynth::instance_mean_multi");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor means = op.call(xs);
    ctx->save_for_backward(variable_list(xs.begin(), xs.end()));
    return {means};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<std::vector<Tensor>(at::TensorList, const Tensor&)>(
        "fastsynth::instance_mean_multi_backward");
    return op.call(ctx->get_saved_variables(), grads[0]);
  }
};

Tensor instance_mean_multi_autograd(at::TensorList xs) { return InstanceMeanMultiFunction::apply(xs)[0]; }

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("contrastive_ce", &fastsynth::ContrastiveCeFunction::kernel);
  m.impl("instance_mean_multi", &fastsynth::instance_mean_multi_autograd);
}
