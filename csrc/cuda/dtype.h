// The one element-type code of the CUDA launch API (the `*Args` structs of csrc/cuda/*_launch.h).
//
// Plain C++ with no CUDA or torch header, shared by the nvcc-built kernels, the g++-built torch
// launchers (which map torch's ScalarType to it in cuda/device_tensor.h: dtype_code) and the
// torch-free test harness. Each kernel family accepts the subset it documents.
#pragma once

namespace lesioncount {
namespace cuda {

enum class DType : int {
  kBool = 0,
  kUInt8 = 1,
  kHalf = 2,
  kBFloat16 = 3,
  kFloat = 4,
  kDouble = 5,
  kInt32 = 6,
  kInt64 = 7,
};

}  // namespace cuda
}  // namespace lesioncount
