// Device helpers of the torch-side CUDA launchers (*_cuda.cpp), on the LibTorch stable ABI.
//
// The launchers accept tensors on the device their kernels run on: CUDA tensors, or CPU tensors
// when they are compiled against the CUDA-on-CPU test runtime (tests/cuda_cpu,
// LESIONCOUNT_CUDA_ON_CPU defined), where they register under the `lesioncount_cuda_cpu` namespace
// for the CPU dispatch key instead of `lesioncount` / CUDA. Everything device-specific a launcher
// needs is here: the device check, the device guard, the current stream and the CUDA error check.
// Host-only; never include from a .cu file.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>

#include "common/stable_api.h"
#include "cuda/dtype.h"

#if !defined(LESIONCOUNT_CUDA_ON_CPU)
#include <torch/csrc/stable/accelerator.h>

// From torch/csrc/inductor/aoti_torch/c/shim.h (declared there under USE_CUDA), in libtorch_cuda.
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                                               void** ret_stream);
#endif

namespace lesioncount {

inline bool on_kernel_device(const Tensor& t) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// Makes the device of `t` current for the launcher's scope (the emulated device needs nothing).
class KernelDeviceGuard {
 public:
  explicit KernelDeviceGuard(const Tensor& t) {
#if !defined(LESIONCOUNT_CUDA_ON_CPU)
    guard_.emplace(t.get_device_index());
#else
    (void)t;
#endif
  }

 private:
#if !defined(LESIONCOUNT_CUDA_ON_CPU)
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
#endif
};

// torch's current CUDA stream on the device of `t` (the emulated runtime has one null stream).
inline cudaStream_t current_stream(const Tensor& t) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  (void)t;
  return nullptr;
#else
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
#endif
}

// torch's dtype as the launch API's code (cuda/dtype.h); `what` names the argument in the error for
// a dtype no kernel reads (the callers check the dtypes first, so this is a last guard).
inline cuda::DType dtype_code(ScalarType t, const char* what = "lesioncount: tensor") {
  switch (t) {
    case ScalarType::Bool: return cuda::DType::kBool;
    case ScalarType::Byte: return cuda::DType::kUInt8;
    case ScalarType::Half: return cuda::DType::kHalf;
    case ScalarType::BFloat16: return cuda::DType::kBFloat16;
    case ScalarType::Float: return cuda::DType::kFloat;
    case ScalarType::Double: return cuda::DType::kDouble;
    case ScalarType::Int: return cuda::DType::kInt32;
    case ScalarType::Long: return cuda::DType::kInt64;
    default: LC_CHECK(false, what, ": unsupported dtype ", t);
  }
  return cuda::DType::kFloat;
}

// Raises a RuntimeError naming `op` if a CUDA runtime call or a launch failed.
inline void check_cuda(cudaError_t error, const char* op) {
  LC_CHECK(error == cudaSuccess, op, ": CUDA error ", static_cast<int>(error), ": ", cudaGetErrorString(error));
}

// A one-byte device flag set to 1 on `stream`: kernels clear it on invalid input, and
// assert_async (common/stable_api.h) turns it into a device-side assertion without a host sync.
inline Tensor device_ok_flag(const Tensor& like, cudaStream_t stream, const char* op) {
  Tensor ok = new_empty(like, {}, ScalarType::Bool);
  check_cuda(cudaMemsetAsync(ok.mutable_data_ptr(), 1, 1, stream), op);
  return ok;
}

}  // namespace lesioncount

#define LC_STABLE_LIBRARY_IMPL_EXPANDED(ns, key, m) STABLE_TORCH_LIBRARY_IMPL(ns, key, m)
#if defined(LESIONCOUNT_CUDA_ON_CPU)
#define LC_CUDA_LIBRARY_IMPL(m) LC_STABLE_LIBRARY_IMPL_EXPANDED(lesioncount_cuda_cpu, CPU, m)
#else
#define LC_CUDA_LIBRARY_IMPL(m) LC_STABLE_LIBRARY_IMPL_EXPANDED(lesioncount, CUDA, m)
#endif
