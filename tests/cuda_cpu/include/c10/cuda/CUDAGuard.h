// CUDA-on-CPU test runtime: stand-in for c10/cuda/CUDAGuard.h. The emulated device is the CPU, so
// the guard only records the device it was given (the launchers' device handling is reviewed and
// checked on a real GPU by tests/test_cuda_ops.py::test_device_guard_second_gpu).
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) : original_device_(device), current_device_(device) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  c10::Device original_device() const { return original_device_; }
  c10::Device current_device() const { return current_device_; }

 private:
  c10::Device original_device_;
  c10::Device current_device_;
};

}  // namespace cuda
}  // namespace c10
