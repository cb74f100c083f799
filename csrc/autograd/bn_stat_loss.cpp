// Autograd of the BatchNorm batch-statistics ops (fastsynth/ops/bn_stat_loss.py has the math),
// for every backend of the C++ ops (CPU and CUDA): registered for the Autograd key, so the
// statistics of a synthesis step go from Python to the kernel and back through the dispatcher
// without a Python autograd wrapper.
//
//   (mean, var) = bn_batch_stats(x)
//   dL/dx = bn_batch_stats_backward(x, mean, dL/dmean, dL/dvar)
//         = dL/dmean_c / M + 2 dL/dvar_c (x - mean_c) / M        (one read of x, one write)
// An output that took no part in what is differentiated contributes zero (autograd
// materialises its gradient as zeros). The Triton ops keep their Python registration.
#include <torch/library.h>

#include "binding/autograd.h"

namespace fastsynth {
namespace {

struct BnBatchStatsFunction : public torch::autograd::Function<BnBatchStatsFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x) {
    static const auto op = find_op<Tensor2(const Tensor&)>("fastsynth::bn_batch_stats");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [mean, var] = op.call(x);
    ctx->save_for_backward({x, mean});
    return {mean, var};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
        "fastsynth::bn_batch_stats_backward");
    const variable_list saved = ctx->get_saved_variables();
    return {op.call(saved[0], saved[1], grads[0], grads[1])};
  }
};

struct BnBatchStatsMultiFunction : public torch::autograd::Function<BnBatchStatsMultiFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList xs) {
    static const auto op = find_op<Tensor2(at::TensorList)>("fastsynth::bn_batch_stats_multi");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [means, vars] = op.call(xs);
    variable_list to_save(xs.begin(), xs.end());
    to_save.push_back(means);
    ctx->save_for_backward(to_save);
    return {means, vars};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<std::vector<Tensor>(at::TensorList, const Tensor&, const Tensor&, const Tensor&)>(
        "fastsynth::bn_batch_stats_multi_backward");
    variable_list saved = ctx->get_saved_variables();
    const Tensor means = saved.back();
    saved.pop_back();
    return op.call(saved, means, grads[0], grads[1]);
  }
};

Tensor2 bn_batch_stats_autograd(const Tensor& x) {
  const variable_list o = BnBatchStatsFunction::apply(x);
  return {o[0], o[1]};
}

Tensor2 bn_batch_stats_multi_autograd(at::TensorList xs) {
  const variable_list o = BnBatchStatsMultiFunction::apply(xs);
  return {o[0], o[1]};
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("bn_batch_stats", &fastsynth::bn_batch_stats_autograd);
  m.impl("bn_batch_stats_multi", &fastsynth::bn_batch_stats_multi_autograd);
}
