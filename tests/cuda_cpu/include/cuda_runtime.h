// CUDA-on-CPU test runtime: runs the project's own .cu kernels, compiled by g++ as C++, on the CPU.
//
// Why: no GPU is available to CI, and no packaged runtime (PyPI or Debian) executes CUDA device code
// on a CPU. This header and runtime.cpp give the kernels of csrc/cuda/*.cu the execution model they
// are written against, so the CUDA tests exercise the same device code nvcc compiles:
//   - a launch runs every block of the grid; blocks are spread over several host threads (real
//     concurrency between blocks, so global-memory atomics race for real) in a seeded, shuffled
//     order;
//   - the threads of a block are fibers (user-level contexts with their own stacks) run by one host
//     thread; a fiber runs until it reaches __syncthreads, a warp collective, or a scheduling point
//     (each atomic yields to another thread of the block with a seeded probability), so the threads of
//     a block interleave at every point where a GPU kernel's correctness can depend on it;
//   - __syncthreads is a barrier over the live threads of the block; a thread that has exited counts
//     as arrived (as on NVIDIA hardware); a barrier nobody can complete is reported as a deadlock;
//   - warps are 32 consecutive linear thread ids; __shfl*_sync, __ballot_sync, __any_sync,
//     __all_sync and __syncwarp are rendezvous of exactly the lanes named in `mask`: each waits until
//     all of them arrived at the same collective. A lane not in its own mask, lanes that meet at
//     different collectives or with different masks, a mask naming an exited or nonexistent lane, and
//     a shuffle reading a lane outside the mask are reported as errors (undefined behaviour on a GPU);
//   - __shared__ variables are per block (per host thread, one block at a time); dynamic shared
//     memory is a per-block buffer filled with 0xFF bytes before each block (reads of unwritten
//     shared memory see NaN / -1, not zeros);
//   - launch configuration errors are those of a real device (grid.x < 2^31, grid.y/z <= 65535,
//     <= 1024 threads per block, no zero dimension, <= 48 KiB dynamic shared memory), reported by
//     cudaGetLastError; errors found while running (above) are reported as cudaErrorLaunchFailure
//     with a message naming the block, the thread and what went wrong.
//
// What it cannot reproduce (covered by review, and by benchmarks/gpu_check.sh on a real GPU):
//   - the GPU memory model: plain loads and stores are not interleaved between the threads of a
//     block (only atomics, barriers and warp collectives are scheduling points), so a missing
//     __threadfence or volatile, or a plain-store race, is not detected; x86 memory is also more
//     strongly ordered than a GPU's;
//   - warp-synchronous code without a *_sync collective (implicit lockstep) simply runs the lanes one
//     after another; __launch_bounds__, register limits, occupancy and static __shared__ size limits
//     are not checked; static __shared__ memory is not poisoned between blocks;
//   - CUDA math functions (exp, log, log1p) are glibc's, which may differ from libdevice by an ulp;
//     __dmul_rn / __dadd_rn are exact IEEE operations here as there (built with -ffp-contract=off);
//   - streams and events: work runs synchronously at launch, in issue order;
//   - out-of-bounds device memory accesses are not trapped (a build with -fsanitize=address can).
#pragma once

// Standard headers the kernels may use are included before the macros below redefine CUDA's
// keywords (libstdc++ itself spells attributes as __noinline__).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__ static

namespace lc_cpu {

// Built-in variables of the running CUDA thread (set by the scheduler before it resumes a fiber).
struct ThreadVars {
  uint3 thread_idx;
};
struct BlockVars {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local ThreadVars* current_thread;
extern thread_local BlockVars current_block;

enum class Collective : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };

void syncthreads();
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int arg, int width);
void scheduling_point();  // maybe lets another thread of the block run (seeded)
void* dynamic_shared_memory();

using KernelEntry = void (*)(void*);
cudaError_t launch_erased(dim3 grid, dim3 block, size_t dynamic_smem_bytes, KernelEntry entry, void* context);

// Launches `kernel` like kernel<<<grid, block, smem>>>(args...): arguments are converted to the
// kernel's parameter types once and every thread gets its own copy (by-value parameters).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, Args&&... args) {
  struct Context {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Context context{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return launch_erased(
      grid, block, dynamic_smem_bytes,
      [](void* c) {
        Context* ctx = static_cast<Context*>(c);
        std::apply(ctx->kernel, ctx->params);
      },
      &context);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp collectives move up to 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Compiler barrier around every runtime call that can switch threads: shared-memory statics must
// be stored before and reloaded after (another fiber of the block may have written them).
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

}  // namespace lc_cpu

#define threadIdx (::lc_cpu::current_thread->thread_idx)
#define blockIdx (::lc_cpu::current_block.block_idx)
#define blockDim (::lc_cpu::current_block.block_dim)
#define gridDim (::lc_cpu::current_block.grid_dim)
constexpr int warpSize = 32;

// ---- synchronisation and warp collectives ----
inline void __syncthreads() {
  lc_cpu::compiler_barrier();
  lc_cpu::syncthreads();
  lc_cpu::compiler_barrier();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  lc_cpu::compiler_barrier();
  lc_cpu::warp_collective(lc_cpu::Collective::kSyncWarp, mask, 0, 0, 32);
  lc_cpu::compiler_barrier();
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#define LC_CPU_SHUFFLE(name, kind)                                                                      \
  template <typename T>                                                                                 \
  inline T name(unsigned mask, T var, int arg, int width = 32) {                                       \
    lc_cpu::compiler_barrier();                                                                         \
    const T r = lc_cpu::from_bits<T>(lc_cpu::warp_collective(kind, mask, lc_cpu::to_bits(var), arg, width)); \
    lc_cpu::compiler_barrier();                                                                         \
    return r;                                                                                           \
  }
LC_CPU_SHUFFLE(__shfl_sync, lc_cpu::Collective::kShflIdx)
LC_CPU_SHUFFLE(__shfl_up_sync, lc_cpu::Collective::kShflUp)
LC_CPU_SHUFFLE(__shfl_down_sync, lc_cpu::Collective::kShflDown)
LC_CPU_SHUFFLE(__shfl_xor_sync, lc_cpu::Collective::kShflXor)
#undef LC_CPU_SHUFFLE

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  lc_cpu::compiler_barrier();
  return static_cast<unsigned>(lc_cpu::warp_collective(lc_cpu::Collective::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  lc_cpu::compiler_barrier();
  return static_cast<int>(lc_cpu::warp_collective(lc_cpu::Collective::kAny, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  lc_cpu::compiler_barrier();
  return static_cast<int>(lc_cpu::warp_collective(lc_cpu::Collective::kAll, mask, predicate != 0, 0, 32));
}

// ---- atomics (sequentially consistent; each one is a scheduling point) ----
namespace lc_cpu {
template <typename T>
inline T atomic_cas(T* p, T expected, T desired) {
  scheduling_point();
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;  // the old value, whether or not it was replaced
}
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
  scheduling_point();
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(p, &old, f(old), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename F, typename U>
inline F atomic_update_float(F* p, U f) {  // float/double through their bit patterns
  using Bits = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  const Bits old = atomic_update(reinterpret_cast<Bits*>(p), [&](Bits b) {
    F v;
    std::memcpy(&v, &b, sizeof(F));
    const F r = f(v);
    Bits out;
    std::memcpy(&out, &r, sizeof(F));
    return out;
  });
  F v;
  std::memcpy(&v, &old, sizeof(F));
  return v;
}
}  // namespace lc_cpu

#define LC_CPU_INT_ATOMICS(T)                                                                              \
  inline T atomicCAS(T* p, T compare, T val) { return lc_cpu::atomic_cas(p, compare, val); }              \
  inline T atomicExch(T* p, T val) {                                                                        \
    return lc_cpu::atomic_update(p, [&](T) { return val; });                                                \
  }                                                                                                         \
  inline T atomicAdd(T* p, T val) {                                                                         \
    return lc_cpu::atomic_update(p, [&](T o) { return static_cast<T>(o + val); });                          \
  }                                                                                                         \
  inline T atomicSub(T* p, T val) {                                                                         \
    return lc_cpu::atomic_update(p, [&](T o) { return static_cast<T>(o - val); });                          \
  }                                                                                                         \
  inline T atomicMin(T* p, T val) {                                                                         \
    return lc_cpu::atomic_update(p, [&](T o) { return val < o ? val : o; });                                \
  }                                                                                                         \
  inline T atomicMax(T* p, T val) {                                                                         \
    return lc_cpu::atomic_update(p, [&](T o) { return val > o ? val : o; });                                \
  }                                                                                                         \
  inline T atomicAnd(T* p, T val) {                                                                         \
    return lc_cpu::atomic_update(p, [&](T o) { return static_cast<T>(o & val); });                          \
  }                                                                                                         \
  inline T atomicOr(T* p, T val) {                                                                          \
    return lc_cpu::atomic_update(p, [&](T o) { return static_cast<T>(o | val); });                          \
  }                                                                                                         \
  inline T atomicXor(T* p, T val) {                                                                         \
    return lc_cpu::atomic_update(p, [&](T o) { return static_cast<T>(o ^ val); });                          \
  }
LC_CPU_INT_ATOMICS(int)
LC_CPU_INT_ATOMICS(unsigned int)
LC_CPU_INT_ATOMICS(long long)
LC_CPU_INT_ATOMICS(unsigned long long)
#undef LC_CPU_INT_ATOMICS
inline float atomicAdd(float* p, float v) {
  return lc_cpu::atomic_update_float(p, [&](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
  return lc_cpu::atomic_update_float(p, [&](double o) { return o + v; });
}
inline float atomicExch(float* p, float v) {
  return lc_cpu::atomic_update_float(p, [&](float) { return v; });
}

// ---- integer and bit intrinsics ----
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __float_as_uint(float f) { return lc_cpu::from_bits<unsigned>(lc_cpu::to_bits(f)); }
inline int __float_as_int(float f) { return lc_cpu::from_bits<int>(lc_cpu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return lc_cpu::from_bits<float>(u); }
inline float __int_as_float(int i) { return lc_cpu::from_bits<float>(static_cast<uint32_t>(i)); }
inline long long __double_as_longlong(double d) { return lc_cpu::from_bits<long long>(lc_cpu::to_bits(d)); }
inline double __longlong_as_double(long long v) { return lc_cpu::from_bits<double>(static_cast<uint64_t>(v)); }

// ---- floating-point intrinsics: IEEE round-to-nearest, never contracted (-ffp-contract=off) ----
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- CUDA's global min/max overloads ----
#define LC_CPU_MINMAX(T)                               \
  inline T min(T a, T b) { return a < b ? a : b; } \
  inline T max(T a, T b) { return a > b ? a : b; }
LC_CPU_MINMAX(int)
LC_CPU_MINMAX(unsigned int)
LC_CPU_MINMAX(long)
LC_CPU_MINMAX(unsigned long)
LC_CPU_MINMAX(long long)
LC_CPU_MINMAX(unsigned long long)
LC_CPU_MINMAX(float)
LC_CPU_MINMAX(double)
#undef LC_CPU_MINMAX
