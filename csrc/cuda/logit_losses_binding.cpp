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

at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": ", a_name, " must be 2-D [N, C], got shape ", a.sizes());
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": ", b_name, " must have the shape of ", a_name, " ", a.sizes(),
                    ", got ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.size(0) > 0 && a.size(1) > 0, op, ": ", a_name, " must not be empty, got shape ", a.sizes());
  TORCH_CHECK_VALUE(a.size(0) < (int64_t(1) << 31), op, ": more than 2^31 rows");
  TORCH_CHECK_VALUE(a.is_cuda() && b.is_cuda() && a.device() == b.device(), op, ": ", a_name, " and ", b_name,
                    " must be CUDA tensors on one device, got ", a.device(), " and ", b.device());
}

// unit column stride (rows may be strided); copies only when columns are strided
at::Tensor unit_column_stride(const at::Tensor& x) {
  if (x.size(1) <= 1 || x.stride(1) == 1) return x;
  return x.contiguous();
}

at::Tensor grad_buffer(const at::Tensor& x, bool needed) {
  return needed ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> synthesis_logit_loss_cuda(
    const at::Tensor& teacher_logits, const at::Tensor& student_logits, const at::Tensor& targets, double oh,
    double adv, bool agree_mask, bool need_grad_teacher, bool need_grad_student) {
  const char* op = "synthesis_logit_loss";
  check_pair(op, teacher_logits, "teacher_logits", student_logits, "student_logits");
  const int64_t N = teacher_logits.size(0), C = teacher_logits.size(1);
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64 class indices, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == N, op, ": targets must have shape [", N, "], got ",
                    targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == teacher_logits.device(), op, ": targets must be on ", teacher_logits.device(),
                    " like the logits, got ", targets.device());
  const c10::cuda::CUDAGuard guard(teacher_logits.device());
  const at::Tensor t = unit_column_stride(teacher_logits), s = unit_column_stride(student_logits);
  const at::Tensor y = targets.contiguous();
  at::Tensor gt = grad_buffer(t, need_grad_teacher), gs = grad_buffer(s, need_grad_student);
  const auto sopts = t.options().dtype(acc_scalar_type(t.scalar_type()));
  at::Tensor partials = at::empty({N, 3}, sopts);
  at::Tensor loss = at::empty({}, sopts), oh_term = at::empty({}, sopts), adv_term = at::empty({}, sopts),
             agree = at::empty({}, sopts);

  cuda::KlRowsArgs a{};
  a.t = t.data_ptr();
  a.s = s.data_ptr();
  a.stride_t = t.stride(0);
  a.stride_s = s.stride(0);
  a.targets = y.data_ptr<int64_t>();
  a.grad_t = need_grad_teacher ? gt.data_ptr() : nullptr;
  a.grad_s = need_grad_student ? gs.data_ptr() : nullptr;
  a.N = N;
  a.C = C;
  a.inv_t = 1.0;
  a.ce_w = oh / static_cast<double>(N);
  a.kl_w = -adv / static_cast<double>(N);
  a.agree_mask = agree_mask;
  cuda::RowSumOutputs out{partials.data_ptr(), loss.data_ptr(), oh_term.data_ptr(), adv_term.data_ptr(),
                          agree.data_ptr(), a.ce_w, a.kl_w};
  C10_CUDA_CHECK(cuda::kl_rows_launch(a, out, logit_dtype(t.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {loss, oh_term, adv_term, agree, gt, gs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_cuda(const at::Tensor& student_logits,
                                                            const at::Tensor& teacher_logits, double T, double scale,
                                                            bool need_grad_student, bool need_grad_teacher) {
  const char* op = "kd_loss";
  check_pair(op, student_logits, "student_logits", teacher_logits, "teacher_logits");
  TORCH_CHECK_VALUE(T > 0 && std::isfinite(T), op, ": T must be a positive finite temperature, got ", T);
  const int64_t N = student_logits.size(0), C = student_logits.size(1);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = unit_column_stride(student_logits), t = unit_column_stride(teacher_logits);
  at::Tensor gs = grad_buffer(s, need_grad_student), gt = grad_buffer(t, need_grad_teacher);
  const auto sopts = s.options().dtype(acc_scalar_type(s.scalar_type()));
  at::Tensor partials = at::empty({N, 3}, sopts);
  at::Tensor loss = at::empty({}, sopts);

  cuda::KlRowsArgs a{};
  a.t = t.data_ptr();
  a.s = s.data_ptr();
  a.stride_t = t.stride(0);
  a.stride_s = s.stride(0);
  a.targets = nullptr;
  a.grad_t = need_grad_teacher ? gt.data_ptr() : nullptr;
  a.grad_s = need_grad_student ? gs.data_ptr() : nullptr;
  a.N = N;
  a.C = C;
  a.inv_t = 1.0 / T;
  a.ce_w = 0.0;
  a.kl_w = scale;
  a.agree_mask = false;
  cuda::RowSumOutputs out{partials.data_ptr(), loss.data_ptr(), nullptr, nullptr, nullptr, 0.0, scale};
  C10_CUDA_CHECK(cuda::kl_rows_launch(a, out, logit_dtype(s.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {loss, gs, gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> js_divergence_cuda(const at::Tensor& student_logits,
                                                                  const at::Tensor& teacher_logits, double T,
                                                                  double clamp_min, double clamp_max, double scale,
                                                                  bool need_grad_student, bool need_grad_teacher) {
  const char* op = "js_divergence";
  check_pair(op, student_logits, "student_logits", teacher_logits, "teacher_logits");
  TORCH_CHECK_VALUE(T > 0 && std::isfinite(T), op, ": T must be a positive finite temperature, got ", T);
  TORCH_CHECK_VALUE(clamp_min > 0 && clamp_min <= clamp_max && clamp_max <= 1, op,
                    ": clamp must satisfy 0 < min <= max <= 1, got (", clamp_min, ", ", clamp_max, ")");
  const int64_t N = student_logits.size(0), C = student_logits.size(1);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = unit_column_stride(student_logits), t = unit_column_stride(teacher_logits);
  at::Tensor gs = grad_buffer(s, need_grad_student), gt = grad_buffer(t, need_grad_teacher);
  const auto sopts = s.options().dtype(acc_scalar_type(s.scalar_type()));
  at::Tensor partials = at::empty({N, 3}, sopts);
  at::Tensor loss = at::empty({}, sopts);

  cuda::JsRowsArgs a{};
  a.s = s.data_ptr();
  a.t = t.data_ptr();
  a.stride_s = s.stride(0);
  a.stride_t = t.stride(0);
  a.grad_s = need_grad_student ? gs.data_ptr() : nullptr;
  a.grad_t = need_grad_teacher ? gt.data_ptr() : nullptr;
  a.N = N;
  a.C = C;
  a.inv_t = 1.0 / T;
  a.lo = clamp_min;
  a.hi = clamp_max;
  a.w = scale;
  cuda::RowSumOutputs out{partials.data_ptr(), loss.data_ptr(), nullptr, nullptr, nullptr, 0.0, scale};
  C10_CUDA_CHECK(cuda::js_rows_launch(a, out, logit_dtype(s.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return {loss, gs, gt};
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

TORCH_LIBRARY_IMPL(fastsynth, CUDA, m) {
  m.impl("synthesis_logit_loss", &fastsynth::synthesis_logit_loss_cuda);
  m.impl("kd_loss", &fastsynth::kd_loss_cuda);
  m.impl("js_divergence", &fastsynth::js_divergence_cuda);
  m.impl("logit_loss_backward", &fastsynth::logit_loss_backward_cuda);
}
