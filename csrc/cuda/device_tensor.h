// Device helpers of the torch-side CUDA launchers (*_cuda.cpp).
//
// The launchers accept tensors on the device their kernels run on: CUDA tensors, or CPU tensors
// when they are compiled against the CUDA-on-CPU test runtime (tests/cuda_cpu,
// LESIONCOUNT_CUDA_ON_CPU defined), where they register under the `lesioncount_cuda_cpu` namespace
// for the CPU dispatch key instead of `lesioncount` / CUDA.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

namespace lesioncount {

inline bool on_kernel_device(const at::Tensor& t) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

}  // namespace lesioncount

#define LC_TORCH_LIBRARY_IMPL_EXPANDED(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#if defined(LESIONCOUNT_CUDA_ON_CPU)
#define LC_CUDA_LIBRARY_IMPL(m) LC_TORCH_LIBRARY_IMPL_EXPANDED(lesioncount_cuda_cpu, CPU, m)
#else
#define LC_CUDA_LIBRARY_IMPL(m) LC_TORCH_LIBRARY_IMPL_EXPANDED(lesioncount, CUDA, m)
#endif
