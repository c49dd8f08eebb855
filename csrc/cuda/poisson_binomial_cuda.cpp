// CUDA dispatch of poisson_binomial and _poisson_binomial_backward: validation (as the CPU
// kernels), allocation (outputs and shape-sized scratch from the caching allocator, so CUDA-graph
// capture works), and the launch of the pure-CUDA kernels of poisson_binomial.cu on the current
// stream. No host synchronisation: NaN, or (without from_logits) a probability outside [0, 1],
// cannot raise synchronously; the kernels treat it as p = 0 and clear a device flag that
// at::_assert_async turns into a device-side assertion (reported at the next synchronising call,
// and it leaves the CUDA context unusable, like an out-of-range index in torch's own kernels).
// The public Python wrapper checks the values (one host sync) outside torch.compile / graph capture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/op_arguments.h"
#include "cuda/device_tensor.h"
#include "cuda/poisson_binomial_launch.h"

namespace lesioncount {
namespace {

cuda::PbValueKind pb_kind(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf: return cuda::PbValueKind::kHalf;
    case at::kBFloat16: return cuda::PbValueKind::kBFloat16;
    case at::kFloat: return cuda::PbValueKind::kFloat;
    case at::kDouble: return cuda::PbValueKind::kDouble;
    default: TORCH_CHECK(false, op, ": `probs` must be float16, bfloat16, float32 or float64, got ", t);
  }
}

void check_probs_arg(const at::Tensor& probs, int64_t max_count, const char* op) {
  check_poisson_binomial_arguments(probs, max_count, op);
  TORCH_CHECK(on_kernel_device(probs), op, ": expected a CUDA tensor for `probs`, got ", probs.device());
}

const char* kInvalidMessage =
    "poisson_binomial: `probs` must not be NaN and, without from_logits, must lie in [0, 1]";

// Launch arguments shared by the forward and the backward, plus the tensors they point into
// (scratch and the device-side validity flag, set to 1 on `stream` before the launch).
struct PbLaunch {
  cuda::PbArgs args{};
  at::Tensor scratch;
  at::Tensor ok;
};

PbLaunch prepare_launch(const at::Tensor& x, const at::Tensor& out, const double* grad, int64_t M, bool log_space,
                        bool from_logits, bool backward, const char* op, cudaStream_t stream) {
  PbLaunch launch;
  const int64_t B = x.size(0), K = x.size(1);
  const cuda::PbPlan plan = cuda::pb_plan(B, K, M, backward);
  if (plan.scratch_doubles > 0) launch.scratch = at::empty({plan.scratch_doubles}, x.options().dtype(at::kDouble));
  launch.ok = at::empty({}, x.options().dtype(at::kBool));
  C10_CUDA_CHECK(cudaMemsetAsync(launch.ok.data_ptr(), 1, 1, stream));
  cuda::PbArgs& a = launch.args;
  a.probs = x.data_ptr();
  a.kind = pb_kind(x.scalar_type(), op);
  a.batch = B;
  a.K = K;
  a.M = M;
  a.log_space = log_space;
  a.from_logits = from_logits;
  a.grad = grad;
  a.out = out.data_ptr();
  a.scratch = launch.scratch.defined() ? launch.scratch.data_ptr<double>() : nullptr;
  a.ok = reinterpret_cast<unsigned char*>(launch.ok.data_ptr<bool>());
  return launch;
}

at::Tensor poisson_binomial_cuda(const at::Tensor& probs, int64_t max_count, bool log_space, bool from_logits) {
  check_probs_arg(probs, max_count, "poisson_binomial");
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), K = probs.size(1), M = max_count;
  const at::Tensor x = probs.contiguous();
  at::Tensor out = at::empty({B, M + 1}, x.options());
  if (B == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  PbLaunch launch = prepare_launch(x, out, nullptr, M, log_space, from_logits, false, "poisson_binomial", stream);
  C10_CUDA_CHECK(static_cast<cudaError_t>(cuda::launch_poisson_binomial_forward(launch.args, stream)));
  if (K > 0) at::_assert_async(launch.ok, kInvalidMessage);
  return out;
}

at::Tensor poisson_binomial_backward_cuda(const at::Tensor& grad, const at::Tensor& probs, int64_t max_count,
                                          bool log_space, bool from_logits) {
  check_probs_arg(probs, max_count, "_poisson_binomial_backward");
  const int64_t B = probs.size(0), K = probs.size(1), M = max_count;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == M + 1,
              "_poisson_binomial_backward: `grad` must have shape (", B, ", ", M + 1, "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == probs.device(),
              "_poisson_binomial_backward: `grad` and `probs` must be on the same device, got `grad` on ",
              grad.device(), " and `probs` on ", probs.device());
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor x = probs.contiguous();
  const at::Tensor g64 = grad.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({B, K}, x.options());
  if (B == 0 || K == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  PbLaunch launch = prepare_launch(x, out, g64.data_ptr<double>(), M, log_space, from_logits, true,
                                   "_poisson_binomial_backward", stream);
  C10_CUDA_CHECK(static_cast<cudaError_t>(cuda::launch_poisson_binomial_backward(launch.args, stream)));
  at::_assert_async(launch.ok, kInvalidMessage);
  return out;
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) {
  m.impl("poisson_binomial", &poisson_binomial_cuda);
  m.impl("_poisson_binomial_backward", &poisson_binomial_backward_cuda);
}

}  // namespace lesioncount
