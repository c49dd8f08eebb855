// Argument checks shared by the CPU kernels and the CUDA launchers (region_max and _region_topk,
// _region_max_backward, poisson_binomial and its backward), so that both backends reject
// bad input with the same message naming the argument. Device checks stay with each backend.
// Host-only (includes ATen); never include from a .cu file.
#pragma once

#include <ATen/ATen.h>

namespace lesioncount {

inline void check_region_max_arguments(const at::Tensor& input, const at::Tensor& labels, int64_t num_regions) {
  TORCH_CHECK(input.dim() >= 1, "region_max: `input` must have a batch dimension, got a scalar");
  TORCH_CHECK(labels.sizes() == input.sizes(), "region_max: `labels` must have the shape of `input` ",
              input.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong,
              "region_max: `labels` must be int32 or int64, got ", labels.scalar_type());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "region_max: `input` must be a floating tensor, got ", input.scalar_type());
  TORCH_CHECK(num_regions >= 0, "region_max: `num_regions` must be >= 0, got ", num_regions);
}

inline void check_region_max_backward_arguments(const at::Tensor& grad_values, const at::Tensor& argmax,
                                               at::IntArrayRef input_shape) {
  TORCH_CHECK(grad_values.dim() == 2 && argmax.sizes() == grad_values.sizes(),
              "_region_max_backward: `grad_values` and `argmax` must both be (B, R), got ",
              grad_values.sizes(), " and ", argmax.sizes());
  TORCH_CHECK(argmax.scalar_type() == at::kLong, "_region_max_backward: `argmax` must be int64");
  TORCH_CHECK(!input_shape.empty() && input_shape[0] == grad_values.size(0),
              "_region_max_backward: `input_shape` must start with the batch size ", grad_values.size(0));
}

// `op` names the calling op in the message (poisson_binomial or its backward).
inline void check_poisson_binomial_arguments(const at::Tensor& probs, int64_t max_count, const char* op) {
  TORCH_CHECK(probs.dim() == 2, op, ": `probs` must have shape (B, K), got ", probs.dim(),
              " dimensions ", probs.sizes());
  TORCH_CHECK(at::isFloatingType(probs.scalar_type()), op,
              ": `probs` must be a floating tensor, got ", probs.scalar_type());
  TORCH_CHECK(max_count >= 0, op, ": `max_count` must be >= 0, got ", max_count);
}

}  // namespace lesioncount
