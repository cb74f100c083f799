// Autograd of the fused logit losses (fastsynth/ops/logit_losses.py has the math), for every
// backend of the C++ ops (CPU and CUDA): registered for the Autograd key, so a call goes from
// Python to the kernel and back through the dispatcher without a Python autograd wrapper (that
// wrapper cost more than the whole kernel at C <= 100).
//
// Each forward op returns the loss, detached per-term values and the gradients w.r.t. both
// logits for a unit upstream gradient (empty [0] tensors where not requested). Backward is one
// op, logit_loss_backward, that scales the saved gradients by grad_loss read from the tensor
// (no host sync). The Triton ops keep their Python registration (torch.library.custom_op).
#include <torch/library.h>

#include "binding/autograd.h"

namespace fastsynth {
namespace {

using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

struct SynthesisLogitLossFunction
    : UnitGradLoss<SynthesisLogitLossFunction, Tensor6, const Tensor&, const Tensor&, const Tensor&, double, double,
                   bool, bool, bool> {
  static constexpr const char* kOp = "fastsynth::synthesis_logit_loss";
};

struct KdLossFunction
    : UnitGradLoss<KdLossFunction, Tensor3, const Tensor&, const Tensor&, double, double, bool, bool> {
  static constexpr const char* kOp = "fastsynth::kd_loss";
};

struct JsDivergenceFunction : UnitGradLoss<JsDivergenceFunction, Tensor3, const Tensor&, const Tensor&, double,
                                           double, double, double, bool, bool> {
  static constexpr const char* kOp = "fastsynth::js_divergence";
};

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("synthesis_logit_loss", &fastsynth::SynthesisLogitLossFunction::kernel);
  m.impl("kd_loss", &fastsynth::KdLossFunction::kernel);
  m.impl("js_divergence", &fastsynth::JsDivergenceFunction::kernel);
}
