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
                    unsigned long long* __restrict__ first_index, unsigned char* ok,
                    unsigned long long* __restrict__ max_label) {
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
    long long lane_max = 0;  // largest region seen by this lane in item b (only with max_label)
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
        if (r > lane_max) lane_max = r;
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
    if (max_label != nullptr) {  // _region_topk: the item's largest label, one atomic per warp
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        const long long other = __shfl_xor_sync(kFullMask, lane_max, d);
        if (other > lane_max) lane_max = other;
      }
      if (lane == 0 && lane_max > 0) atomicMax(&max_label[b], static_cast<unsigned long long>(lane_max));
    }
  }
}

// The flat index of a one-pass packed key.
__device__ __forceinline__ long long packed_index(unsigned long long key) {
  return static_cast<long long>(0xFFFFFFFFull - (key & 0xFFFFFFFFull));
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
    const long long idx = two_pass ? static_cast<long long>(first_index[t]) : packed_index(key);
    const long long b = t / R;
    argmax[t] = idx;
    values[t] = x[b * n + idx];
  }
}

template <typename T, typename L>
cudaError_t launch_typed(const RegionMaxArgs& a, cudaStream_t stream) {
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
                          a.item_voxels, a.num_regions, keys, a.scratch, a.ok, nullptr);
    } else {
      err = launch_kernel(region_max_scan<T, L, kMaxValue>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                          a.item_voxels, a.num_regions, keys, a.scratch, a.ok, nullptr);
      if (err != cudaSuccess) return err;
      err = launch_kernel(region_max_scan<T, L, kFirstIndex>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                          a.item_voxels, a.num_regions, keys, a.scratch, a.ok, nullptr);
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
cudaError_t launch_labels(const RegionMaxArgs& a, cudaStream_t stream) {
  if (a.label_kind == DType::kInt32) return launch_typed<T, int32_t>(a, stream);
  return launch_typed<T, int64_t>(a, stream);
}


// ---- _region_topk ----

// The selection key of a region (larger = better): value desc, then label asc. One-pass keys pack
// (value bits << 32 | ~index): the value half is kept and the slot (label - 1) replaces the index,
// unique within the item, so `lo` is 0. Two-pass keys are the 64-bit value bits; `lo` is ~slot.
struct SelectKey {
  unsigned long long hi, lo;
};

__device__ __forceinline__ SelectKey select_key(unsigned long long key, long long slot, bool two_pass) {
  if (two_pass) return {key, ~static_cast<unsigned long long>(slot)};
  return {(key & 0xFFFFFFFF00000000ull) | (0xFFFFFFFFull - static_cast<unsigned long long>(slot)), 0ull};
}

// Digit d (0 = most significant) of the 128-bit key hi:lo, 8 bits each.
__device__ __forceinline__ unsigned digit_of(const SelectKey& k, int d) {
  const unsigned long long w = d < 8 ? k.hi : k.lo;
  return static_cast<unsigned>((w >> (56 - 8 * (d & 7))) & 0xFFull);
}

// Compares the first `digits` digits of k with the prefix p (whose other digits are 0).
__device__ __forceinline__ int compare_prefix(const SelectKey& k, const SelectKey& p, int digits) {
  if (digits <= 0) return 0;
  const int hi_digits = digits < 8 ? digits : 8;
  const unsigned long long hi_mask = hi_digits == 8 ? ~0ull : ~(~0ull >> (8 * hi_digits));
  const unsigned long long h = k.hi & hi_mask;
  if (h != p.hi) return h > p.hi ? 1 : -1;
  if (digits <= 8) return 0;
  const int lo_digits = digits - 8;
  const unsigned long long lo_mask = lo_digits == 8 ? ~0ull : ~(~0ull >> (8 * lo_digits));
  const unsigned long long l = k.lo & lo_mask;
  if (l != p.lo) return l > p.lo ? 1 : -1;
  return 0;
}

// One block per item (block-stride over the batch). Regions are the slots 0..max_label-1 of the
// item's key array (slot = label - 1; key 0 = absent). With more than k present, an MSB-first radix
// select (256 buckets, one histogram pass over the item's slots per digit) finds the prefix P and
// count c such that the regions selected are those whose key prefix is > P plus exactly c with
// prefix == P; keys are unique, so this ends at the latest after the last digit. Then the selected
// slots are compacted in slot (= label) order; the remaining columns are padding.
template <typename T>
__global__ void __launch_bounds__(kRegionTopkThreads)
    region_topk_select(const T* __restrict__ x, long long batch, long long n, long long k, bool two_pass,
                       const unsigned long long* __restrict__ keys,
                       const unsigned long long* __restrict__ first_index,
                       const unsigned long long* __restrict__ max_label, T* __restrict__ values,
                       long long* __restrict__ argmax, long long* __restrict__ ids) {
  __shared__ unsigned long long hist[256];
  __shared__ unsigned long long warp_count[kRegionTopkThreads / 32];
  __shared__ unsigned long long s_present;
  __shared__ unsigned long long s_phi, s_plo, s_remaining;
  __shared__ int s_digits, s_done;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps = blockDim.x >> 5;
  for (long long b = blockIdx.x; b < batch; b += gridDim.x) {
    const unsigned long long* kb = keys + b * n;
    const long long R = static_cast<long long>(max_label[b]);  // <= n: larger labels were rejected
    // number of present regions
    if (tid == 0) s_present = 0;
    __syncthreads();
    unsigned long long mine = 0;
    for (long long r = tid; r < R; r += blockDim.x) mine += kb[r] != 0;
    if (mine != 0) atomicAdd(&s_present, mine);
    __syncthreads();
    const unsigned long long present = s_present;
    SelectKey prefix{0ull, 0ull};
    int digits = 0;
    if (present > static_cast<unsigned long long>(k)) {
      unsigned long long remaining = static_cast<unsigned long long>(k);  // still to take with prefix == P
      const int total_digits = two_pass ? 16 : 8;
      for (int d = 0; d < total_digits; ++d) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (long long r = tid; r < R; r += blockDim.x) {
          const unsigned long long key = kb[r];
          if (key == 0) continue;
          const SelectKey sk = select_key(key, r, two_pass);
          if (compare_prefix(sk, prefix, digits) == 0) atomicAdd(&hist[digit_of(sk, d)], 1ull);
        }
        __syncthreads();
        if (tid == 0) {
          unsigned long long above = 0;  // keys with this prefix and a larger digit
          int bucket = 255;
          for (; bucket > 0; --bucket) {
            if (above + hist[bucket] >= remaining) break;
            above += hist[bucket];
          }
          remaining -= above;
          SelectKey p = prefix;
          if (d < 8) p.hi |= static_cast<unsigned long long>(bucket) << (56 - 8 * d);
          else p.lo |= static_cast<unsigned long long>(bucket) << (56 - 8 * (d - 8));
          s_phi = p.hi;
          s_plo = p.lo;
          s_remaining = remaining;
          s_digits = d + 1;
          s_done = hist[bucket] == remaining;
        }
        __syncthreads();
        prefix = {s_phi, s_plo};
        digits = s_digits;
        remaining = s_remaining;
        const bool done = s_done != 0;
        __syncthreads();  // shared state read by every thread before the next digit rewrites it
        if (done) break;
      }
    }
    // order-preserving compaction of the selected slots (label order), then padding
    T* vb = values + b * k;
    long long* ab = argmax + b * k;
    long long* idb = ids + b * k;
    long long written = 0;
    for (long long start = 0; start < R; start += blockDim.x) {
      const long long r = start + tid;
      bool selected = false;
      unsigned long long key = 0;
      if (r < R) {
        key = kb[r];
        selected = key != 0 && compare_prefix(select_key(key, r, two_pass), prefix, digits) >= 0;
      }
      const unsigned ballot = __ballot_sync(kFullMask, selected);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      long long before = written;
      long long chunk = 0;
      for (int w = 0; w < warps; ++w) {
        if (w < warp) before += static_cast<long long>(warp_count[w]);
        chunk += static_cast<long long>(warp_count[w]);
      }
      before += __popc(ballot & ((1u << lane) - 1u));
      if (selected && before < k) {  // (always: exactly min(k, present) slots are selected)
        const long long idx = two_pass ? static_cast<long long>(first_index[b * n + r]) : packed_index(key);
        vb[before] = x[b * n + idx];
        ab[before] = idx;
        idb[before] = r + 1;
      }
      written += chunk;
      __syncthreads();  // warp_count is rewritten by the next chunk
    }
    for (long long c = written + tid; c < k; c += blockDim.x) {
      vb[c] = T(0.0f);
      ab[c] = -1;
      idb[c] = 0;
    }
    __syncthreads();  // every thread has read s_present before the next item resets it
  }
}

template <typename T, typename L>
cudaError_t launch_topk_typed(const RegionTopkArgs& a, cudaStream_t stream) {
  const long long slots = a.batch * a.item_voxels;
  cudaError_t err = cudaMemsetAsync(a.keys, 0, sizeof(unsigned long long) * slots, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(a.max_label, 0, sizeof(unsigned long long) * a.batch, stream);
  if (err != cudaSuccess) return err;
  const bool two_pass = region_max_two_pass(a.value_kind, a.item_voxels);
  if (two_pass) {
    err = cudaMemsetAsync(a.first_index, 0xff, sizeof(unsigned long long) * slots, stream);
    if (err != cudaSuccess) return err;
  }
  // the region_max scan with one key per possible label 1..N
  const RegionMaxGrid g = region_max_grid(a.batch, a.item_voxels);
  const T* x = static_cast<const T*>(a.input);
  const L* lab = static_cast<const L*>(a.labels);
  const dim3 grid(static_cast<unsigned>(g.blocks_x), static_cast<unsigned>(g.blocks_y));
  if (!two_pass) {
    err = launch_kernel(region_max_scan<T, L, kPacked>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                        a.item_voxels, a.item_voxels, a.keys, a.first_index, a.ok, a.max_label);
  } else {
    err = launch_kernel(region_max_scan<T, L, kMaxValue>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                        a.item_voxels, a.item_voxels, a.keys, a.first_index, a.ok, a.max_label);
    if (err != cudaSuccess) return err;
    err = launch_kernel(region_max_scan<T, L, kFirstIndex>, grid, kRegionMaxThreads, 0, stream, x, lab, a.batch,
                        a.item_voxels, a.item_voxels, a.keys, a.first_index, a.ok,
                        static_cast<unsigned long long*>(nullptr));
  }
  if (err != cudaSuccess || a.k == 0) return err;
  const long long blocks = a.batch < 65535LL * 16 ? a.batch : 65535LL * 16;
  return launch_kernel(region_topk_select<T>, static_cast<unsigned>(blocks), kRegionTopkThreads, 0, stream, x,
                       a.batch, a.item_voxels, a.k, two_pass, a.keys, a.first_index, a.max_label,
                       static_cast<T*>(a.values), a.argmax, a.ids);
}

template <typename T>
cudaError_t launch_topk_labels(const RegionTopkArgs& a, cudaStream_t stream) {
  if (a.label_kind == DType::kInt32) return launch_topk_typed<T, int32_t>(a, stream);
  return launch_topk_typed<T, int64_t>(a, stream);
}

// ---- _region_max_backward ----

// a + b as the CPU kernel computes `out += g` in scalar_t (c10::Half / BFloat16 add in float and
// round back once).
__device__ __forceinline__ __half add_like_cpu(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
__device__ __forceinline__ __nv_bfloat16 add_like_cpu(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(__bfloat162float(a) + __bfloat162float(b));
}
__device__ __forceinline__ float add_like_cpu(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_like_cpu(double a, double b) { return __dadd_rn(a, b); }

constexpr unsigned long long kEmptySlot = ~0ull;

// Slot of the table for the target (item * N + voxel) (a 64-bit mix, linear probing).
__device__ __forceinline__ unsigned long long grad_slot_hash(unsigned long long target, long long slots) {
  unsigned long long h = target * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  return h & static_cast<unsigned long long>(slots - 1);
}

// Pass 1: every (item, region) with an argmax inserts its target into the table and records there
// the smallest flat region index t = b * R + r and the number of regions sharing the target.
// Table: [0, S) targets, [S, 2S) smallest t, [2S, 3S) counts.
__global__ void region_grad_claim(const long long* __restrict__ argmax, long long batch, long long R, long long n,
                                  unsigned long long* __restrict__ table, long long slots, unsigned char* ok) {
  const long long total = batch * R;
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
       t += (long long)gridDim.x * blockDim.x) {
    const long long idx = argmax[t];
    if (idx < 0) continue;
    if (idx >= n) {
      *ok = 0;
      continue;
    }
    const unsigned long long target = static_cast<unsigned long long>((t / R) * n + idx);
    unsigned long long s = grad_slot_hash(target, slots);
    for (;;) {
      const unsigned long long old = atomicCAS(&table[s], kEmptySlot, target);
      if (old == kEmptySlot || old == target) break;
      s = (s + 1) & static_cast<unsigned long long>(slots - 1);
    }
    atomicMin(&table[slots + s], static_cast<unsigned long long>(t));
    atomicAdd(&table[2 * slots + s], 1ull);
  }
}

// Pass 2: the first region of each target writes 0 + g (+ the gradients of the later regions with
// the same target, in region order, as the CPU kernel's loop adds them).
template <typename T>
__global__ void region_grad_scatter(const T* __restrict__ grad, const long long* __restrict__ argmax, long long batch,
                                    long long R, long long n, const unsigned long long* __restrict__ table,
                                    long long slots, T* __restrict__ out) {
  const long long total = batch * R;
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
       t += (long long)gridDim.x * blockDim.x) {
    const long long idx = argmax[t];
    if (idx < 0 || idx >= n) continue;
    const unsigned long long target = static_cast<unsigned long long>((t / R) * n + idx);
    unsigned long long s = grad_slot_hash(target, slots);
    while (table[s] != target) s = (s + 1) & static_cast<unsigned long long>(slots - 1);
    if (table[slots + s] != static_cast<unsigned long long>(t)) continue;
    T acc = add_like_cpu(T(0.0f), grad[t]);
    unsigned long long others = table[2 * slots + s] - 1;
    const long long row_end = (t / R + 1) * R;
    for (long long u = t + 1; others > 0 && u < row_end; ++u) {
      if (argmax[u] == idx) {
        acc = add_like_cpu(acc, grad[u]);
        --others;
      }
    }
    out[target] = acc;
  }
}

template <typename T>
cudaError_t launch_backward_typed(const RegionMaxBackwardArgs& a, cudaStream_t stream) {
  const long long total = a.batch * a.regions;
  if (a.batch * a.item_voxels > 0) {
    const cudaError_t err = cudaMemsetAsync(a.grad_input, 0, sizeof(T) * a.batch * a.item_voxels, stream);
    if (err != cudaSuccess) return err;
  }
  if (total == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(a.table, 0xff, sizeof(unsigned long long) * 2 * a.table_slots, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(a.table + 2 * a.table_slots, 0, sizeof(unsigned long long) * a.table_slots, stream);
  if (err != cudaSuccess) return err;
  const int threads = 256;
  long long blocks = (total + threads - 1) / threads;
  if (blocks > 65535LL * 8) blocks = 65535LL * 8;
  err = launch_kernel(region_grad_claim, static_cast<unsigned>(blocks), threads, 0, stream, a.argmax, a.batch,
                      a.regions, a.item_voxels, a.table, a.table_slots, a.ok);
  if (err != cudaSuccess) return err;
  return launch_kernel(region_grad_scatter<T>, static_cast<unsigned>(blocks), threads, 0, stream,
                       static_cast<const T*>(a.grad_values), a.argmax, a.batch, a.regions, a.item_voxels,
                       static_cast<const unsigned long long*>(a.table), a.table_slots, static_cast<T*>(a.grad_input));
}

}  // namespace

cudaError_t launch_region_max(const RegionMaxArgs& a, cudaStream_t stream) {
  switch (a.value_kind) {
    case DType::kHalf: return launch_labels<__half>(a, stream);
    case DType::kBFloat16: return launch_labels<__nv_bfloat16>(a, stream);
    case DType::kFloat: return launch_labels<float>(a, stream);
    case DType::kDouble: return launch_labels<double>(a, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_region_topk(const RegionTopkArgs& a, cudaStream_t stream) {
  switch (a.value_kind) {
    case DType::kHalf: return launch_topk_labels<__half>(a, stream);
    case DType::kBFloat16: return launch_topk_labels<__nv_bfloat16>(a, stream);
    case DType::kFloat: return launch_topk_labels<float>(a, stream);
    case DType::kDouble: return launch_topk_labels<double>(a, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_region_max_backward(const RegionMaxBackwardArgs& a, cudaStream_t stream) {
  switch (a.value_kind) {
    case DType::kHalf: return launch_backward_typed<__half>(a, stream);
    case DType::kBFloat16: return launch_backward_typed<__nv_bfloat16>(a, stream);
    case DType::kFloat: return launch_backward_typed<float>(a, stream);
    case DType::kDouble: return launch_backward_typed<double>(a, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lesioncount
