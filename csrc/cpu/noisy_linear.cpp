// CPU kernels of fastsynth.ops.noisy_linear: K Linear layers applied to consecutive row blocks of
// nl rows (NAYER's noisy layers), out[b] = bias[k] + x[b] @ W[k], k = b / nl, W: [K, I, O].
//
// The per-layer GEMMs are skinny (nl = 10 rows against a 512 x 1000 weight): each weight element
// is used by only nl rows, so the op is bound by streaming the weight (82 MB at K = 40), and the
// point of these kernels is to touch each weight row as few times as possible:
//   forward   one pass over W: per layer, the nl output rows of a column block stay in L1/L2
//             while blocks of 8 weight rows stream past (out[r] += sum_j x[r, i+j] W[i+j]).
//   backward  one pass over W that reads each weight row once and, in the same sweep,
//               grad_x[r, i] = <grad_out[r, :], W[i, :]>            (nl dot products)
//               grad_W[i, :] = sum_r x[r, i] grad_out[r, :]          (written once)
//             with the layer's nl grad_out rows held in cache (10 rows per sweep), the grad_W
//             row leaving through streaming stores. MKL runs the second product as a GEMM of
//             inner dimension nl, far below the bandwidth floor.
// grad_bias[k] = sum of the layer's grad_out rows (a separate small pass). grad_W blocks come
// from the recycled large blocks of cpu/large_alloc.h (a fresh 82 MB block costs more in page
// faults than the kernel, ~60 ms).
//
// Vectors are GCC/Clang vector extensions of 32 bytes (8 floats, 4 doubles), cloned for
// x86-64-v4 / v3 / baseline (target_clones, picked at load time): 256-bit FMAs are far faster
// than the memory stream here. Every output element is computed by one task in a fixed order
// (column blocks are multiples of the vector width, row chunks fixed; neither depends on the
// thread count), so results are deterministic for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/large_alloc.h"
#include "cpu/noisy_linear_kernels.h"

namespace fastsynth {
namespace {

using namespace noisy_linear_kernels;

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

// x [B, I] and weight [K, I, O] of one CPU float dtype with B <= K * nl, and `other` (the bias or
// grad_out, named `name`) of x's dtype on the CPU with the sizes {`rows`, O} (described by `shape`).
void check_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t nl, const char* op, const at::Tensor& other,
                  const char* name, int64_t rows, const char* shape) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, in_features], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be [K, in_features, out_features], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x.shape[1] must equal weight.shape[1]");
  TORCH_CHECK(nl >= 1, op, ": nl must be >= 1");
  TORCH_CHECK(x.size(0) <= weight.size(0) * nl, op, ": batch ", x.size(0), " exceeds K * nl = ",
              weight.size(0) * nl);
  TORCH_CHECK(other.dim() == 2 && other.size(0) == rows && other.size(1) == weight.size(2), op, ": ", name,
              " must be ", shape);
  TORCH_CHECK(other.scalar_type() == x.scalar_type() && other.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor of x's dtype");
}

// Runs body(t) for every t in [0, ntasks) on the intra-op threads, handing the tasks out one at
// a time from an atomic counter. On the shared 2-core machine one of the two threads is often
// descheduled for a while; with the static split of at::parallel_for the op then waits for that
// thread's whole half (measured: 2 threads slower than 1). Each task writes only its own
// outputs, so results do not depend on which thread ran which task.
template <typename F>
void parallel_tasks(int64_t ntasks, const F& body) {
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) body(t);
  });
}

// Length of the blocks that cut n into about `parts` parts, a multiple of `align`.
int64_t block_len(int64_t n, int64_t parts, int64_t align) {
  int64_t len = (n + parts - 1) / parts;
  len = (len + align - 1) / align * align;
  return std::max<int64_t>(len, align);
}

at::Tensor noisy_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                            int64_t nl) {
  check_inputs(x_in, weight_in, nl, "noisy_linear", bias_in, "bias", weight_in.size(0), "[K, out_features]");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t B = x.size(0), I = x.size(1), O = weight.size(2);
  at::Tensor out = at::empty({B, O}, x.options());
  if (B == 0 || O == 0) return out;
  const int64_t kb = (B + nl - 1) / nl;  // layers in use
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "noisy_linear", [&] {
    constexpr int64_t align = 64;  // elements: a multiple of the vector width
    // enough column blocks for both threads when few layers are in use; whole rows otherwise
    const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + kb - 1) / kb);
    const int64_t ob = block_len(O, want, align);
    const int64_t nob = (O + ob - 1) / ob;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_tasks(kb * nob, [&](int64_t t) {
      const int64_t k = t / nob, o0 = (t % nob) * ob, o1 = std::min(O, o0 + ob);
      const int64_t nr = std::min(nl, B - k * nl);
      forward_tile_cloned<scalar_t>(xp + k * nl * I, wp + k * I * O, bp + k * O, op + k * nl * O, nr, I, O, o0, o1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_linear_backward_cpu(const at::Tensor& grad_out_in,
                                                                         const at::Tensor& x_in,
                                                                         const at::Tensor& weight_in, int64_t nl,
                                                                         bool need_grad_x, bool need_grad_weight,
                                                                         bool need_grad_bias) {
  check_inputs(x_in, weight_in, nl, "noisy_linear_backward", grad_out_in, "grad_out", x_in.size(0),
               "[B, out_features]");
  const at::Tensor g = grad_out_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = x.size(0), I = x.size(1), K = weight.size(0), O = weight.size(2);
  const int64_t kb = (B + nl - 1) / nl;
  at::Tensor gx = need_grad_x ? at::empty({B, I}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = need_grad_weight ? empty_large({K, I, O}, x.options()) : at::empty({0}, x.options());
  at::Tensor gb = need_grad_bias ? at::empty({K, O}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "noisy_linear_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    if ((need_grad_x || need_grad_weight) && B > 0 && I > 0) {
      scalar_t* gxp = need_grad_x ? gx.data_ptr<scalar_t>() : nullptr;
      scalar_t* gwp = need_grad_weight ? gw.data_ptr<scalar_t>() : nullptr;
      const int64_t want = std::max<int64_t>(1, (8 * at::get_num_threads() + kb - 1) / kb);
      const int64_t ib = block_len(I, want, 1);
      const int64_t nib = (I + ib - 1) / ib;
      parallel_tasks(kb * nib, [&](int64_t t) {
        thread_local std::vector<scalar_t> scratch;
        scratch.resize(static_cast<size_t>(nl + O));
        const int64_t k = t / nib, i0 = (t % nib) * ib, i1 = std::min(I, i0 + ib);
        const int64_t nr = std::min(nl, B - k * nl);
        backward_rows_cloned<scalar_t>(xp + k * nl * I, gp + k * nl * O, wp + k * I * O,
                                       gxp ? gxp + k * nl * I : nullptr, gwp ? gwp + k * I * O : nullptr, nr, I, O,
                                       i0, i1, scratch.data(), scratch.data() + nl, need_grad_x, need_grad_weight);
      });
      // layers past the batch take no gradient
      if (need_grad_weight && kb < K) gw.narrow(0, kb, K - kb).zero_();
    } else if (need_grad_weight) {
      gw.zero_();
    }
    if (need_grad_bias) {
      scalar_t* gbp = gb.data_ptr<scalar_t>();
      at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          bias_grad_row(gp + k * nl * O, gbp + k * O, k < kb ? std::min(nl, B - k * nl) : 0, O);
        }
      });
    }
  });
  return {gx, gw, gb};
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) {
  m.impl("noisy_linear", &fastsynth::noisy_linear_cpu);
  m.impl("noisy_linear_backward", &fastsynth::noisy_linear_backward_cpu);
}
