// Torch-free CUDA kernels of the fused teacher BatchNorm (math: fastsynth/ops/fused_bn.py,
// shared arithmetic: csrc/common/fused_bn_math.h, csrc/common/welford.h).
//
// Indexing. The (n, h, w) positions of a channel are collapsed on the host into R rows of L
// values (fused_bn_rows: dimensions whose strides nest in x and in y are merged; NCHW dense gives
// N rows of H*W, channels_last dense one row of N*H*W, sliced maps N*H rows of W); row r starts
// at (r / R0) * s1 + (r % R0) * s0. A block owns a block of channels and a contiguous range of
// tiles; a thread's position inside a tile is fixed, and the tile index advances by carrying
// (no division in the loop; one division per row group where R0 > 1).
//   channel-contiguous maps (channels_last): 32 channels x 8 positions per tile, consecutive
//           threads read consecutive channels (coalesced);
//   other maps: 1 channel, tiles of (256 / LP) rows x LP values (LP = next power of two of L,
//           at most 256), consecutive threads read consecutive values of a row (coalesced).
// forward : grid (channel blocks, splits). Each thread runs a Welford over its elements while
//           writing y; the states of a channel are merged in the block (Chan's merge) into one
//           partial per (channel, split); a second kernel (grid C) merges the partials.
// backward: same grid, one elementwise pass writing grad_x; per-block partial sums of g_pre and
//           g_pre*(x - running_mean) for dgamma/dbeta when asked.
// instance means (inst_mean[n, c] = mean over H, W of x): the rows are laid out with the batch
//           kept apart (fused_bn_rows keep_batch), so a row lies in one sample n = r / RS; the
//           forward adds each thread's row sums (first reduced over the lanes of the row) / (H W)
//           to a zeroed [N][C] buffer by atomicAdd (the last bits may vary between runs), the
//           backward adds grad_inst[n][c] / (H W) to each element of the row.
// Parameters (weight, bias, running stats, mean, grad_mean, grad_var) are acc_t arrays of size C.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastsynth {
namespace cuda {

struct RowStrides {
  int64_t c;   // channel stride
  int64_t s1;  // row r starts at (r / R0) * s1 + (r % R0) * s0
  int64_t s0;
  int64_t l;   // stride of consecutive values of a row
};

struct FusedBnRows {
  int64_t C, L, R, R0, M;  // channels, values per row, rows, inner row count, M = N*H*W = L*R
  int64_t HW, RS;          // H*W; rows per sample (keep_batch layouts; R otherwise)
  RowStrides x;            // strides of x (elements)
  RowStrides y;            // strides of y / grad_x / grad_y (elements)
};

struct FusedBnPlan {
  bool cl;          // channel-contiguous tiles (32 channels x 8 positions)
  int lp_log2;      // values of a row per tile (1 << lp_log2)
  int tr_log2;      // rows per tile (1 << tr_log2)
  int64_t lt;       // tiles per row group: ceil(L / LP)
  int64_t tiles;    // ceil(R / TR) * lt
  int64_t per;      // tiles per block
  int64_t cblocks;  // channel blocks (grid.x)
  int splits;       // blocks per channel block (grid.y)
};

// Row geometry of a 4-D map x (sizes, strides) and its output y (same sizes, own strides);
// keep_batch: the batch dimension is not merged with H, W (rows never straddle two samples).
FusedBnRows fused_bn_rows(const int64_t* sizes, const int64_t* x_strides, const int64_t* y_strides,
                          bool keep_batch = false);

// Tiles and grid: enough blocks to fill the GPU (4 per SM), at least 4 tiles per block.
FusedBnPlan fused_bn_plan(const FusedBnRows& g, int num_sms);

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_forward_launch(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias,
                                    const acc_t* running_mean, const acc_t* running_var, acc_t eps, bool apply_relu,
                                    bool with_stats, acc_t* mean_out, acc_t* var_out,
                                    acc_t* workspace /* 3*C*splits when with_stats */,
                                    acc_t* inst_out /* zeroed N*C, or null: no instance means */,
                                    const FusedBnRows& g, const FusedBnPlan& p, cudaStream_t stream);

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_backward_launch(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, const acc_t* weight,
                                     const acc_t* bias, const acc_t* running_mean, const acc_t* running_var,
                                     const acc_t* mean, const acc_t* grad_mean, const acc_t* grad_var,
                                     const acc_t* grad_inst /* N*C, or null */, acc_t eps,
                                     bool apply_relu, bool with_stats, bool need_weight_grad,
                                     acc_t* partial_g /* C*splits */, acc_t* partial_gx /* C*splits */,
                                     const FusedBnRows& g, const FusedBnPlan& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsynth
