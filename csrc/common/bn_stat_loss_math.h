// Arithmetic of the BatchNorm-statistics loss shared by the CPU and CUDA kernels (torch-free).
//
// Statistics: per channel c of a feature map a (M = N*H*W values per channel) the kernels split
// the M values into chunks, reduce each chunk to a Welford state (see welford.h) and merge the
// chunk states in chunk order. Biased variance = m2 / M.
//
// Backward (the loss of fastsynth/ops/bn_stat_loss.py): with g_mu = dL/dmu_c and g_var = dL/dvar_c,
//     dL/da = g_mu / M + 2 g_var (a - mu) / M  =  scale * (a - mu) + shift,
//     scale = 2 g_var / M,  shift = g_mu / M.
// (a - mu) is formed before scaling: a + (shift - scale*mu) would cancel when |mu| >> std.
#pragma once

#include "macros.h"
#include "welford.h"

namespace fastsynth {

// Per-channel coefficients of the one-pass elementwise backward.
template <typename T>
struct BnGradCoeffs {
  T mean;
  T scale;
  T shift;
};

template <typename T>
FS_HD BnGradCoeffs<T> bn_grad_coeffs(T mean, T g_mean, T g_var, T count) {
  BnGradCoeffs<T> c;
  c.mean = mean;
  c.scale = T(2) * g_var / count;
  c.shift = g_mean / count;
  return c;
}

template <typename T>
FS_HD T bn_grad_elem(T a, const BnGradCoeffs<T>& c) {
  return c.scale * (a - c.mean) + c.shift;
}

// Chunk k of `parts` near-equal chunks of [0, total): [chunk_begin(k), chunk_begin(k+1)).
// Used by every backend so the same chunking (and so the same merge order) is reproducible.
template <typename I>
FS_HD I chunk_begin(I total, I parts, I k) {
  return (total / parts) * k + (k < total % parts ? k : total % parts);
}

// Number of chunks so that each chunk holds at most `max_chunk` values (at least one chunk).
template <typename I>
FS_HD I num_chunks(I total, I max_chunk) {
  const I n = (total + max_chunk - I(1)) / max_chunk;
  return n > I(0) ? n : I(1);
}

}  // namespace fastsynth
