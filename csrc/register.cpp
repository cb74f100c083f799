// The one registration file of fastsynth._C.
//
// Every op's schema is declared here, in one TORCH_LIBRARY block, so the op table can be read
// in one place. Backend implementations register themselves next to their kernels:
//   csrc/cpu/<op>.cpp           TORCH_LIBRARY_IMPL(fastsynth, CPU, m)
//   csrc/cuda/<op>_binding.cpp  TORCH_LIBRARY_IMPL(fastsynth, CUDA, m)   (CUDA builds only)
// Fake (meta) kernels and autograd formulas are registered from Python (fastsynth/ops/<op>.py).
// The pybind11 module serves non-tensor utilities only.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastsynth, m) {
  // ---- bn_stat_loss (fastsynth/ops/bn_stat_loss.py) ----

  // ---- end bn_stat_loss ----

  // ---- logit losses (fastsynth/ops/logit_losses.py) ----

  // ---- end logit losses ----

  // ---- reinit (fastsynth/ops/reinit.py) ----
  // Fills every tensor of the list in place from the Philox stream keyed by seed (1-element
  // int64 tensor, read on the device) and by each element's offset in the concatenated list.
  // dist: "normal" (mean a, std b), "uniform" [a, b), "kaiming_uniform", "constant" (a);
  // dist, a, b: one entry for all tensors or one per tensor.
  m.def("reinit_(Tensor(a!)[] tensors, Tensor seed, str[] dist, float[] a, float[] b) -> ()");

  // ---- end reinit ----

  // ---- fused teacher BatchNorm (fastsynth/ops/fused_bn.py) ----

  // ---- end fused teacher BatchNorm ----
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
}
