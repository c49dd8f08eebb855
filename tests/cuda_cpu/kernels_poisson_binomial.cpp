// CUDA-on-CPU test build: csrc/cuda/poisson_binomial*.cu (the dispatch and its four per-dtype units) compiled as C++ against this directory's runtime
// (include/cuda_runtime.h). __CUDACC__ / __CUDA_ARCH__ select the device branches of the shared
// headers, so the code that runs is the code nvcc compiles for the GPU.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#include "cuda/poisson_binomial.cu"
#include "cuda/poisson_binomial_half.cu"
#include "cuda/poisson_binomial_bfloat16.cu"
#include "cuda/poisson_binomial_float.cu"
#include "cuda/poisson_binomial_double.cu"
