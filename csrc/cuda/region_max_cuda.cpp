// CUDA dispatch of region_max, _region_topk and _region_max_backward: validation (as the CPU
// kernels, through common/op_arguments.h), allocation of outputs and workspaces (sizes from shapes
// only), and the launch of the pure-CUDA kernels of region_max.cu on the current stream. No host synchronisation: a label
// outside [0, num_regions] or a NaN inside a region cannot raise synchronously on the GPU; the
// kernels skip such voxels (no memory is touched for them) and clear a device flag, which
// at::_assert_async turns into a device-side assertion (a CUDA error at the next synchronising
// call; like an out-of-range index in torch's own kernels, it leaves the CUDA context unusable).
// The Python wrapper's own checks run first outside torch.compile / CUDA-graph capture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/op_arguments.h"
#include "cuda/device_tensor.h"
#include "cuda/region_max_launch.h"
#include "cuda/region_ops_launch.h"

namespace lesioncount {
namespace {

cuda::ValueKind value_kind(at::ScalarType t, const char* what = "region_max: `input`") {
  switch (t) {
    case at::kHalf: return cuda::ValueKind::kHalf;
    case at::kBFloat16: return cuda::ValueKind::kBFloat16;
    case at::kFloat: return cuda::ValueKind::kFloat;
    case at::kDouble: return cuda::ValueKind::kDouble;
    default: TORCH_CHECK(false, what, " must be float16, bfloat16, float32 or float64, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> region_max_cuda(const at::Tensor& input, const at::Tensor& labels,
                                                  int64_t num_regions) {
  check_region_max_arguments(input, labels, num_regions);
  TORCH_CHECK(on_kernel_device(input) && on_kernel_device(labels) && input.device() == labels.device(),
              "region_max: `input` and `labels` must be on the same CUDA device, got `input` on ",
              input.device(), " and `labels` on ", labels.device());
  const c10::cuda::CUDAGuard guard(input.device());

  const int64_t batch = input.size(0);
  const int64_t item_voxels = batch == 0 ? 0 : input.numel() / batch;
  const at::Tensor x = input.contiguous();
  const at::Tensor lab = labels.contiguous();
  at::Tensor values = at::empty({batch, num_regions}, x.options());
  at::Tensor argmax = at::empty({batch, num_regions}, x.options().dtype(at::kLong));
  if (batch == 0 || item_voxels == 0) {
    values.zero_();
    argmax.fill_(-1);
    return {values, argmax};
  }
  const cuda::ValueKind kind = value_kind(x.scalar_type());
  at::Tensor scratch;
  if (cuda::region_max_two_pass(kind, item_voxels) && num_regions > 0)
    scratch = at::empty({batch, num_regions}, x.options().dtype(at::kLong));
  at::Tensor ok = at::empty({}, x.options().dtype(at::kBool));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(cudaMemsetAsync(ok.data_ptr(), 1, 1, stream));
  cuda::RegionMaxArgs args{};
  args.input = x.data_ptr();
  args.labels = lab.data_ptr();
  args.value_kind = kind;
  args.label_kind = lab.scalar_type() == at::kInt ? cuda::LabelKind::kInt32 : cuda::LabelKind::kInt64;
  args.batch = batch;
  args.item_voxels = item_voxels;
  args.num_regions = num_regions;
  args.values = values.data_ptr();
  args.argmax = reinterpret_cast<long long*>(argmax.data_ptr<int64_t>());
  args.scratch = scratch.defined() ? reinterpret_cast<unsigned long long*>(scratch.data_ptr<int64_t>()) : nullptr;
  args.ok = reinterpret_cast<unsigned char*>(ok.data_ptr<bool>());
  C10_CUDA_CHECK(static_cast<cudaError_t>(cuda::launch_region_max(args, stream)));
  at::_assert_async(ok, "region_max: `labels` must lie in [0, num_regions] and `input` must not be NaN inside a region");
  return {values, argmax};
}

// Workspace: one 64-bit key per possible label 1..N of each item (plus the first-index array in
// two-pass mode) and each item's largest label: O(voxels), independent of the data. Labels above N
// (which no item of N voxels needs) are rejected like negative ones, through the device flag.
std::tuple<at::Tensor, at::Tensor, at::Tensor> region_topk_cuda(const at::Tensor& input, const at::Tensor& labels,
                                                               int64_t k) {
  check_region_max_arguments(input, labels, k);
  TORCH_CHECK(on_kernel_device(input) && on_kernel_device(labels) && input.device() == labels.device(),
              "_region_topk: `input` and `labels` must be on the same CUDA device, got `input` on ",
              input.device(), " and `labels` on ", labels.device());
  const c10::cuda::CUDAGuard guard(input.device());

  const int64_t batch = input.size(0);
  const int64_t item_voxels = batch == 0 ? 0 : input.numel() / batch;
  const at::Tensor x = input.contiguous();
  const at::Tensor lab = labels.contiguous();
  at::Tensor values = at::empty({batch, k}, x.options());
  at::Tensor argmax = at::empty({batch, k}, x.options().dtype(at::kLong));
  at::Tensor ids = at::empty({batch, k}, x.options().dtype(at::kLong));
  if (batch == 0 || item_voxels == 0) {
    values.zero_();
    argmax.fill_(-1);
    ids.zero_();
    return {values, argmax, ids};
  }
  const cuda::ValueKind kind = value_kind(x.scalar_type(), "_region_topk: `input`");
  const at::TensorOptions u64 = x.options().dtype(at::kLong);
  at::Tensor keys = at::empty({batch, item_voxels}, u64);
  at::Tensor first_index;
  if (cuda::region_max_two_pass(kind, item_voxels)) first_index = at::empty({batch, item_voxels}, u64);
  at::Tensor max_label = at::empty({batch}, u64);
  at::Tensor ok = at::empty({}, x.options().dtype(at::kBool));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(cudaMemsetAsync(ok.data_ptr(), 1, 1, stream));
  cuda::RegionTopkArgs args{};
  args.input = x.data_ptr();
  args.labels = lab.data_ptr();
  args.value_kind = kind;
  args.label_kind = lab.scalar_type() == at::kInt ? cuda::LabelKind::kInt32 : cuda::LabelKind::kInt64;
  args.batch = batch;
  args.item_voxels = item_voxels;
  args.k = k;
  args.values = values.data_ptr();
  args.argmax = reinterpret_cast<long long*>(argmax.data_ptr<int64_t>());
  args.ids = reinterpret_cast<long long*>(ids.data_ptr<int64_t>());
  args.keys = reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>());
  args.first_index =
      first_index.defined() ? reinterpret_cast<unsigned long long*>(first_index.data_ptr<int64_t>()) : nullptr;
  args.max_label = reinterpret_cast<unsigned long long*>(max_label.data_ptr<int64_t>());
  args.ok = reinterpret_cast<unsigned char*>(ok.data_ptr<bool>());
  C10_CUDA_CHECK(cuda::launch_region_topk(args, stream));
  at::_assert_async(ok, "_region_topk: `labels` must lie in [0, voxels per item] and `input` must not be NaN inside a region");
  return {values, argmax, ids};
}

at::Tensor region_max_backward_cuda(const at::Tensor& grad_values, const at::Tensor& argmax,
                                    c10::SymIntArrayRef input_shape_sym) {
  const auto input_shape = C10_AS_INTARRAYREF_SLOW(input_shape_sym);
  check_region_max_backward_arguments(grad_values, argmax, input_shape);
  TORCH_CHECK(on_kernel_device(grad_values) && on_kernel_device(argmax) && grad_values.device() == argmax.device(),
              "_region_max_backward: `grad_values` and `argmax` must be on the same CUDA device, got ",
              grad_values.device(), " and ", argmax.device());
  const c10::cuda::CUDAGuard guard(grad_values.device());

  at::Tensor grad_input = at::empty(input_shape, grad_values.options());
  const int64_t batch = grad_values.size(0), regions = grad_values.size(1);
  const int64_t item_voxels = batch == 0 ? 0 : grad_input.numel() / batch;
  if (batch == 0) return grad_input;
  const cuda::ValueKind kind = value_kind(grad_values.scalar_type(), "_region_max_backward: `grad_values`");
  const at::Tensor g = grad_values.contiguous();
  const at::Tensor a = argmax.contiguous();
  const int64_t slots = regions > 0 ? cuda::region_grad_table_slots(batch, regions) : 0;
  at::Tensor table = at::empty({3 * slots}, a.options());
  at::Tensor ok = at::empty({}, g.options().dtype(at::kBool));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  C10_CUDA_CHECK(cudaMemsetAsync(ok.data_ptr(), 1, 1, stream));
  cuda::RegionMaxBackwardArgs args{};
  args.grad_values = g.data_ptr();
  args.argmax = reinterpret_cast<const long long*>(a.data_ptr<int64_t>());
  args.value_kind = kind;
  args.batch = batch;
  args.regions = regions;
  args.item_voxels = item_voxels;
  args.grad_input = grad_input.data_ptr();
  args.table = reinterpret_cast<unsigned long long*>(table.data_ptr<int64_t>());
  args.table_slots = slots;
  args.ok = reinterpret_cast<unsigned char*>(ok.data_ptr<bool>());
  C10_CUDA_CHECK(cuda::launch_region_max_backward(args, stream));
  at::_assert_async(ok, "_region_max_backward: `argmax` must lie in [-1, voxels per item)");
  return grad_input;
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) {
  m.impl("region_max", &region_max_cuda);
  m.impl("_region_topk", &region_topk_cuda);
  m.impl("_region_max_backward", &region_max_backward_cuda);
}

}  // namespace lesioncount
