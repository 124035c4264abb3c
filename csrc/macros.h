// DDPM_HD marks the small functions that the CPU (.cpp) and CUDA (.cu) kernels share.
#pragma once

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif
