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
