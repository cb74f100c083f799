// Autograd of the batched noisy layers (fastsynth/ops/noisy_linear.py has the math), registered
// for the Autograd key of the C++ op:
//
//   out = noisy_linear(x, weight, bias, nl)
//   (grad_x, grad_weight, grad_bias) = noisy_linear_backward(grad_out, x, weight, nl, need_x, need_w, need_b)
// Only the gradients of inputs that require grad are computed (grad_W is the expensive one: a
// full sweep writing K * in * out elements).
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
                             .findSchemaOrThrow("fastsynth::noisy_linear", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastsynth::noisy_linear_backward", "")
          .typed<Tensor3(const Tensor&, const Tensor&, const Tensor&, int64_t, bool, bool, bool)>();
  return op;
}

struct NoisyLinearFunction : public torch::autograd::Function<NoisyLinearFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t nl) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor out = forward_op().call(x, weight, bias, nl);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["nl"] = nl;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1];
    const int64_t nl = ctx->saved_data["nl"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = ctx->needs_input_grad(2);
    auto [gx, gw, gb] = backward_op().call(grads[0], x, weight, nl, need_x, need_w, need_b);
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
