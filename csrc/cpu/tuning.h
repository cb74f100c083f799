// Run-time switches of the CPU-only tuning, set from Python through fastsynth.cpu.config (one
// configuration object; fastsynth._C.set_cpu_tuning). Both default to on. They exist so that each
// mechanism can be measured against its absence in the same process and compared in tests.
#pragma once

#include <atomic>

namespace fastsynth {

// Large CPU output buffers come from the recycled huge-page blocks (cpu/large_alloc.h).
inline std::atomic<bool>& large_blocks_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

// The Winograd convolution calls the BLAS's sgemm_/dgemm_ directly (cpu/winograd_conv.cpp);
// off: the same products through at::mm.
inline std::atomic<bool>& winograd_blas_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

}  // namespace fastsynth
