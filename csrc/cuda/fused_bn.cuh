// Torch-free CUDA kernels of the fused teacher BatchNorm (math: fastsynth/ops/fused_bn.py,
// shared arithmetic: csrc/common/fused_bn_math.h, csrc/common/welford.h).
//
// forward : grid (C, splits), one block per (channel, slice of the M = N*H*W elements). Each
//           thread runs a Welford over its elements while writing y; the block merges the
//           per-thread states with warp shuffles then shared memory (Chan's merge) and writes one
//           partial state; a second kernel (grid C) merges the `splits` partials of each channel.
// backward: grid (C, splits), one elementwise pass writing grad_x; per-block partial sums of
//           g_pre and g_pre*(x - running_mean) for dgamma/dbeta when asked.
// x is read through its strides (NCHW, channels_last, sliced); y/grad_x/grad_y use their own.
// Parameters (weight, bias, running stats, mean, grad_mean, grad_var) are acc_t arrays of size C.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastsynth {
namespace cuda {

struct Strides4 {
  int64_t n, c, h, w;
};

struct FusedBnGeometry {
  int64_t N, C, H, W;
  Strides4 x;  // strides of x (elements)
  Strides4 y;  // strides of y / grad_x / grad_y (elements)
};

// Number of blocks per channel: enough blocks to fill the GPU, at most one per 4 tiles of work.
int fused_bn_splits(int64_t M, int64_t C, int num_sms);

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_forward_launch(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias,
                                    const acc_t* running_mean, const acc_t* running_var, acc_t eps, bool apply_relu,
                                    bool with_stats, acc_t* mean_out, acc_t* var_out,
                                    acc_t* workspace /* 3*C*splits when with_stats */, int splits,
                                    const FusedBnGeometry& g, cudaStream_t stream);

template <typename scalar_t, typename acc_t>
cudaError_t fused_bn_backward_launch(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, const acc_t* weight,
                                     const acc_t* bias, const acc_t* running_mean, const acc_t* running_var,
                                     const acc_t* mean, const acc_t* grad_mean, const acc_t* grad_var, acc_t eps,
                                     bool apply_relu, bool with_stats, bool need_weight_grad,
                                     acc_t* partial_g /* C*splits */, acc_t* partial_gx /* C*splits */, int splits,
                                     const FusedBnGeometry& g, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsynth
