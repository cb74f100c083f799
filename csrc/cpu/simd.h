// The two ways CPU kernels here get ISA-specific code (docs/DEVELOPING.md, "CPU ISA dispatch").
// The extension is compiled for the baseline x86-64 ISA, so it loads on any x86-64 machine; hot
// loops carry their own AVX2 / AVX-512 code, chosen at run time:
//
//   1. Compiler clones (the default): mark a function FS_SIMD_CLONES; GCC compiles it for
//      x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline and picks one at load time
//      (ifunc). For loops the compiler vectorises. FS_SIMD_CLONES_NO_FMA is the same without
//      FMA-capable targets, for arithmetic that must stay bit-identical to another backend
//      (reinit's Philox transforms match the CUDA kernel).
//   2. Explicit ISA code, picked once at run time: functions marked FS_TARGET_AVX512F /
//      FS_TARGET_AVX2 (intrinsics the compiler would not find itself, e.g. reinit's Philox
//      multiplies), or a whole loops header compiled twice, once inside
//      FS_AVX2_REGION_BEGIN / FS_AVX2_REGION_END (bn_stat_loss); the caller branches on
//      cpu_has_avx512f() / cpu_has_avx2() (cached CPUID queries).
//
// Elsewhere (clang, non-x86) every macro is empty or false, and the baseline code runs.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FS_X86_GCC 1
#endif

#ifdef FS_X86_GCC
#define FS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FS_SIMD_CLONES_NO_FMA __attribute__((target_clones("avx512f", "avx2", "default")))
#define FS_TARGET_AVX512F __attribute__((target("avx512f")))
#define FS_TARGET_AVX2 __attribute__((target("avx2")))
#define FS_AVX2_REGION_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define FS_AVX2_REGION_END _Pragma("GCC pop_options")
#else
#define FS_SIMD_CLONES
#define FS_SIMD_CLONES_NO_FMA
#define FS_TARGET_AVX512F
#define FS_TARGET_AVX2
#define FS_AVX2_REGION_BEGIN
#define FS_AVX2_REGION_END
#endif

#if defined(__GNUC__)
#define FS_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FS_ALWAYS_INLINE inline
#endif

namespace fastsynth {
namespace simd {

// AVX-512F: the run-time condition of the FS_TARGET_AVX512F code.
inline bool cpu_has_avx512f() {
#ifdef FS_X86_GCC
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return ok;
#else
  return false;
#endif
}

// AVX2 with FMA and F16C: the run-time condition of FS_TARGET_AVX2 code and of the
// FS_AVX2_REGION code (which is compiled with all three).
inline bool cpu_has_avx2() {
#ifdef FS_X86_GCC
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c"));
  return ok;
#else
  return false;
#endif
}

}  // namespace simd
}  // namespace fastsynth
