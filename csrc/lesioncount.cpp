// Operator schemas of the lesioncount library, defined once for every backend.
//
// Backend files (cpu/*.cpp, cuda/*.cu + their .cpp launchers) register only their own kernels with
// STABLE_TORCH_LIBRARY_IMPL, so a CPU-only build needs no #ifdef here. Fake (meta) kernels and
// autograd are attached from Python (python/lesioncount/_ops.py). Everything here goes through the
// LibTorch stable ABI (common/stable_api.h).
#include "common/stable_api.h"

// The CUDA-on-CPU test build (tests/cuda_cpu) defines the same schemas again under its own
// namespace, lesioncount_cuda_cpu, for the CUDA launchers it compiles for CPU tensors.
#ifndef LC_OPS_NAMESPACE
#define LC_OPS_NAMESPACE lesioncount
#endif
#define LC_TORCH_LIBRARY_EXPANDED(ns, m) STABLE_TORCH_LIBRARY(ns, m)

LC_TORCH_LIBRARY_EXPANDED(LC_OPS_NAMESPACE, m) {
  // Connected components of `input > threshold` per batch item, numbered like scipy.ndimage.label.
  // check_probabilities: also reject values outside [0, 1] in the same pass (CPU: an error; CUDA: a
  // device flag of the first pass and a device-side assertion, no host sync).
  m.def("label(Tensor input, float threshold, int connectivity, int min_size, bool check_probabilities=False) -> (Tensor labels, Tensor num)");
  // Per-region maximum and the first flat index reaching it; column r-1 holds label r.
  m.def("region_max(Tensor input, Tensor labels, int num_regions) -> (Tensor values, Tensor argmax)");
  // The k regions with the largest maxima per item (ties: smaller label), in label order, with their
  // argmax and label id; padded with value 0, argmax -1, id 0. Static output shape for any number of
  // regions: the path of count_distribution(max_lesions=k). Labels < 0 (and, on CUDA, labels above the
  // item's voxel count) and NaN inside a region are errors.
  m.def("_region_topk(Tensor input, Tensor labels, int k) -> (Tensor values, Tensor argmax, Tensor ids)");
  // Backward of region_max: a dense zero gradient of `input_shape` with one value per region placed at
  // its argmax voxel (absent regions, argmax -1, contribute nothing).
  m.def("_region_max_backward(Tensor grad_values, Tensor argmax, SymInt[] input_shape) -> Tensor");
  // Truncated Poisson-binomial pmf (bins 0..M-1 and a tail bin P(C >= M)) of independent Bernoullis.
  m.def("poisson_binomial(Tensor probs, int max_count, bool log_space, bool from_logits) -> Tensor");
  // Vector-Jacobian product of poisson_binomial with respect to `probs`.
  m.def("_poisson_binomial_backward(Tensor grad, Tensor probs, int max_count, bool log_space, bool from_logits) -> Tensor");
}
