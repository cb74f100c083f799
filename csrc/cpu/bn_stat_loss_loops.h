// Inner loops of the CPU BatchNorm-statistics kernels (csrc/cpu/bn_stat_loss.cpp).
//
// This file is included twice by bn_stat_loss.cpp: once compiled for AVX2/FMA/F16C (chosen at
// run time where the CPU has them) and once for the baseline ISA, each time inside its own
// namespace. It has no include guard on purpose and includes nothing: the types it uses
// (LayerDesc, WorkItem, Welford, BnGradCoeffs) are declared by the including file.
//
// Index space of one channel: m = n*P*Q + p*Q + q for m in [0, M). A chunk [m0, m1) of it is
// walked as "runs" along q (the innermost, fastest-moving plane dimension): each run starts at
// an element offset and has up to Q entries at stride s_q.

template <typename F>
inline void for_each_run(const LayerDesc& L, int64_t m0, int64_t m1, F&& fn) {
  const int64_t PQ = L.P * L.Q;
  int64_t n = m0 / PQ, r = m0 % PQ, p = r / L.Q, q = r % L.Q;
  int64_t m = m0;
  while (m < m1) {
    const int64_t len = std::min(L.Q - q, m1 - m);
    fn(n * L.xs_n + p * L.xs_p + q * L.xs_q, n * L.gs_n + p * L.gs_p + q * L.gs_q, len);
    m += len;
    q = 0;
    if (++p == L.P) { p = 0; ++n; }
  }
}

template <typename scalar_t, typename acc_t>
inline Welford<double> block_stats(const scalar_t* x, int64_t n, int64_t stride) {
  // two passes over a block that stays in L1: sum -> block mean -> centred sum of squares
  constexpr int V = sizeof(acc_t) == 8 ? 8 : 16;  // independent accumulators (vector lanes)
  acc_t s[V] = {};
  acc_t sum = acc_t(0);
  int64_t i = 0;
  if (stride == 1) {
    for (; i + V <= n; i += V)
      for (int j = 0; j < V; ++j) s[j] += static_cast<acc_t>(x[i + j]);
    for (int j = 0; j < V; ++j) sum += s[j];
  }
  for (; i < n; ++i) sum += static_cast<acc_t>(x[i * stride]);
  const acc_t mean = sum / static_cast<acc_t>(n);
  acc_t q[V] = {};
  acc_t m2 = acc_t(0);
  i = 0;
  if (stride == 1) {
    for (; i + V <= n; i += V)
      for (int j = 0; j < V; ++j) {
        const acc_t d = static_cast<acc_t>(x[i + j]) - mean;
        q[j] += d * d;
      }
    for (int j = 0; j < V; ++j) m2 += q[j];
  }
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i * stride]) - mean;
    m2 += d * d;
  }
  return Welford<double>(static_cast<double>(mean), static_cast<double>(m2), static_cast<double>(n));
}

// Statistics of one work item on the plane path: channel it.c0, chunk it.chunk.
template <typename scalar_t, typename acc_t>
inline void stats_plane_item(const LayerDesc& L, const WorkItem& it, Welford<double>* partials) {
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0 * L.xs_c;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk);
  const int64_t m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  Welford<double> st;
  for_each_run(L, m0, m1, [&](int64_t xoff, int64_t, int64_t len) {
    for (int64_t b = 0; b < len; b += kPlaneBlock) {
      const int64_t n = std::min<int64_t>(kPlaneBlock, len - b);
      st = welford_merge(st, block_stats<scalar_t, acc_t>(x + xoff + b * L.xs_q, n, L.xs_q));
    }
  });
  partials[L.partial_offset + it.c0 * L.chunks + it.chunk] = st;
}

// Statistics of one work item on the channel-inner path (channels are the unit-stride
// dimension, e.g. channels_last): channels [c0, c0+nc) over the rows of chunk it.chunk.
template <typename scalar_t, typename acc_t>
inline void stats_rows_item(const LayerDesc& L, const WorkItem& it, Welford<double>* partials) {
  const int64_t nc = std::min<int64_t>(L.cblock, L.C - it.c0);
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk);
  const int64_t m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  const int64_t rows_per_block = std::max<int64_t>(4, kRowBlockElems / nc);
  acc_t bs[kMaxChannelBlock], bq[kMaxChannelBlock];
  double mean[kMaxChannelBlock], m2[kMaxChannelBlock];
  for (int64_t j = 0; j < nc; ++j) { mean[j] = 0.0; m2[j] = 0.0; }
  double count = 0.0;
  for_each_run(L, m0, m1, [&](int64_t xoff, int64_t, int64_t len) {
    for (int64_t r0 = 0; r0 < len; r0 += rows_per_block) {
      const int64_t R = std::min(rows_per_block, len - r0);
      const scalar_t* base = x + xoff + r0 * L.xs_q;
      for (int64_t j = 0; j < nc; ++j) bs[j] = acc_t(0);
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* row = base + r * L.xs_q;
        for (int64_t j = 0; j < nc; ++j) bs[j] += static_cast<acc_t>(row[j]);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(R);
      for (int64_t j = 0; j < nc; ++j) { bs[j] *= inv; bq[j] = acc_t(0); }  // bs now holds block means
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* row = base + r * L.xs_q;
        for (int64_t j = 0; j < nc; ++j) {
          const acc_t d = static_cast<acc_t>(row[j]) - bs[j];
          bq[j] += d * d;
        }
      }
      // Chan merge of the block into the running state; all channels share the counts
      const double nb = static_cast<double>(R), n = count + nb, wb = nb / n, wab = count * wb;
      for (int64_t j = 0; j < nc; ++j) {
        const double delta = static_cast<double>(bs[j]) - mean[j];
        mean[j] += delta * wb;
        m2[j] += static_cast<double>(bq[j]) + delta * delta * wab;
      }
      count = n;
    }
  });
  for (int64_t j = 0; j < nc; ++j)
    partials[L.partial_offset + (it.c0 + j) * L.chunks + it.chunk] = Welford<double>(mean[j], m2[j], count);
}

// One-pass backward of one plane-path work item: g = scale * (x - mean) + shift.
template <typename scalar_t, typename acc_t>
inline void backward_plane_item(const LayerDesc& L, const WorkItem& it, const BnGradCoeffs<acc_t>& cf) {
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0 * L.xs_c;
  scalar_t* g = static_cast<scalar_t*>(L.g) + it.c0 * L.gs_c;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk);
  const int64_t m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  const int64_t sx = L.xs_q, sg = L.gs_q;
  for_each_run(L, m0, m1, [&](int64_t xoff, int64_t goff, int64_t len) {
    const scalar_t* xr = x + xoff;
    scalar_t* gr = g + goff;
    if (sx == 1 && sg == 1) {
      for (int64_t i = 0; i < len; ++i) gr[i] = static_cast<scalar_t>(bn_grad_elem(static_cast<acc_t>(xr[i]), cf));
    } else {
      for (int64_t i = 0; i < len; ++i)
        gr[i * sg] = static_cast<scalar_t>(bn_grad_elem(static_cast<acc_t>(xr[i * sx]), cf));
    }
  });
}

// One-pass backward of one channel-inner work item (x and grad both have unit channel stride).
template <typename scalar_t, typename acc_t>
inline void backward_rows_item(const LayerDesc& L, const WorkItem& it, const acc_t* mean, const acc_t* scale,
                               const acc_t* shift) {
  const int64_t nc = std::min<int64_t>(L.cblock, L.C - it.c0);
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0;
  scalar_t* g = static_cast<scalar_t*>(L.g) + it.c0;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk);
  const int64_t m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  for_each_run(L, m0, m1, [&](int64_t xoff, int64_t goff, int64_t len) {
    for (int64_t r = 0; r < len; ++r) {
      const scalar_t* xr = x + xoff + r * L.xs_q;
      scalar_t* gr = g + goff + r * L.gs_q;
      for (int64_t j = 0; j < nc; ++j)
        gr[j] = static_cast<scalar_t>(scale[j] * (static_cast<acc_t>(xr[j]) - mean[j]) + shift[j]);
    }
  });
}

template <typename scalar_t, typename acc_t>
void run_stats_items(const std::vector<LayerDesc>& layers, const std::vector<WorkItem>& items,
                     Welford<double>* partials, int nthreads) {
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && n_items > 1)
  for (int64_t i = 0; i < n_items; ++i) {
    const WorkItem& it = items[i];
    const LayerDesc& L = layers[it.layer];
    if (L.channel_inner) stats_rows_item<scalar_t, acc_t>(L, it, partials);
    else stats_plane_item<scalar_t, acc_t>(L, it, partials);
  }
}

template <typename scalar_t, typename acc_t, typename stat_t>
void run_backward_items(const std::vector<LayerDesc>& layers, const std::vector<WorkItem>& items,
                        const stat_t* means, const stat_t* g_means, const stat_t* g_vars, int nthreads) {
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && n_items > 1)
  for (int64_t i = 0; i < n_items; ++i) {
    const WorkItem& it = items[i];
    const LayerDesc& L = layers[it.layer];
    const double count = static_cast<double>(L.M);
    if (L.channel_inner) {
      const int64_t nc = std::min<int64_t>(L.cblock, L.C - it.c0);
      acc_t mean[kMaxChannelBlock], scale[kMaxChannelBlock], shift[kMaxChannelBlock];
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t gch = L.chan_offset + it.c0 + j;
        const auto cf = bn_grad_coeffs<double>(means[gch], g_means[gch], g_vars[gch], count);
        mean[j] = static_cast<acc_t>(cf.mean);
        scale[j] = static_cast<acc_t>(cf.scale);
        shift[j] = static_cast<acc_t>(cf.shift);
      }
      backward_rows_item<scalar_t, acc_t>(L, it, mean, scale, shift);
    } else {
      const int64_t gch = L.chan_offset + it.c0;
      const auto cd = bn_grad_coeffs<double>(means[gch], g_means[gch], g_vars[gch], count);
      BnGradCoeffs<acc_t> cf;
      cf.mean = static_cast<acc_t>(cd.mean);
      cf.scale = static_cast<acc_t>(cd.scale);
      cf.shift = static_cast<acc_t>(cd.shift);
      backward_plane_item<scalar_t, acc_t>(L, it, cf);
    }
  }
}
