// Launcher API of the CUDA region_max kernels (csrc/cuda/region_max.cu).
//
// This header is shared by the nvcc-built .cu and the g++-built torch launcher
// (region_max_cuda.cpp). It includes no CUDA or torch header, so the launch-configuration helpers
// below can also be compiled and tested by a plain C++ compiler on a machine without CUDA.
#pragma once

#include <cstdint>

#include "common/connectivity.h"  // LC_HOST_DEVICE
#if defined(LESIONCOUNT_CUDA_ON_CPU)
#include "emulation_api.h"  // the CUDA-on-CPU tests force the two-pass path on small items too
#endif

// The CUDA runtime spells the stream type this way; repeating an identical typedef is legal C++.
typedef struct CUstream_st* cudaStream_t;

namespace lesioncount {
namespace cuda {

enum class ValueKind : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum class LabelKind : int { kInt32 = 0, kInt64 = 1 };

// One-pass mode packs (order-preserving value bits << 32) | (0xFFFFFFFF - flat index) into one
// 64-bit key and keeps the atomicMax per region. That needs values of at most 32 bits and flat
// indices below 2^32. Otherwise (float64 values, or items of more than 2^32 voxels) two passes run:
// atomicMax of the 64-bit order-preserving value bits, then atomicMin of the flat index among the
// voxels whose value equals that maximum. Both give the smallest flat index among the maxima.
LC_HOST_DEVICE inline bool region_max_two_pass(ValueKind kind, long long item_voxels) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  if (::lc_cpu::force_large_item_paths()) return true;
#endif
  return kind == ValueKind::kDouble || item_voxels > (1LL << 32);
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
  const void* input;   // (B, N) contiguous, ValueKind
  const void* labels;  // (B, N) contiguous, LabelKind
  ValueKind value_kind;
  LabelKind label_kind;
  long long batch;
  long long item_voxels;  // N
  long long num_regions;  // R
  void* values;           // (B, R) output in the input dtype (fully written)
  long long* argmax;      // (B, R) output (fully written; also used as the key buffer)
  unsigned long long* scratch;  // (B, R) in two-pass mode, else unused (may be null)
  unsigned char* ok;  // one device byte: set to 0 on a label < 0 or > R, or NaN inside a region
};

// Enqueues the whole op on `stream` (memset + scan kernel(s) + finalize); no host sync.
// Returns a cudaError_t value (0 = success).
int launch_region_max(const RegionMaxArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lesioncount
