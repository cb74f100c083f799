// Arithmetic of the fused contrastive cross-entropy (fastsynth/ops/contrastive_loss.py has the
// math in full), shared by the CPU kernel and the CUDA-side tests of the header.
//
// One row i of the similarity matrix S_i. = scale * q_i . k_. (scale = 1 / temperature), label i:
//   lse_i  = log sum_j exp(S_ij)
//   loss_i = w_i (lse_i - S_ii)
//   G_ij   = w_i scale (exp(S_ij - lse_i) - [i = j])        (dloss/dq_i = sum_j G_ij k_j,
//                                                            dloss/dk_j = sum_i G_ij q_i)
// w_i = 1 / n_split for i < n_split, 1 / (M - n_split) otherwise (two batch means summed).
#pragma once

#include <cstdint>

#include "logit_loss_math.h"
#include "macros.h"

namespace fastsynth {

// Weight of row i: the first n_split rows form one mean, the other rows a second one.
template <typename acc_t>
FS_HD acc_t contrastive_row_weight(int64_t i, int64_t m, int64_t n_split) {
  return i < n_split ? acc_t(1) / acc_t(n_split) : acc_t(1) / acc_t(m - n_split);
}

// s: the row of raw dot products q_i . k_j (m values), diag: i. Returns loss_i; when grad is
// true, s is overwritten with G_i. (the unit gradient w.r.t. the raw products, scale included).
template <typename acc_t>
inline acc_t contrastive_row(acc_t* s, int64_t m, int64_t diag, acc_t scale, acc_t w, bool grad) {
  acc_t mx = s[0] * scale;
  for (int64_t j = 1; j < m; ++j) mx = s[j] * scale > mx ? s[j] * scale : mx;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) sum += fs_exp(s[j] * scale - mx);
  const acc_t lse = mx + fs_log(sum);
  const acc_t loss = w * (lse - s[diag] * scale);
  if (grad) {
    const acc_t ws = w * scale;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) s[j] = ws * fs_exp(s[j] * scale - lse);
    s[diag] -= ws;
  }
  return loss;
}

}  // namespace fastsynth
