// CUDA-on-CPU test runtime: controls and counters of the scheduler (used by emulation.cpp, which
// exposes them to the tests as torch ops).
#pragma once

namespace lc_cpu {

struct Stats {
  long long launches, blocks, threads, context_switches;
  int workers;
  long long seed;
  double yield_probability;
};

// workers: host threads running blocks (> 0 to change); seed: block order and scheduling-point
// randomness (>= 0 to change); yield_probability: chance that an atomic lets another thread of the
// block run first (>= 0 to change).
void configure(int workers, long long seed, double yield_probability);
Stats stats();

// When set, the kernels take the paths meant for huge items on every input, so that those paths run
// in the tests (set through _configure): the labeler its int64 path (items of >= 2^31 voxels),
// region_max its two-pass path (items of > 2^32 voxels) for 16- and 32-bit values too.
bool force_large_item_paths();
void set_force_large_item_paths(bool on);

}  // namespace lc_cpu
