// Autograd of the fused logit losses (fastsynth/ops/logit_losses.py has the math), for every
// backend of the C++ ops (CPU and CUDA): registered for the Autograd key, so a call goes from
// Python to the kernel and back through the dispatcher without a Python autograd wrapper (that
// wrapper cost more than the whole kernel at C <= 100).
//
// Each forward op returns the loss, detached per-term values and the gradients w.r.t. both
// logits for a unit upstream gradient (empty [0] tensors where not requested). Backward is one
// op, logit_loss_backward, that scales the saved gradients by grad_loss read from the tensor
// (no host sync). The Triton ops keep their Python registration (torch.library.custom_op).
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
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---- typed handles of the ops (looked up once) ----

const auto& synthesis_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::synthesis_logit_loss", "")
                             .typed<Tensor6(const Tensor&, const Tensor&, const Tensor&, double, double, bool, bool,
                                            bool)>();
  return op;
}

const auto& kd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::kd_loss", "")
                             .typed<Tensor3(const Tensor&, const Tensor&, double, double, bool, bool)>();
  return op;
}

const auto& js_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastsynth::js_divergence", "")
          .typed<Tensor3(const Tensor&, const Tensor&, double, double, double, double, bool, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastsynth::logit_loss_backward", "")
                             .typed<Tensor2(const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

// Saves the unit-gradients (the last two outputs) and marks every output but the loss
// non-differentiable.
void save_unit_grads(AutogradContext* ctx, const variable_list& outputs) {
  const size_t n = outputs.size();
  ctx->save_for_backward({outputs[n - 2], outputs[n - 1]});
  ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
  ctx->set_materialize_grads(false);  // no zero tensors for the outputs that carry no gradient
}

// Gradients of the first two inputs: the saved unit-gradients scaled by grad_loss; undefined
// where the loss took no part in what is differentiated or the input's gradient was not
// requested (an empty saved gradient: static shapes, no sync).
variable_list scaled_unit_grads(AutogradContext* ctx, const Tensor& grad_loss, size_t n_inputs) {
  variable_list grads(n_inputs);
  if (!grad_loss.defined()) return grads;
  const variable_list saved = ctx->get_saved_variables();
  auto [grad_a, grad_b] = backward_op().call(grad_loss, saved[0], saved[1]);
  if (saved[0].sym_numel() != 0) grads[0] = grad_a;  // sym_: also under symbolic shapes (compile)
  if (saved[1].sym_numel() != 0) grads[1] = grad_b;
  return grads;
}

variable_list as_list(Tensor6&& t) {
  return {std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t), std::get<5>(t)};
}
variable_list as_list(Tensor3&& t) { return {std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }

// ---- autograd functions ----

struct SynthesisLogitLossFunction : public torch::autograd::Function<SynthesisLogitLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& teacher_logits, const Tensor& student_logits,
                               const Tensor& targets, double oh, double adv, bool agree_mask, bool need_grad_teacher,
                               bool need_grad_student) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list out = as_list(synthesis_op().call(teacher_logits, student_logits, targets, oh, adv, agree_mask,
                                                    need_grad_teacher, need_grad_student));
    save_unit_grads(ctx, out);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return scaled_unit_grads(ctx, grads[0], 8);
  }
};

struct KdLossFunction : public torch::autograd::Function<KdLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& student_logits, const Tensor& teacher_logits,
                               double T, double scale, bool need_grad_student, bool need_grad_teacher) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list out =
        as_list(kd_op().call(student_logits, teacher_logits, T, scale, need_grad_student, need_grad_teacher));
    save_unit_grads(ctx, out);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return scaled_unit_grads(ctx, grads[0], 6);
  }
};

struct JsDivergenceFunction : public torch::autograd::Function<JsDivergenceFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& student_logits, const Tensor& teacher_logits,
                               double T, double clamp_min, double clamp_max, double scale, bool need_grad_student,
                               bool need_grad_teacher) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list out = as_list(js_op().call(student_logits, teacher_logits, T, clamp_min, clamp_max, scale,
                                             need_grad_student, need_grad_teacher));
    save_unit_grads(ctx, out);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return scaled_unit_grads(ctx, grads[0], 8);
  }
};

// ---- Autograd-key kernels ----

Tensor6 synthesis_logit_loss_autograd(const Tensor& teacher_logits, const Tensor& student_logits,
                                      const Tensor& targets, double oh, double adv, bool agree_mask,
                                      bool need_grad_teacher, bool need_grad_student) {
  const variable_list o = SynthesisLogitLossFunction::apply(teacher_logits, student_logits, targets, oh, adv,
                                                            agree_mask, need_grad_teacher, need_grad_student);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

Tensor3 kd_loss_autograd(const Tensor& student_logits, const Tensor& teacher_logits, double T, double scale,
                         bool need_grad_student, bool need_grad_teacher) {
  const variable_list o =
      KdLossFunction::apply(student_logits, teacher_logits, T, scale, need_grad_student, need_grad_teacher);
  return {o[0], o[1], o[2]};
}

Tensor3 js_divergence_autograd(const Tensor& student_logits, const Tensor& teacher_logits, double T,
                               double clamp_min, double clamp_max, double scale, bool need_grad_student,
                               bool need_grad_teacher) {
  const variable_list o = JsDivergenceFunction::apply(student_logits, teacher_logits, T, clamp_min, clamp_max, scale,
                                                      need_grad_student, need_grad_teacher);
  return {o[0], o[1], o[2]};
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, Autograd, m) {
  m.impl("synthesis_logit_loss", &fastsynth::synthesis_logit_loss_autograd);
  m.impl("kd_loss", &fastsynth::kd_loss_autograd);
  m.impl("js_divergence", &fastsynth::js_divergence_autograd);
}
