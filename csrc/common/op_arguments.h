// Argument checks shared by the CPU kernels and the CUDA launchers (region_max and _region_topk,
// _region_max_backward, poisson_binomial and its backward), so that both backends reject
// bad input with the same message naming the argument. Device checks stay with each backend.
// Host-only (stable ABI tensors); never include from a .cu file.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "common/connectivity.h"
#include "common/stable_api.h"

namespace lesioncount {

// label(input, threshold, connectivity, min_size): rank, connectivity, min_size, threshold, dtype.
inline void check_label_arguments(const Tensor& input, double threshold, int64_t connectivity, int64_t min_size) {
  LC_CHECK(input.dim() == 3 || input.dim() == 4,
           "label: `input` must have shape (B, H, W) for 2D or (B, D, H, W) for 3D, got ", input.dim(),
           " dimensions ", shape_of(input));
  const int spatial_rank = static_cast<int>(input.dim()) - 1;
  LC_CHECK(is_valid_connectivity(spatial_rank, connectivity), "label: `connectivity` must be ",
           spatial_rank == 2 ? "4 or 8 for 2D input" : "6, 18 or 26 for 3D input", ", got ", connectivity);
  LC_CHECK(min_size >= 0, "label: `min_size` must be >= 0, got ", min_size);
  LC_CHECK(!std::isnan(threshold), "label: `threshold` must not be NaN");
  const ScalarType dtype = input.scalar_type();
  LC_CHECK(dtype == ScalarType::Bool || dtype == ScalarType::Byte || is_floating(dtype),
           "label: `input` dtype must be bool, uint8, float16, bfloat16, float32 or float64, got ", dtype);
  LC_CHECK(input.size(input.dim() - 1) < std::numeric_limits<int32_t>::max(), "label: `input` rows are too long");
}

// `op` names the calling op in the message (region_max or _region_topk).
inline void check_region_arguments(const Tensor& input, const Tensor& labels, const char* op) {
  LC_CHECK(input.dim() >= 1, op, ": `input` must have a batch dimension, got a scalar");
  LC_CHECK(shape_of(labels) == shape_of(input), op, ": `labels` must have the shape of `input` ",
           shape_of(input), ", got ", shape_of(labels));
  LC_CHECK(labels.scalar_type() == ScalarType::Int || labels.scalar_type() == ScalarType::Long, op,
           ": `labels` must be int32 or int64, got ", labels.scalar_type());
  LC_CHECK(is_floating(input.scalar_type()), op, ": `input` must be a floating tensor, got ", input.scalar_type());
}

inline void check_region_max_arguments(const Tensor& input, const Tensor& labels, int64_t num_regions) {
  check_region_arguments(input, labels, "region_max");
  LC_CHECK(num_regions >= 0, "region_max: `num_regions` must be >= 0, got ", num_regions);
}

inline void check_region_max_backward_arguments(const Tensor& grad_values, const Tensor& argmax,
                                                const std::vector<int64_t>& input_shape) {
  LC_CHECK(grad_values.dim() == 2 && shape_of(argmax) == shape_of(grad_values),
           "_region_max_backward: `grad_values` and `argmax` must both be (B, R), got ", shape_of(grad_values), " and ",
           shape_of(argmax));
  LC_CHECK(argmax.scalar_type() == ScalarType::Long, "_region_max_backward: `argmax` must be int64");
  LC_CHECK(is_floating(grad_values.scalar_type()),
           "_region_max_backward: `grad_values` must be a floating tensor, got ", grad_values.scalar_type());
  LC_CHECK(!input_shape.empty() && input_shape[0] == grad_values.size(0),
           "_region_max_backward: `input_shape` must start with the batch size ", grad_values.size(0));
}

// `op` names the calling op in the message (poisson_binomial or its backward).
inline void check_poisson_binomial_arguments(const Tensor& probs, int64_t max_count, const char* op) {
  LC_CHECK(probs.dim() == 2, op, ": `probs` must have shape (B, K), got ", probs.dim(), " dimensions ",
           shape_of(probs));
  LC_CHECK(is_floating(probs.scalar_type()), op, ": `probs` must be a floating tensor, got ", probs.scalar_type());
  LC_CHECK(max_count >= 0, op, ": `max_count` must be >= 0, got ", max_count);
}

}  // namespace lesioncount
