// relu(a + b) in one pass over the maps: the residual join of a ResNet block (fastsynth/fuse.py,
// add_relu). An add followed by a ReLU reads and writes the map twice and allocates two
// outputs; this reads a and b once and writes one output (recycled when large,
// cpu/large_alloc.h). The backward is the ReLU's own (threshold_backward on the output), done in
// Python, so only the forward needs a kernel.
//
// Semantics are those of torch.relu(a + b): the sum is rounded to the tensor's dtype (computed
// in float for half/bfloat16), negative sums become 0 and NaN propagates (aten's own _add_relu
// clamps to the largest finite float and may drop NaN, so it is not used).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/large_alloc.h"

namespace fastsynth {
namespace {

template <typename scalar_t, typename acc_t>
void add_relu_loop(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  // grain: 64 K elements per task keeps the two threads streaming without per-task overhead
  at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t s = static_cast<scalar_t>(static_cast<acc_t>(a[i]) + static_cast<acc_t>(b[i]));
      // s < 0 is false for NaN, so NaN passes through as torch.relu does
      out[i] = static_cast<acc_t>(s) < acc_t(0) ? scalar_t(0) : s;
    }
  });
}

at::Tensor add_relu_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "add_relu: a and b must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "add_relu: a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "add_relu: a and b must be floating, got ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "add_relu: a and b must be on one device");
  // one memory format for both (a's, when dense in it), so the loop is flat over storage order
  const auto fmt = (a.dim() == 4 && !a.is_contiguous() && a.is_contiguous(at::MemoryFormat::ChannelsLast))
                       ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
  const at::Tensor ac = a.contiguous(fmt);
  const at::Tensor bc = b.contiguous(fmt);
  at::Tensor out = empty_large(a.sizes(), a.options(), fmt);
  const int64_t n = a.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "add_relu_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    add_relu_loop<scalar_t, acc_t>(ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) { m.impl("add_relu", &add_relu_cpu); }

}  // namespace fastsynth
