// Autograd of the batched noisy layers (fastsynth/ops/noisy_linear.py has the math), registered
// for the Autograd key of the C++ op:
//
//   out = noisy_linear(x, weight, bias, nl)
//   (grad_x, grad_weight, grad_bias) = noisy_linear_backward(grad_out, x, weight, nl, need_x, need_w, need_b)
// Only the gradients of inputs that require grad are computed (grad_W is the expensive one: a
// full sweep writing K * in * out elements).
#include <torch/library.h>

#include "binding/autograd.h"

namespace fastsynth {
namespace {

struct NoisyLinearFunction : public torch::autograd::Function<NoisyLinearFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t nl) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>("fastsynth::noisy_linear");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = op.call(x, weight, bias, nl);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["nl"] = nl;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor3(const Tensor&, const Tensor&, const Tensor&, int64_t, bool, bool, bool)>(
            "fastsynth::noisy_linear_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1];
    const int64_t nl = ctx->saved_data["nl"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = ctx->needs_input_grad(2);
    auto [gx, gw, gb] = op.call(grads[0], x, weight, nl, need_x, need_w, need_b);
    variable_list out(4);
    if (need_x) out[0] = gx;
    if (need_w) out[1] = gw;
    if (need_b) out[2] = gb;
    return out;
  }
};

Tensor noisy_linear_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t nl) {
  return NoisyLinearFunction::apply(x, weight, bias, nl);
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("noisy_linear", &fastsynth::noisy_linear_autograd);
}
