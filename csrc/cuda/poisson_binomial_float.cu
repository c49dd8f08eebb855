// The float instantiations of the Poisson-binomial kernels (forward and backward, linear and log
// space): one of four per-dtype translation units, compiled in parallel (poisson_binomial_kernels.cuh).
#include "cuda/poisson_binomial_kernels.cuh"

LC_DEFINE_PB_LAUNCH(float, float)
