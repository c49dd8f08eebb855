// The double instantiations of the Poisson-binomial kernels (forward and backward, linear and log
// space): one of four per-dtype translation units, compiled in parallel (poisson_binomial_kernels.cuh).
#include "cuda/poisson_binomial_kernels.cuh"

namespace lesioncount {
namespace cuda {

int launch_pb_double(const PbArgs& a, bool backward, cudaStream_t stream) {
  return backward ? launch_mode<true, double>(a, stream) : launch_mode<false, double>(a, stream);
}

}  // namespace cuda
}  // namespace lesioncount
