// CUDA dispatch of region_max, _region_topk and _region_max_backward: validation (as the CPU
// kernels, through common/op_arguments.h), allocation of outputs and workspaces (sizes from shapes
// only), and the launch of the pure-CUDA kernels of region_max.cu on the current stream. No host
// synchronisation: a label
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

// The floating dtypes the region kernels read; `what` names the argument in the error.
cuda::DType value_kind(ScalarType t, const char* what) {
  LC_CHECK(is_floating(t), what, " must be float16, bfloat16, float32 or float64, got ", t);
  return dtype_code(t, what);
}

// The scan inputs shared by region_max and _region_topk: dense input and labels on one device.
struct RegionScan {
  Tensor x, lab;
  int64_t batch, item_voxels;
};

RegionScan region_scan_inputs(const Tensor& input, const Tensor& labels, const char* op) {
  LC_CHECK(on_kernel_device(input) && on_kernel_device(labels) && same_device(input, labels), op,
           ": `input` and `labels` must be on the same CUDA device, got `input` on ", device_name(input),
           " and `labels` on ", device_name(labels));
  const int64_t batch = input.size(0);
  return {dense(input), dense(labels), batch, batch == 0 ? 0 : input.numel() / batch};
}

// Fills the scan fields that RegionMaxArgs and RegionTopkArgs share.
template <typename Args>
void set_scan_arguments(Args& args, const RegionScan& scan, cuda::DType value_kind) {
  args.input = scan.x.const_data_ptr();
  args.labels = scan.lab.const_data_ptr();
  args.value_kind = value_kind;
  args.label_kind = dtype_code(scan.lab.scalar_type());
  args.batch = scan.batch;
  args.item_voxels = scan.item_voxels;
}

std::tuple<Tensor, Tensor> region_max_cuda(const Tensor& input, const Tensor& labels, int64_t num_regions) {
  check_region_max_arguments(input, labels, num_regions);
  const RegionScan scan = region_scan_inputs(input, labels, "region_max");
  const KernelDeviceGuard guard(input);
  const Tensor& x = scan.x;
  const int64_t batch = scan.batch, item_voxels = scan.item_voxels;
  if (batch == 0 || item_voxels == 0)
    return {new_zeros(x, {batch, num_regions}, x.scalar_type()), new_full(x, {batch, num_regions}, ScalarType::Long, -1)};
  Tensor values = new_empty(x, {batch, num_regions}, x.scalar_type());
  Tensor argmax = new_empty(x, {batch, num_regions}, ScalarType::Long);
  const cuda::DType kind = value_kind(x.scalar_type(), "region_max: `input`");
  std::optional<Tensor> scratch;
  if (cuda::region_max_two_pass(kind, item_voxels) && num_regions > 0)
    scratch = new_empty(x, {batch, num_regions}, ScalarType::Long);
  const cudaStream_t stream = current_stream(x);
  Tensor ok = device_ok_flag(x, stream, "region_max");
  cuda::RegionMaxArgs args{};
  set_scan_arguments(args, scan, kind);
  args.num_regions = num_regions;
  args.values = values.mutable_data_ptr();
  args.argmax = reinterpret_cast<long long*>(argmax.mutable_data_ptr<int64_t>());
  args.scratch = scratch ? reinterpret_cast<unsigned long long*>(scratch->mutable_data_ptr<int64_t>()) : nullptr;
  args.ok = static_cast<unsigned char*>(ok.mutable_data_ptr());
  check_cuda(cuda::launch_region_max(args, stream), "region_max");
  assert_async(ok, "region_max: `labels` must lie in [0, num_regions] and `input` must not be NaN inside a region");
  return {values, argmax};
}

// Workspace: one 64-bit key per possible label 1..N of each item (plus the first-index array in
// two-pass mode) and each item's largest label: O(voxels), independent of the data. Labels above N
// (which no item of N voxels needs) are rejected like negative ones, through the device flag.
std::tuple<Tensor, Tensor, Tensor> region_topk_cuda(const Tensor& input, const Tensor& labels, int64_t k) {
  check_region_arguments(input, labels, "_region_topk");
  LC_CHECK(k >= 0, "_region_topk: `k` must be >= 0, got ", k);
  const RegionScan scan = region_scan_inputs(input, labels, "_region_topk");
  const KernelDeviceGuard guard(input);
  const Tensor& x = scan.x;
  const int64_t batch = scan.batch, item_voxels = scan.item_voxels;
  if (batch == 0 || item_voxels == 0)
    return {new_zeros(x, {batch, k}, x.scalar_type()), new_full(x, {batch, k}, ScalarType::Long, -1),
            new_zeros(x, {batch, k}, ScalarType::Long)};
  Tensor values = new_empty(x, {batch, k}, x.scalar_type());
  Tensor argmax = new_empty(x, {batch, k}, ScalarType::Long);
  Tensor ids = new_empty(x, {batch, k}, ScalarType::Long);
  const cuda::DType kind = value_kind(x.scalar_type(), "_region_topk: `input`");
  Tensor keys = new_empty(x, {batch, item_voxels}, ScalarType::Long);
  std::optional<Tensor> first_index;
  if (cuda::region_max_two_pass(kind, item_voxels)) first_index = new_empty(x, {batch, item_voxels}, ScalarType::Long);
  Tensor max_label = new_empty(x, {batch}, ScalarType::Long);
  const cudaStream_t stream = current_stream(x);
  Tensor ok = device_ok_flag(x, stream, "_region_topk");

  cuda::RegionTopkArgs args{};
  set_scan_arguments(args, scan, kind);
  args.k = k;
  args.values = values.mutable_data_ptr();
  args.argmax = reinterpret_cast<long long*>(argmax.mutable_data_ptr<int64_t>());
  args.ids = reinterpret_cast<long long*>(ids.mutable_data_ptr<int64_t>());
  args.keys = reinterpret_cast<unsigned long long*>(keys.mutable_data_ptr<int64_t>());
  args.first_index = first_index ? reinterpret_cast<unsigned long long*>(first_index->mutable_data_ptr<int64_t>()) : nullptr;
  args.max_label = reinterpret_cast<unsigned long long*>(max_label.mutable_data_ptr<int64_t>());
  args.ok = static_cast<unsigned char*>(ok.mutable_data_ptr());
  check_cuda(cuda::launch_region_topk(args, stream), "_region_topk");
  assert_async(ok, "_region_topk: `labels` must lie in [0, voxels per item] and `input` must not be NaN inside a region");
  return {values, argmax, ids};
}

Tensor region_max_backward_cuda(const Tensor& grad_values, const Tensor& argmax, std::vector<int64_t> input_shape) {
  check_region_max_backward_arguments(grad_values, argmax, input_shape);
  LC_CHECK(on_kernel_device(grad_values) && on_kernel_device(argmax) && same_device(grad_values, argmax),
           "_region_max_backward: `grad_values` and `argmax` must be on the same CUDA device, got ",
           device_name(grad_values), " and ", device_name(argmax));
  const KernelDeviceGuard guard(grad_values);

  Tensor grad_input = new_empty(grad_values, input_shape, grad_values.scalar_type());
  const int64_t batch = grad_values.size(0), regions = grad_values.size(1);
  const int64_t item_voxels = batch == 0 ? 0 : grad_input.numel() / batch;
  if (batch == 0) return grad_input;
  const cuda::DType kind = value_kind(grad_values.scalar_type(), "_region_max_backward: `grad_values`");
  const Tensor g = dense(grad_values);
  const Tensor a = dense(argmax);
  const int64_t slots = regions > 0 ? cuda::region_grad_table_slots(batch, regions) : 0;
  Tensor table = new_empty(a, {3 * slots}, ScalarType::Long);
  const cudaStream_t stream = current_stream(g);
  Tensor ok = device_ok_flag(g, stream, "_region_max_backward");

  cuda::RegionMaxBackwardArgs args{};
  args.grad_values = g.const_data_ptr();
  args.argmax = reinterpret_cast<const long long*>(a.const_data_ptr<int64_t>());
  args.value_kind = kind;
  args.batch = batch;
  args.regions = regions;
  args.item_voxels = item_voxels;
  args.grad_input = grad_input.mutable_data_ptr();
  args.table = reinterpret_cast<unsigned long long*>(table.mutable_data_ptr<int64_t>());
  args.table_slots = slots;
  args.ok = static_cast<unsigned char*>(ok.mutable_data_ptr());
  check_cuda(cuda::launch_region_max_backward(args, stream), "_region_max_backward");
  assert_async(ok, "_region_max_backward: `argmax` must lie in [-1, voxels per item)");
  return grad_input;
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) {
  m.impl("region_max", TORCH_BOX(&region_max_cuda));
  m.impl("_region_topk", TORCH_BOX(&region_topk_cuda));
  m.impl("_region_max_backward", TORCH_BOX(&region_max_backward_cuda));
}

}  // namespace lesioncount
