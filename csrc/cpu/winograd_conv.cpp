// 3x3 convolution, stride 1, padding 1, by Winograd's minimal filtering F(2x2, 3x3) on the CPU
// (fastsynth/winograd.py). During synthesis the teacher's and the student's convolution weights
// are frozen and only input gradients are needed; a 3x3 stride-1 convolution's input gradient
// is itself such a convolution (weights flipped and transposed), so both directions run here.
//
// Math. The output is cut into 2x2 tiles; tile t reads the 4x4 input patch d around it. With
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1],
//   G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
// the tile's output for output channel k is
//   Y_k = A^T [ sum_c (G g_kc G^T) .* (B^T d_c B) ] A,
// so for each of the 16 positions a of the 4x4 transformed tile the sum over c is one GEMM:
//   M[a] (tiles x K) = V[a] (tiles x C) @ U[a] (C x K),   V[a] = (B^T d B)[a],  U[a] = (G g G^T)[a].
// That is 16 multiply-adds per input-channel/output-channel pair and tile of 4 outputs, against
// 36 for the direct convolution: 2.25x fewer. The transforms are additions only. U is computed
// once per weight in float64 by the caller (weights are frozen) and passed in.
//
// Two schedules (winograd_loop). Many tiles, small C x K (early layers): each thread takes a
// block of tiles, transforms it into V (in its cache), runs the block's 16 GEMMs (single-threaded
// BLAS inside the parallel region) and transforms M straight into the output, so the maps are
// read once and written once. Few tiles, large C x K (deep layers): all tiles are transformed
// at once and the 16 GEMMs split across the threads, so the BLAS packs each U[a] once per call.
// The input is read channels_last (a tile position's channels are contiguous, so the transforms
// run down the channels in SIMD lanes) and the output is written channels_last.
//
// Accuracy: the transform coefficients are 0, +-1 and 1/2 (exact), so the float32 result differs
// from the direct convolution by rounding in the sums only; tests bound it against float64.
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "cpu/large_alloc.h"
#include "cpu/simd.h"
#include "cpu/tuning.h"

namespace fastsynth {
namespace {

constexpr int kAlpha = 4;               // transformed tile side
constexpr int kPositions = 16;          // kAlpha * kAlpha GEMMs per block
// Measured at b64 (docs/PERFORMANCE.md, "Sixth pass"): blocks of 4 MB beat 1, 2 and 8 MB; all
// tiles at once wins where U is large and the tiles few (512 ch at 4 x 4: 15.5 against 20.9 ms)
// and loses where V and M outgrow the cache (256 ch at 8 x 8: 32 against 17.4 ms).
constexpr int64_t kBlockBytes = 4 << 20;   // V and M of one block together, per thread
constexpr int64_t kWholeBytes = 20 << 20;  // V and M of all tiles together, when done at once

// Column-major GEMM C (m x n) = A (m x k) @ B (k x n), no transposes, from the BLAS that PyTorch
// links (its Fortran sgemm_/dgemm_, looked up at run time). ATen's own C++ gemm wrappers are not
// exported to extensions, and at::mm on blob tensors costs microseconds per call. A PyTorch
// without such a symbol (or fastsynth.cpu.config.winograd_blas = False) runs the same product
// through at::mm.
template <typename scalar_t>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const scalar_t*,
                             const scalar_t*, const int*, const scalar_t*, const int*, const scalar_t*, scalar_t*,
                             const int*);

template <typename scalar_t>
FortranGemm<scalar_t> find_fortran_gemm() {
  // the library that holds ATen's CPU kernels (it is loaded privately, so RTLD_DEFAULT misses it)
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&at::_ops::mm_out::call), &info) || info.dli_fname == nullptr) return nullptr;
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  const auto found =
      reinterpret_cast<FortranGemm<scalar_t>>(dlsym(lib, std::is_same_v<scalar_t, float> ? "sgemm_" : "dgemm_"));
  if (found == nullptr) return nullptr;
  // A BLAS built with 64-bit integers exports the same name; it would misread these int32
  // arguments. Check one small product before trusting it (2x2 @ 2x3, column-major).
  const scalar_t a[4] = {1, 2, 3, 4}, b[6] = {5, 6, 7, 8, 9, 10};
  scalar_t c[6] = {-1, -1, -1, -1, -1, -1};
  const int m = 2, n = 3, k = 2, lda = 2, ldb = 2, ldc = 2;
  const scalar_t one = 1, zero = 0;
  found("N", "N", &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
  const scalar_t want[6] = {23, 34, 31, 46, 39, 58};
  for (int i = 0; i < 6; ++i) {
    if (c[i] != want[i]) return nullptr;
  }
  return found;
}

// The BLAS's GEMM, or null: none found, or switched off (fastsynth.cpu.config.winograd_blas,
// which runs the portable at::mm path; tests compare the two).
template <typename scalar_t>
FortranGemm<scalar_t> fortran_gemm() {
  static const FortranGemm<scalar_t> fn = find_fortran_gemm<scalar_t>();
  return winograd_blas_enabled().load(std::memory_order_relaxed) ? fn : nullptr;
}

template <typename scalar_t>
void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
          int64_t ldb, scalar_t* c, int64_t ldc) {
  // C (m x n) = op(A) (m x k) @ B (k x n), column-major; op(A) = A, or A^T for A stored k x m
  if (const auto fn = fortran_gemm<scalar_t>()) {
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    const scalar_t one = 1, zero = 0;
    fn(trans_a ? "T" : "N", "N", &im, &in, &ik, &one, a, &ilda, b, &ildb, &zero, c, &ildc);
    return;
  }
  // row-major views: C^T (n x m) = B^T (n x k) @ op(A)^T (k x m)
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const at::Tensor at_ = trans_a ? at::from_blob(const_cast<scalar_t*>(a), {k, m}, {1, lda}, opts)
                                 : at::from_blob(const_cast<scalar_t*>(a), {k, m}, {lda, 1}, opts);
  const at::Tensor bt = at::from_blob(const_cast<scalar_t*>(b), {n, k}, {ldb, 1}, opts);
  at::Tensor ct = at::from_blob(c, {n, m}, {ldc, 1}, opts);
  at::mm_out(ct, bt, at_);
}

struct Geometry {
  int64_t n, c, h, w, k;              // x is (n, c, h, w), y is (n, k, h, w)
  int64_t tiles_h, tiles_w, tiles;  // tiles per image row / column, tiles in all
  bool input_grad;                  // the transposed convolution of a forward's U (see gemm_position)
};

// The transforms run down the channels, 64 bytes of channels at a time, as GCC vector values
// (one AVX-512 register, two AVX2 ones); a channel tail runs the same code on scalars.
// 64 bytes of lanes. (The attribute has to sit on a concrete type: on a template parameter GCC
// ignores it.)
template <typename scalar_t>
struct Lanes64;
template <>
struct Lanes64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Lanes64<double> {
  typedef double type __attribute__((vector_size(64)));
};

// FS_ALWAYS_INLINE: an out-of-line copy would be shared by the clones, which pass vector values in
// different registers.
template <typename T>
FS_ALWAYS_INLINE T load(const void* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
FS_ALWAYS_INLINE void store(void* p, const T& v) {
  __builtin_memcpy(p, &v, sizeof(T));
}

// V[a][i][c] = (B^T d B)[a] for one tile and the channels [c, c + lanes): p[q] points at the
// tile's input pixel q (row-major 4x4), or at zeros in the padding.
template <typename T, typename scalar_t>
FS_ALWAYS_INLINE void input_tile(const scalar_t* const* p, int64_t c, scalar_t* out, int64_t plane) {
  T d[kPositions];
  for (int q = 0; q < kPositions; ++q) d[q] = load<T>(p[q] + c);
  T t[kPositions];  // rows: B^T d
  for (int s = 0; s < kAlpha; ++s) {
    t[0 * kAlpha + s] = d[0 * kAlpha + s] - d[2 * kAlpha + s];
    t[1 * kAlpha + s] = d[1 * kAlpha + s] + d[2 * kAlpha + s];
    t[2 * kAlpha + s] = d[2 * kAlpha + s] - d[1 * kAlpha + s];
    t[3 * kAlpha + s] = d[1 * kAlpha + s] - d[3 * kAlpha + s];
  }
  for (int r = 0; r < kAlpha; ++r) {  // columns: (B^T d) B
    const T* row = t + r * kAlpha;
    store<T>(out + (r * kAlpha + 0) * plane + c, row[0] - row[2]);
    store<T>(out + (r * kAlpha + 1) * plane + c, row[1] + row[2]);
    store<T>(out + (r * kAlpha + 2) * plane + c, row[2] - row[1]);
    store<T>(out + (r * kAlpha + 3) * plane + c, row[1] - row[3]);
  }
}

// Tile t (row-major over images, tile rows, tile columns): its image and its output's top-left
// pixel.
struct TileOrigin {
  int64_t img, y, x;
};
FS_ALWAYS_INLINE TileOrigin tile_origin(const Geometry& g, int64_t t) {
  const int64_t per_image = g.tiles_h * g.tiles_w;
  const int64_t rem = t % per_image;
  return {t / per_image, (rem / g.tiles_w) * 2, (rem % g.tiles_w) * 2};
}

// V[a][i][0:C] for the tiles [t0, t0 + count) of a block (i = t - t0). `zeros` is C zeros, read
// where a patch position falls in the padding.
template <typename scalar_t>
FS_SIMD_CLONES void input_transform(const scalar_t* x, const scalar_t* zeros, const Geometry& g, int64_t t0,
                                    int64_t count, int64_t rows, scalar_t* v) {
  using vec = typename Lanes64<scalar_t>::type;
  constexpr int64_t lanes = 64 / sizeof(scalar_t);
  const int64_t C = g.c;
  const int64_t plane = rows * C;  // stride between positions a in V (rows: tiles per plane)
  for (int64_t i = 0; i < count; ++i) {
    const TileOrigin o = tile_origin(g, t0 + i);
    const int64_t img = o.img, y0 = o.y - 1, x0 = o.x - 1;  // the patch starts in the padding row/column
    const scalar_t* p[kPositions];
    for (int r = 0; r < kAlpha; ++r) {
      for (int s = 0; s < kAlpha; ++s) {
        const int64_t yy = y0 + r, xx = x0 + s;
        const bool inside = yy >= 0 && yy < g.h && xx >= 0 && xx < g.w;
        p[r * kAlpha + s] = inside ? x + ((img * g.h + yy) * g.w + xx) * C : zeros;
      }
    }
    scalar_t* out = v + i * C;
    int64_t c = 0;
    for (; c + lanes <= C; c += lanes) input_tile<vec>(p, c, out, plane);
    for (; c < C; ++c) input_tile<scalar_t>(p, c, out, plane);
  }
}

// Y for one tile and the output channels [k, k + lanes): A^T M A + bias; without `row1` / `col1`
// the tile is cut at an odd bottom / right edge (its second row / column is not written).
template <typename T, typename scalar_t>
FS_ALWAYS_INLINE void output_tile(const scalar_t* in, int64_t plane, const scalar_t* bias, int64_t k, scalar_t* const* y,
                        bool row1, bool col1) {
  T s[2 * kAlpha];  // A^T M: 2 rows of 4
  for (int col = 0; col < kAlpha; ++col) {
    const T m0 = load<T>(in + (0 * kAlpha + col) * plane + k), m1 = load<T>(in + (1 * kAlpha + col) * plane + k);
    const T m2 = load<T>(in + (2 * kAlpha + col) * plane + k), m3 = load<T>(in + (3 * kAlpha + col) * plane + k);
    s[col] = m0 + m1 + m2;
    s[kAlpha + col] = m1 - m2 - m3;
  }
  const T b = bias ? load<T>(bias + k) : T{} * 0;
  store<T>(y[0] + k, s[0] + s[1] + s[2] + b);
  if (col1) store<T>(y[1] + k, s[1] - s[2] - s[3] + b);
  if (row1) store<T>(y[2] + k, s[4] + s[5] + s[6] + b);
  if (row1 && col1) store<T>(y[3] + k, s[5] - s[6] - s[7] + b);
}

// Output tiles [t0, t0 + count) of a block from M[a][i][0:K], written channels_last.
template <typename scalar_t>
FS_SIMD_CLONES void output_transform(const scalar_t* m, const scalar_t* bias, const Geometry& g, int64_t t0,
                                     int64_t count, int64_t rows, scalar_t* y) {
  using vec = typename Lanes64<scalar_t>::type;
  constexpr int64_t lanes = 64 / sizeof(scalar_t);
  const int64_t K = g.k;
  const int64_t plane = rows * K;
  for (int64_t i = 0; i < count; ++i) {
    const TileOrigin o = tile_origin(g, t0 + i);
    const int64_t img = o.img, oy = o.y, ox = o.x;
    const bool row1 = oy + 1 < g.h, col1 = ox + 1 < g.w;  // odd H / W: the last tile is cut
    scalar_t* out[4];
    out[0] = y + ((img * g.h + oy) * g.w + ox) * K;
    out[1] = out[0] + K;
    out[2] = out[0] + g.w * K;
    out[3] = out[2] + K;
    const scalar_t* in = m + i * K;
    int64_t k = 0;
    for (; k + lanes <= K; k += lanes) output_tile<vec>(in, plane, bias, k, out, row1, col1);
    for (; k < K; ++k) output_tile<scalar_t>(in, plane, bias, k, out, row1, col1);
  }
}

// The input gradient's transformed weight from the forward's: with J the 3x3 flip, G J = Q G,
// where Q swaps the rows 0 and 3 of G, so G (J g J) G^T = Q (G g G^T) Q: position (i, j) of the
// flipped kernel's transform is position (q(i), q(j)) of the forward's, channels transposed.
constexpr int kFlippedPosition[kPositions] = {15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0};

template <typename scalar_t>
void gemm_position(const scalar_t* u, const scalar_t* v, scalar_t* m, const Geometry& g, int64_t count, int a) {
  // row-major M[a] (count x K) = V[a] (count x C) @ U[a] (C x K); BLAS is column-major, so this is
  // M^T = U^T V^T with the same buffers. For the input gradient U is the forward's (K x C) at
  // the flipped position, used transposed.
  const scalar_t* va = v + a * count * g.c;
  scalar_t* ma = m + a * count * g.k;
  if (g.input_grad) {
    gemm<scalar_t>(true, g.k, count, g.c, u + kFlippedPosition[a] * g.c * g.k, g.c, va, g.c, ma, g.k);
  } else {
    gemm<scalar_t>(false, g.k, count, g.c, u + a * g.c * g.k, g.k, va, g.c, ma, g.k);
  }
}

template <typename scalar_t>
void winograd_loop(const scalar_t* x, const scalar_t* u, const scalar_t* bias, const Geometry& g, scalar_t* y) {
  const std::vector<scalar_t> zeros(static_cast<size_t>(g.c), scalar_t(0));
  const int64_t per_tile = kPositions * (g.c + g.k) * static_cast<int64_t>(sizeof(scalar_t));
  if (g.tiles * per_tile <= kWholeBytes) {
    // Deep layers (few tiles, large C x K): all tiles at once, so each U[a] is packed by the BLAS
    // once per call rather than once per block; the 16 GEMMs are split across the threads.
    auto v = std::unique_ptr<scalar_t[]>(new scalar_t[kPositions * g.tiles * g.c]);
    auto m = std::unique_ptr<scalar_t[]>(new scalar_t[kPositions * g.tiles * g.k]);
    at::parallel_for(0, g.tiles, 16, [&](int64_t lo, int64_t hi) {
      // V is laid out for all tiles: write tile t's rows at their place in each position's plane
      input_transform<scalar_t>(x, zeros.data(), g, lo, hi - lo, g.tiles, v.get() + lo * g.c);
    });
    at::parallel_for(0, kPositions, 1, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) gemm_position<scalar_t>(u, v.get(), m.get(), g, g.tiles, static_cast<int>(a));
    });
    at::parallel_for(0, g.tiles, 16, [&](int64_t lo, int64_t hi) {
      output_transform<scalar_t>(m.get() + lo * g.k, bias, g, lo, hi - lo, g.tiles, y);
    });
    return;
  }
  // Early layers (many tiles, small C x K): blocks of tiles whose V and M stay in the thread's
  // cache, so the input is read once and the output written once.
  const int64_t block = std::clamp<int64_t>(kBlockBytes / per_tile / 8 * 8, 8, 512);
  const int64_t blocks = (g.tiles + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    auto v = std::unique_ptr<scalar_t[]>(new scalar_t[kPositions * block * g.c]);
    auto m = std::unique_ptr<scalar_t[]>(new scalar_t[kPositions * block * g.k]);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block;
      const int64_t count = std::min(block, g.tiles - t0);
      input_transform<scalar_t>(x, zeros.data(), g, t0, count, count, v.get());
      for (int a = 0; a < kPositions; ++a) gemm_position<scalar_t>(u, v.get(), m.get(), g, count, a);
      output_transform<scalar_t>(m.get(), bias, g, t0, count, count, y);
    }
  });
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                bool input_grad) {
  TORCH_CHECK(x.dim() == 4, "winograd_conv3x3: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(u.dim() == 3 && u.size(0) == kPositions,
              "winograd_conv3x3: u must be the transformed weight of shape (16, C, K), got ", u.sizes());
  // forward: u is (16, C_in, C_out); input_grad: the same u of the forward, read (16, C_out, C_in)
  const int64_t in_channels = input_grad ? u.size(2) : u.size(1);
  const int64_t K = input_grad ? u.size(1) : u.size(2);
  TORCH_CHECK(in_channels == x.size(1), "winograd_conv3x3: u has ", in_channels, " input channels",
              input_grad ? " (input_grad: its third dimension)" : "", ", x has ", x.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "winograd_conv3x3: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(u.scalar_type() == x.scalar_type(), "winograd_conv3x3: u must have x's dtype ", x.scalar_type(),
              ", got ", u.scalar_type());
  TORCH_CHECK(u.is_contiguous(), "winograd_conv3x3: u must be contiguous");
  TORCH_CHECK(u.device().is_cpu(), "winograd_conv3x3: u must be on the CPU like x, got ", u.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, "winograd_conv3x3: bias must have shape (", K, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "winograd_conv3x3: bias must have x's dtype");
    TORCH_CHECK(bias->device().is_cpu(), "winograd_conv3x3: bias must be on the CPU like x, got ", bias->device());
  }
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), K, 0, 0, 0, input_grad};
  at::Tensor y = empty_large({g.n, K, g.h, g.w}, x.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  if (g.c == 0) {  // an empty sum: the bias alone
    return bias.has_value() ? y.copy_(bias->view({1, K, 1, 1}).expand_as(y)) : y.zero_();
  }
  g.tiles_h = (g.h + 1) / 2;
  g.tiles_w = (g.w + 1) / 2;
  g.tiles = g.n * g.tiles_h * g.tiles_w;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
    winograd_loop<scalar_t>(xc.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                            bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, g, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsynth, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace fastsynth
