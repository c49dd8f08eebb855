// CUDA registration of `label`: argument checks (as label_cpu), outputs and workspace allocated with
// torch on the input's device, kernels enqueued on the current stream (csrc/cuda/label.cu).
// No device-to-host synchronisation: `num` stays on the device. An item containing NaN gets
// num[b] = -1 and all-zero labels (the CPU kernel raises instead; raising here would need a sync).
// With check_probabilities, the labeler's first pass clears a device flag on a value outside [0, 1]
// or NaN, and assert_async on that flag raises (asynchronously on a GPU, at the next synchronising
// call; at once on the CUDA-on-CPU test runtime) with the CPU kernel's message.
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/op_arguments.h"
#include "cuda/device_tensor.h"
#include "cuda/label_launch.h"

namespace lesioncount {
namespace {

std::tuple<Tensor, Tensor> label_cuda(const Tensor& input, double threshold, int64_t connectivity,
                                      int64_t min_size, bool check_probabilities) {
  check_label_arguments(input, threshold, connectivity, min_size);
  LC_CHECK(on_kernel_device(input), "label: expected a CUDA tensor for `input`, got one on ", device_name(input));
  const int spatial_rank = static_cast<int>(input.dim()) - 1;

  const KernelDeviceGuard guard(input);
  const Tensor x = dense(input);
  cuda::LabelShape shape;
  shape.batch = x.size(0);
  shape.depth = spatial_rank == 3 ? x.size(1) : 1;
  shape.height = x.size(spatial_rank - 1);
  shape.width = x.size(spatial_rank);
  shape.connectivity = static_cast<int>(connectivity);
  shape.min_size = min_size;
  const bool wide = cuda::label_is_wide(shape);
  Tensor labels = new_empty(x, shape_of(x).dims, wide ? ScalarType::Long : ScalarType::Int);
  const int64_t item_voxels = shape.depth * shape.height * shape.width;
  if (shape.batch == 0 || item_voxels == 0) return {labels, new_zeros(x, {shape.batch}, ScalarType::Long)};
  Tensor num = new_empty(x, {shape.batch}, ScalarType::Long);

  const size_t ws_bytes = cuda::label_workspace_bytes(shape);
  Tensor workspace = new_empty(x, {static_cast<int64_t>(ws_bytes)}, ScalarType::Byte);
  // check_probabilities: 1 while every value lies in [0, 1] (set and cleared on the device)
  std::optional<Tensor> in_range;
  if (check_probabilities) in_range = new_empty(x, {}, ScalarType::Bool);
  const cudaStream_t stream = current_stream(x);
  cuda::LabelArgs args{};
  args.shape = shape;
  args.input = x.const_data_ptr();
  args.input_type = dtype_code(x.scalar_type());
  args.threshold = threshold;
  args.labels = labels.mutable_data_ptr();
  args.num = num.mutable_data_ptr<int64_t>();
  args.workspace = workspace.mutable_data_ptr();
  args.workspace_bytes = ws_bytes;
  args.in_range = in_range ? static_cast<uint8_t*>(in_range->mutable_data_ptr()) : nullptr;
  check_cuda(cuda::launch_label(args, stream), "label");
  if (in_range)
    assert_async(*in_range, "label: `input` must hold probabilities in [0, 1] without NaN (pass from_logits=True for logits)");
  return {labels, num};
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) { m.impl("label", TORCH_BOX(&label_cuda)); }

}  // namespace lesioncount
