// The project's host-side view of the LibTorch stable ABI (torch/csrc/stable and torch/headeronly).
//
// Every operator registration, CPU kernel entry point and CUDA launcher works on
// torch::stable::Tensor through the few helpers below. Together they reference only the stable C
// shim of libtorch (extern "C" aoti_torch_* / torch_* functions) and header-only code, never a C++
// symbol of ATen or c10, so one compiled library loads on every torch from the targeted version on
// (TORCH_TARGET_VERSION, set by CMakeLists.txt: 2.10). docs/ARCHITECTURE.md explains the choice.
//
// Errors: LC_CHECK(cond, parts...) throws std::runtime_error with the parts streamed together; torch
// turns it into a Python RuntimeError with the same message, as TORCH_CHECK did.
// Host-only; never include from a .cu file.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#define LC_CHECK(cond, ...) STD_TORCH_CHECK(cond, __VA_ARGS__)

namespace lesioncount {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = c10::Half;          // header-only (torch/headeronly/util/Half.h)
using BFloat16 = c10::BFloat16;  // header-only (torch/headeronly/util/BFloat16.h)

// A tensor's sizes, printable as "[2, 3, 4]" in error messages.
struct Shape {
  std::vector<int64_t> dims;
  bool operator==(const Shape& other) const { return dims == other.dims; }
  bool operator!=(const Shape& other) const { return dims != other.dims; }
};

inline std::ostream& operator<<(std::ostream& out, const Shape& shape) {
  out << '[';
  for (size_t i = 0; i < shape.dims.size(); ++i) out << (i ? ", " : "") << shape.dims[i];
  return out << ']';
}

inline Shape shape_of(const Tensor& t) {
  const auto sizes = t.sizes();
  return Shape{std::vector<int64_t>(sizes.begin(), sizes.end())};
}

// "cpu", "cuda:0", ... as torch prints devices.
inline std::string device_name(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  const std::string index = std::to_string(t.get_device_index());
  if (t.is_cuda()) return "cuda:" + index;
  return "device(type " + std::to_string(static_cast<int>(t.device().type())) + ", index " + index + ")";
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index();
}

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float || t == ScalarType::Double;
}

// Bytes per element of the dtypes this library produces.
inline size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Bool:
    case ScalarType::Byte: return 1;
    case ScalarType::Half:
    case ScalarType::BFloat16: return 2;
    case ScalarType::Int:
    case ScalarType::Float: return 4;
    case ScalarType::Long:
    case ScalarType::Double: return 8;
    default: LC_CHECK(false, "lesioncount: no element size for dtype ", t);
  }
  return 0;
}

// Dense, row-major copy of `t` (`t` itself when it already is).
inline Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// New uninitialised tensor of `sizes` and `dtype` on the device of `like`.
inline Tensor new_empty(const Tensor& like, const std::vector<int64_t>& sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

inline Tensor new_zeros(const Tensor& like, const std::vector<int64_t>& sizes, ScalarType dtype) {
  Tensor t = new_empty(like, sizes, dtype);
  torch::stable::zero_(t);
  return t;
}

inline Tensor new_full(const Tensor& like, const std::vector<int64_t>& sizes, ScalarType dtype, double value) {
  Tensor t = new_empty(like, sizes, dtype);
  torch::stable::fill_(t, value);
  return t;
}

// `t` converted to `dtype` and made contiguous (no copy when it already is both).
inline Tensor contiguous_as(const Tensor& t, ScalarType dtype) {
  return dense(t.scalar_type() == dtype ? t : torch::stable::to(t, dtype));
}

// Calls f(T{}) with T the C++ type of the floating dtype `t` (float16, bfloat16, float32 or float64);
// `op` names the caller in the error for any other dtype. Replaces AT_DISPATCH_FLOATING_TYPES_AND2.
template <typename F>
inline void dispatch_floating(ScalarType t, const char* op, F&& f) {
  switch (t) {
    case ScalarType::Half: f(Half{}); break;
    case ScalarType::BFloat16: f(BFloat16{}); break;
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Double: f(double{}); break;
    default: LC_CHECK(false, op, ": expected a float16, bfloat16, float32 or float64 tensor, got ", t);
  }
}

// aten::_assert_async.msg: on a CUDA tensor `ok` (a bool scalar), a device-side assertion that
// fires, with `message`, if `ok` is false when the stream reaches it; no host synchronisation. On a
// CPU tensor (the CUDA-on-CPU test runtime) it is checked at once, as aten::_assert_async does there;
// this is done here so that the message survives (an exception inside a C shim call reaches the
// caller only as an error code).
inline void assert_async(const Tensor& ok, const std::string& message) {
  if (ok.is_cpu()) {
    LC_CHECK(*static_cast<const bool*>(ok.const_data_ptr()), message);
    return;
  }
  std::array<StableIValue, 2> stack{torch::stable::detail::from(ok), torch::stable::detail::from(message)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::_assert_async", "msg", stack.data(), TORCH_ABI_VERSION));
}

}  // namespace lesioncount
