// Portable kernel launch for the project's .cu files.
//
// launch_kernel(kernel, grid, block, smem, stream, args...) is kernel<<<grid, block, smem, stream>>>
// (args...) followed by cudaGetLastError() when nvcc compiles the file. When the same file is compiled
// as C++ against the CUDA-on-CPU test runtime (tests/cuda_cpu, LESIONCOUNT_CUDA_ON_CPU defined), it
// runs the kernel there, so the tests execute this very device code without a GPU.
// LC_DYNAMIC_SHARED_MEMORY(T, name) declares the kernel's dynamic shared memory as `T* name`-like
// storage (`extern __shared__ T name[]` under nvcc).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace lesioncount {
namespace cuda {

template <typename... Params, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                                 cudaStream_t stream, Args&&... args) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  (void)stream;
  return ::lc_cpu::launch(kernel, grid, block, dynamic_smem_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, dynamic_smem_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace lesioncount

#if defined(LESIONCOUNT_CUDA_ON_CPU)
#define LC_DYNAMIC_SHARED_MEMORY(T, name) T* name = static_cast<T*>(::lc_cpu::dynamic_shared_memory())
#else
#define LC_DYNAMIC_SHARED_MEMORY(T, name) extern __shared__ T name[]
#endif
