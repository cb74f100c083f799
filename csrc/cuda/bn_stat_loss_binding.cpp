// ATen glue of the CUDA BatchNorm-statistics kernels (built only where torch has CUDA).
// Describes every feature map as a BnLayer (sizes, element strides; no copies) and plans the work
// items on the host once per call layout (shapes, strides, dtype, device); both tables are
// written to the device through kernel arguments and cached. Per call, a device copy of the layer
// table gets the call's data pointers (again through kernel arguments), then one statistics kernel
// (or one backward kernel) runs for all layers. No call copies host memory to the device, so a
// CUDA graph that captures it replays no host copy on any torch version.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "binding/bn_stat_loss.h"
#include "cuda/bn_stat_loss.cuh"

namespace fastsynth {
namespace cuda {
namespace {

BnDtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return BnDtype::f32;
    case at::kDouble: return BnDtype::f64;
    case at::kHalf: return BnDtype::f16;
    case at::kBFloat16: return BnDtype::bf16;
    default: break;
  }
  TORCH_CHECK(false, "bn_batch_stats (cuda): unsupported dtype ", t);
  return BnDtype::f32;
}

void check_inputs(const std::vector<at::Tensor>& xs, const char* op) {
  bn_binding::check_inputs(xs, op, c10::DeviceType::CUDA);
}

BnLayer describe(const at::Tensor& x, const at::Tensor* g) {
  BnLayer L{};
  bn_binding::describe(L, x, g);
  return L;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Host bytes to a new device buffer through kernel arguments, ordered on `stream`: no
// host-to-device copy, so a CUDA graph capturing it replays no read of host memory.
at::Tensor upload_by_args(const std::vector<uint8_t>& bytes, const at::Device& dev, cudaStream_t stream) {
  at::Tensor buf = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte).device(dev));
  BnByteChunk chunk;
  for (size_t off = 0; off < bytes.size(); off += kBnArgBytes) {
    const int n = static_cast<int>(std::min<size_t>(kBnArgBytes, bytes.size() - off));
    std::memcpy(chunk.b, bytes.data() + off, n);
    C10_CUDA_CHECK(bn_write_bytes(static_cast<uint8_t*>(buf.data_ptr()) + off, chunk, n, stream));
  }
  return buf;
}

// Layer table (data pointers left null) and item table of one call layout, on the device.
struct BnTables {
  at::Tensor buf;  // layers at byte 0, items at `ioff`
  size_t lbytes = 0, ioff = 0;
  int64_t n_layers = 0, n_items = 0, n_groups = 0, n_channels = 0, n_partials = 0;
};

// Tables depend only on the shapes, strides, dtype and device of a call: built once per such key
// (kept in a bounded LRU cache; tables built during a graph capture live in the graph's pool and
// are not kept).
constexpr size_t kBnCacheMax = 64;
std::mutex g_cache_mutex;
std::list<std::pair<std::vector<int64_t>, BnTables>> g_cache;  // most recent first

BnTables tables_for(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>* grads, cudaStream_t stream) {
  std::vector<int64_t> key{xs[0].device().index(), static_cast<int64_t>(xs[0].scalar_type()), grads ? 1 : 0};
  for (size_t l = 0; l < xs.size(); ++l) {
    key.push_back(xs[l].dim());
    for (int d = 0; d < xs[l].dim(); ++d) {
      key.push_back(xs[l].size(d));
      key.push_back(xs[l].stride(d));
      if (grads) key.push_back((*grads)[l].stride(d));
    }
  }
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it) {
      if (it->first == key) {
        g_cache.splice(g_cache.begin(), g_cache, it);
        return g_cache.front().second;
      }
    }
  }
  std::vector<BnLayer> layers;
  for (size_t l = 0; l < xs.size(); ++l) {
    BnLayer L = describe(xs[l], grads ? &(*grads)[l] : nullptr);
    // the kernels split value indices with 32-bit divisions (a 64-bit one is a called subroutine)
    TORCH_CHECK(L.M < (int64_t(1) << 31), "bn_batch_stats (cuda): xs[", l, "] of shape ", xs[l].sizes(), " has ", L.M,
                " values per channel; at most 2^31 - 1 are supported");
    L.x = nullptr;  // per call: bn_set_pointers
    L.g = nullptr;
    layers.push_back(L);
  }
  std::vector<BnItem> items;
  BnTables t;
  t.n_partials = bn_plan(layers, items, &t.n_groups, &t.n_channels);
  t.n_layers = static_cast<int64_t>(layers.size());
  t.n_items = static_cast<int64_t>(items.size());
  t.lbytes = layers.size() * sizeof(BnLayer);
  t.ioff = (t.lbytes + 15) / 16 * 16;
  std::vector<uint8_t> bytes(t.ioff + items.size() * sizeof(BnItem), 0);
  std::memcpy(bytes.data(), layers.data(), t.lbytes);
  if (!items.empty()) std::memcpy(bytes.data() + t.ioff, items.data(), items.size() * sizeof(BnItem));
  t.buf = upload_by_args(bytes, xs[0].device(), stream);
  if (!capturing(stream)) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache.emplace_front(std::move(key), t);
    while (g_cache.size() > kBnCacheMax) g_cache.pop_back();
  }
  return t;
}

// The call's layer table: a device copy of the cached one with this call's data pointers,
// written through kernel arguments (stream-ordered, capture-safe).
at::Tensor layers_with_pointers(const BnTables& t, const std::vector<at::Tensor>& xs,
                                const std::vector<at::Tensor>* grads, cudaStream_t stream) {
  at::Tensor layers = t.buf.narrow(0, 0, static_cast<int64_t>(t.lbytes)).clone();
  BnPointerChunk chunk{};
  for (int64_t first = 0; first < t.n_layers; first += kBnArgLayers) {
    const int n = static_cast<int>(std::min<int64_t>(kBnArgLayers, t.n_layers - first));
    for (int i = 0; i < n; ++i) {
      chunk.x[i] = xs[first + i].data_ptr();
      chunk.g[i] = grads ? (*grads)[first + i].data_ptr() : nullptr;
    }
    C10_CUDA_CHECK(bn_set_pointers(reinterpret_cast<BnLayer*>(layers.data_ptr()), first, chunk, n, stream));
  }
  return layers;
}

std::tuple<at::Tensor, at::Tensor> stats_multi(at::TensorList xs_in) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_inputs(xs, "bn_batch_stats_multi");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const BnTables t = tables_for(xs, nullptr, stream);
  const at::Tensor layers = layers_with_pointers(t, xs, nullptr, stream);
  const auto* d_layers = reinterpret_cast<const BnLayer*>(layers.data_ptr());
  const auto* d_items = reinterpret_cast<const BnItem*>(static_cast<const uint8_t*>(t.buf.data_ptr()) + t.ioff);
  auto sopts = xs[0].options().dtype(bn_binding::stat_dtype(xs[0].scalar_type()));
  at::Tensor partials = at::empty({3 * t.n_partials}, sopts);
  at::Tensor counters = at::zeros({t.n_groups}, xs[0].options().dtype(at::kInt));
  at::Tensor mean = at::empty({t.n_channels}, sopts);
  at::Tensor var = at::empty({t.n_channels}, sopts);
  const cudaError_t err = bn_stats_multi_launch(d_layers, d_items, t.n_items, partials.data_ptr(),
                                                counters.data_ptr<int>(), mean.data_ptr(), var.data_ptr(),
                                                dtype_of(xs[0].scalar_type()), stream);
  TORCH_CHECK(err == cudaSuccess, "bn_batch_stats_multi (cuda): ", cudaGetErrorString(err));
  return {mean, var};
}

std::vector<at::Tensor> backward_multi(at::TensorList xs_in, const at::Tensor& means, const at::Tensor& g_means,
                                       const at::Tensor& g_vars) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_inputs(xs, "bn_batch_stats_multi_backward");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  bn_binding::check_statistics(xs, means, g_means, g_vars, "bn_batch_stats_multi_backward (cuda)");
  const at::Tensor mc = means.contiguous(), gmc = g_means.contiguous(), gvc = g_vars.contiguous();
  std::vector<at::Tensor> grads;
  for (const auto& x : xs) grads.push_back(at::empty_like(x));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const BnTables t = tables_for(xs, &grads, stream);
  const at::Tensor layers = layers_with_pointers(t, xs, &grads, stream);
  const auto* d_layers = reinterpret_cast<const BnLayer*>(layers.data_ptr());
  const auto* d_items = reinterpret_cast<const BnItem*>(static_cast<const uint8_t*>(t.buf.data_ptr()) + t.ioff);
  const cudaError_t err = bn_backward_multi_launch(d_layers, d_items, t.n_items, mc.data_ptr(), gmc.data_ptr(),
                                                   gvc.data_ptr(), dtype_of(xs[0].scalar_type()), stream);
  TORCH_CHECK(err == cudaSuccess, "bn_batch_stats_multi_backward (cuda): ", cudaGetErrorString(err));
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, CUDA, m) {
  fastsynth::bn_binding::register_ops<&fastsynth::cuda::stats_multi, &fastsynth::cuda::backward_multi>(m);
}
