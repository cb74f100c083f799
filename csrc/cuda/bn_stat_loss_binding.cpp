// ATen glue of the CUDA BatchNorm-statistics kernels (built only where torch has CUDA).
// Describes every feature map as a BnLayer (pointer, sizes, element strides; no copies), plans
// the work items on the host, ships both tables to the device in one pinned, stream-ordered
// copy and launches one statistics kernel (or one backward kernel) for all layers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

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

at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const std::vector<at::Tensor>& xs, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": need at least one feature map");
  for (size_t l = 0; l < xs.size(); ++l) {
    const auto& x = xs[l];
    TORCH_CHECK(x.is_cuda() && x.device() == xs[0].device(), op, ": xs[", l, "] must be on ", xs[0].device());
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type(), op, ": all feature maps must share one dtype");
    TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, op, ": xs[", l, "] must be 2-, 3- or 4-D (N, C, ...), got ", x.sizes());
    TORCH_CHECK(x.numel() > 0, op, ": xs[", l, "] must not be empty");
    TORCH_CHECK(x.size(1) < (int64_t(1) << 31), op, ": too many channels");
  }
  (void)dtype_of(xs[0].scalar_type());
}

// Same description as the CPU kernels (csrc/cpu/bn_stat_loss.cpp, describe()).
BnLayer describe(const at::Tensor& x, const at::Tensor* g) {
  BnLayer L{};
  L.x = x.data_ptr();
  L.N = x.size(0);
  L.C = x.size(1);
  int64_t H = 1, W = 1, sh = 0, sw = 0, gh = 0, gw = 0;
  if (x.dim() == 3) { W = x.size(2); sw = x.stride(2); }
  if (x.dim() == 4) { H = x.size(2); W = x.size(3); sh = x.stride(2); sw = x.stride(3); }
  L.xs_n = x.stride(0);
  L.xs_c = x.stride(1);
  if (g) {
    L.g = g->data_ptr();
    L.gs_n = g->stride(0);
    L.gs_c = g->stride(1);
    if (x.dim() == 3) gw = g->stride(2);
    if (x.dim() == 4) { gh = g->stride(2); gw = g->stride(3); }
  }
  const bool x_flat = H == 1 || W == 1 || sh == W * sw;
  const bool g_flat = !g || H == 1 || W == 1 || gh == W * gw;
  if (x_flat && g_flat) {
    L.P = 1; L.Q = H * W;
    L.xs_q = W == 1 ? sh : sw; L.gs_q = W == 1 ? gh : gw;
  } else {
    L.P = H; L.Q = W;
    L.xs_p = sh; L.xs_q = sw; L.gs_p = gh; L.gs_q = gw;
  }
  L.M = L.N * L.P * L.Q;
  L.channel_inner = (L.C > 1 && L.xs_c == 1 && (!g || L.gs_c == 1)) ? 1 : 0;
  if (L.channel_inner && L.P * L.Q == 1) {  // (N, C) maps: rows are the batch
    L.Q = L.N; L.N = 1; L.xs_q = L.xs_n; L.gs_q = L.gs_n;
  }
  return L;
}

// Copy the layer and item tables to the device in one pinned buffer, ordered on `stream`.
at::Tensor upload_tables(const std::vector<BnLayer>& layers, const std::vector<BnItem>& items, const at::Device& dev,
                         const BnLayer** d_layers, const BnItem** d_items) {
  const size_t lbytes = layers.size() * sizeof(BnLayer);
  const size_t ibytes = items.size() * sizeof(BnItem);
  const size_t ioff = (lbytes + 15) / 16 * 16;
  at::Tensor host = at::empty({static_cast<int64_t>(ioff + ibytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), layers.data(), lbytes);
  std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + ioff, items.data(), ibytes);
  // non_blocking copy from pinned memory on the current stream; the caching host allocator
  // keeps `host` alive until the copy has run
  at::Tensor dev_buf = host.to(at::TensorOptions().device(dev), /*non_blocking=*/true);
  *d_layers = reinterpret_cast<const BnLayer*>(dev_buf.data_ptr());
  *d_items = reinterpret_cast<const BnItem*>(static_cast<uint8_t*>(dev_buf.data_ptr()) + ioff);
  return dev_buf;
}

std::tuple<at::Tensor, at::Tensor> stats_multi(at::TensorList xs_in) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_inputs(xs, "bn_batch_stats_multi");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  std::vector<BnLayer> layers;
  for (const auto& x : xs) layers.push_back(describe(x, nullptr));
  std::vector<BnItem> items;
  int64_t n_groups = 0, n_channels = 0;
  const int64_t n_partials = bn_plan(layers, items, &n_groups, &n_channels);
  const BnLayer* d_layers = nullptr;
  const BnItem* d_items = nullptr;
  at::Tensor tables = upload_tables(layers, items, xs[0].device(), &d_layers, &d_items);
  auto sopts = xs[0].options().dtype(stat_dtype(xs[0].scalar_type()));
  at::Tensor partials = at::empty({3 * n_partials}, sopts);
  at::Tensor counters = at::zeros({n_groups}, xs[0].options().dtype(at::kInt));
  at::Tensor mean = at::empty({n_channels}, sopts);
  at::Tensor var = at::empty({n_channels}, sopts);
  const cudaError_t err = bn_stats_multi_launch(d_layers, d_items, static_cast<int64_t>(items.size()), partials.data_ptr(),
                                                counters.data_ptr<int>(), mean.data_ptr(), var.data_ptr(),
                                                dtype_of(xs[0].scalar_type()), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_batch_stats_multi (cuda): ", cudaGetErrorString(err));
  return {mean, var};
}

std::vector<at::Tensor> backward_multi(at::TensorList xs_in, const at::Tensor& means, const at::Tensor& g_means,
                                       const at::Tensor& g_vars) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_inputs(xs, "bn_batch_stats_multi_backward");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  int64_t total = 0;
  for (const auto& x : xs) total += x.size(1);
  const auto sdt = stat_dtype(xs[0].scalar_type());
  for (const at::Tensor* t : {&means, &g_means, &g_vars}) {
    TORCH_CHECK(t->device() == xs[0].device() && t->dim() == 1 && t->size(0) == total,
                "bn_batch_stats_multi_backward (cuda): statistics and their gradients must be vectors of ", total,
                " channels on ", xs[0].device());
    TORCH_CHECK(t->scalar_type() == sdt, "bn_batch_stats_multi_backward (cuda): statistics must have dtype ", sdt);
  }
  const at::Tensor mc = means.contiguous(), gmc = g_means.contiguous(), gvc = g_vars.contiguous();
  std::vector<at::Tensor> grads;
  std::vector<BnLayer> layers;
  for (const auto& x : xs) {
    grads.push_back(at::empty_like(x));
    layers.push_back(describe(x, &grads.back()));
  }
  std::vector<BnItem> items;
  int64_t n_groups = 0, n_channels = 0;
  bn_plan(layers, items, &n_groups, &n_channels);
  const BnLayer* d_layers = nullptr;
  const BnItem* d_items = nullptr;
  at::Tensor tables = upload_tables(layers, items, xs[0].device(), &d_layers, &d_items);
  const cudaError_t err = bn_backward_multi_launch(d_layers, d_items, static_cast<int64_t>(items.size()), mc.data_ptr(),
                                                   gmc.data_ptr(), gvc.data_ptr(), dtype_of(xs[0].scalar_type()),
                                                   at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bn_batch_stats_multi_backward (cuda): ", cudaGetErrorString(err));
  return grads;
}

std::tuple<at::Tensor, at::Tensor> stats_one(const at::Tensor& x) { return stats_multi({x}); }

at::Tensor backward_one(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& g_mean, const at::Tensor& g_var) {
  return backward_multi({x}, mean, g_mean, g_var)[0];
}

}  // namespace
}  // namespace cuda
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, CUDA, m) {
  m.impl("bn_batch_stats", &fastsynth::cuda::stats_one);
  m.impl("bn_batch_stats_backward", &fastsynth::cuda::backward_one);
  m.impl("bn_batch_stats_multi", &fastsynth::cuda::stats_multi);
  m.impl("bn_batch_stats_multi_backward", &fastsynth::cuda::backward_multi);
}
