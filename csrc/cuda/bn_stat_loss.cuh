// Torch-free CUDA kernels of the BatchNorm-statistics loss (math: fastsynth/ops/bn_stat_loss.py,
// shared arithmetic: csrc/common/bn_stat_loss_math.h, welford.h).
//
// One statistics launch serves every layer of a call: the grid is a table of work items
// (layer, channel or block of 32 channels, chunk of the channel's N*H*W values) read from
// device memory, each layer described by a BnLayer (pointer, sizes, element strides).
//   plane path (NCHW-like, channel stride != 1): a 256-thread block reduces one chunk of one
//     channel: per-thread Welford (vectorised 16-byte loads where the run is contiguous and
//     aligned), warp-shuffle merge, shared-memory merge of the 8 warps;
//   rows path (channels_last-like, channel stride 1): threadIdx%32 is the channel (coalesced
//     across channels), threadIdx/32 one of 8 row lanes; shared-memory merge of the row lanes.
// Grid-level merge: each block writes its chunk partials, then the last block of a group
// (atomic counter, __threadfence) merges the chunks of its channels in chunk order and writes
// mean and biased variance. The backward is one elementwise launch over the same kind of table.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace fastsynth {
namespace cuda {

enum class BnDtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

struct BnLayer {
  const void* x;
  void* g;                          // gradient output (backward only)
  int64_t N, C, P, Q, M;            // plane of P x Q values (H, W merged where strides allow), M = N*P*Q
  int64_t xs_n, xs_c, xs_p, xs_q;   // element strides of x
  int64_t gs_n, gs_c, gs_p, gs_q;   // element strides of g
  int64_t chan_offset;              // first channel of this layer in the concatenated statistics
  int64_t partial_offset;           // first chunk partial of this layer
  int64_t group_offset;             // first merge group (counter) of this layer
  int64_t chunks;                   // chunks per channel
  int32_t cblock;                   // channels per item: 1 (plane path) or up to 32 (rows path)
  int32_t channel_inner;            // 1: rows path
};

struct BnItem {
  int32_t layer;
  int32_t c0;
  int64_t chunk;
};

constexpr int kBnThreads = 256;
constexpr int kBnRowChannels = 32;

// Fill chunks/cblock/offsets of every layer and the work items. Returns the number of chunk
// partials; *n_groups receives the number of merge groups (one atomic counter each).
int64_t bn_plan(std::vector<BnLayer>& layers, std::vector<BnItem>& items, int64_t* n_groups, int64_t* n_channels);

// Statistics of all layers: partials (3 x n_partials of the accumulator type: float, or double
// for f64 inputs) and counters (n_groups ints, zero on entry) are scratch; mean/var (float or
// double, n_channels each) receive the result.
cudaError_t bn_stats_multi_launch(const BnLayer* d_layers, const BnItem* d_items, int64_t n_items, void* partials,
                                  int* counters, void* mean, void* var, BnDtype dtype, cudaStream_t stream);

// dL/dx of all layers: g = 2 g_var (x - mean)/M + g_mean/M (statistics in float, or double for f64).
// Capture-safe uploads: the bytes / pointers travel as kernel arguments (captured by value in a
// CUDA graph), never as a host-to-device copy that a graph would replay from host memory.
constexpr int kBnArgBytes = 3968;   // bytes per bn_write_bytes launch (kernel parameter space < 4 KiB)
constexpr int kBnArgLayers = 120;   // layers per bn_set_pointers launch
struct BnByteChunk {
  unsigned char b[kBnArgBytes];
};
struct BnPointerChunk {
  const void* x[kBnArgLayers];
  void* g[kBnArgLayers];
};
// dst[0, n) = chunk.b[0, n)
cudaError_t bn_write_bytes(void* dst, const BnByteChunk& chunk, int n, cudaStream_t stream);
// layers[first + i].x / .g = chunk.x[i] / chunk.g[i] for i < n
cudaError_t bn_set_pointers(BnLayer* layers, int64_t first, const BnPointerChunk& chunk, int n, cudaStream_t stream);

cudaError_t bn_backward_multi_launch(const BnLayer* d_layers, const BnItem* d_items, int64_t n_items,
                                     const void* mean, const void* g_mean, const void* g_var, BnDtype dtype,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsynth
