// CUDA truncated Poisson-binomial pmf, forward and backward, linear and log space (pure CUDA: no
// torch headers; see poisson_binomial_cuda.cpp). The kernels and their launch plan are described
// in poisson_binomial_launch.h. Accumulation is float64 (or float64 log space) for every input
// dtype; the per-element DP formulas are those of common/poisson_binomial_dp.h and of the CPU
// kernel, with products and sums rounded separately (__dmul_rn/__dadd_rn, no FMA contraction) so
// that the linear-space block kernel reproduces the CPU's float64 arithmetic operation for
// operation. The split kernel multiplies chunk pmfs in a different order than the CPU's sequential
// DP (all terms non-negative, so it agrees to a few ulps); log space uses CUDA's exp/log1p.
//
// Invalid inputs (NaN; without from_logits, p outside [0, 1]) are treated as p = 0 and clear the
// `ok` byte; the torch launcher turns it into an asynchronous device assertion.
//
// This file: the dtype dispatch. The kernels are in poisson_binomial_kernels.cuh, instantiated by
// poisson_binomial_{half,bfloat16,float,double}.cu (four units that nvcc compiles in parallel).
#include <cuda_runtime.h>

#include "cuda/poisson_binomial_launch.h"

namespace lesioncount {
namespace cuda {
namespace {

template <bool BACKWARD>
cudaError_t launch(const PoissonBinomialArgs& a, cudaStream_t stream) {
  if (a.batch <= 0) return cudaSuccess;
  if (BACKWARD && a.K <= 0) return cudaSuccess;
  switch (a.kind) {
    case DType::kHalf: return launch_pb_half(a, BACKWARD, stream);
    case DType::kBFloat16: return launch_pb_bfloat16(a, BACKWARD, stream);
    case DType::kFloat: return launch_pb_float(a, BACKWARD, stream);
    case DType::kDouble: return launch_pb_double(a, BACKWARD, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_poisson_binomial(const PoissonBinomialArgs& args, cudaStream_t stream) { return launch<false>(args, stream); }
cudaError_t launch_poisson_binomial_backward(const PoissonBinomialArgs& args, cudaStream_t stream) { return launch<true>(args, stream); }

}  // namespace cuda
}  // namespace lesioncount
