// Output buffers for the CPU kernels that write whole feature maps or weight gradients
// (BN-statistics backward, fused BatchNorm, noisy-layer grad_W): large blocks are recycled.
//
// Why: glibc maps every block of 32 MB or more afresh (and trims freed heap tops), and a fresh
// mapping costs a page fault per 4 KB page on first touch, with the kernel zeroing each page:
// writing a 51 MB gradient into new memory took 38 ms against 7 ms into memory already mapped
// (measured on the 2-core machine), so the faults, not the kernel, set the speed of a backward
// pass. A synthesis step allocates the same shapes every step and frees them before the next,
// so blocks of kMinCachedBytes or more are kept when their tensor dies and handed out again for
// the next request of the same size; at most kMaxCachedBytes stay cached (fastsynth.empty_cache()
// releases them; fastsynth.cpu.config.large_blocks = False hands out torch's own buffers
// instead). New blocks are 2 MB aligned and advised as huge pages (Linux), which makes
// their first touch cheaper as well. The buffers are ordinary tensors with their own deleter.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "cpu/tuning.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastsynth {

constexpr size_t kMinCachedBytes = size_t(4) << 20;
constexpr size_t kMaxCachedBytes = size_t(512) << 20;
constexpr size_t kBlockAlign = size_t(2) << 20;

class LargeBlockCache {
 public:
  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // newest first: the block freed last is the likeliest to still be in the caches
      for (size_t j = free_.size(); j-- > 0;) {
        if (free_[j].second == nbytes) {
          void* p = free_[j].first;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(j));
          cached_ -= nbytes;
          return p;
        }
      }
    }
    void* p = nullptr;
    const size_t rounded = (nbytes + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
    if (posix_memalign(&p, kBlockAlign, rounded) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint; ignored where transparent huge pages are off
#endif
    return p;
  }

  void give_back(void* p, size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + nbytes <= kMaxCachedBytes) {
        free_.emplace_back(p, nbytes);
        cached_ += nbytes;
        return;
      }
    }
    std::free(p);
  }

  // Frees every cached block; returns the bytes released.
  size_t release() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    size_t n = 0;
    for (auto& b : blocks) {
      std::free(b.first);
      n += b.second;
    }
    return n;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t cached_ = 0;
};

inline LargeBlockCache& large_block_cache() {
  static LargeBlockCache* cache = new LargeBlockCache();  // never destroyed: tensors may outlive static destructors
  return *cache;
}

// An uninitialised CPU tensor of these sizes and strides (strides of a dense layout).
inline at::Tensor empty_strided_large(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
#if defined(__linux__)
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && nbytes >= kMinCachedBytes && large_blocks_enabled().load(std::memory_order_relaxed)) {
    void* p = large_block_cache().take(nbytes);
    if (p != nullptr)
      return at::from_blob(p, sizes, strides, [nbytes](void* q) { large_block_cache().give_back(q, nbytes); }, options);
  }
#endif
  return at::empty_strided(sizes, strides, options);
}

// As at::empty(sizes, options.memory_format(fmt)).
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options,
                              at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes < kMinCachedBytes) return at::empty(sizes, options.memory_format(fmt));  // the common, small case
  const at::Tensor meta = at::empty(sizes, options.device(at::kMeta).memory_format(fmt));  // strides, no memory
  return empty_strided_large(sizes, meta.strides(), options);
}

// As at::empty_like(x): x's strides where x is dense, its suggested memory format otherwise.
inline at::Tensor empty_like_large(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return empty_strided_large(x.sizes(), x.strides(), x.options());
  return empty_large(x.sizes(), x.options(), x.suggest_memory_format());
}

}  // namespace fastsynth
