// Torch-free CUDA kernel of fastsynth.ops.reinit_ (multi-tensor in-place fill from the Philox
// stream of csrc/common/philox.h). The ATen glue is csrc/cuda/reinit_binding.cpp.
//
// One thread per Philox group of 4 global elements (grid-stride): it draws the 4 lanes once and
// writes each lane to the tensor that holds that element (binary search in the table of tensor
// ends; groups straddling two tensors write into both). The seed is read from device memory, so
// a captured CUDA graph re-draws when the seed tensor is advanced inside the graph.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace fastsynth {
namespace cuda {

constexpr int kReinitMaxTensors = 64;  // per launch: the table travels as a kernel argument (< 4 KB)

enum ReinitDtype : int8_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct ReinitTable {
  void* ptr[kReinitMaxTensors];
  int64_t begin[kReinitMaxTensors];  // global index of the first element of each tensor
  int64_t end[kReinitMaxTensors];    // global index one past its last element (increasing)
  double lo[kReinitMaxTensors];      // normal: mean; uniform: a; constant: value
  double hi[kReinitMaxTensors];      // normal: std; uniform: b
  int8_t dtype[kReinitMaxTensors];   // ReinitDtype
  int8_t dist[kReinitMaxTensors];    // philox::Dist (normal, uniform, constant)
  int count;                         // tensors in this table (1..kReinitMaxTensors)
  int any_normal;                    // some tensor is normal: draw Box-Muller pairs
};

// Fills the table's tensors (non-empty ones only, ends increasing). seed: device pointer to one
// int64. Returns the launch error (cudaSuccess when nothing was to be done).
cudaError_t launch_reinit(const ReinitTable& table, const int64_t* seed, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsynth
