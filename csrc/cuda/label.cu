// CUDA connected-component labeling: batched block union-find (BUF), SciPy-exact numbering.
//
// The per-thread logic of every phase lives in common/block_union_find.h; this file holds the
// kernels that run those phases over a (blocks x batch) grid, the prefix sum of the root bitmap, and
// the launcher. No torch headers here (see label_launch.h / label_cuda.cpp).
//
// Launch sequence on one stream, no host synchronisation:
//   memset(root bitmap, NaN flags) [-> memset(in-range flag) = 1] -> init -> merge -> compress -> [flag, only with min_size > 1]
//   -> tile sums -> tile scan (1 CTA) -> word offsets -> final labels + num.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/block_union_find.h"
#include "cuda/kernel_launch.h"
#include "cuda/label_launch.h"
#if defined(LESIONCOUNT_CUDA_ON_CPU)
#include "emulation_api.h"
#endif

namespace lesioncount {
namespace cuda {
namespace {

using buf::CudaAtomics;
using buf::Problem;

constexpr int kThreads = 256;           // threads per CTA of the per-block phases
constexpr int kScanThreads = 256;       // threads per CTA of the bitmap scan
constexpr int kWordsPerThread = 16;     // bitmap words per scan thread
constexpr int64_t kTileWords = int64_t(kScanThreads) * kWordsPerThread;
constexpr int kTileScanThreads = 1024;  // the single CTA scanning the tile sums
constexpr int64_t kMaxGridX = int64_t(1) << 22;
constexpr int64_t kMaxGridY = 65535;

// ---- foreground tests (threshold fused into the first pass) ----
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

// float, half, bfloat16, uint8 (bool is read as uint8): value > threshold in float64 <=> float
// value > the largest float <= threshold (exact, as on the CPU). With `check` (check_probabilities),
// a value outside [0, 1] or NaN also sets out_of_range (the conversion to float is exact, so the
// range test is the CPU kernel's); a uniform branch, no extra memory traffic.
template <typename T>
struct FloatForeground {
  const T* __restrict__ x;
  float bound;
  bool check;
  __device__ __forceinline__ bool operator()(int64_t i, bool& nan, bool& out_of_range) const {
    const float v = to_float(x[i]);
    if (v != v) nan = true;
    if (check && !(v >= 0.0f && v <= 1.0f)) out_of_range = true;
    return v > bound;
  }
};

struct DoubleForeground {
  const double* __restrict__ x;
  double bound;
  bool check;
  __device__ __forceinline__ bool operator()(int64_t i, bool& nan, bool& out_of_range) const {
    const double v = x[i];
    if (v != v) nan = true;
    if (check && !(v >= 0.0 && v <= 1.0)) out_of_range = true;
    return v > bound;
  }
};

// ---- per-block phases over a (blocks, batch) grid ----
template <int Conn, typename index_t, typename Foreground>
__global__ void __launch_bounds__(kThreads) init_kernel(Problem<index_t> p, Foreground fg) {
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y)
    for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < p.nblocks; t += int64_t(blockDim.x) * gridDim.x)
      buf::init_block<Conn, CudaAtomics>(p, b, static_cast<index_t>(t), fg);
}

enum Phase : int { kMerge = 0, kCompress = 1, kFlag = 2, kFinal = 3 };

template <int Conn, int P, typename index_t>
__global__ void __launch_bounds__(kThreads) phase_kernel(Problem<index_t> p) {
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < p.nblocks; t += int64_t(blockDim.x) * gridDim.x) {
      const index_t blk = static_cast<index_t>(t);
      if (P == kMerge) buf::merge_block<Conn, CudaAtomics>(p, b, blk);
      else if (P == kCompress) buf::compress_block<Conn, CudaAtomics>(p, b, blk);
      else if (P == kFlag) buf::flag_block<Conn, CudaAtomics>(p, b, blk);
      else buf::final_block<Conn>(p, b, blk);
    }
  }
}

// ---- exclusive prefix sum of popcount(root bitmap word) over all batch * words words ----

// Exclusive scan of one value per thread over a CTA of NT threads; *total gets the CTA's sum.
template <int NT>
__device__ __forceinline__ int64_t cta_exclusive_scan(int64_t v, int64_t* total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "CTA size");
  __shared__ int64_t warp_sums[NT / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < NT / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < NT / 32) warp_sums[lane] = s;  // inclusive sums of the warps
  }
  __syncthreads();
  const int64_t prefix = warp > 0 ? warp_sums[warp - 1] : 0;
  *total = warp_sums[NT / 32 - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return prefix + x - v;
}

__device__ __forceinline__ int64_t load_thread_words(const uint32_t* roots, int64_t total_words, int64_t first,
                                                     uint32_t w[kWordsPerThread]) {
  int64_t s = 0;
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    w[k] = first + k < total_words ? roots[first + k] : 0u;
    s += __popc(w[k]);
  }
  return s;
}

__global__ void __launch_bounds__(kScanThreads) tile_sum_kernel(const uint32_t* roots, int64_t total_words,
                                                               int64_t* tile_sums) {
  uint32_t w[kWordsPerThread];
  const int64_t first = int64_t(blockIdx.x) * kTileWords + int64_t(threadIdx.x) * kWordsPerThread;
  const int64_t s = load_thread_words(roots, total_words, first, w);
  int64_t total;
  cta_exclusive_scan<kScanThreads>(s, &total);
  if (threadIdx.x == 0) tile_sums[blockIdx.x] = total;
}

// One CTA: tile_sums[0..ntiles) -> exclusive prefix sums; offsets[total_words] = grand total.
__global__ void __launch_bounds__(kTileScanThreads) tile_scan_kernel(int64_t* tile_sums, int64_t ntiles,
                                                                     int64_t* offsets, int64_t total_words) {
  int64_t carry = 0;
  for (int64_t base = 0; base < ntiles; base += kTileScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < ntiles ? tile_sums[i] : 0;
    int64_t total;
    const int64_t ex = cta_exclusive_scan<kTileScanThreads>(v, &total);
    if (i < ntiles) tile_sums[i] = carry + ex;
    carry += total;
  }
  if (threadIdx.x == 0) offsets[total_words] = carry;
}

__global__ void __launch_bounds__(kScanThreads) word_offsets_kernel(const uint32_t* roots, int64_t total_words,
                                                                   const int64_t* tile_sums, int64_t* offsets) {
  uint32_t w[kWordsPerThread];
  const int64_t first = int64_t(blockIdx.x) * kTileWords + int64_t(threadIdx.x) * kWordsPerThread;
  const int64_t s = load_thread_words(roots, total_words, first, w);
  int64_t total;
  int64_t acc = tile_sums[blockIdx.x] + cta_exclusive_scan<kScanThreads>(s, &total);
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    if (first + k < total_words) offsets[first + k] = acc;
    acc += __popc(w[k]);
  }
}

// ---- workspace ----
constexpr size_t kAlign = 256;
inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct Layout {
  size_t masks, sizes, roots, nan_flags, offsets, tile_sums, total;
  size_t memset_begin, memset_bytes;
  int64_t nblocks, words, ntiles;
};

inline Layout make_layout(const LabelShape& s) {
  const int conn = s.connectivity;
  const int64_t nbz = (s.depth + buf::block_dim_z(conn) - 1) / buf::block_dim_z(conn);
  const int64_t nby = (s.height + buf::block_dim_y(conn) - 1) / buf::block_dim_y(conn);
  const int64_t nbx = (s.width + buf::block_dim_x(conn) - 1) / buf::block_dim_x(conn);
  const int64_t voxels = s.depth * s.height * s.width;
  const size_t index_bytes = label_is_wide(s) ? 8 : 4;
  Layout l;
  l.nblocks = nbz * nby * nbx;
  l.words = (voxels + 31) / 32;
  l.ntiles = (s.batch * l.words + kTileWords - 1) / kTileWords;
  size_t off = 0;
  l.masks = off;
  off = align_up(off + size_t(s.batch * l.nblocks));
  l.sizes = off;
  off = align_up(off + (s.min_size > 1 ? size_t(s.batch * voxels) * index_bytes : 0));
  l.roots = off;
  off = align_up(off + size_t(s.batch * l.words) * 4);
  l.nan_flags = off;
  off = align_up(off + size_t(s.batch) * 4);
  l.memset_begin = l.roots;
  l.memset_bytes = off - l.roots;
  l.offsets = off;
  off = align_up(off + size_t(s.batch * l.words + 1) * 8);
  l.tile_sums = off;
  off = align_up(off + size_t(l.ntiles + 1) * 8);
  l.total = off;
  return l;
}

inline dim3 phase_grid(int64_t nblocks, int64_t batch) {
  int64_t gx = (nblocks + kThreads - 1) / kThreads;
  if (gx > kMaxGridX) gx = kMaxGridX;
  if (gx < 1) gx = 1;
  const int64_t gy = batch < kMaxGridY ? batch : kMaxGridY;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

// The bitmap scan runs one CTA per tile of kTileWords words (ntiles >= 1: batch and items are
// non-empty); gridDim.x allows 2^31 - 1 tiles, i.e. 2^48 voxels per batch.
inline dim3 scan_grid(int64_t ntiles) { return dim3(static_cast<unsigned>(ntiles)); }

template <int Conn, typename index_t>
cudaError_t launch_typed(const LabelArgs& a, cudaStream_t stream) {
  const LabelShape& s = a.shape;
  const void* input = a.input;
  const double threshold = a.threshold;
  uint8_t* in_range = a.in_range;
  char* ws = static_cast<char*>(a.workspace);
  const Layout l = make_layout(s);
  Problem<index_t> p;
  buf::set_shape(p, Conn, s.batch, s.depth, s.height, s.width, s.min_size);
  p.masks = reinterpret_cast<uint8_t*>(ws + l.masks);
  p.parent = static_cast<index_t*>(a.labels);
  p.sizes = s.min_size > 1 ? reinterpret_cast<index_t*>(ws + l.sizes) : nullptr;
  p.roots = reinterpret_cast<uint32_t*>(ws + l.roots);
  p.offsets = reinterpret_cast<int64_t*>(ws + l.offsets);
  p.nan_flags = reinterpret_cast<int32_t*>(ws + l.nan_flags);
  p.in_range = in_range;
  p.num = a.num;
  int64_t* tile_sums = reinterpret_cast<int64_t*>(ws + l.tile_sums);
  const int64_t total_words = s.batch * l.words;

  cudaError_t err = cudaMemsetAsync(ws + l.memset_begin, 0, l.memset_bytes, stream);
  if (err != cudaSuccess) return err;
  const bool check = in_range != nullptr;
  if (check && (err = cudaMemsetAsync(in_range, 1, 1, stream)) != cudaSuccess) return err;

  const dim3 grid = phase_grid(l.nblocks, s.batch);
  const float fbound = buf::float_bound_below(threshold);
  switch (a.input_type) {
    case DType::kBool:
    case DType::kUInt8:
      err = launch_kernel(init_kernel<Conn, index_t, FloatForeground<uint8_t>>, grid, kThreads, 0, stream, p,
                          FloatForeground<uint8_t>{static_cast<const uint8_t*>(input), fbound, check});
      break;
    case DType::kHalf:
      err = launch_kernel(init_kernel<Conn, index_t, FloatForeground<__half>>, grid, kThreads, 0, stream, p,
                          FloatForeground<__half>{static_cast<const __half*>(input), fbound, check});
      break;
    case DType::kBFloat16:
      err = launch_kernel(init_kernel<Conn, index_t, FloatForeground<__nv_bfloat16>>, grid, kThreads, 0, stream, p,
                          FloatForeground<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(input), fbound, check});
      break;
    case DType::kFloat:
      err = launch_kernel(init_kernel<Conn, index_t, FloatForeground<float>>, grid, kThreads, 0, stream, p,
                          FloatForeground<float>{static_cast<const float*>(input), fbound, check});
      break;
    case DType::kDouble:
      err = launch_kernel(init_kernel<Conn, index_t, DoubleForeground>, grid, kThreads, 0, stream, p,
                          DoubleForeground{static_cast<const double*>(input), threshold, check});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  if ((err = launch_kernel(phase_kernel<Conn, kMerge, index_t>, grid, kThreads, 0, stream, p)) != cudaSuccess) return err;
  if ((err = launch_kernel(phase_kernel<Conn, kCompress, index_t>, grid, kThreads, 0, stream, p)) != cudaSuccess)
    return err;
  if (s.min_size > 1) {
    if ((err = launch_kernel(phase_kernel<Conn, kFlag, index_t>, grid, kThreads, 0, stream, p)) != cudaSuccess) return err;
  }
  const dim3 tiles = scan_grid(l.ntiles);
  if ((err = launch_kernel(tile_sum_kernel, tiles, kScanThreads, 0, stream, p.roots, total_words, tile_sums)) !=
      cudaSuccess)
    return err;
  if ((err = launch_kernel(tile_scan_kernel, 1, kTileScanThreads, 0, stream, tile_sums, l.ntiles, p.offsets,
                           total_words)) != cudaSuccess)
    return err;
  if ((err = launch_kernel(word_offsets_kernel, tiles, kScanThreads, 0, stream, p.roots, total_words,
                           static_cast<const int64_t*>(tile_sums), p.offsets)) != cudaSuccess)
    return err;
  return launch_kernel(phase_kernel<Conn, kFinal, index_t>, grid, kThreads, 0, stream, p);
}

template <int Conn>
cudaError_t launch_conn(const LabelArgs& a, cudaStream_t stream) {
  return label_is_wide(a.shape) ? launch_typed<Conn, int64_t>(a, stream) : launch_typed<Conn, int32_t>(a, stream);
}

}  // namespace

bool label_is_wide(const LabelShape& s) {
#if defined(LESIONCOUNT_CUDA_ON_CPU)
  // the CUDA-on-CPU tests run the int64 path on small inputs too (lesioncount_cuda_cpu::_configure)
  if (::lc_cpu::force_large_item_paths()) return true;
#endif
  return s.depth * s.height * s.width >= (int64_t(1) << 31);
}

size_t label_workspace_bytes(const LabelShape& s) { return make_layout(s).total; }

cudaError_t launch_label(const LabelArgs& a, cudaStream_t stream) {
  const LabelShape& s = a.shape;
  if (s.batch <= 0 || s.depth <= 0 || s.height <= 0 || s.width <= 0) return cudaErrorInvalidValue;
  if (a.workspace_bytes < label_workspace_bytes(s)) return cudaErrorInvalidValue;
  switch (s.connectivity) {
    case 4: return launch_conn<4>(a, stream);
    case 8: return launch_conn<8>(a, stream);
    case 6: return launch_conn<6>(a, stream);
    case 18: return launch_conn<18>(a, stream);
    case 26: return launch_conn<26>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lesioncount
