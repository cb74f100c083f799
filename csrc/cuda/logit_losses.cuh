// Torch-free CUDA kernels of the teacher/student logit losses (math: fastsynth/ops/logit_losses.py,
// shared arithmetic: csrc/common/logit_loss_math.h). Declarations of the host launchers; the
// kernels are in logit_losses.cu. Included by the ATen binding (host compiler) and by the .cu.
//
// One row pair per thread group, in one launch:
//   C <= 1024: a warp per row, 4 rows per 128-thread block;
//   C >  1024: a 512-thread block per row (warp-shuffle merges, then shared memory).
// Pass 1 reads the rows once with 16-byte vector loads (where rows are 16-byte aligned) and
// streams every element into a per-thread online state (KlState: running maxima, sums and the
// centred KL accumulator; or two LseStates for JS) and per-thread argmaxes; the states merge
// exactly across lanes and warps. Pass 2 re-reads the rows (from L2) and writes the gradients.
// Each group writes its row's partial results (a_i, b_i, c_i) to an [N, 3] buffer; a second
// single-block launch sums them in a fixed order (deterministic, no atomics, no host sync) into
// the 0-dim outputs.
// Out-of-range targets: the index is clamped for the load and that row's CE is NaN.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastsynth {
namespace cuda {

enum class LogitDtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Outputs of the final batch sum (accumulator type: float, or double for f64 inputs), given the
// per-row partials a_i, b_i, c_i:
//   loss = w_a sum a + w_b sum b,  a_mean = sum a / N,  b_mean = -sum b / N,  c_mean = sum c / N
// (a_mean, b_mean, c_mean may be null).
struct RowSumOutputs {
  void* partials;  // [N, 3] scratch
  void* loss;
  void* a_mean;
  void* b_mean;
  void* c_mean;
  double w_a, w_b;
};

// ce_w * CE_i + kl_w * m_i * KL_i per row (temperature 1/inv_t); partials (CE_i, m_i KL_i, m_i).
struct KlRowsArgs {
  const void* t;  // [N, C] teacher logits, unit column stride
  const void* s;  // [N, C] student logits
  int64_t stride_t, stride_s;  // row strides in elements
  const int64_t* targets;  // [N] or null (no CE term)
  void* grad_t;  // [N, C] contiguous, or null (not written)
  void* grad_s;  // [N, C] contiguous, or null
  int64_t N, C;
  double inv_t, ce_w, kl_w;
  bool agree_mask;
};

// Clamped JS per row (P from s, Q from t); gradients scaled by w; partials (0, js_i, 1).
struct JsRowsArgs {
  const void* s;  // [N, C] student logits, unit column stride
  const void* t;  // [N, C] teacher logits
  int64_t stride_s, stride_t;
  void* grad_s;  // [N, C] contiguous, or null
  void* grad_t;  // [N, C] contiguous, or null
  int64_t N, C;
  double inv_t, lo, hi, w;
};

cudaError_t kl_rows_launch(const KlRowsArgs& args, const RowSumOutputs& out, LogitDtype dtype, cudaStream_t stream);
cudaError_t js_rows_launch(const JsRowsArgs& args, const RowSumOutputs& out, LogitDtype dtype, cudaStream_t stream);

// out[k] = grad_loss[0] * x[k] for k < n; grad_loss in the accumulator type (float, or double for
// f64), read on the device.
cudaError_t scale_grad_launch(const void* grad_loss, const void* x, void* out, int64_t n, LogitDtype dtype,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsynth
