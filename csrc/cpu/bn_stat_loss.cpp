// CPU kernels of the BatchNorm-statistics loss (fastsynth/ops/bn_stat_loss.py has the math).
//
//   bn_batch_stats_multi(xs)                -> (means, vars)   one pass over every feature map
//   bn_batch_stats_multi_backward(xs, means, g_means, g_vars) -> grads   one elementwise pass
//   bn_batch_stats / bn_batch_stats_backward: the same for one feature map
//
// Every layer's statistics are computed in ONE parallel region over work items (layer, channel
// or channel block, chunk of the N*H*W index space), so a 4-channel layer still splits over the
// batch and every core, and a list of 36 layers costs one region, not 36. Each item reduces its
// chunk in cache-sized blocks (two passes over a block held in L1, fp32 accumulation for
// fp32/fp16/bf16 inputs, fp64 for fp64) and merges the blocks as Welford states in double;
// a second short parallel loop merges the chunks of each channel in chunk order (deterministic).
//
// Layouts: x is read through its strides. Channels with unit stride (channels_last, 2-D (N,C))
// take the "rows" path: blocks of rows of contiguous channels, vectorised across channels.
// Otherwise the "plane" path walks each channel's (n, h, w) runs along w (H and W merged into
// one run where the strides allow); NCHW runs are contiguous and vectorised. Nothing is copied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "binding/bn_stat_loss.h"
#include "common/bn_stat_loss_math.h"
#include "common/welford.h"
#include "cpu/large_alloc.h"
#include "cpu/simd.h"

namespace fastsynth {
namespace bn_cpu {

constexpr int64_t kPlaneBlock = 4096;        // values per two-pass block on the plane path
constexpr int64_t kRowBlockElems = 8192;     // values per two-pass block on the rows path
constexpr int64_t kMaxChannelBlock = 128;    // channels per work item on the rows path
constexpr int64_t kSmallPlane = 1024;        // NCHW planes below this many values take the samples path
constexpr int64_t kSampleBlockElems = 1 << 18;  // values per two-pass block on the samples path (L2)
// samples path only while its per-(channel, position) accumulators (C*Q values) and a few samples
// stay in L2; larger samples (e.g. 512 x 28 x 28) take the plane path (runs of H*W values)
constexpr int64_t kSampleMaxElems = kSampleBlockElems / 4;
// statistics (forward) take the samples path only for planes up to 8x8: from 7x7 x 512 and
// 14x14 up, runs of H*W values on the plane path read faster (measured 6-7 GB/s against 2-4);
// the backward, a plain streaming pass, keeps the samples path up to kSmallPlane
constexpr int64_t kStatsSampleMaxQ = 64;

struct LayerDesc {
  const void* x = nullptr;
  void* g = nullptr;                 // gradient output (backward only)
  int64_t N = 0, C = 0, P = 1, Q = 1, M = 0;   // plane of P x Q values; M = N*P*Q per channel
  int64_t xs_n = 0, xs_c = 0, xs_p = 0, xs_q = 0;
  int64_t gs_n = 0, gs_c = 0, gs_p = 0, gs_q = 0;
  int64_t chan_offset = 0;           // first channel of this layer in the concatenated statistics
  int64_t partial_offset = 0;        // first chunk partial of this layer
  int64_t chunks = 1;                // chunks per channel
  int64_t cblock = 1;                // channels per work item (1 on the plane path)
  bool channel_inner = false;
  bool sample_major = false;         // "samples" path: dense small planes, whole samples per item
};

struct WorkItem {
  int32_t layer;
  int32_t c0;
  int64_t chunk;
};

// The loops header compiled twice (explicit ISA code, cpu/simd.h): for AVX2 + FMA + F16C and for
// the baseline; use_avx2() picks one per call.
namespace avx2 {
FS_AVX2_REGION_BEGIN
#include "cpu/bn_stat_loss_loops.h"
FS_AVX2_REGION_END
}  // namespace avx2

namespace baseline {
#include "cpu/bn_stat_loss_loops.h"
}  // namespace baseline

static bool use_avx2() { return simd::cpu_has_avx2(); }

// The shared description (csrc/binding/bn_stat_loss.h) plus the CPU-only samples-path choice.
static LayerDesc describe(const at::Tensor& x, const at::Tensor* g) {
  LayerDesc L;
  bn_binding::describe(L, x, g);
  // small dense NCHW planes (and a batch to split over threads): stream whole samples (x and g hold each sample's C planes
  // back to back) instead of one short run per sample and channel
  L.sample_major = !L.channel_inner && L.N >= 4 && L.P == 1 && L.Q > 1 && L.Q < kSmallPlane && L.C > 1 &&
                   (g || (L.C * L.Q <= kSampleMaxElems && L.Q <= kStatsSampleMaxQ)) && L.xs_q == 1 &&
                   L.xs_c == L.Q && (!g || (L.gs_q == 1 && L.gs_c == L.Q));
  return L;
}

// Split every layer into work items of about `target` values, at least a few per core in all.
static std::vector<WorkItem> plan(std::vector<LayerDesc>& layers, int nthreads) {
  int64_t total = 0, channels = 0, partials = 0;
  for (auto& L : layers) total += L.C * L.M;
  const int64_t target = std::min<int64_t>(int64_t(1) << 20, std::max<int64_t>(int64_t(1) << 15, total / (8 * std::max(nthreads, 1))));
  std::vector<WorkItem> items;
  for (size_t l = 0; l < layers.size(); ++l) {
    auto& L = layers[l];
    if (L.sample_major) {  // chunks of whole samples, all channels per item
      L.cblock = L.C;
      L.chunks = num_chunks<int64_t>(L.N, std::max<int64_t>(1, target / (L.C * L.Q)));
    } else {
      L.cblock = L.channel_inner ? std::min<int64_t>(L.C, kMaxChannelBlock) : 1;
      L.chunks = num_chunks<int64_t>(L.M, std::max<int64_t>(1, target / L.cblock));
    }
    L.chan_offset = channels;
    L.partial_offset = partials;
    channels += L.C;
    partials += L.C * L.chunks;
    for (int64_t c0 = 0; c0 < L.C; c0 += L.cblock)
      for (int64_t k = 0; k < L.chunks; ++k) items.push_back(WorkItem{static_cast<int32_t>(l), static_cast<int32_t>(c0), k});
  }
  return items;
}

template <typename in_t>
static void stats_impl(std::vector<LayerDesc>& layers, const std::vector<WorkItem>& items, int64_t total_channels,
                       at::Tensor& means, at::Tensor& vars, int nthreads) {
  using acc_t = std::conditional_t<std::is_same<in_t, double>::value, double, float>;
  int64_t n_partials = 0;
  for (auto& L : layers) n_partials += L.C * L.chunks;
  std::vector<Welford<double>> partials(n_partials);
  if (use_avx2()) avx2::run_stats_items<in_t, acc_t>(layers, items, partials.data(), nthreads);
  else baseline::run_stats_items<in_t, acc_t>(layers, items, partials.data(), nthreads);

  // merge the chunks of each channel, in chunk order
  std::vector<int32_t> chan_layer(total_channels);
  for (size_t l = 0; l < layers.size(); ++l)
    std::fill(chan_layer.begin() + layers[l].chan_offset, chan_layer.begin() + layers[l].chan_offset + layers[l].C, int32_t(l));
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "bn_batch_stats_merge", [&] {
    scalar_t* mo = means.data_ptr<scalar_t>();
    scalar_t* vo = vars.data_ptr<scalar_t>();
    at::parallel_for(0, total_channels, 256, [&](int64_t b, int64_t e) {
      for (int64_t gch = b; gch < e; ++gch) {
        const LayerDesc& L = layers[chan_layer[gch]];
        const Welford<double>* p = partials.data() + L.partial_offset + (gch - L.chan_offset) * L.chunks;
        Welford<double> st = p[0];
        for (int64_t k = 1; k < L.chunks; ++k) st = welford_merge(st, p[k]);
        mo[gch] = static_cast<scalar_t>(st.mean);
        vo[gch] = static_cast<scalar_t>(st.m2 / st.n);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> bn_batch_stats_multi_cpu(at::TensorList xs_in) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  bn_binding::check_inputs(xs, "bn_batch_stats_multi", c10::DeviceType::CPU);
  std::vector<LayerDesc> layers;
  int64_t total_channels = 0;
  for (const auto& x : xs) { layers.push_back(describe(x, nullptr)); total_channels += x.size(1); }
  const int nthreads = at::get_num_threads();
  auto items = plan(layers, nthreads);
  auto opts = xs[0].options().dtype(bn_binding::stat_dtype(xs[0].scalar_type()));
  at::Tensor means = at::empty({total_channels}, opts);
  at::Tensor vars = at::empty({total_channels}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "bn_batch_stats_multi", [&] {
    stats_impl<scalar_t>(layers, items, total_channels, means, vars, nthreads);
  });
  return {means, vars};
}

std::vector<at::Tensor> bn_batch_stats_multi_backward_cpu(at::TensorList xs_in, const at::Tensor& means,
                                                          const at::Tensor& g_means, const at::Tensor& g_vars) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  bn_binding::check_inputs(xs, "bn_batch_stats_multi_backward", c10::DeviceType::CPU);
  bn_binding::check_statistics(xs, means, g_means, g_vars, "bn_batch_stats_multi_backward");
  const at::Tensor mc = means.contiguous(), gmc = g_means.contiguous(), gvc = g_vars.contiguous();
  std::vector<at::Tensor> grads;
  std::vector<LayerDesc> layers;
  for (const auto& x : xs) {
    grads.push_back(empty_like_large(x));  // as empty_like (x's layout where dense); large blocks recycled
    layers.push_back(describe(x, &grads.back()));
  }
  const int nthreads = at::get_num_threads();
  auto items = plan(layers, nthreads);
  AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "bn_batch_stats_multi_backward", [&] {
    using stat_t = scalar_t;
    const stat_t* m = mc.data_ptr<stat_t>();
    const stat_t* gm = gmc.data_ptr<stat_t>();
    const stat_t* gv = gvc.data_ptr<stat_t>();
    auto run = [&](auto tag) {
      using in_t = decltype(tag);
      using acc_t = std::conditional_t<std::is_same<in_t, double>::value, double, float>;
      if (use_avx2()) avx2::run_backward_items<in_t, acc_t, stat_t>(layers, items, m, gm, gv, nthreads);
      else baseline::run_backward_items<in_t, acc_t, stat_t>(layers, items, m, gm, gv, nthreads);
    };
    switch (xs[0].scalar_type()) {
      case at::kDouble: run(double{}); break;
      case at::kFloat: run(float{}); break;
      case at::kHalf: run(c10::Half{}); break;
      case at::kBFloat16: run(c10::BFloat16{}); break;
      default: TORCH_CHECK(false, "bn_batch_stats_multi_backward: unsupported dtype ", xs[0].scalar_type());
    }
  });
  return grads;
}

}  // namespace bn_cpu
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) {
  fastsynth::bn_binding::register_ops<&fastsynth::bn_cpu::bn_batch_stats_multi_cpu,
                                      &fastsynth::bn_cpu::bn_batch_stats_multi_backward_cpu>(m);
}
