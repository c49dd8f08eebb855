// CUDA-on-CPU test runtime: stand-in for c10/cuda/CUDAException.h (C10_CUDA_CHECK raises a
// c10::Error carrying the runtime's message, as the real macro does).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR)                                                                  \
  do {                                                                                        \
    const cudaError_t lc_cuda_check_error = (EXPR);                                           \
    TORCH_CHECK(lc_cuda_check_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(lc_cuda_check_error)); \
  } while (0)
