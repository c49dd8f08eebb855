// Launcher API of the CUDA Poisson-binomial kernels (csrc/cuda/poisson_binomial.cu).
//
// Shared by the nvcc-built .cu and the g++-built torch launcher (poisson_binomial_cuda.cpp). It
// includes no torch header and of CUDA only cuda_runtime_api.h (for cudaError_t / cudaStream_t;
// the CUDA-on-CPU runtime has a stand-in), so the launch plan below can be compiled and tested by a
// plain C++ compiler on a machine without CUDA (tests/test_cuda_ops.py does).
//
// Two kernels:
// - "split" (M + 1 <= 16): one warp per batch item. The K candidates are split into 32 contiguous
//   chunks (forward: chunks of equally many active, p != 0, candidates, so that zero padding
//   anywhere leaves every bit of the pmf unchanged); each lane runs the DP of its chunk in registers
//   (chunk-local pmf of M+1 bins), then the
//   32 chunk pmfs are multiplied in a warp tree of truncated convolutions (bins >= M saturate into
//   the tail, an associative operation). The serial chain is K/32 steps instead of K: large K
//   (100k candidates) stays fast. Backward: prefix and suffix products across lanes give each
//   chunk the product of all other chunks, hence the adjoint of its chunk pmf; each lane then
//   runs the reverse DP over its chunk with sqrt checkpointing (states every ~sqrt(K/32)
//   candidates, segments recomputed) in global scratch.
// - "block" (any M): one block per item, bins across threads, one __syncthreads per candidate;
//   the state double buffer lives in shared memory when it fits, else in global scratch. Backward
//   with the same sqrt(K) checkpointing as the CPU kernel.
// Scratch sizes depend on shapes only (B, K, M), never on data. At most kPbScratchBudgetBytes of
// scratch is used: fewer warps/blocks are launched and loop over the items when the budget binds.
#pragma once

#include "common/connectivity.h"  // LC_HOST_DEVICE

#include <cuda_runtime_api.h>

#include "cuda/dtype.h"

namespace lesioncount {
namespace cuda {


constexpr int kPbSplitMaxBins = 16;   // split kernel when M + 1 <= this
constexpr int kPbSplitWarpsPerBlock = 4;
constexpr int kPbBlockThreads = 256;
constexpr long long kPbScratchBudgetBytes = 512LL << 20;
constexpr long long kPbMaxBlocks = 65535LL * 16;
constexpr long long kPbSmemStateLimitBytes = 48 * 1024;  // default dynamic shared memory limit

LC_HOST_DEVICE inline long long pb_ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// ceil(sqrt(n)) for n >= 1, exact for any long long n (no floating point).
LC_HOST_DEVICE inline long long pb_ceil_sqrt(long long n) {
  if (n <= 1) return 1;
  long long r = 1;
  while (r * r < n) r <<= 1;  // r >= sqrt(n)
  long long lo = r >> 1, hi = r;  // lo*lo < n <= hi*hi
  while (hi - lo > 1) {
    const long long mid = lo + (hi - lo) / 2;
    if (mid * mid >= n) hi = mid;
    else lo = mid;
  }
  return hi;
}

struct PbPlan {
  bool split;            // split kernel (else block kernel)
  int bins;              // split: compile-time bin count NB (power of two >= M+1, >= 2)
  int threads;           // threads per block
  long long blocks;      // grid size (the kernels loop over items beyond it)
  long long chunk;       // split: candidates per lane (ceil(K/32)); block: K
  long long seg_len;     // backward: candidates per checkpoint segment (S)
  long long num_ckpt;    // backward: checkpoints per item (or per lane): ceil(chunk / S)
  long long scratch_per_unit;  // doubles of scratch per warp (split) or per block (block)
  long long scratch_doubles;   // total doubles of scratch to allocate
  bool smem_state;       // block: state / adjoint double buffers in shared memory
  long long smem_bytes;  // block: dynamic shared memory per block
};

// Launch plan of the forward (backward = false) or backward pass for B items, K candidates,
// M = max_count. Depends on shapes only.
LC_HOST_DEVICE inline PbPlan pb_plan(long long B, long long K, long long M, bool backward) {
  PbPlan p{};
  const long long W = M + 1;
  p.split = W <= kPbSplitMaxBins;
  if (p.split) {
    p.bins = 2;
    while (p.bins < W) p.bins <<= 1;
    p.threads = 32 * kPbSplitWarpsPerBlock;
    p.chunk = pb_ceil_div(K, 32);
    p.seg_len = pb_ceil_sqrt(p.chunk > 0 ? p.chunk : 1);
    p.num_ckpt = pb_ceil_div(p.chunk, p.seg_len);
    // rows of NB doubles per lane: checkpoints + one segment
    p.scratch_per_unit = backward ? 32LL * (p.num_ckpt + p.seg_len) * p.bins : 0;
    long long units = B;  // warps
    if (p.scratch_per_unit > 0) {
      long long cap = kPbScratchBudgetBytes / (8 * p.scratch_per_unit);
      if (cap < 1) cap = 1;
      if (units > cap) units = cap;
    }
    p.blocks = pb_ceil_div(units, kPbSplitWarpsPerBlock);
    if (p.blocks > kPbMaxBlocks) p.blocks = kPbMaxBlocks;
    if (p.blocks < 1) p.blocks = 1;
    p.scratch_doubles = p.scratch_per_unit * p.blocks * kPbSplitWarpsPerBlock;
    p.smem_state = false;
    p.smem_bytes = 0;
    return p;
  }
  p.bins = 0;
  p.threads = kPbBlockThreads;
  p.chunk = K;
  p.seg_len = pb_ceil_sqrt(K > 0 ? K : 1);
  p.num_ckpt = pb_ceil_div(K, p.seg_len);
  // state (or adjoint value) double buffer; the log-space backward adds two int8 sign buffers
  const long long buf_bytes = 2 * W * 8 + (backward ? 2 * W : 0);
  p.smem_state = buf_bytes <= kPbSmemStateLimitBytes - 1024;
  // per block: candidate factors (3 per candidate), the double buffer unless in shared memory,
  // and for the backward the checkpoints plus one recomputed segment
  long long per = 3 * K + (p.smem_state ? 0 : pb_ceil_div(buf_bytes, 8));
  if (backward) per += (p.num_ckpt + p.seg_len) * W;
  p.scratch_per_unit = per;
  long long units = B;
  long long cap = kPbScratchBudgetBytes / (8 * (per > 0 ? per : 1));
  if (cap < 1) cap = 1;
  if (units > cap) units = cap;
  if (units > kPbMaxBlocks) units = kPbMaxBlocks;
  if (units < 1) units = 1;
  p.blocks = units;
  p.scratch_doubles = per * units;
  // 2 * kPbBlockThreads/32 doubles for the reduction, then the buffers
  p.smem_bytes = 2 * (kPbBlockThreads / 32) * 8 + (p.smem_state ? buf_bytes : 0);
  return p;
}

struct PoissonBinomialArgs {
  const void* probs;  // (B, K) contiguous, DType
  DType kind;
  long long batch, K, M;
  bool log_space, from_logits;
  const double* grad;  // backward only: (B, M+1) float64 contiguous
  void* out;           // forward: (B, M+1); backward: (B, K); in the probs dtype, fully written
  double* scratch;     // pb_plan(...).scratch_doubles doubles (may be null when 0)
  unsigned char* ok;   // one device byte: set to 0 on NaN, or (without from_logits) p outside [0, 1]
};

// Enqueue on `stream`; no host sync (the launch convention of every op: docs/ARCHITECTURE.md).
cudaError_t launch_poisson_binomial(const PoissonBinomialArgs& args, cudaStream_t stream);
cudaError_t launch_poisson_binomial_backward(const PoissonBinomialArgs& args, cudaStream_t stream);

// Internal: the per-dtype halves of the two above (forward when !backward), one per translation unit
// poisson_binomial_<dtype>.cu so that nvcc compiles the dtypes in parallel; poisson_binomial.cu
// dispatches on PoissonBinomialArgs::kind.
cudaError_t launch_pb_half(const PoissonBinomialArgs& args, bool backward, cudaStream_t stream);
cudaError_t launch_pb_bfloat16(const PoissonBinomialArgs& args, bool backward, cudaStream_t stream);
cudaError_t launch_pb_float(const PoissonBinomialArgs& args, bool backward, cudaStream_t stream);
cudaError_t launch_pb_double(const PoissonBinomialArgs& args, bool backward, cudaStream_t stream);

}  // namespace cuda
}  // namespace lesioncount
