// CUDA dispatch of region_max: validation (as region_max_cpu), allocation, and the launch of the
// pure-CUDA kernels of region_max.cu on the current stream. No host synchronisation: a label
// outside [0, num_regions] or a NaN inside a region cannot raise synchronously on the GPU; the
// kernels skip such voxels (no memory is touched for them) and clear a device flag, which
// assert_async (aten::_assert_async) turns into a device-side assertion (a CUDA error at the next synchronising
// call; like an out-of-range index in torch's own kernels, it leaves the CUDA context unusable).
// The Python wrapper's own checks run first outside torch.compile / CUDA-graph capture.
#include "common/op_arguments.h"
#include "cuda/device_tensor.h"
#include "cuda/region_max_launch.h"

namespace lesioncount {
namespace {

cuda::ValueKind value_kind(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return cuda::ValueKind::kHalf;
    case ScalarType::BFloat16: return cuda::ValueKind::kBFloat16;
    case ScalarType::Float: return cuda::ValueKind::kFloat;
    case ScalarType::Double: return cuda::ValueKind::kDouble;
    default: LC_CHECK(false, "region_max: `input` must be float16, bfloat16, float32 or float64, got ", t);
  }
  return cuda::ValueKind::kFloat;
}

std::tuple<Tensor, Tensor> region_max_cuda(const Tensor& input, const Tensor& labels, int64_t num_regions) {
  check_region_max_arguments(input, labels, num_regions);
  LC_CHECK(on_kernel_device(input) && on_kernel_device(labels) && same_device(input, labels),
           "region_max: `input` and `labels` must be on the same CUDA device, got `input` on ", device_name(input),
           " and `labels` on ", device_name(labels));
  const KernelDeviceGuard guard(input);

  const int64_t batch = input.size(0);
  const int64_t item_voxels = batch == 0 ? 0 : input.numel() / batch;
  const Tensor x = dense(input);
  const Tensor lab = dense(labels);
  if (batch == 0 || item_voxels == 0)
    return {new_zeros(x, {batch, num_regions}, x.scalar_type()), new_full(x, {batch, num_regions}, ScalarType::Long, -1)};
  Tensor values = new_empty(x, {batch, num_regions}, x.scalar_type());
  Tensor argmax = new_empty(x, {batch, num_regions}, ScalarType::Long);
  const cuda::ValueKind kind = value_kind(x.scalar_type());
  std::optional<Tensor> scratch;
  if (cuda::region_max_two_pass(kind, item_voxels) && num_regions > 0)
    scratch = new_empty(x, {batch, num_regions}, ScalarType::Long);
  const cudaStream_t stream = current_stream(x);
  Tensor ok = device_ok_flag(x, stream, "region_max");
  cuda::RegionMaxArgs args{};
  args.input = x.const_data_ptr();
  args.labels = lab.const_data_ptr();
  args.value_kind = kind;
  args.label_kind = lab.scalar_type() == ScalarType::Int ? cuda::LabelKind::kInt32 : cuda::LabelKind::kInt64;
  args.batch = batch;
  args.item_voxels = item_voxels;
  args.num_regions = num_regions;
  args.values = values.mutable_data_ptr();
  args.argmax = reinterpret_cast<long long*>(argmax.mutable_data_ptr<int64_t>());
  args.scratch = scratch ? reinterpret_cast<unsigned long long*>(scratch->mutable_data_ptr<int64_t>()) : nullptr;
  args.ok = static_cast<unsigned char*>(ok.mutable_data_ptr());
  check_cuda(static_cast<cudaError_t>(cuda::launch_region_max(args, stream)), "region_max");
  assert_async(ok, "region_max: `labels` must lie in [0, num_regions] and `input` must not be NaN inside a region");
  return {values, argmax};
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) { m.impl("region_max", TORCH_BOX(&region_max_cuda)); }

}  // namespace lesioncount
