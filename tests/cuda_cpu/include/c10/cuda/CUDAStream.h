// CUDA-on-CPU test runtime: stand-in for c10/cuda/CUDAStream.h. Work runs synchronously at launch,
// so there is one (null) stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int64_t /*device_index*/ = -1) { return CUDAStream{}; }

}  // namespace cuda
}  // namespace c10
