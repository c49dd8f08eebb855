// CUDA-on-CPU test build: torch ops to steer and observe the runtime from the tests.
//   lesioncount_cuda_cpu::_configure(workers, seed, yield_probability, large_item_paths) (negative = unchanged)
//   lesioncount_cuda_cpu::_stats() -> int64 [launches, blocks, threads, context switches, workers, seed]
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "emulation_api.h"

namespace {

void configure(int64_t workers, int64_t seed, double yield_probability, int64_t large_item_paths) {
  TORCH_CHECK(workers == -1 || (workers >= 1 && workers <= 64), "_configure: `workers` must be -1 or in [1, 64], got ",
              workers);
  TORCH_CHECK(yield_probability < 0 || yield_probability <= 1, "_configure: `yield_probability` must be <= 1");
  lc_cpu::configure(static_cast<int>(workers), seed, yield_probability);
  if (large_item_paths >= 0) lc_cpu::set_force_large_item_paths(large_item_paths != 0);
}

at::Tensor stats() {
  const lc_cpu::Stats s = lc_cpu::stats();
  const std::vector<int64_t> v{s.launches, s.blocks, s.threads, s.context_switches, static_cast<int64_t>(s.workers),
                               s.seed};
  return at::tensor(v, at::kLong);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lesioncount_cuda_cpu, m) {
  m.def("_configure(int workers=-1, int seed=-1, float yield_probability=-1.0, int large_item_paths=-1) -> ()", &configure);
  m.def("_stats() -> Tensor", &stats);
}
