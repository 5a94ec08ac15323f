#pragma once
// NOTE: [shared element math]
// The per-element arithmetic of every kernel lives in small inline functions marked MRGD_HOST_DEVICE and is
// compiled both by the host compiler (CPU kernels) and by nvcc (CUDA kernels). The CPU tests therefore
// exercise the very expressions the GPU evaluates; only indexing, reductions and launches differ.
// MRGD_HOST_DEVICE_MEMBER is the same for static member functions (of types with internal linkage).
#if defined(__CUDACC__)
#define MRGD_HOST_DEVICE __host__ __device__ __forceinline__
#define MRGD_HOST_DEVICE_MEMBER static __host__ __device__ __forceinline__
#else
// Internal linkage on the host: the CPU element loops are compiled once per instruction set, and a shared
// (COMDAT) copy of these functions could otherwise carry AVX2 code into the baseline build.
#define MRGD_HOST_DEVICE static inline
#define MRGD_HOST_DEVICE_MEMBER static inline
#endif
