// Glue shared by the Autograd-key kernels of the C++ ops (csrc/autograd/*.cpp): the op handles,
// and the autograd of the losses whose forward also returns their unit gradients.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <tuple>
#include <utility>

namespace fastsynth {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

// The typed handle of the registered op `name` ("fastsynth::..."). Look it up once, when first
// needed (a function-local static): the schemas are registered while the library loads.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// Autograd of a loss op Self::kOp with signature Out(In...), whose outputs are
//   (loss, <detached values>..., unit gradient of input 0, unit gradient of input 1)
// where the unit gradients are those of the loss for grad_loss = 1, or empty [0] tensors where
// not requested. Backward scales them by grad_loss with fastsynth::logit_loss_backward, which
// reads grad_loss on the device (no host sync). Every output but the loss is non-differentiable.
// Use: struct F : UnitGradLoss<F, Out, In...> { static constexpr const char* kOp = "fastsynth::op"; };
// and register F::kernel for the Autograd key.
template <typename Self, typename Out, typename... In>
struct UnitGradLoss : public torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, In... in) {
    static const auto op = find_op<Out(In...)>(Self::kOp);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const variable_list out = std::apply([](const auto&... o) { return variable_list{o...}; }, op.call(in...));
    const size_t n = out.size();
    ctx->save_for_backward({out[n - 2], out[n - 1]});
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs that carry no gradient
    return out;
  }

  // Gradients of the first two inputs; undefined where the loss took no part in what is
  // differentiated or the input's gradient was not requested (an empty saved gradient: static
  // shapes, no sync).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto scale_op =
        find_op<Tensor2(const Tensor&, const Tensor&, const Tensor&)>("fastsynth::logit_loss_backward");
    variable_list in_grads(sizeof...(In));
    if (!grads[0].defined()) return in_grads;
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_a, grad_b] = scale_op.call(grads[0], saved[0], saved[1]);
    if (saved[0].sym_numel() != 0) in_grads[0] = grad_a;  // sym_: also under symbolic shapes (compile)
    if (saved[1].sym_numel() != 0) in_grads[1] = grad_b;
    return in_grads;
  }

  // The op's kernel for the Autograd key.
  static Out kernel(In... in) {
    const variable_list out = Self::apply(in...);
    return as_tuple(out, std::make_index_sequence<std::tuple_size_v<Out>>{});
  }

 private:
  template <size_t... I>
  static Out as_tuple(const variable_list& v, std::index_sequence<I...>) {
    return Out{v[I]...};
  }
};

}  // namespace fastsynth
