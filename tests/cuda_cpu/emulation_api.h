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

}  // namespace lc_cpu
