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

// When set, the labeler takes its int64 path (int64 labels and indices) for every input, not only
// for items of >= 2^31 voxels, so that path runs in the tests (set through _configure).
bool force_wide_labels();
void set_force_wide_labels(bool on);

}  // namespace lc_cpu
