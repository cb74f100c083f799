// Output buffers for the CPU kernels that write whole feature maps (BN-statistics backward,
// fused BatchNorm): large ones are backed by transparent huge pages.
//
// A freshly allocated buffer is mapped on first touch, one page fault per 4 KB page, and the
// kernel zeroes every page: writing a 51 MB gradient into new memory took 38 ms against 7 ms
// into memory already mapped (measured on the 2-core machine), so the faults, not the kernel,
// set the speed of a backward pass. Asking for huge pages (madvise(MADV_HUGEPAGE), which the
// system honours in its default "madvise" mode) faults once per 2 MB instead. The buffer is an
// ordinary tensor with its own deleter; buffers below 32 MB keep torch's allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastsynth {

constexpr int64_t kHugePage = int64_t(2) << 20;
// glibc serves blocks below its dynamic mmap threshold (up to 32 MB) from the heap, where a
// freed block is reused without new faults; from 32 MB on every allocation is a fresh mapping
constexpr int64_t kHugePageMinBytes = int64_t(32) << 20;

// An uninitialised tensor of these sizes and strides (strides of a dense layout).
inline at::Tensor empty_strided_large(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (options.device().is_cpu() && bytes >= kHugePageMinBytes) {
    const int64_t padded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(static_cast<size_t>(kHugePage), static_cast<size_t>(padded));
    if (p != nullptr) {
      madvise(p, static_cast<size_t>(padded), MADV_HUGEPAGE);  // advice only: failure is harmless
      return at::from_blob(p, sizes, strides, [](void* q) { std::free(q); }, options);
    }
  }
#endif
  return at::empty_strided(sizes, strides, options);
}

// As at::empty(sizes, options.memory_format(fmt)).
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt) {
  const at::Tensor meta = at::empty(sizes, options.device(at::kMeta).memory_format(fmt));  // strides, no memory
  return empty_strided_large(sizes, meta.strides(), options);
}

// As at::empty_like(x): x's strides where x is dense, its suggested memory format otherwise.
inline at::Tensor empty_like_large(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return empty_strided_large(x.sizes(), x.strides(), x.options());
  return empty_large(x.sizes(), x.options(), x.suggest_memory_format());
}

}  // namespace fastsynth
