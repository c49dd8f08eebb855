// Launcher API of the CUDA region_max, _region_topk and _region_max_backward kernels
// (csrc/cuda/region_max.cu).
//
// This header is shared by the nvcc-built .cu and the g++-built torch launcher
// (region_max_cuda.cpp). It includes no torch header and of CUDA only cuda_runtime_api.h (for
// cudaError_t / cudaStream_t; the CUDA-on-CPU runtime has a stand-in), so the launch-configuration
// helpers below can also be compiled and tested by a plain C++ compiler on a machine without CUDA.
// Launch convention of every op: cudaError_t launch_<op>(const <Op>Args&, cudaStream_t).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

#include "common/connectivity.h"  // LC_HOST_DEVICE
#if defined(LESIONCOUNT_CUDA_ON_CPU)
#include "emulation_api.h"  // the CUDA-on-CPU tests force the two-pass path on small items too
#endif

namespace lesioncount {
namespace cuda {

// One-pass mode packs (order-preserving value bits << 32) | (0xFFFFFFFF - flat index) into one
// 64-bit key and keeps the atomicMax per region. That needs values of at most 32 bits and flat
// indices below 2^32. Otherwise (float64 values, or items of more than 2^32 voxels) two passes run:
// atomicMax of the 64-bit order-preserving value bits, then atomicMin of the flat index among the
// voxels whose value equals that maximum. Both give the smallest flat index among the maxima.
LC_HOST_DEVICE inline bool region_max_two_pass(DType kind, long long item_voxels) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  if (::lc_cpu::force_large_item_paths()) return true;
#endif
  return kind == DType::kDouble || item_voxels > (1LL << 32);
}

// Launch geometry of the scan kernels: blockDim.x = kRegionMaxThreads, each warp takes
// 32 * kRegionMaxUnroll consecutive voxels per iteration (grid-stride beyond grid.x blocks);
// grid.y walks the batch (item-stride beyond 65535 items).
constexpr int kRegionMaxThreads = 256;
constexpr int kRegionMaxUnroll = 4;
constexpr long long kRegionMaxVoxelsPerBlock = (long long)kRegionMaxThreads * kRegionMaxUnroll;

struct RegionMaxGrid {
  long long blocks_x;  // 0 when there is nothing to scan
  long long blocks_y;
};

LC_HOST_DEVICE inline RegionMaxGrid region_max_grid(long long batch, long long item_voxels) {
  RegionMaxGrid g{0, 0};
  if (batch <= 0 || item_voxels <= 0) return g;
  long long bx = (item_voxels + kRegionMaxVoxelsPerBlock - 1) / kRegionMaxVoxelsPerBlock;
  // Enough blocks to fill any current GPU several times over; larger items loop (grid-stride).
  const long long max_bx = 65535;
  g.blocks_x = bx < max_bx ? bx : max_bx;
  g.blocks_y = batch < 65535 ? batch : 65535;
  return g;
}

struct RegionMaxArgs {
  const void* input;   // (B, N) contiguous, value_kind (half, bfloat16, float, double)
  const void* labels;  // (B, N) contiguous, label_kind (int32, int64)
  DType value_kind;
  DType label_kind;
  long long batch;
  long long item_voxels;  // N
  long long num_regions;  // R
  void* values;           // (B, R) output in the input dtype (fully written)
  long long* argmax;      // (B, R) output (fully written; also used as the key buffer)
  unsigned long long* scratch;  // (B, R) in two-pass mode, else unused (may be null)
  unsigned char* ok;  // one device byte: set to 0 on a label < 0 or > R, or NaN inside a region
};

// Enqueues the whole op on `stream` (memset + scan kernel(s) + finalize); no host sync.
cudaError_t launch_region_max(const RegionMaxArgs& args, cudaStream_t stream);

// ---- _region_topk and _region_max_backward ----
// _region_topk: the region_max scan of region_max.cu (packed keys, or the two-pass scheme) over
// per-item key arrays indexed by label (labels 1..N for an item of N voxels: O(voxels) workspace),
// which also records each item's largest label on the device; then one block per item selects
// the k best regions (value desc, label asc) with a radix select over the item's own labels
// 1..max_label only (no sort, nothing sized by a bound) and writes them in label order with a
// block-wide order-preserving compaction. _region_max_backward: a zeroed output plus one scatter
// per (item, region); argmax voxels shared by several regions (only possible for hand-made argmax)
// are found through an open-addressing table of (item, voxel) and summed in region order, so the
// result is bitwise that of the CPU kernel.

// Threads of the per-item selection block of _region_topk.
constexpr int kRegionTopkThreads = 512;

struct RegionTopkArgs {
  const void* input;   // (B, N) contiguous, value_kind (half, bfloat16, float, double)
  const void* labels;  // (B, N) contiguous, label_kind (int32, int64)
  DType value_kind;
  DType label_kind;
  long long batch;        // B > 0
  long long item_voxels;  // N > 0
  long long k;            // >= 0
  void* values;           // (B, k) output in the input dtype (fully written)
  long long* argmax;      // (B, k) output (fully written)
  long long* ids;         // (B, k) output (fully written)
  unsigned long long* keys;         // (B, N) workspace
  unsigned long long* first_index;  // (B, N) workspace in two-pass mode (region_max_two_pass), else null
  unsigned long long* max_label;    // (B) workspace
  unsigned char* ok;  // one device byte: set to 0 on a label < 0 or > N, or NaN inside a region
};

// Enqueues the whole op on `stream` (memsets + scan kernel(s) + selection); no host sync.
cudaError_t launch_region_topk(const RegionTopkArgs& args, cudaStream_t stream);

// Slots of the (item, voxel) table of _region_max_backward: a power of two >= 2 * B * R.
LC_HOST_DEVICE inline long long region_grad_table_slots(long long batch, long long regions) {
  long long slots = 2;
  while (slots < 2 * batch * regions) slots <<= 1;
  return slots;
}

struct RegionMaxBackwardArgs {
  const void* grad_values;  // (B, R) contiguous, DType
  const long long* argmax;  // (B, R) contiguous
  DType value_kind;
  long long batch;          // B > 0
  long long regions;        // R > 0
  long long item_voxels;    // N >= 0 (elements per item of the output)
  void* grad_input;         // (B, N) output in the grad_values dtype (fully written)
  unsigned long long* table;  // 3 * region_grad_table_slots(B, R) workspace
  long long table_slots;
  unsigned char* ok;  // one device byte: set to 0 on an argmax >= N
};

// Enqueues the whole op on `stream` (memsets + two scatter kernels); no host sync.
cudaError_t launch_region_max_backward(const RegionMaxBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lesioncount
