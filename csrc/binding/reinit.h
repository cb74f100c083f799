// ATen glue shared by the CPU kernel (csrc/cpu/reinit.cpp) and the CUDA binding
// (csrc/cuda/reinit_binding.cpp) of fastsynth::reinit_: the argument checks and the table of
// tensors (pointer, dtype, global element range, per-tensor distribution parameters). It lives
// here, not under csrc/cpu/, so that the CUDA side includes no CPU file; header-only (inline), so
// either build compiles it where it is used.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/philox.h"

namespace fastsynth {

struct ReinitEntry {
  void* ptr;
  at::ScalarType dtype;
  int64_t begin;  // global index of the tensor's first element in the concatenated list
  int64_t end;
  double lo;      // normal: mean; uniform: a; constant: value
  double hi;      // normal: std; uniform: b
  int dist;       // philox::Dist of this tensor
};

// Checks the arguments (TORCH_CHECK) and builds the table. dist, a and b hold one entry for all
// tensors or one per tensor; kaiming_uniform becomes uniform with bounds +-1/sqrt(fan_in).
inline std::vector<ReinitEntry> reinit_entries(at::TensorList tensors, const at::Tensor& seed,
                                               const std::vector<std::string>& dist, c10::ArrayRef<double> a,
                                               c10::ArrayRef<double> b) {
  const size_t n = tensors.size();
  TORCH_CHECK(n > 0, "fastsynth::reinit_: tensors must be a non-empty list");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastsynth::reinit_: seed must be a one-element int64 tensor");
  TORCH_CHECK((dist.size() == 1 || dist.size() == n) && (a.size() == 1 || a.size() == n) &&
                  (b.size() == 1 || b.size() == n),
              "fastsynth::reinit_: dist, a and b must have one entry or one per tensor");
  std::vector<ReinitEntry> entries;
  entries.reserve(n);
  int64_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    const std::string& name = dist.size() == 1 ? dist[0] : dist[i];
    const double ai = a.size() == 1 ? a[0] : a[i], bi = b.size() == 1 ? b[0] : b[i];
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "fastsynth::reinit_: tensors must be float32/float64/float16/bfloat16");
    TORCH_CHECK(t.device() == seed.device(), "fastsynth::reinit_: tensors and seed must share one device");
    TORCH_CHECK(t.is_contiguous(), "fastsynth::reinit_: tensors must be contiguous");
    ReinitEntry e;
    e.ptr = t.numel() > 0 ? t.data_ptr() : nullptr;
    e.dtype = st;
    e.begin = offset;
    offset += t.numel();
    e.end = offset;
    e.lo = ai;
    e.hi = bi;
    if (name == "normal") {
      e.dist = philox::kNormal;
      TORCH_CHECK(bi > 0, "fastsynth::reinit_: normal needs std b > 0");
    } else if (name == "uniform") {
      e.dist = philox::kUniform;
      TORCH_CHECK(ai < bi, "fastsynth::reinit_: uniform needs a < b");
    } else if (name == "kaiming_uniform") {
      e.dist = philox::kUniform;
      TORCH_CHECK(t.dim() >= 2, "fastsynth::reinit_: kaiming_uniform needs tensors of 2 or more dimensions");
      int64_t fan_in = t.size(1);
      for (int64_t d = 2; d < t.dim(); ++d) fan_in *= t.size(d);
      TORCH_CHECK(fan_in > 0, "fastsynth::reinit_: kaiming_uniform needs a non-zero fan-in");
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));  // kaiming_uniform_(a=sqrt(5))
      e.lo = -bound;
      e.hi = bound;
    } else if (name == "constant") {
      e.dist = philox::kConstant;
    } else {
      TORCH_CHECK(false, "fastsynth::reinit_: dist must be normal, uniform, kaiming_uniform or constant, got ", name);
    }
    entries.push_back(e);
  }
  return entries;
}

}  // namespace fastsynth
