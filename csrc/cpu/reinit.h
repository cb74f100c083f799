// Shared by the CPU kernel (csrc/cpu/reinit.cpp) and the CUDA binding (csrc/cuda/reinit_binding.cpp)
// of fastsynth::reinit_: argument checks and the table of tensors (pointer, dtype, global element
// range, per-tensor distribution parameters).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <string>
#include <vector>

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
std::vector<ReinitEntry> reinit_entries(at::TensorList tensors, const at::Tensor& seed,
                                        const std::vector<std::string>& dist, c10::ArrayRef<double> a,
                                        c10::ArrayRef<double> b);

}  // namespace fastsynth
