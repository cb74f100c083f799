// CPU kernels of the CMI synthesizer's ops (fastsynth/ops/contrastive_loss.py has the math).
//
//   contrastive_ce(q, k, scale, n_split, need_grad_q, need_grad_k) -> (loss, grad_q, grad_k)
//     The cross-entropy of the similarity rows scale * q k^T against the diagonal labels, and
//     the unit gradients w.r.t. q and k, in one sweep over blocks of kRowBlock query rows: the
//     block's similarities (one GEMM into a kRowBlock x M buffer that stays in L2), each row's
//     log-sum-exp and loss, the row turned in place into its gradient G_i., then
//     grad_q[block] = G k and grad_k += G^T q[block] (two GEMMs). The M x M matrix never
//     exists; the backward only scales the saved unit gradients by grad_loss
//     (fastsynth::logit_loss_backward).
//   instance_mean_multi(xs) -> means [B, sum_l C_l]: per-sample channel means over H, W of every
//     map, written side by side (the concatenation CMI feeds its head), one parallel region.
//   instance_mean_multi_backward(xs, grad) -> grads: grad_x[b, c, h, w] = grad[b, off_l + c] / HW.
//
// The GEMMs are ATen's (BLAS); fp16/bf16 inputs are computed in fp32 (copies of q and k: M x D,
// small next to the M x M similarities).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/contrastive_loss_math.h"

namespace fastsynth {
namespace {

constexpr int64_t kRowBlock = 256;  // query rows per block: 256 x M fp32 similarities (4 MB at M = 4160)

template <typename scalar_t>
using acc_type_of = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

void check_pair(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q.dim() == 2, "contrastive_ce: queries must be 2-D [M, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "contrastive_ce: keys must have the shape of queries ", q.sizes(),
                    ", got ", k.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type(), "contrastive_ce: keys must have the dtype of queries (",
                   q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "contrastive_ce: queries must be floating, got ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu(), "contrastive_ce: CPU kernel got non-CPU tensors");
  TORCH_CHECK_VALUE(q.size(0) >= 1 && q.size(1) >= 1, "contrastive_ce: queries must not be empty, got shape ",
                    q.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_ce_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                   double scale, int64_t n_split, bool need_grad_q,
                                                                   bool need_grad_k) {
  check_pair(q, k);
  const int64_t m = q.size(0);
  TORCH_CHECK_VALUE(n_split >= 1 && n_split <= m, "contrastive_ce: n_split must be in [1, ", m, "], got ", n_split);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qa = q.to(acc).contiguous();
  const at::Tensor ka = k.to(acc).contiguous();
  const bool grad = need_grad_q || need_grad_k;
  const int64_t rb_max = std::min(kRowBlock, m);
  at::Tensor s_buf = at::empty({rb_max, m}, qa.options());
  at::Tensor row_loss = at::empty({m}, qa.options());
  at::Tensor gq = need_grad_q ? at::empty_like(qa) : at::empty({0}, q.options());
  at::Tensor gk = need_grad_k ? at::zeros_like(qa) : at::empty({0}, k.options());
  const at::Tensor kt = ka.t();
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_ce_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* loss_ptr = row_loss.data_ptr<acc_t>();
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
      const int64_t rb = std::min(kRowBlock, m - r0);
      at::Tensor s = s_buf.narrow(0, 0, rb);
      const at::Tensor qb = qa.narrow(0, r0, rb);
      at::mm_out(s, qb, kt);
      acc_t* sp = s.data_ptr<acc_t>();
      at::parallel_for(0, rb, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int64_t i = r0 + r;
          loss_ptr[i] = contrastive_row<acc_t>(sp + r * m, m, i, static_cast<acc_t>(scale),
                                               contrastive_row_weight<acc_t>(i, m, n_split), grad);
        }
      });
      if (need_grad_q) {
        at::Tensor gq_block = gq.narrow(0, r0, rb);
        at::mm_out(gq_block, s, ka);
      }
      if (need_grad_k) gk.addmm_(s.t(), qb);  // blocks in order: a deterministic sum
    }
  });
  // the batch sum in row order, in double (deterministic, independent of the thread count)
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_ce_cpu_sum", [&] {
    const scalar_t* p = row_loss.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) total += static_cast<double>(p[i]);
  });
  at::Tensor loss = at::full({}, total, qa.options());
  if (need_grad_q && gq.scalar_type() != q.scalar_type()) gq = gq.to(q.scalar_type());
  if (need_grad_k && gk.scalar_type() != k.scalar_type()) gk = gk.to(k.scalar_type());
  return {loss, gq, gk};
}

// ---- per-instance channel means ----

void check_maps(const std::vector<at::Tensor>& xs, const char* op) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": xs must hold at least one map");
  for (size_t l = 0; l < xs.size(); ++l) {
    const at::Tensor& x = xs[l];
    TORCH_CHECK_VALUE(x.dim() == 4, op, ": xs[", l, "] must be 4-D (B, C, H, W), got shape ", x.sizes());
    TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": xs[", l, "] must be a CPU tensor");
    TORCH_CHECK_VALUE(x.size(0) == xs[0].size(0), op, ": xs[", l, "] has batch ", x.size(0), ", xs[0] has ",
                      xs[0].size(0));
    TORCH_CHECK_TYPE(x.scalar_type() == xs[0].scalar_type(), op, ": xs[", l, "] has dtype ", x.scalar_type(),
                     ", xs[0] has ", xs[0].scalar_type());
    TORCH_CHECK_VALUE(x.size(2) * x.size(3) >= 1, op, ": xs[", l, "] has an empty plane, shape ", x.sizes());
  }
}

// One work item: map l, sample b, channels [c0, c1). Reads through the strides: NCHW planes are
// contiguous runs, channels_last rows are runs over channels (vectorised across c).
template <typename in_t, typename acc_t>
void mean_item(const at::Tensor& x, int64_t b, int64_t c0, int64_t c1, acc_t* out) {
  const in_t* p = x.data_ptr<in_t>();
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t sb = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const acc_t inv = acc_t(1) / static_cast<acc_t>(H * W);
  if (sc == 1) {  // channels_last: accumulate rows of channels
    std::vector<acc_t> acc(c1 - c0, acc_t(0));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const in_t* row = p + b * sb + h * sh + w * sw;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<acc_t>(row[c]);
      }
    for (int64_t c = c0; c < c1; ++c) out[c] = acc[c - c0] * inv;
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    acc_t sum = 0;
    const in_t* plane = p + b * sb + c * sc;
    if (sw == 1 && sh == W) {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < H * W; ++i) sum += static_cast<acc_t>(plane[i]);
    } else {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) sum += static_cast<acc_t>(plane[h * sh + w * sw]);
    }
    out[c] = sum * inv;
  }
}

constexpr int64_t kChannelChunk = 64;

at::Tensor instance_mean_multi_cpu(at::TensorList xs_in) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_maps(xs, "instance_mean_multi");
  const int64_t B = xs[0].size(0);
  std::vector<int64_t> offs;
  int64_t total = 0;
  for (const auto& x : xs) { offs.push_back(total); total += x.size(1); }
  const auto dt = xs[0].scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, total}, xs[0].options().dtype(acc));
  // work items (layer, sample, channel chunk) in one parallel region
  struct Item { int64_t l, b, c0, c1; };
  std::vector<Item> items;
  for (size_t l = 0; l < xs.size(); ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c0 = 0; c0 < xs[l].size(1); c0 += kChannelChunk)
        items.push_back({static_cast<int64_t>(l), b, c0, std::min(xs[l].size(1), c0 + kChannelChunk)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "instance_mean_multi_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t) {
        const Item& it = items[t];
        mean_item<scalar_t, acc_t>(xs[it.l], it.b, it.c0, it.c1, o + it.b * total + offs[it.l]);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> instance_mean_multi_backward_cpu(at::TensorList xs_in, const at::Tensor& grad) {
  std::vector<at::Tensor> xs(xs_in.begin(), xs_in.end());
  check_maps(xs, "instance_mean_multi_backward");
  const int64_t B = xs[0].size(0);
  int64_t total = 0;
  for (const auto& x : xs) total += x.size(1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == total,
                    "instance_mean_multi_backward: grad must be [", B, ", ", total, "], got ", grad.sizes());
  const auto acc = xs[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad.to(acc).contiguous();
  std::vector<at::Tensor> grads;
  std::vector<int64_t> offs;
  struct Item { int64_t l, b; };
  std::vector<Item> items;
  int64_t off = 0;
  for (size_t l = 0; l < xs.size(); ++l) {
    offs.push_back(off);
    off += xs[l].size(1);
    // x's memory format (channels_last stays channels_last), every element written below
    grads.push_back(at::empty(xs[l].sizes(), xs[l].options().memory_format(xs[l].suggest_memory_format())));
    for (int64_t b = 0; b < B; ++b) items.push_back({static_cast<int64_t>(l), b});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "instance_mean_multi_backward", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const acc_t* gp = g.data_ptr<acc_t>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t) {
        const at::Tensor& out = grads[items[t].l];
        const int64_t b = items[t].b, C = out.size(1), H = out.size(2), W = out.size(3);
        const acc_t inv = acc_t(1) / static_cast<acc_t>(H * W);
        const acc_t* gr = gp + b * total + offs[items[t].l];
        scalar_t* o = out.data_ptr<scalar_t>() + b * out.stride(0);
        if (out.stride(1) == 1) {  // channels_last: rows of C values
          for (int64_t hw = 0; hw < H * W; ++hw)
            for (int64_t c = 0; c < C; ++c) o[hw * C + c] = static_cast<scalar_t>(gr[c] * inv);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t v = static_cast<scalar_t>(gr[c] * inv);
            std::fill(o + c * H * W, o + (c + 1) * H * W, v);
          }
        }
      }
    });
  });
  return grads;
}

}  // namespace
}  // namespace fastsynth

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) {
  m.impl("contrastive_ce", &fastsynth::contrastive_ce_cpu);
  m.impl("instance_mean_multi", &fastsynth::instance_mean_multi_cpu);
  m.impl("instance_mean_multi_backward", &fastsynth::instance_mean_multi_backward_cpu);
}
