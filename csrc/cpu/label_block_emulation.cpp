// Test-only CPU ops that run the CUDA labeler's algorithm (common/block_union_find.h) on the host.
//
// `_label_block_emulation` executes the same per-block phase functions as csrc/cuda/label.cu, each
// "kernel" as a sequential loop over its grid, with the sequential atomics policy. A nonzero `seed`
// visits the blocks of every phase in a pseudo-random order (the GPU runs them in any order), so
// the tests can check the result does not depend on it. `wide` runs the int64 index/label path
// (used from 2^31 voxels per item) on small inputs. `threads` > 1 runs every phase with that many
// std::threads at once, interleaving their blocks, with real atomics (ThreadAtomics below): the
// lock-free union of the merge phase then races as it does on the GPU. NaN behaves as on the GPU: num[b] = -1 and
// item b's labels are all 0.
//
// `_label_block_tables` exports the block geometry tables for unit tests of the index arithmetic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <thread>
#include <tuple>
#include <vector>

#include "common/block_union_find.h"
#include "common/connectivity.h"

namespace lesioncount {
namespace {

using buf::HostAtomics;
using buf::Problem;

// Atomics policy for the multi-threaded emulation (GCC builtins; relaxed, as CUDA's atomics are).
struct ThreadAtomics {
  template <typename T>
  static T load(const T* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
  template <typename T>
  static T fetch_min(T* p, T v) {  // returns the previous value, like atomicMin
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
  }
  template <typename T>
  static T fetch_add(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
  static uint32_t fetch_or(uint32_t* p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
};

template <typename T>
struct HostForeground {
  const T* x;
  float bound;
  bool operator()(int64_t i, bool& nan) const {
    const float v = static_cast<float>(x[i]);
    if (v != v) nan = true;
    return v > bound;
  }
};

struct HostForegroundDouble {
  const double* x;
  double bound;
  bool operator()(int64_t i, bool& nan) const {
    const double v = x[i];
    if (v != v) nan = true;
    return v > bound;
  }
};

// Visit order of the blocks of one phase: natural, or a seeded permutation.
std::vector<int64_t> visit_order(int64_t n, uint64_t seed, int phase) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t(0));
  if (seed != 0) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + uint64_t(phase) * 0xBF58476D1CE4E5B9ull;
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates with splitmix64
      s += 0x9E3779B97F4A7C15ull;
      uint64_t z = s;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      std::swap(order[i], order[static_cast<int64_t>(z % uint64_t(i + 1))]);
    }
  }
  return order;
}

// Runs `body(b, blk)` over the whole (batch x blocks) grid: one "kernel". With several threads,
// thread t takes grid positions t, t + T, t + 2T, ... of the visit order, all at once.
template <typename index_t, typename Body>
void run_grid(const Problem<index_t>& p, uint64_t seed, int phase, int threads, const Body& body) {
  const int64_t grid = p.batch * static_cast<int64_t>(p.nblocks);
  const std::vector<int64_t> order = visit_order(grid, seed, phase);
  auto work = [&](int t, int stride) {
    for (int64_t k = t; k < grid; k += stride)
      body(order[k] / p.nblocks, static_cast<index_t>(order[k] % p.nblocks));
  };
  if (threads <= 1) {
    work(0, 1);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work, t, threads);
  for (auto& th : pool) th.join();  // the kernel boundary
}

template <int Conn, typename A, typename index_t, typename Foreground>
void emulate(Problem<index_t>& p, const Foreground& fg, uint64_t seed, int threads) {
  run_grid(p, seed, 1, threads, [&](int64_t b, index_t blk) { buf::init_block<Conn, A>(p, b, blk, fg); });
  run_grid(p, seed, 2, threads, [&](int64_t b, index_t blk) { buf::merge_block<Conn, A>(p, b, blk); });
  run_grid(p, seed, 3, threads, [&](int64_t b, index_t blk) { buf::compress_block<Conn, A>(p, b, blk); });
  if (p.min_size > 1)
    run_grid(p, seed, 4, threads, [&](int64_t b, index_t blk) { buf::flag_block<Conn, A>(p, b, blk); });
  buf::scan_roots_host(p);
  run_grid(p, seed, 6, threads, [&](int64_t b, index_t blk) { buf::final_block<Conn>(p, b, blk); });
}

template <int Conn, typename index_t, typename Foreground>
void emulate_policy(Problem<index_t>& p, const Foreground& fg, uint64_t seed, int threads) {
  if (threads > 1) emulate<Conn, ThreadAtomics>(p, fg, seed, threads);
  else emulate<Conn, HostAtomics>(p, fg, seed, 1);
}

template <typename index_t, typename Foreground>
void emulate_conn(int conn, Problem<index_t>& p, const Foreground& fg, uint64_t seed, int threads) {
  switch (conn) {
    case 4: emulate_policy<4>(p, fg, seed, threads); break;
    case 8: emulate_policy<8>(p, fg, seed, threads); break;
    case 6: emulate_policy<6>(p, fg, seed, threads); break;
    case 18: emulate_policy<18>(p, fg, seed, threads); break;
    case 26: emulate_policy<26>(p, fg, seed, threads); break;
    default: TORCH_CHECK(false, "bad connectivity");
  }
}

template <typename index_t>
std::tuple<at::Tensor, at::Tensor> emulate_typed(const at::Tensor& x, int64_t batch, int64_t depth, int64_t height,
                                                 int64_t width, double threshold, int conn, int64_t min_size,
                                                 uint64_t seed, int threads, at::ScalarType label_type) {
  Problem<index_t> p;
  buf::set_shape(p, conn, batch, depth, height, width, min_size);
  at::Tensor labels = at::empty(x.sizes(), x.options().dtype(label_type));
  at::Tensor num = at::zeros({batch}, x.options().dtype(at::kLong));
  if (batch == 0 || p.voxels == 0) return {labels, num};
  // Scratch that is uninitialised on the GPU is filled with garbage here, so that reading an entry
  // no phase wrote shows up as a wrong answer.
  std::vector<uint8_t> masks(batch * p.nblocks, 0xA5);
  std::vector<index_t> sizes(min_size > 1 ? batch * p.voxels : 0, index_t(-7));
  std::vector<uint32_t> roots(batch * p.words, 0u);  // zeroed by memset on the GPU
  std::vector<int64_t> offsets(batch * p.words + 1, -12345);
  std::vector<int32_t> nan_flags(batch, 0);           // zeroed by memset on the GPU
  labels.fill_(std::numeric_limits<index_t>::max() / 3);
  p.masks = masks.data();
  p.parent = labels.data_ptr<index_t>();
  p.sizes = min_size > 1 ? sizes.data() : nullptr;
  p.roots = roots.data();
  p.offsets = offsets.data();
  p.nan_flags = nan_flags.data();
  p.num = num.data_ptr<int64_t>();
  const float fbound = buf::float_bound_below(threshold);
  switch (x.scalar_type()) {
    case at::kBool:
    case at::kByte:
      emulate_conn(conn, p, HostForeground<uint8_t>{static_cast<const uint8_t*>(x.const_data_ptr()), fbound}, seed, threads);
      break;
    case at::kHalf:
      emulate_conn(conn, p, HostForeground<at::Half>{x.const_data_ptr<at::Half>(), fbound}, seed, threads);
      break;
    case at::kBFloat16:
      emulate_conn(conn, p, HostForeground<at::BFloat16>{x.const_data_ptr<at::BFloat16>(), fbound}, seed, threads);
      break;
    case at::kFloat:
      emulate_conn(conn, p, HostForeground<float>{x.const_data_ptr<float>(), fbound}, seed, threads);
      break;
    case at::kDouble:
      emulate_conn(conn, p, HostForegroundDouble{x.const_data_ptr<double>(), threshold}, seed, threads);
      break;
    default:
      TORCH_CHECK(false, "_label_block_emulation: unsupported dtype ", x.scalar_type());
  }
  return {labels, num};
}

std::tuple<at::Tensor, at::Tensor> label_block_emulation(const at::Tensor& input, double threshold,
                                                        int64_t connectivity, int64_t min_size, int64_t seed,
                                                        bool wide, int64_t threads) {
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, "_label_block_emulation: input must be (B, H, W) or (B, D, H, W)");
  const int spatial_rank = static_cast<int>(input.dim()) - 1;
  TORCH_CHECK(is_valid_connectivity(spatial_rank, connectivity), "_label_block_emulation: bad connectivity ",
              connectivity);
  TORCH_CHECK(min_size >= 0, "_label_block_emulation: min_size must be >= 0");
  TORCH_CHECK(input.device().is_cpu(), "_label_block_emulation: expected a CPU tensor");
  TORCH_CHECK(threads >= 1 && threads <= 256, "_label_block_emulation: threads must be in [1, 256]");
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0);
  const int64_t depth = spatial_rank == 3 ? x.size(1) : 1;
  const int64_t height = x.size(-2), width = x.size(-1);
  // `wide` forces the int64 index path (taken automatically from 2^31 voxels per item).
  if (wide || depth * height * width >= (int64_t(1) << 31))
    return emulate_typed<int64_t>(x, batch, depth, height, width, threshold, (int)connectivity, min_size,
                                  static_cast<uint64_t>(seed), static_cast<int>(threads), at::kLong);
  return emulate_typed<int32_t>(x, batch, depth, height, width, threshold, (int)connectivity, min_size,
                                static_cast<uint64_t>(seed), static_cast<int>(threads), at::kInt);
}

// Tables of the block geometry for `connectivity`, as an int64 tensor of shape (27 + 13 + 256, 8):
//   rows 0..26, column 0: is_neighbour_offset(conn, dz, dy, dx) for offset index
//                         (dz + 1) * 9 + (dy + 1) * 3 + (dx + 1); columns 1-3: block dims z, y, x;
//   rows 27..39 (direction d = row - 27 < 13): adjacency_mask(conn, d, i) for voxel i = column,
//                         and -1 in column i >= block_voxels;
//   rows 40..295 (block mask m = row - 40): column 0: node count, 1-2: node masks, 3: dir_used for
//                         m < 13 (direction m), 4: is_split_pattern.
at::Tensor label_block_tables(int64_t connectivity) {
  const int conn = static_cast<int>(connectivity);
  TORCH_CHECK(conn == 4 || conn == 8 || conn == 6 || conn == 18 || conn == 26, "bad connectivity");
  at::Tensor t = at::zeros({27 + 13 + 256, 8}, at::kLong);
  auto a = t.accessor<int64_t, 2>();
  for (int o = 0; o < 27; ++o) {
    a[o][0] = is_neighbour_offset(conn, buf::dir_z(o), buf::dir_y(o), buf::dir_x(o));
    a[o][1] = buf::block_dim_z(conn);
    a[o][2] = buf::block_dim_y(conn);
    a[o][3] = buf::block_dim_x(conn);
  }
  for (int d = 0; d < 13; ++d)
    for (int i = 0; i < 8; ++i) a[27 + d][i] = i < buf::block_voxels(conn) ? static_cast<int64_t>(buf::adjacency_mask(conn, d, i)) : int64_t(-1);
  for (int m = 0; m < 256; ++m) {
    uint32_t nodes[2] = {0, 0};
    a[40 + m][0] = buf::node_masks(conn, static_cast<uint32_t>(m), nodes);
    a[40 + m][1] = nodes[0];
    a[40 + m][2] = nodes[1];
    a[40 + m][3] = m < 13 ? buf::dir_used(conn, m) : 0;
    a[40 + m][4] = buf::is_split_pattern(conn, static_cast<uint32_t>(m));
  }
  return t;
}

}  // namespace

TORCH_LIBRARY_IMPL(lesioncount, CPU, m) { m.impl("_label_block_emulation", &label_block_emulation); }
TORCH_LIBRARY_IMPL(lesioncount, CompositeExplicitAutograd, m) { m.impl("_label_block_tables", &label_block_tables); }

}  // namespace lesioncount
