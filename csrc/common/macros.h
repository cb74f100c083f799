// Portable qualifiers for the math shared by the CPU and CUDA kernels.
// Headers under csrc/common are torch-free: they compile with g++ (CPU kernels and the
// CTest unit tests) and with nvcc (CUDA kernels), so both backends run the same arithmetic.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FS_HD __host__ __device__ __forceinline__
#define FS_DEVICE __device__ __forceinline__
#else
#define FS_HD inline
#define FS_DEVICE inline
#endif

// Register room for a kernel whose fp64 build spills under ptxas' default heuristics (which, with
// __launch_bounds__ alone, spill some kernels at ~40-50 registers): __maxnreg__ (CUDA >= 12.4)
// caps registers explicitly and cannot be combined with __launch_bounds__, which older toolkits
// get instead.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define FS_KERNEL_REGS(max_regs, threads) __maxnreg__(max_regs)
#else
#define FS_KERNEL_REGS(max_regs, threads) __launch_bounds__(threads)
#endif
