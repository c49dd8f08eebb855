// CUDA registration of `label`: argument checks (as label_cpu), outputs and workspace allocated with
// torch on the input's device, kernels enqueued on the current stream (csrc/cuda/label.cu).
// No device-to-host synchronisation: `num` stays on the device. An item containing NaN gets
// num[b] = -1 and all-zero labels (the CPU kernel raises instead; raising here would need a sync).
// With check_probabilities, the labeler's first pass clears a device flag on a value outside [0, 1]
// or NaN, and an at::_assert_async on that flag raises (asynchronously on a GPU, at the next
// synchronising call; at once on the CUDA-on-CPU test runtime) with the CPU kernel's message.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/connectivity.h"
#include "cuda/device_tensor.h"
#include "cuda/label_launch.h"

namespace lesioncount {
namespace {

std::tuple<at::Tensor, at::Tensor> label_cuda(const at::Tensor& input, double threshold, int64_t connectivity,
                                             int64_t min_size, bool check_probabilities) {
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4,
              "label: `input` must have shape (B, H, W) for 2D or (B, D, H, W) for 3D, got ", input.dim(),
              " dimensions ", input.sizes());
  const int spatial_rank = static_cast<int>(input.dim()) - 1;
  TORCH_CHECK(is_valid_connectivity(spatial_rank, connectivity), "label: `connectivity` must be ",
              spatial_rank == 2 ? "4 or 8 for 2D input" : "6, 18 or 26 for 3D input", ", got ", connectivity);
  TORCH_CHECK(min_size >= 0, "label: `min_size` must be >= 0, got ", min_size);
  TORCH_CHECK(!std::isnan(threshold), "label: `threshold` must not be NaN");
  const auto dtype = input.scalar_type();
  cuda::LabelInputType type;
  switch (dtype) {
    case at::kBool: type = cuda::kLabelInputBool; break;
    case at::kByte: type = cuda::kLabelInputUInt8; break;
    case at::kHalf: type = cuda::kLabelInputHalf; break;
    case at::kBFloat16: type = cuda::kLabelInputBFloat16; break;
    case at::kFloat: type = cuda::kLabelInputFloat; break;
    case at::kDouble: type = cuda::kLabelInputDouble; break;
    default:
      TORCH_CHECK(false, "label: `input` dtype must be bool, uint8, float16, bfloat16, float32 or float64, got ",
                  dtype);
  }
  TORCH_CHECK(on_kernel_device(input), "label: expected a CUDA tensor for `input`");

  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  cuda::LabelShape shape;
  shape.batch = x.size(0);
  shape.depth = spatial_rank == 3 ? x.size(1) : 1;
  shape.height = x.size(-2);
  shape.width = x.size(-1);
  shape.connectivity = static_cast<int>(connectivity);
  shape.min_size = min_size;
  TORCH_CHECK(shape.width < std::numeric_limits<int32_t>::max(), "label: `input` rows are too long");
  const bool wide = cuda::label_is_wide(shape);
  at::Tensor labels = at::empty(x.sizes(), x.options().dtype(wide ? at::kLong : at::kInt));
  const int64_t item_voxels = shape.depth * shape.height * shape.width;
  if (shape.batch == 0 || item_voxels == 0) return {labels, at::zeros({shape.batch}, x.options().dtype(at::kLong))};
  at::Tensor num = at::empty({shape.batch}, x.options().dtype(at::kLong));

  const size_t ws_bytes = cuda::label_workspace_bytes(shape);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  // check_probabilities: 1 while every value lies in [0, 1] (set and cleared on the device)
  at::Tensor in_range;
  if (check_probabilities) in_range = at::empty({}, x.options().dtype(at::kBool));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(cuda::label_launch(shape, x.const_data_ptr(), type, threshold, labels.data_ptr(),
                                    num.data_ptr<int64_t>(), workspace.data_ptr(), ws_bytes, stream,
                                    check_probabilities ? static_cast<uint8_t*>(in_range.data_ptr()) : nullptr));
  if (check_probabilities)
    at::_assert_async(in_range, "label: `input` must hold probabilities in [0, 1] without NaN "
                                "(pass from_logits=True for logits)");
  return {labels, num};
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) { m.impl("label", &label_cuda); }

}  // namespace lesioncount
