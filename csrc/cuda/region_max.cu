// CUDA fused per-region max and argmax (pure CUDA: no torch headers; see region_max_cuda.cpp).
//
// One pass over the voxels (float16/bfloat16/float32 values, items below 2^32 voxels): every voxel
// of a region forms the 64-bit key
//     (order-preserving bits of its value) << 32  |  (0xFFFFFFFF - flat index)
// and the region keeps the atomicMax of its keys, so the maximum value wins and among equal values
// the smallest flat index does. -0.0 is ordered as +0.0 (they compare equal on the CPU, where the
// first one wins). Keys live in the argmax output itself (zeroed first: key 0 = region absent); a
// finalize kernel turns each key into the flat index and reads the value back from the input at
// that index, so values are bitwise those of the CPU kernel.
// float64 (or huge items): two passes, atomicMax of the 64-bit ordered value bits, then atomicMin
// of the flat index among the voxels equal to that maximum. Same result, also deterministic.
//
// Each warp takes 32 consecutive voxels at a time; lanes with the same label form runs (lesions
// are spatially compact), a segmented warp reduction over each run leaves its maximum in the run's
// first lane, and only that lane issues the atomic. All-background chunks cost one ballot.
// Value loads are skipped for background voxels.
//
// Bad labels (< 0 or > num_regions) and NaN inside a region are ignored by the scan (no memory is
// touched for them) and clear the `ok` byte; the torch launcher turns that into an asynchronous
// device assertion.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_launch.h"
#include "cuda/region_max_launch.h"

namespace lesioncount {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float as_float(float v) { return v; }

template <typename T>
struct Wide {  // the comparison type: float for <= 32-bit values, double for float64
  using type = float;
};
template <>
struct Wide<double> {
  using type = double;
};

__device__ __forceinline__ double as_wide(double v) { return v; }
template <typename T>
__device__ __forceinline__ float as_wide(T v) { return as_float(v); }

// Order-preserving unsigned images of floats (NaN excluded); -0.0 maps like +0.0. Every non-NaN
// value maps above 0, so key 0 can mean "absent".
__device__ __forceinline__ unsigned long long ordered_bits(float v) {
  if (v == 0.0f) v = 0.0f;
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long ordered_bits(double v) {
  if (v == 0.0) v = 0.0;
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// For a lane inside a run of equal segment ids, the last lane of its run.
__device__ __forceinline__ int run_end(unsigned heads, int lane) {
  const unsigned above = heads & ~((2u << lane) - 1u);  // heads strictly above this lane
  return above ? __ffs(above) - 2 : 31;
}

// Max over each run, left in every lane for [lane, run end]; the run head ends with the run max.
__device__ __forceinline__ unsigned long long segmented_max(unsigned long long key, int lane, int end) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned long long other = __shfl_down_sync(kFullMask, key, d);
    if (lane + d <= end && other > key) key = other;
  }
  return key;
}

// Reads one label, classifies it. Returns the region number (1..R) or 0 for background/invalid.
template <typename L>
__device__ __forceinline__ long long region_of(const L* lab, long long i, long long n, long long R,
                                               unsigned char* ok) {
  if (i >= n) return 0;
  const long long r = static_cast<long long>(lab[i]);
  if (r == 0) return 0;
  if (r < 0 || r > R) {
    *ok = 0;
    return 0;
  }
  return r;
}

// Pass kinds of the scan kernel.
enum Pass : int { kPacked = 0, kMaxValue = 1, kFirstIndex = 2 };

template <typename T, typename L, int PASS>
__global__ void __launch_bounds__(kRegionMaxThreads)
    region_max_scan(const T* __restrict__ x, const L* __restrict__ lab, long long batch, long long n,
                    long long R, unsigned long long* __restrict__ keys,
                    unsigned long long* __restrict__ first_index, unsigned char* ok) {
  using W = typename Wide<T>::type;
  const int lane = threadIdx.x & 31;
  const long long warps_per_block = blockDim.x >> 5;
  const long long warp = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  const long long warp_stride = (long long)gridDim.x * warps_per_block;
  constexpr long long kTile = 32LL * kRegionMaxUnroll;
  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* xb = x + b * n;
    const L* lb = lab + b * n;
    unsigned long long* kb = keys + b * R;
    unsigned long long* ib = first_index + b * R;
    for (long long base = warp * kTile; base < n; base += warp_stride * kTile) {
      long long reg[kRegionMaxUnroll];
      T val[kRegionMaxUnroll];
#pragma unroll
      for (int u = 0; u < kRegionMaxUnroll; ++u) reg[u] = region_of(lb, base + u * 32 + lane, n, R, ok);
#pragma unroll
      for (int u = 0; u < kRegionMaxUnroll; ++u) {
        if (reg[u] != 0) val[u] = xb[base + u * 32 + lane];
      }
#pragma unroll
      for (int u = 0; u < kRegionMaxUnroll; ++u) {
        const long long i = base + u * 32 + lane;
        long long r = reg[u];
        W v = 0;
        if (r != 0) {
          v = as_wide(val[u]);
          if (v != v) {  // NaN inside a region: report, ignore the voxel
            *ok = 0;
            r = 0;
          }
        }
        if (__ballot_sync(kFullMask, r != 0) == 0) continue;
        const long long prev = __shfl_up_sync(kFullMask, r, 1);
        const bool head = lane == 0 || prev != r;
        const unsigned heads = __ballot_sync(kFullMask, head);
        if (PASS == kFirstIndex) {
          // The first lane of each run whose value equals the region's maximum.
          const bool match = r != 0 && ordered_bits(v) == kb[r - 1];
          const unsigned matches = __ballot_sync(kFullMask, match);
          const unsigned below = (1u << lane) - 1u;  // lanes before this one
          // start of this lane's run: the highest head at or below the lane
          const unsigned heads_upto = heads & (below | (1u << lane));
          const int start = 31 - __clz(heads_upto);
          const unsigned run_before = below & ~((1u << start) - 1u);
          if (match && (matches & run_before) == 0) atomicMin(&ib[r - 1], static_cast<unsigned long long>(i));
        } else {
          unsigned long long key = 0;
          if (r != 0) {
            key = ordered_bits(v);
            if (PASS == kPacked) key = (key << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(i));
          }
          key = segmented_max(key, lane, run_end(heads, lane));
          if (head && r != 0) atomicMax(&kb[r - 1], key);
        }
      }
    }
  }
}

// Turns keys into (value, argmax); absent regions get (0, -1).
template <typename T>
__global__ void region_max_finalize(const T* __restrict__ x, long long batch, long long n, long long R,
                                    bool two_pass, long long* __restrict__ argmax,
                                    const unsigned long long* __restrict__ first_index, T* __restrict__ values) {
  const long long total = batch * R;
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
       t += (long long)gridDim.x * blockDim.x) {
    const unsigned long long key = static_cast<unsigned long long>(argmax[t]);
    if (key == 0) {
      argmax[t] = -1;
      values[t] = T(0.0f);
      continue;
    }
    const long long idx = two_pass ? static_cast<long long>(first_index[t])
                                   : static_cast<long long>(0xFFFFFFFFull - (key & 0xFFFFFFFFull));
    const long long b = t / R;
    argmax[t] = idx;
    values[t] = x[b * n + idx];
  }
}

template <typename T, typename L>
int launch_typed(const RegionMaxArgs& a, cudaStream_t stream) {
  const long long total = a.batch * a.num_regions;
  cudaError_t err = cudaSuccess;
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(a.argmax);
  if (total > 0) {
    err = cudaMemsetAsync(keys, 0, sizeof(unsigned long long) * total, stream);
    if (err != cudaSuccess) return err;
  }
  const bool two_pass = region_max_two_pass(a.value_kind, a.item_voxels);
  if (two_pass && total > 0) {
    err = cudaMemsetAsync(a.scratch, 0xff, sizeof(unsigned long long) * total, stream);
    if (err != cudaSuccess) return err;
  }
  const RegionMaxGrid g = region_max_grid(a.batch, a.item_voxels);
  const T* x = static_cast<const T*>(a.input);
  const L* lab = static_cast<const L*>(a.labels);
  if (g.blocks_x > 0) {
    const dim3 grid(static_cast<unsigned>(g.blocks_x), static_cast<unsigned>(g.blocks_y));
    if (!two_pass) {
      err = launch_kernel(region_max_scan<T, L, kPacked>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                          a.item_voxels, a.num_regions, keys, a.scratch, a.ok);
    } else {
      err = launch_kernel(region_max_scan<T, L, kMaxValue>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                          a.item_voxels, a.num_regions, keys, a.scratch, a.ok);
      if (err != cudaSuccess) return err;
      err = launch_kernel(region_max_scan<T, L, kFirstIndex>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                          a.item_voxels, a.num_regions, keys, a.scratch, a.ok);
    }
    if (err != cudaSuccess) return err;
  }
  if (total > 0) {
    const int threads = 256;
    long long blocks = (total + threads - 1) / threads;
    if (blocks > 65535LL * 8) blocks = 65535LL * 8;
    err = launch_kernel(region_max_finalize<T>, static_cast<unsigned>(blocks), threads, 0, stream, x, a.batch,
                        a.item_voxels, a.num_regions, two_pass, a.argmax,
                        static_cast<const unsigned long long*>(a.scratch), static_cast<T*>(a.values));
  }
  return err;
}

template <typename T>
int launch_labels(const RegionMaxArgs& a, cudaStream_t stream) {
  if (a.label_kind == LabelKind::kInt32) return launch_typed<T, int32_t>(a, stream);
  return launch_typed<T, int64_t>(a, stream);
}

}  // namespace

int launch_region_max(const RegionMaxArgs& a, cudaStream_t stream) {
  switch (a.value_kind) {
    case ValueKind::kHalf: return launch_labels<__half>(a, stream);
    case ValueKind::kBFloat16: return launch_labels<__nv_bfloat16>(a, stream);
    case ValueKind::kFloat: return launch_labels<float>(a, stream);
    case ValueKind::kDouble: return launch_labels<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lesioncount
