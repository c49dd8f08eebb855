// CUDA dispatch of poisson_binomial and _poisson_binomial_backward: validation (as the CPU
// kernels), allocation (outputs and shape-sized scratch from the caching allocator, so CUDA-graph
// capture works), and the launch of the pure-CUDA kernels of poisson_binomial.cu on the current
// stream. No host synchronisation: NaN, or (without from_logits) a probability outside [0, 1],
// cannot raise synchronously; the kernels treat it as p = 0 and clear a device flag that
// assert_async (aten::_assert_async) turns into a device-side assertion (reported at the next synchronising call,
// and it leaves the CUDA context unusable, like an out-of-range index in torch's own kernels).
// The public Python wrapper checks the values (one host sync) outside torch.compile / graph capture.
#include "common/op_arguments.h"
#include "cuda/device_tensor.h"
#include "cuda/poisson_binomial_launch.h"

namespace lesioncount {
namespace {

void check_probs_arg(const Tensor& probs, int64_t max_count, const char* op) {
  check_poisson_binomial_arguments(probs, max_count, op);
  LC_CHECK(on_kernel_device(probs), op, ": expected a CUDA tensor for `probs`, got one on ", device_name(probs));
}

const char* kInvalidMessage =
    "poisson_binomial: `probs` must not be NaN and, without from_logits, must lie in [0, 1]";

// Launch arguments shared by the forward and the backward, plus the tensors they point into
// (scratch and the device-side validity flag, set to 1 on `stream` before the launch).
struct PbLaunch {
  cuda::PoissonBinomialArgs args{};
  std::optional<Tensor> scratch;
  std::optional<Tensor> ok;
};

PbLaunch prepare_launch(const Tensor& x, const Tensor& out, const double* grad, int64_t M, bool log_space,
                        bool from_logits, bool backward, const char* op, cudaStream_t stream) {
  PbLaunch launch;
  const int64_t B = x.size(0), K = x.size(1);
  const cuda::PbPlan plan = cuda::pb_plan(B, K, M, backward);
  if (plan.scratch_doubles > 0) launch.scratch = new_empty(x, {plan.scratch_doubles}, ScalarType::Double);
  launch.ok = device_ok_flag(x, stream, op);
  cuda::PoissonBinomialArgs& a = launch.args;
  a.probs = x.const_data_ptr();
  a.kind = dtype_code(x.scalar_type(), op);
  a.batch = B;
  a.K = K;
  a.M = M;
  a.log_space = log_space;
  a.from_logits = from_logits;
  a.grad = grad;
  a.out = out.mutable_data_ptr();
  a.scratch = launch.scratch ? launch.scratch->mutable_data_ptr<double>() : nullptr;
  a.ok = static_cast<unsigned char*>(launch.ok->mutable_data_ptr());
  return launch;
}

Tensor poisson_binomial_cuda(const Tensor& probs, int64_t max_count, bool log_space, bool from_logits) {
  check_probs_arg(probs, max_count, "poisson_binomial");
  const KernelDeviceGuard guard(probs);
  const int64_t B = probs.size(0), K = probs.size(1), M = max_count;
  const Tensor x = dense(probs);
  Tensor out = new_empty(x, {B, M + 1}, x.scalar_type());
  if (B == 0) return out;
  const cudaStream_t stream = current_stream(x);
  PbLaunch launch = prepare_launch(x, out, nullptr, M, log_space, from_logits, false, "poisson_binomial", stream);
  check_cuda(cuda::launch_poisson_binomial(launch.args, stream), "poisson_binomial");
  if (K > 0) assert_async(*launch.ok, kInvalidMessage);
  return out;
}

Tensor poisson_binomial_backward_cuda(const Tensor& grad, const Tensor& probs, int64_t max_count,
                                          bool log_space, bool from_logits) {
  check_probs_arg(probs, max_count, "_poisson_binomial_backward");
  const int64_t B = probs.size(0), K = probs.size(1), M = max_count;
  LC_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == M + 1,
              "_poisson_binomial_backward: `grad` must have shape (", B, ", ", M + 1, "), got ", shape_of(grad));
  LC_CHECK(same_device(grad, probs),
           "_poisson_binomial_backward: `grad` and `probs` must be on the same device, got `grad` on ",
           device_name(grad), " and `probs` on ", device_name(probs));
  const KernelDeviceGuard guard(probs);
  const Tensor x = dense(probs);
  const Tensor g64 = contiguous_as(grad, ScalarType::Double);
  Tensor out = new_empty(x, {B, K}, x.scalar_type());
  if (B == 0 || K == 0) return out;
  const cudaStream_t stream = current_stream(x);
  PbLaunch launch = prepare_launch(x, out, g64.const_data_ptr<double>(), M, log_space, from_logits, true,
                                   "_poisson_binomial_backward", stream);
  check_cuda(cuda::launch_poisson_binomial_backward(launch.args, stream), "_poisson_binomial_backward");
  assert_async(*launch.ok, kInvalidMessage);
  return out;
}

}  // namespace

LC_CUDA_LIBRARY_IMPL(m) {
  m.impl("poisson_binomial", TORCH_BOX(&poisson_binomial_cuda));
  m.impl("_poisson_binomial_backward", TORCH_BOX(&poisson_binomial_backward_cuda));
}

}  // namespace lesioncount
