// ATen glue of the CUDA kernel of fastsynth::reinit_ (built only where torch has CUDA).
// The table of tensors travels as a kernel argument: one launch for up to kReinitMaxTensors
// tensors (more are filled in consecutive launches with the same global indexing, hence the same
// values). Nothing here synchronises with the host: the seed stays on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/philox.h"
#include "binding/reinit.h"
#include "cuda/reinit.cuh"

namespace fastsynth {
namespace {

cuda::ReinitDtype to_reinit_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::kF32;
    case at::kDouble: return cuda::kF64;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    default: TORCH_CHECK(false, "fastsynth::reinit_: unsupported dtype ", st);
  }
}

void reinit_cuda(at::TensorList tensors, const at::Tensor& seed, std::vector<std::string> dist,
                 c10::ArrayRef<double> a, c10::ArrayRef<double> b) {
  const std::vector<ReinitEntry> entries = reinit_entries(tensors, seed, dist, a, b);
  TORCH_CHECK(seed.is_cuda(), "fastsynth::reinit_ (CUDA): seed must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(seed.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(seed.device().index()).stream();
  const int64_t* seed_ptr = seed.const_data_ptr<int64_t>();

  cuda::ReinitTable table{};
  table.count = 0;
  auto flush = [&]() {
    if (table.count == 0) return;
    C10_CUDA_CHECK(cuda::launch_reinit(table, seed_ptr, stream));
    table = cuda::ReinitTable{};
    table.count = 0;
  };
  for (const ReinitEntry& e : entries) {
    if (e.end == e.begin) continue;  // empty tensors take no slot
    const int i = table.count++;
    table.ptr[i] = e.ptr;
    table.begin[i] = e.begin;
    table.end[i] = e.end;
    table.lo[i] = e.lo;
    table.hi[i] = e.hi;
    table.dtype[i] = to_reinit_dtype(e.dtype);
    table.dist[i] = static_cast<int8_t>(e.dist);
    table.any_normal |= e.dist == philox::kNormal ? 1 : 0;
    if (table.count == cuda::kReinitMaxTensors) flush();
  }
  flush();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsynth, CUDA, m) { m.impl("reinit_", &reinit_cuda); }

}  // namespace fastsynth
