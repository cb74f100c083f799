// ATen glue of the CUDA logit-loss kernels (csrc/cuda/logit_losses.cuh). Built only where torch
// has CUDA (setup.py). Checks are a second line of defence behind fastsynth/ops/logit_losses.py;
// target values are NOT checked here (that needs a host sync): the kernels clamp the index and
// make the row's CE NaN.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "binding/logit_losses.h"
#include "cuda/logit_losses.cuh"

namespace fastsynth {
namespace {

cuda::LogitDtype logit_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::LogitDtype::f32;
    case at::kDouble: return cuda::LogitDtype::f64;
    case at::kHalf: return cuda::LogitDtype::f16;
    case at::kBFloat16: return cuda::LogitDtype::bf16;
    default: TORCH_CHECK_TYPE(false, "fastsynth logit losses: unsupported dtype ", t);
  }
  return cuda::LogitDtype::f32;
}

using logit_binding::acc_scalar_type;
using logit_binding::Tensor3;
using logit_binding::unit_column_stride;

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  logit_binding::check_pair(op, a, a_name, b, b_name);
  TORCH_CHECK_VALUE(a.size(0) < (int64_t(1) << 31), op, ": more than 2^31 rows");
  TORCH_CHECK_VALUE(a.is_cuda() && b.is_cuda() && a.device() == b.device(), op, ": ", a_name, " and ", b_name,
                    " must be CUDA tensors on one device, got ", a.device(), " and ", b.device());
}

// the kernels' pointer to a gradient buffer: null for an empty (not wanted) one
void* grad_ptr(const at::Tensor& g) { return g.numel() != 0 ? g.data_ptr() : nullptr; }

at::Tensor grad_buffer(const at::Tensor& x, bool needed) {
  return needed ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, x.options());
}

// The two logit matrices of an op at unit column stride, their gradient buffers (for a unit
// grad_loss; [0] where not wanted), and the row partials [N, 3] and the loss in the accumulator
// dtype.
struct RowBuffers {
  at::Tensor a, b, grad_a, grad_b, partials, loss;
};

RowBuffers row_buffers(const at::Tensor& a, bool need_grad_a, const at::Tensor& b, bool need_grad_b) {
  RowBuffers r;
  r.a = unit_column_stride(a);
  r.b = unit_column_stride(b);
  r.grad_a = grad_buffer(r.a, need_grad_a);
  r.grad_b = grad_buffer(r.b, need_grad_b);
  const auto sopts = r.a.options().dtype(acc_scalar_type(r.a.scalar_type()));
  r.partials = at::empty({r.a.size(0), 3}, sopts);
  r.loss = at::empty({}, sopts);
  return r;
}

// The KL row kernel's arguments for teacher rows t and student rows s (unit column stride) with
// their gradient buffers gt, gs.
cuda::KlRowsArgs kl_rows_args(const at::Tensor& t, const at::Tensor& s, const int64_t* targets, const at::Tensor& gt,
                              const at::Tensor& gs, double inv_t, double ce_w, double kl_w, bool agree_mask) {
  return {t.data_ptr(), s.data_ptr(), t.stride(0), s.stride(0), targets,   grad_ptr(gt), grad_ptr(gs),
          t.size(0),    t.size(1),    inv_t,       ce_w,        kl_w,      agree_mask};
}

// Batch sums into the loss alone: loss = w_b sum_i b_i.
cuda::RowSumOutputs loss_only(const RowBuffers& r, double w_b) {
  return {r.partials.data_ptr(), r.loss.data_ptr(), nullptr, nullptr, nullptr, 0.0, w_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> synthesis_logit_loss_cuda(
    const at::Tensor& teacher_logits, const at::Tensor& student_logits, const at::Tensor& targets, double oh,
    double adv, bool agree_mask, bool need_grad_teacher, bool need_grad_student) {
  const char* op = "synthesis_logit_loss";
  check_pair(op, teacher_logits, "teacher_logits", student_logits, "student_logits");
  const int64_t N = teacher_logits.size(0);
  logit_binding::check_targets(op, targets, N);
  TORCH_CHECK_VALUE(targets.device() == teacher_logits.device(), op, ": targets must be on ", teacher_logits.device(),
                    " like the logits, got ", targets.device());
  const c10::cuda::CUDAGuard guard(teacher_logits.device());
  const RowBuffers r = row_buffers(teacher_logits, need_grad_teacher, student_logits, need_grad_student);
  const at::Tensor y = targets.contiguous();
  const auto sopts = r.loss.options();
  at::Tensor oh_term = at::empty({}, sopts), adv_term = at::empty({}, sopts), agree = at::empty({}, sopts);
  const double ce_w = oh / static_cast<double>(N), kl_w = -adv / static_cast<double>(N);
  const cuda::KlRowsArgs a = kl_rows_args(r.a, r.b, y.data_ptr<int64_t>(), r.grad_a, r.grad_b, 1.0, ce_w, kl_w,
                                          agree_mask);
  const cuda::RowSumOutputs out{r.partials.data_ptr(), r.loss.data_ptr(), oh_term.data_ptr(), adv_term.data_ptr(),
                                agree.data_ptr(), ce_w, kl_w};
  C10_CUDA_CHECK(cuda::kl_rows_launch(a, out, logit_dtype(r.a.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {r.loss, oh_term, adv_term, agree, r.grad_a, r.grad_b};
}

Tensor3 kd_loss_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T, double scale,
                     bool need_grad_student, bool need_grad_teacher) {
  const char* op = "kd_loss";
  check_pair(op, student_logits, "student_logits", teacher_logits, "teacher_logits");
  logit_binding::check_temperature(op, T);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const RowBuffers r = row_buffers(student_logits, need_grad_student, teacher_logits, need_grad_teacher);
  const cuda::KlRowsArgs a = kl_rows_args(r.b, r.a, nullptr, r.grad_b, r.grad_a, 1.0 / T, 0.0, scale, false);
  C10_CUDA_CHECK(
      cuda::kl_rows_launch(a, loss_only(r, scale), logit_dtype(r.a.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {r.loss, r.grad_a, r.grad_b};
}

Tensor3 js_divergence_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T,
                           double clamp_min, double clamp_max, double scale, bool need_grad_student,
                           bool need_grad_teacher) {
  check_pair("js_divergence", student_logits, "student_logits", teacher_logits, "teacher_logits");
  logit_binding::check_js_scalars(T, clamp_min, clamp_max);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const RowBuffers r = row_buffers(student_logits, need_grad_student, teacher_logits, need_grad_teacher);
  const cuda::JsRowsArgs a{r.a.data_ptr(),     r.b.data_ptr(),     r.a.stride(0), r.b.stride(0),
                           grad_ptr(r.grad_a), grad_ptr(r.grad_b), r.a.size(0),   r.a.size(1),
                           1.0 / T,            clamp_min,          clamp_max,     scale};
  C10_CUDA_CHECK(
      cuda::js_rows_launch(a, loss_only(r, scale), logit_dtype(r.a.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {r.loss, r.grad_a, r.grad_b};
}

// grad_loss is read by the kernel from device memory: no host sync.
std::tuple<at::Tensor, at::Tensor> logit_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_a,
                                                            const at::Tensor& grad_b) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "logit_loss_backward: grad_loss must have one element, got shape ",
                    grad_loss.sizes());
  // The kernel dereferences grad_loss on the device: a host (or other-device) tensor reaches this
  // kernel whenever one of the gradients is a CUDA tensor, and would be read through a host pointer.
  const at::Tensor& like = grad_a.numel() != 0 ? grad_a : grad_b;
  TORCH_CHECK_VALUE(grad_loss.is_cuda(), "logit_loss_backward: grad_loss must be a CUDA tensor on ", like.device(),
                    " (the device of the gradients), got a tensor on ", grad_loss.device());
  const c10::cuda::CUDAGuard guard(grad_loss.device());
  auto scale = [&](const at::Tensor& x, const char* name) {
    if (x.numel() == 0) return at::empty_like(x);
    TORCH_CHECK_VALUE(x.is_cuda() && x.device() == grad_loss.device(), "logit_loss_backward: ", name,
                      " must be on the device of grad_loss ", grad_loss.device(), ", got ", x.device());
    const at::Tensor xc = x.contiguous();
    // the kernel reads grad_loss in the accumulator type of x
    const at::Tensor g = grad_loss.reshape({}).to(acc_scalar_type(xc.scalar_type())).contiguous();
    at::Tensor out = at::empty_like(xc);
    C10_CUDA_CHECK(cuda::scale_grad_launch(g.data_ptr(), xc.data_ptr(), out.data_ptr(), xc.numel(),
                                           logit_dtype(xc.scalar_type()), c10::cuda::getCurrentCUDAStream()));
    return out;
  };
  return {scale(grad_a, "grad_a"), scale(grad_b, "grad_b")};
}

}  // namespace
}  // namespace fastsynth

FS_REGISTER_LOGIT_LOSSES(CUDA, cuda)
