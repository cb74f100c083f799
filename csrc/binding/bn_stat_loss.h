// ATen glue shared by the CPU kernels (csrc/cpu/bn_stat_loss.cpp) and the CUDA binding
// (csrc/cuda/bn_stat_loss_binding.cpp) of the BatchNorm-statistics ops: the argument checks, the
// op registration and the description of a feature map as N x C x (P x Q) with element strides
// (no copies). One copy, so the two backends cannot drift apart on which layouts take which path.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace fastsynth {
namespace bn_binding {

// Every feature map on one device of type `device_type`, one floating dtype, 2-D to 4-D
// (N, C, ...), non-empty, with fewer than 2^31 channels (work items carry 32-bit channels).
inline void check_inputs(const std::vector<at::Tensor>& xs, const char* op, c10::DeviceType device_type) {
  TORCH_CHECK(!xs.empty(), op, ": need at least one feature map");
  TORCH_CHECK(xs[0].device().type() == device_type, op, ": xs[0] must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", xs[0].device());
  const auto dtype = xs[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": feature maps must be float32, float64, float16 or bfloat16, got ", dtype);
  for (size_t l = 0; l < xs.size(); ++l) {
    const auto& x = xs[l];
    TORCH_CHECK(x.device() == xs[0].device(), op, ": xs[", l, "] must be on ", xs[0].device(), ", got ", x.device());
    TORCH_CHECK(x.scalar_type() == dtype, op, ": all feature maps must share one dtype, xs[", l, "] is ",
                x.scalar_type(), " and xs[0] ", dtype);
    TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, op, ": xs[", l, "] must be 2-, 3- or 4-D (N, C, ...), got ", x.sizes());
    TORCH_CHECK(x.numel() > 0, op, ": xs[", l, "] must not be empty");
    TORCH_CHECK(x.size(1) < (int64_t(1) << 31), op, ": xs[", l, "] has too many channels (", x.size(1),
                ", at most 2^31 - 1)");
  }
}

// Dtype of the statistics and of their gradients: float64 for float64 maps, float32 otherwise.
inline at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The backward's statistics and their gradients: vectors of all the maps' channels on the maps'
// device, of stat_dtype.
inline void check_statistics(const std::vector<at::Tensor>& xs, const at::Tensor& means, const at::Tensor& g_means,
                             const at::Tensor& g_vars, const char* op) {
  int64_t total = 0;
  for (const auto& x : xs) total += x.size(1);
  const auto sdt = stat_dtype(xs[0].scalar_type());
  for (const at::Tensor* t : {&means, &g_means, &g_vars}) {
    TORCH_CHECK(t->device() == xs[0].device() && t->dim() == 1 && t->size(0) == total, op,
                ": statistics and their gradients must be vectors of ", total, " channels on ", xs[0].device());
    TORCH_CHECK(t->scalar_type() == sdt, op, ": statistics must have dtype ", sdt);
  }
}

using StatsMulti = std::tuple<at::Tensor, at::Tensor> (*)(at::TensorList);
using BackwardMulti = std::vector<at::Tensor> (*)(at::TensorList, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&);

// Registers a backend's kernels of the four ops: the list ops, and the one-map ops as the list
// ops on a one-element list.
template <StatsMulti stats, BackwardMulti backward>
void register_ops(torch::Library& m) {
  m.impl("bn_batch_stats_multi", stats);
  m.impl("bn_batch_stats_multi_backward", backward);
  m.impl("bn_batch_stats", +[](const at::Tensor& x) { return stats({x}); });
  m.impl("bn_batch_stats_backward",
         +[](const at::Tensor& x, const at::Tensor& mean, const at::Tensor& g_mean, const at::Tensor& g_var) {
           return backward({x}, mean, g_mean, g_var)[0];
         });
}

// Describe x (and optionally its gradient g, same sizes) into `L`: any struct with the fields
// x, g, N, C, P, Q, M, xs_{n,c,p,q}, gs_{n,c,p,q}, channel_inner (the CPU LayerDesc and the CUDA
// BnLayer). H and W merge into one run of Q = H*W values when both tensors allow it (size-1
// dimensions merge trivially); channel_inner (unit channel stride in x and g) selects the rows
// path, where an (N, C) map's rows are the batch.
template <class Layer>
void describe(Layer& L, const at::Tensor& x, const at::Tensor* g) {
  L.x = x.data_ptr();
  L.g = g ? g->data_ptr() : nullptr;
  L.N = x.size(0);
  L.C = x.size(1);
  int64_t H = 1, W = 1, sh = 0, sw = 0, gh = 0, gw = 0;
  if (x.dim() == 3) { W = x.size(2); sw = x.stride(2); }
  if (x.dim() == 4) { H = x.size(2); W = x.size(3); sh = x.stride(2); sw = x.stride(3); }
  L.xs_n = x.stride(0);
  L.xs_c = x.stride(1);
  L.gs_n = L.gs_c = 0;
  if (g) {
    L.gs_n = g->stride(0);
    L.gs_c = g->stride(1);
    if (x.dim() == 3) gw = g->stride(2);
    if (x.dim() == 4) { gh = g->stride(2); gw = g->stride(3); }
  }
  const bool x_flat = H == 1 || W == 1 || sh == W * sw;
  const bool g_flat = !g || H == 1 || W == 1 || gh == W * gw;
  if (x_flat && g_flat) {
    L.P = 1;
    L.Q = H * W;
    L.xs_q = W == 1 ? sh : sw;
    L.gs_q = W == 1 ? gh : gw;
    L.xs_p = L.gs_p = 0;
  } else {
    L.P = H;
    L.Q = W;
    L.xs_p = sh;
    L.xs_q = sw;
    L.gs_p = gh;
    L.gs_q = gw;
  }
  L.M = L.N * L.P * L.Q;
  const bool channel_inner = L.C > 1 && L.xs_c == 1 && (!g || L.gs_c == 1);
  L.channel_inner = channel_inner;
  if (channel_inner && L.P * L.Q == 1) {  // (N, C) maps: rows are the batch
    L.Q = L.N;
    L.N = 1;
    L.xs_q = L.xs_n;
    L.gs_q = L.gs_n;
  }
}

}  // namespace bn_binding
}  // namespace fastsynth
