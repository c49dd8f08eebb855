// CUDA-on-CPU test build: torch ops to steer and observe the runtime from the tests.
//   lesioncount_cuda_cpu::_configure(workers, seed, yield_probability, large_item_paths) (negative = unchanged)
//   lesioncount_cuda_cpu::_stats() -> int64 [launches, blocks, threads, context switches, workers, seed]
// On the LibTorch stable ABI, like the library it tests.
#include <cstdint>
#include <tuple>

#include "common/stable_api.h"
#include "emulation_api.h"

namespace {

using lesioncount::Tensor;

// Returns a dummy 0 (a stable kernel returns at least one value; the Python side ignores it).
int64_t configure(int64_t workers, int64_t seed, double yield_probability, int64_t large_item_paths) {
  LC_CHECK(workers == -1 || (workers >= 1 && workers <= 64), "_configure: `workers` must be -1 or in [1, 64], got ",
           workers);
  LC_CHECK(yield_probability < 0 || yield_probability <= 1, "_configure: `yield_probability` must be <= 1");
  lc_cpu::configure(static_cast<int>(workers), seed, yield_probability);
  if (large_item_paths >= 0) lc_cpu::set_force_large_item_paths(large_item_paths != 0);
  return 0;
}

Tensor stats() {
  const lc_cpu::Stats s = lc_cpu::stats();
  Tensor out = torch::stable::empty({6}, lesioncount::ScalarType::Long, std::nullopt,
                                    torch::stable::Device(torch::headeronly::DeviceType::CPU));
  int64_t* v = out.mutable_data_ptr<int64_t>();
  v[0] = s.launches;
  v[1] = s.blocks;
  v[2] = s.threads;
  v[3] = s.context_switches;
  v[4] = static_cast<int64_t>(s.workers);
  v[5] = s.seed;
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(lesioncount_cuda_cpu, m) {
  m.def("_configure(int workers=-1, int seed=-1, float yield_probability=-1.0, int large_item_paths=-1) -> int");
  m.def("_stats() -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(lesioncount_cuda_cpu, CompositeExplicitAutograd, m) {
  m.impl("_configure", TORCH_BOX(&configure));
  m.impl("_stats", TORCH_BOX(&stats));
}
