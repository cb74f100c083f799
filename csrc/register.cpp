// The one registration file of fastsynth._C.
//
// Every op's schema is declared here, in one TORCH_LIBRARY block, so the op table can be read
// in one place. Backend implementations register themselves next to their kernels:
//   csrc/cpu/<op>.cpp           TORCH_LIBRARY_IMPL(fastsynth, CPU, m)
//   csrc/cuda/<op>_binding.cpp  TORCH_LIBRARY_IMPL(fastsynth, CUDA, m)   (CUDA builds only)
//   csrc/autograd/<op>.cpp      TORCH_LIBRARY_IMPL(fastsynth, Autograd, m)  (every backend)
// Fake (meta) kernels are registered from Python (fastsynth/ops/<op>.py), as are the Triton ops.
// The pybind11 module serves non-tensor utilities only.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/large_alloc.h"
#include "cpu/tuning.h"

TORCH_LIBRARY(fastsynth, m) {
  // ---- bn_stat_loss (fastsynth/ops/bn_stat_loss.py) ----
  // Per-channel batch statistics (mean, biased variance) over every dim but dim 1 of a 2/3/4-D
  // map; fp32 statistics for fp16/bf16/fp32 inputs, fp64 for fp64. The *_multi forms take one
  // map per layer and return the statistics of all layers concatenated (one launch).
  m.def("bn_batch_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_batch_stats_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor");
  m.def("bn_batch_stats_multi(Tensor[] xs) -> (Tensor means, Tensor vars)");
  m.def("bn_batch_stats_multi_backward(Tensor[] xs, Tensor means, Tensor grad_means, Tensor grad_vars) -> Tensor[]");

  // ---- end bn_stat_loss ----

  // ---- logit losses (fastsynth/ops/logit_losses.py) ----
  // Forward ops return the loss, the detached per-term values and the gradients w.r.t. the
  // logits for a unit grad_loss (empty [0] tensors where not requested); backward scales them.
  m.def(
      "synthesis_logit_loss(Tensor teacher_logits, Tensor student_logits, Tensor targets, float oh, float adv, "
      "bool agree_mask, bool need_grad_teacher, bool need_grad_student) -> (Tensor loss, Tensor oh_term, "
      "Tensor adv_term, Tensor agree_frac, Tensor grad_teacher, Tensor grad_student)");
  m.def(
      "kd_loss(Tensor student_logits, Tensor teacher_logits, float T, float scale, bool need_grad_student, "
      "bool need_grad_teacher) -> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  m.def(
      "js_divergence(Tensor student_logits, Tensor teacher_logits, float T, float clamp_min, float clamp_max, "
      "float scale, bool need_grad_student, bool need_grad_teacher) -> (Tensor loss, Tensor grad_student, "
      "Tensor grad_teacher)");
  m.def("logit_loss_backward(Tensor grad_loss, Tensor grad_a, Tensor grad_b) -> (Tensor, Tensor)");
  // ---- end logit losses ----

  // ---- reinit (fastsynth/ops/reinit.py) ----
  // Fills every tensor of the list in place from the Philox stream keyed by seed (1-element
  // int64 tensor, read on the device) and by each element's offset in the concatenated list.
  // dist: "normal" (mean a, std b), "uniform" [a, b), "kaiming_uniform", "constant" (a);
  // dist, a, b: one entry for all tensors or one per tensor.
  m.def("reinit_(Tensor(a!)[] tensors, Tensor seed, str[] dist, float[] a, float[] b) -> ()");

  // ---- end reinit ----

  // ---- noisy_linear (fastsynth/ops/noisy_linear.py) ----
  // K Linear layers on consecutive row blocks of nl rows: out[b] = bias[k] + x[b] @ weight[k],
  // k = b // nl; weight [K, in, out], bias [K, out], x [B, in] with B <= K * nl. The backward
  // returns empty [0] tensors for the gradients not requested.
  m.def("noisy_linear(Tensor x, Tensor weight, Tensor bias, int nl) -> Tensor");
  m.def(
      "noisy_linear_backward(Tensor grad_out, Tensor x, Tensor weight, int nl, bool need_grad_x, "
      "bool need_grad_weight, bool need_grad_bias) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // ---- end noisy_linear ----

  // ---- fused teacher BatchNorm (fastsynth/ops/fused_bn.py) ----
  // Eval-mode BatchNorm (+ optional ReLU) and, when with_stats, the per-channel batch mean and
  // biased variance of x, when with_instance_means the per-sample channel means inst_mean [N, C]
  // = mean over H, W of x (all fp32 for fp16/bf16 x; empty [0] when not asked), in one pass.
  m.def(
      "fused_bn_forward(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float eps, bool apply_relu, bool with_stats, bool with_instance_means=False) -> (Tensor y, Tensor mean, "
      "Tensor var, Tensor inst_mean)");
  // grad_x = relu_mask * grad_y * scale + grad_mean / M + 2 grad_var (x - mean) / M
  //          (+ grad_inst_mean[n, c] / (H W) when with_instance_means), one pass;
  // grad_weight/grad_bias (empty unless need_weight_grad) reduced in the same pass. Unused
  // tensor arguments (mean, grad_mean, grad_var without with_stats; grad_inst_mean without
  // with_instance_means) are not read.
  m.def(
      "fused_bn_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor running_mean, "
      "Tensor running_var, Tensor mean, Tensor grad_mean, Tensor grad_var, Tensor grad_inst_mean, float eps, "
      "bool apply_relu, bool with_stats, bool with_instance_means, bool need_weight_grad) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");

  // ---- end fused teacher BatchNorm ----

  // ---- CMI synthesizer (fastsynth/ops/contrastive_loss.py) ----
  // Cross-entropy of the rows of scale * q k^T against the diagonal labels, the first n_split
  // rows and the others averaged separately and summed; with the unit gradients w.r.t. q and k
  // (empty [0] where not requested). Backward: logit_loss_backward scales them.
  m.def(
      "contrastive_ce(Tensor queries, Tensor keys, float scale, int n_split, bool need_grad_queries, "
      "bool need_grad_keys) -> (Tensor loss, Tensor grad_queries, Tensor grad_keys)");
  // Per-sample channel means over H, W of every 4-D map, side by side: [B, sum_l C_l] (fp32 for
  // fp16/bf16/fp32 maps, fp64 for fp64); the backward spreads grad / (H W) over each plane.
  m.def("instance_mean_multi(Tensor[] xs) -> Tensor");
  m.def("instance_mean_multi_backward(Tensor[] xs, Tensor grad) -> Tensor[]");
  // ---- end CMI synthesizer ----

  // ---- frozen-weight 3x3 convolution (fastsynth/cpu/winograd.py) ----
  // conv2d(x, w, bias, stride 1, padding 1) by Winograd F(2x2, 3x3) with u = G w G^T laid out
  // (16, C, K), computed once per weight by the caller. input_grad: the same u gives the input
  // gradient, conv2d(x, w.transpose(0, 1).flip(-1, -2), padding=1). CPU, float32/float64; output
  // channels_last.
  m.def("winograd_conv3x3(Tensor x, Tensor u, Tensor? bias, bool input_grad=False) -> Tensor");
  // ---- end frozen-weight 3x3 convolution ----
}

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef FASTSYNTH_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(C10_STRINGIZE(TORCH_VERSION_MAJOR) "." C10_STRINGIZE(TORCH_VERSION_MINOR));
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsynth compiled kernels (ops are registered under torch.ops.fastsynth)";
  m.def("build_info", &build_info, "Which backends this build of fastsynth._C contains");
  m.def("empty_cache", [] { return fastsynth::large_block_cache().release(); },
        "Free the recycled large CPU output blocks (csrc/cpu/large_alloc.h); returns the bytes freed");
  m.def(
      "set_cpu_tuning",
      [](bool large_blocks, bool winograd_blas) {
        fastsynth::large_blocks_enabled().store(large_blocks);
        fastsynth::winograd_blas_enabled().store(winograd_blas);
      },
      "Switch the C++ side of the CPU tuning (csrc/cpu/tuning.h); set through fastsynth.cpu.config",
      pybind11::arg("large_blocks"), pybind11::arg("winograd_blas"));
}
