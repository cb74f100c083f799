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

// sum of f(x) over a block of `nruns` runs of `len` values (run starts `run_stride` apart, values
// `stride` apart): V independent accumulators (vector lanes) on unit-stride runs, then the tail,
// added in a fixed order.
template <int V, typename scalar_t, typename acc_t, typename F>
inline acc_t block_sum(const scalar_t* x, int64_t nruns, int64_t run_stride, int64_t len, int64_t stride, F f) {
  acc_t s[V] = {};
  acc_t sum = acc_t(0);
  for (int64_t r = 0; r < nruns; ++r) {
    const scalar_t* p = x + r * run_stride;
    int64_t i = 0;
    if (stride == 1)
      for (; i + V <= len; i += V)
        for (int j = 0; j < V; ++j) s[j] += f(static_cast<acc_t>(p[i + j]));
    for (; i < len; ++i) sum += f(static_cast<acc_t>(p[i * stride]));
  }
  for (int j = 0; j < V; ++j) sum += s[j];
  return sum;
}

// Two passes over a block that stays in L1: sum -> block mean -> centred sum of squares. Grouping
// short runs (small H*W planes of consecutive samples) into one block keeps the per-block work
// (lane reduction, divisions, merge) off the per-value path.
template <typename scalar_t, typename acc_t>
inline Welford<double> block_stats(const scalar_t* x, int64_t nruns, int64_t run_stride, int64_t len, int64_t stride) {
  constexpr int V = sizeof(acc_t) == 8 ? 8 : 16;  // independent accumulators (vector lanes)
  const acc_t count = static_cast<acc_t>(nruns * len);
  const acc_t mean = block_sum<V, scalar_t, acc_t>(x, nruns, run_stride, len, stride, [](acc_t v) { return v; }) / count;
  const acc_t m2 = block_sum<V, scalar_t, acc_t>(x, nruns, run_stride, len, stride, [mean](acc_t v) {
    const acc_t d = v - mean;
    return d * d;
  });
  return Welford<double>(static_cast<double>(mean), static_cast<double>(m2), static_cast<double>(nruns * len));
}

// Statistics of one work item on the plane path: channel it.c0, chunk it.chunk.
template <typename scalar_t, typename acc_t>
inline void stats_plane_item(const LayerDesc& L, const WorkItem& it, Welford<double>* partials) {
  const scalar_t* x = static_cast<const scalar_t*>(L.x) + it.c0 * L.xs_c;
  const int64_t m0 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk);
  const int64_t m1 = chunk_begin<int64_t>(L.M, L.chunks, it.chunk + 1);
  Welford<double> st;
  auto long_run = [&](int64_t xoff, int64_t, int64_t len) {
    for (int64_t b = 0; b < len; b += kPlaneBlock) {
      const int64_t n = std::min<int64_t>(kPlaneBlock, len - b);
      st = welford_merge(st, block_stats<scalar_t, acc_t>(x + xoff + b * L.xs_q, 1, 0, n, L.xs_q));
    }
  };
  if (L.P == 1 && L.Q < kPlaneBlock) {
    // short planes (e.g. 4x4, 8x8): whole samples are grouped into blocks of ~kPlaneBlock values
    const int64_t Q = L.Q;
    int64_t m = m0;
    while (m < m1) {
      const int64_t n = m / Q, q = m - n * Q;
      if (q != 0 || m1 - m < Q) {  // a partial sample at either end of the chunk
        const int64_t len = std::min(Q - q, m1 - m);
        long_run(n * L.xs_n + q * L.xs_q, 0, len);
        m += len;
        continue;
      }
      const int64_t R = std::min((m1 - m) / Q, std::max<int64_t>(1, kPlaneBlock / Q));
      st = welford_merge(st, block_stats<scalar_t, acc_t>(x + n * L.xs_n, R, L.xs_n, Q, L.xs_q));
      m += R * Q;
    }
  } else {
    for_each_run(L, m0, m1, long_run);
  }
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

// Statistics of one "samples" work item: NCHW maps with small dense planes (4x4 ... 28x28),
// where walking one channel at a time would touch one short run per sample, each in another
// page. Instead the item streams whole samples [n0, n1) (C*Q contiguous values each) and keeps
// per-(channel, position) accumulators, reduced per channel once per block of samples.
template <typename scalar_t, typename acc_t>
inline void stats_samples_item(const LayerDesc& L, const WorkItem& it, Welford<double>* partials) {
  const int64_t C = L.C, Q = L.Q, CQ = C * Q;
  const int64_t n0 = chunk_begin<int64_t>(L.N, L.chunks, it.chunk);
  const int64_t n1 = chunk_begin<int64_t>(L.N, L.chunks, it.chunk + 1);
  const int64_t R = std::max<int64_t>(1, kSampleBlockElems / CQ);  // samples per two-pass block
  const scalar_t* x = static_cast<const scalar_t*>(L.x);
  std::vector<acc_t> acc(CQ), bmean(C);
  std::vector<double> mean(C, 0.0), m2(C, 0.0);
  double count = 0.0;
  for (int64_t nb = n0; nb < n1; nb += R) {
    const int64_t rs = std::min(R, n1 - nb);
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t s = 0; s < rs; ++s) {
      const scalar_t* xs = x + (nb + s) * L.xs_n;
      for (int64_t j = 0; j < CQ; ++j) acc[j] += static_cast<acc_t>(xs[j]);
    }
    const acc_t inv = acc_t(1) / static_cast<acc_t>(rs * Q);
    for (int64_t c = 0; c < C; ++c) {
      acc_t t = acc_t(0);
      for (int64_t i = 0; i < Q; ++i) t += acc[c * Q + i];
      bmean[c] = t * inv;
    }
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t s = 0; s < rs; ++s) {
      const scalar_t* xs = x + (nb + s) * L.xs_n;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t mc = bmean[c];
        acc_t* a = acc.data() + c * Q;
        const scalar_t* xc = xs + c * Q;
        for (int64_t i = 0; i < Q; ++i) {
          const acc_t d = static_cast<acc_t>(xc[i]) - mc;
          a[i] += d * d;
        }
      }
    }
    const double nbk = static_cast<double>(rs * Q), n = count + nbk, wb = nbk / n, wab = count * wb;
    for (int64_t c = 0; c < C; ++c) {
      acc_t t = acc_t(0);
      for (int64_t i = 0; i < Q; ++i) t += acc[c * Q + i];
      const double delta = static_cast<double>(bmean[c]) - mean[c];
      mean[c] += delta * wb;
      m2[c] += static_cast<double>(t) + delta * delta * wab;
    }
    count = n;
  }
  for (int64_t c = 0; c < C; ++c)
    partials[L.partial_offset + c * L.chunks + it.chunk] = Welford<double>(mean[c], m2[c], count);
}

// Backward of one "samples" work item: whole samples, coefficients broadcast per channel.
template <typename scalar_t, typename acc_t>
inline void backward_samples_item(const LayerDesc& L, const WorkItem& it, const acc_t* mean, const acc_t* scale,
                                  const acc_t* shift) {
  const int64_t C = L.C, Q = L.Q;
  const int64_t n0 = chunk_begin<int64_t>(L.N, L.chunks, it.chunk);
  const int64_t n1 = chunk_begin<int64_t>(L.N, L.chunks, it.chunk + 1);
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* xs = static_cast<const scalar_t*>(L.x) + n * L.xs_n;
    scalar_t* gs = static_cast<scalar_t*>(L.g) + n * L.gs_n;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t mc = mean[c], sc = scale[c], sh = shift[c];
      const scalar_t* xc = xs + c * Q;
      scalar_t* gc = gs + c * Q;
      for (int64_t i = 0; i < Q; ++i) gc[i] = static_cast<scalar_t>(sc * (static_cast<acc_t>(xc[i]) - mc) + sh);
    }
  }
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
    if (L.sample_major) stats_samples_item<scalar_t, acc_t>(L, it, partials);
    else if (L.channel_inner) stats_rows_item<scalar_t, acc_t>(L, it, partials);
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
    if (L.sample_major) {
      std::vector<acc_t> coeffs(3 * L.C);
      for (int64_t c = 0; c < L.C; ++c) {
        const int64_t gch = L.chan_offset + c;
        const auto cf = bn_grad_coeffs<double>(means[gch], g_means[gch], g_vars[gch], count);
        coeffs[c] = static_cast<acc_t>(cf.mean);
        coeffs[L.C + c] = static_cast<acc_t>(cf.scale);
        coeffs[2 * L.C + c] = static_cast<acc_t>(cf.shift);
      }
      backward_samples_item<scalar_t, acc_t>(L, it, coeffs.data(), coeffs.data() + L.C, coeffs.data() + 2 * L.C);
    } else if (L.channel_inner) {
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
