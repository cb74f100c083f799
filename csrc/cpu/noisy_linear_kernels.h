// Torch-free CPU kernels of fastsynth::noisy_linear (see csrc/cpu/noisy_linear.cpp for the
// scheme); included by that file only.
#pragma once

// The 32-byte vector types are only passed between inlined helpers of one ISA clone.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/simd.h"

namespace fastsynth {
namespace noisy_linear_kernels {


constexpr int64_t kVecBytes = 32;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t kLanes = kVecBytes / static_cast<int64_t>(sizeof(T));
};

template <typename T>
FS_ALWAYS_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

template <typename T>
FS_ALWAYS_INLINE void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
FS_ALWAYS_INLINE typename Vec<T>::type vsplat(T s) {
  typename Vec<T>::type v;
  for (int64_t l = 0; l < Vec<T>::kLanes; ++l) v[l] = s;
  return v;
}

template <typename T>
FS_ALWAYS_INLINE T vsum(typename Vec<T>::type v) {
  T s = 0;
  for (int64_t l = 0; l < Vec<T>::kLanes; ++l) s += v[l];
  return s;
}

// ---------------------------------------------------------------------------------------------
// forward: columns [o0, o1) of one layer's nr output rows
// ---------------------------------------------------------------------------------------------

constexpr int64_t kFwdRows = 8;  // weight rows per step: 8 FMAs per load/store of the output (measured best of 2-16)

// out[r, o] = bias[o] + sum_i x[r, i] w[i, o] for r < nr, o in [o0, o1).
// x: [nr, I] (row stride I), w: [I, O], out: [nr, O] (row stride O).
template <typename T>
FS_ALWAYS_INLINE void forward_tile(const T* x, const T* w, const T* bias, T* out, int64_t nr, int64_t I, int64_t O,
                                   int64_t o0, int64_t o1) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t ov = o0 + (o1 - o0) / L * L;  // end of the whole vectors
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t o = o0; o < o1; ++o) out[r * O + o] = bias[o];
  }
  int64_t i = 0;
  for (; i + kFwdRows <= I; i += kFwdRows) {
    const T* wi = w + i * O;
    for (int64_t r = 0; r < nr; ++r) {
      const T* xr = x + r * I + i;
      V b[kFwdRows];
      for (int j = 0; j < kFwdRows; ++j) b[j] = vsplat<T>(xr[j]);
      T* orow = out + r * O;
      for (int64_t o = o0; o < ov; o += L) {
        V acc = vload(orow + o);
        for (int j = 0; j < kFwdRows; ++j) acc += b[j] * vload(wi + j * O + o);
        vstore(orow + o, acc);
      }
      for (int64_t o = ov; o < o1; ++o) {
        T acc = orow[o];
        for (int j = 0; j < kFwdRows; ++j) acc += xr[j] * wi[j * O + o];
        orow[o] = acc;
      }
    }
  }
  for (; i < I; ++i) {
    const T* w0 = w + i * O;
    for (int64_t r = 0; r < nr; ++r) {
      const T a0 = x[r * I + i];
      const V b0 = vsplat<T>(a0);
      T* orow = out + r * O;
      for (int64_t o = o0; o < ov; o += L) vstore(orow + o, vload(orow + o) + b0 * vload(w0 + o));
      for (int64_t o = ov; o < o1; ++o) orow[o] += a0 * w0[o];
    }
  }
}

template <typename T>
FS_SIMD_CLONES void forward_tile_cloned(const T* x, const T* w, const T* bias, T* out, int64_t nr, int64_t I,
                                        int64_t O, int64_t o0, int64_t o1) {
  forward_tile(x, w, bias, out, nr, I, O, o0, o1);
}

// ---------------------------------------------------------------------------------------------
// backward: weight rows [i0, i1) of one layer, each read once
// ---------------------------------------------------------------------------------------------

// grad_out rows per sweep of a weight row: NAYER's CIFAR-10 nl = 10 in one sweep. The 10 dot
// accumulators and 10 broadcasts stay in registers with AVX-512's 32 vector registers (the AVX2
// clone spills some of them; measured 15-25% faster than sweeps of 8 + 2 rows here).
constexpr int kBwdRows = 10;

// One sweep of weight row w[0..O) against R grad_out rows g[j*O ..] (j < R):
//   dots[j]  = <g_j, w>                          (when GX)
//   gw[o]    = (first ? 0 : gw[o]) + sum_j xs[j] g_j[o]   (when GW; gw is an L1 row buffer)
template <typename T, int R, bool GX, bool GW>
FS_ALWAYS_INLINE void backward_sweep(const T* w, const T* g, const T* xs, T* gw, bool first, int64_t O, T* dots) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t ov = O / L * L;
  V acc[R];
  V bx[R];
  for (int j = 0; j < R; ++j) {
    acc[j] = vsplat<T>(0);
    bx[j] = vsplat<T>(xs[j]);
  }
  for (int64_t o = 0; o < ov; o += L) {
    V wv;
    if (GX) wv = vload(w + o);
    V gwv = first ? vsplat<T>(0) : vload(gw + o);
    for (int j = 0; j < R; ++j) {
      const V gv = vload(g + j * O + o);
      if (GW) gwv += bx[j] * gv;
      if (GX) acc[j] += gv * wv;
    }
    if (GW) vstore(gw + o, gwv);
  }
  T tail[R];
  for (int j = 0; j < R; ++j) tail[j] = 0;
  for (int64_t o = ov; o < O; ++o) {
    T gwo = first ? T(0) : gw[o];
    for (int j = 0; j < R; ++j) {
      const T gv = g[j * O + o];
      if (GW) gwo += xs[j] * gv;
      if (GX) tail[j] += gv * w[o];
    }
    if (GW) gw[o] = gwo;
  }
  if (GX) {
    for (int j = 0; j < R; ++j) dots[j] = vsum<T>(acc[j]) + tail[j];
  }
}

template <typename T, bool GX, bool GW>
FS_ALWAYS_INLINE void backward_sweep_n(int n, const T* w, const T* g, const T* xs, T* gw, bool first, int64_t O,
                                       T* dots) {
  switch (n) {
    case 1: backward_sweep<T, 1, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 2: backward_sweep<T, 2, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 3: backward_sweep<T, 3, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 4: backward_sweep<T, 4, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 5: backward_sweep<T, 5, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 6: backward_sweep<T, 6, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 7: backward_sweep<T, 7, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 8: backward_sweep<T, 8, GX, GW>(w, g, xs, gw, first, O, dots); break;
    case 9: backward_sweep<T, 9, GX, GW>(w, g, xs, gw, first, O, dots); break;
    default: backward_sweep<T, kBwdRows, GX, GW>(w, g, xs, gw, first, O, dots); break;
  }
}

// dst[0..n) = src[0..n) with non-temporal (streaming) stores where dst is 16-byte aligned: the
// grad_W rows are written once and not read again here, so they bypass the caches and skip the
// read-for-ownership of a plain store (82 MB less memory traffic at K = 40). SSE2 stores: in
// every x86-64 clone; write-combining merges them into whole cache lines.
#if defined(__x86_64__)
FS_ALWAYS_INLINE void stream16(float* dst, const float* src) { _mm_stream_ps(dst, _mm_loadu_ps(src)); }
FS_ALWAYS_INLINE void stream16(double* dst, const double* src) { _mm_stream_pd(dst, _mm_loadu_pd(src)); }
#endif

template <typename T>
FS_ALWAYS_INLINE void stream_row(T* dst, const T* src, int64_t n) {
  int64_t o = 0;
#if defined(__x86_64__)
  constexpr int64_t L = 16 / static_cast<int64_t>(sizeof(T));
  for (; o < n && (reinterpret_cast<uintptr_t>(dst + o) % 16) != 0; ++o) dst[o] = src[o];
  for (; o + L <= n; o += L) stream16(dst + o, src + o);
#endif
  for (; o < n; ++o) dst[o] = src[o];
}

// Weight rows [i0, i1) of one layer with nr rows: x [nr, I], g [nr, O], w [I, O];
// gx [nr, I] (column i written), gw [I, O] (row i written), xt/rowbuf: scratch of nr and O.
template <typename T, bool GX, bool GW>
FS_ALWAYS_INLINE void backward_rows(const T* x, const T* g, const T* w, T* gx, T* gw, int64_t nr, int64_t I,
                                    int64_t O, int64_t i0, int64_t i1, T* xt, T* rowbuf) {
  T dots[kBwdRows];
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t r = 0; r < nr; ++r) xt[r] = x[r * I + i];  // column i of x
    for (int64_t r0 = 0; r0 < nr; r0 += kBwdRows) {
      const int n = static_cast<int>(std::min<int64_t>(kBwdRows, nr - r0));
      backward_sweep_n<T, GX, GW>(n, w + i * O, g + r0 * O, xt + r0, rowbuf, r0 == 0, O, dots);
      if (GX) {
        for (int j = 0; j < n; ++j) gx[(r0 + j) * I + i] = dots[j];
      }
    }
    if (GW) stream_row(gw + i * O, rowbuf, O);
  }
#if defined(__x86_64__)
  if (GW) _mm_sfence();  // order the streaming stores before the task ends
#endif
}

template <typename T>
FS_SIMD_CLONES void backward_rows_cloned(const T* x, const T* g, const T* w, T* gx, T* gw, int64_t nr, int64_t I,
                                         int64_t O, int64_t i0, int64_t i1, T* xt, T* rowbuf, bool need_gx,
                                         bool need_gw) {
  if (need_gx && need_gw) {
    backward_rows<T, true, true>(x, g, w, gx, gw, nr, I, O, i0, i1, xt, rowbuf);
  } else if (need_gx) {
    backward_rows<T, true, false>(x, g, w, gx, gw, nr, I, O, i0, i1, xt, rowbuf);
  } else if (need_gw) {
    backward_rows<T, false, true>(x, g, w, gx, gw, nr, I, O, i0, i1, xt, rowbuf);
  }
}

// grad_bias row of one layer: gb[o] = sum_{r < nr} g[r, o] (rows in order).
template <typename T>
void bias_grad_row(const T* g, T* gb, int64_t nr, int64_t O) {
  for (int64_t o = 0; o < O; ++o) gb[o] = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const T* grow = g + r * O;
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) gb[o] += grow[o];
  }
}

}  // namespace noisy_linear_kernels
}  // namespace fastsynth
