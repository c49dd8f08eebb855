// Launcher API of the CUDA _region_topk and _region_max_backward kernels (csrc/cuda/region_max.cu).
//
// _region_topk: the region_max scan of region_max.cu (packed keys, or the two-pass scheme) over
// per-item key arrays indexed by label (labels 1..N for an item of N voxels: O(voxels) workspace),
// which also records each item's largest label on the device; then one block per item selects
// the k best regions (value desc, label asc) with a radix select over the item's own labels
// 1..max_label only (no sort, nothing sized by a bound) and writes them in label order with a
// block-wide order-preserving compaction. _region_max_backward: a zeroed output plus one scatter
// per (item, region); argmax voxels shared by several regions (only possible for hand-made argmax)
// are found through an open-addressing table of (item, voxel) and summed in region order, so the
// result is bitwise that of the CPU kernel.
//
// Kept apart from region_max_launch.h because it includes <cuda_runtime_api.h> (for cudaError_t),
// while region_max_launch.h stays compilable by a plain C++ compiler without any CUDA header.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/region_max_launch.h"

namespace lesioncount {
namespace cuda {

// Threads of the per-item selection block of _region_topk.
constexpr int kRegionTopkThreads = 512;

struct RegionTopkArgs {
  const void* input;   // (B, N) contiguous, ValueKind
  const void* labels;  // (B, N) contiguous, LabelKind
  ValueKind value_kind;
  LabelKind label_kind;
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
  const void* grad_values;  // (B, R) contiguous, ValueKind
  const long long* argmax;  // (B, R) contiguous
  ValueKind value_kind;
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
