// Block union-find (BUF) connected-component labeling: the per-thread pieces of the CUDA kernels
// (csrc/cuda/label.cu). The test-suite runs those kernels on the CUDA-on-CPU runtime (tests/cuda_cpu)
// and checks them against scipy.ndimage.label (tests/test_cuda_label.py).
//
// Algorithm (after Allegretti, Bolelli, Grana, "Optimized Block-Based Algorithms to Label Connected
// Components on GPUs", IEEE TPDS 2020), one "thread" per block of voxels, per batch item:
//
//   blocks   26/18: 2x2x2 voxels; 2D 8: 1x2x2; 6 and 2D 4: single voxels (voxel-level union-find).
//            A block's foreground voxels are one union-find node, except under 18-connectivity when
//            the block holds exactly two voxels at antipodal corners (4 patterns): they are not
//            18-adjacent, so each is its own node.
//   node id  the item-local flat index (d*H*W + h*W + w) of the node's first voxel in raster order.
//            The union-find links the larger root under the smaller (atomicMin), so every root is
//            the smallest node id of its component = the component's first voxel in raster order,
//            which is exactly how scipy.ndimage.label orders its labels.
//   storage  parent pointers live in the labels output buffer at the node-id positions (no other
//            entry is read before the last phase overwrites it); block masks 1 byte per block.
//
//   1. init      threshold the block's voxels (fused, exact `double(v) > threshold`), store its
//                mask, parent[node] = node; record NaN per item; with check_probabilities, clear
//                the launch's in-range flag on a value outside [0, 1] (or NaN).
//   2. merge     union each node with the touching nodes of the preceding neighbour blocks
//                (13 directions in 3D, 4 in 2D 8, 3/2 for voxel-level 6/4). Roots are linked with
//                an atomic compare-and-swap, smaller root id on top; every find halves the path it
//                walks (uf_find_halving), so trees stay shallow even on 50% noise.
//   3. compress  parent[node] = root. Without min_size, roots set their bit in a per-item root
//                bitmap; with min_size, component sizes are accumulated at the root (atomicAdd).
//   4. flag      (min_size > 1 only) roots of components with size >= min_size set their bit.
//   5. scan      offsets = exclusive prefix sum of popcount(bitmap word) over all items' words.
//   6. final     label of a root r = offsets[word(r)] - offsets[item's first word]
//                + popcount(bits of word(r) below r) + 1 (0 when r's bit is clear): 1..K in raster
//                order of first voxels, consecutive after the min_size filter. num[b] = K.
//
// No host synchronisation and no allocation that depends on data values: every buffer is sized by
// the shape. Components never cross batch items (each item has its own index space).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/connectivity.h"

namespace lesioncount {
namespace buf {

// ---------------------------------------------------------------------------------------------
// bit helpers
// ---------------------------------------------------------------------------------------------

LC_HOST_DEVICE inline int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// Index of the lowest set bit; v must be nonzero.
LC_HOST_DEVICE inline int lowest_bit(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(v)) - 1;
#else
  return __builtin_ctz(v);
#endif
}

// ---------------------------------------------------------------------------------------------
// block geometry
// ---------------------------------------------------------------------------------------------

// Block extent along z, y, x for a connectivity (neighbour count).
LC_HOST_DEVICE inline int block_dim_z(int conn) { return (conn == 26 || conn == 18) ? 2 : 1; }
LC_HOST_DEVICE inline int block_dim_y(int conn) { return (conn == 26 || conn == 18 || conn == 8) ? 2 : 1; }
LC_HOST_DEVICE inline int block_dim_x(int conn) { return block_dim_y(conn); }
LC_HOST_DEVICE inline int block_voxels(int conn) {
  return block_dim_z(conn) * block_dim_y(conn) * block_dim_x(conn);
}

// Voxel bit i of a block sits at local (lz, ly, lx) with i = (lz * BY + ly) * BX + lx, so bit
// order is raster order inside the block.
LC_HOST_DEVICE inline int local_z(int conn, int i) { return i / (block_dim_y(conn) * block_dim_x(conn)); }
LC_HOST_DEVICE inline int local_y(int conn, int i) { return (i / block_dim_x(conn)) % block_dim_y(conn); }
LC_HOST_DEVICE inline int local_x(int conn, int i) { return i % block_dim_x(conn); }

// The 27 block directions d = (dz + 1) * 9 + (dy + 1) * 3 + (dx + 1); d < 13 are the preceding
// ones in raster order (d == 13 is the block itself).
LC_HOST_DEVICE inline int dir_z(int d) { return d / 9 - 1; }
LC_HOST_DEVICE inline int dir_y(int d) { return (d / 3) % 3 - 1; }
LC_HOST_DEVICE inline int dir_x(int d) { return d % 3 - 1; }
constexpr int kNumPrecedingDirs = 13;

// Mask of the voxels j of the neighbour block in direction d that are neighbours (under `conn`)
// of voxel i of this block.
LC_HOST_DEVICE inline uint32_t adjacency_mask(int conn, int d, int i) {
  const int bz = block_dim_z(conn), by = block_dim_y(conn), bx = block_dim_x(conn);
  const int n = bz * by * bx;
  uint32_t m = 0;
  for (int j = 0; j < n; ++j) {
    const int oz = dir_z(d) * bz + local_z(conn, j) - local_z(conn, i);
    const int oy = dir_y(d) * by + local_y(conn, j) - local_y(conn, i);
    const int ox = dir_x(d) * bx + local_x(conn, j) - local_x(conn, i);
    if (is_neighbour_offset(conn, oz, oy, ox)) m |= 1u << j;
  }
  return m;
}

// Voxels of the neighbour block in direction d touching any voxel of `mask` (this block).
LC_HOST_DEVICE inline uint32_t touch_mask(int conn, int d, uint32_t mask) {
  uint32_t t = 0;
  const int n = block_voxels(conn);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 8; ++i)
    if (i < n && ((mask >> i) & 1u)) t |= adjacency_mask(conn, d, i);
  return t;
}

// Whether a preceding direction can connect two blocks at all under `conn` (e.g. the corner
// directions never do under 18, z directions never in 2D).
LC_HOST_DEVICE inline bool dir_used(int conn, int d) {
  if (d < 0 || d >= kNumPrecedingDirs) return false;
  const int n = block_voxels(conn);
  for (int i = 0; i < n; ++i)
    if (adjacency_mask(conn, d, i)) return true;
  return false;
}

// 18-connectivity: a 2x2x2 block holding exactly two voxels at antipodal corners (bits i and 7-i)
// has two components; every other nonempty pattern of a block is connected under its
// connectivity (26: the block is a clique; 8: a 2x2 square is a clique; 1-voxel blocks trivially).
LC_HOST_DEVICE inline bool is_split_pattern(int conn, uint32_t mask) {
  return conn == 18 && (mask == 0x81u || mask == 0x42u || mask == 0x24u || mask == 0x18u);
}

// Splits a block mask into its union-find nodes (voxel masks), in order of their first voxel.
// Returns the node count (0, 1 or 2).
LC_HOST_DEVICE inline int node_masks(int conn, uint32_t mask, uint32_t nodes[2]) {
  if (mask == 0) return 0;
  if (is_split_pattern(conn, mask)) {
    nodes[0] = mask & (~mask + 1u);  // lowest bit
    nodes[1] = mask & ~nodes[0];
    return 2;
  }
  nodes[0] = mask;
  return 1;
}

// ---------------------------------------------------------------------------------------------
// the problem: shape, scratch and outputs of one launch
// ---------------------------------------------------------------------------------------------

// index_t: int32_t when an item has < 2^31 voxels, else int64_t; it is also the labels' dtype.
template <typename index_t>
struct Problem {
  int64_t batch;
  index_t depth, height, width;  // depth 1 for 2D
  index_t nbz, nby, nbx;         // blocks per item along z, y, x
  index_t nblocks;               // blocks per item
  index_t voxels;                // voxels per item
  int64_t words;                 // root-bitmap words (32 voxels each) per item
  int64_t min_size;
  uint8_t* masks;      // [batch, nblocks] foreground mask of each block
  index_t* parent;     // [batch, voxels] union-find parents at node ids; the labels output
  index_t* sizes;      // [batch, voxels] component sizes at node ids (min_size > 1), else null
  uint32_t* roots;     // [batch, words] bit r set: r is a kept component's first voxel; zeroed
  int64_t* offsets;    // [batch * words + 1] exclusive prefix sum of popcount(roots)
  int32_t* nan_flags;  // [batch] nonzero: the item contains NaN; zeroed
  uint8_t* in_range;   // [1] check_probabilities: set to 1 before the first pass, cleared (0) by a
                       // value outside [0, 1] or NaN; null when the values are not checked
  int64_t* num;        // [batch] output component counts (-1 for an item with NaN)
};

// Fills the shape fields (pointers are left to the caller).
template <typename index_t>
inline void set_shape(Problem<index_t>& p, int conn, int64_t batch, int64_t depth, int64_t height,
                      int64_t width, int64_t min_size) {
  p.batch = batch;
  p.depth = static_cast<index_t>(depth);
  p.height = static_cast<index_t>(height);
  p.width = static_cast<index_t>(width);
  p.nbz = static_cast<index_t>((depth + block_dim_z(conn) - 1) / block_dim_z(conn));
  p.nby = static_cast<index_t>((height + block_dim_y(conn) - 1) / block_dim_y(conn));
  p.nbx = static_cast<index_t>((width + block_dim_x(conn) - 1) / block_dim_x(conn));
  p.nblocks = p.nbz * p.nby * p.nbx;
  p.voxels = static_cast<index_t>(depth * height * width);
  p.words = (depth * height * width + 31) / 32;
  p.min_size = min_size;
}

template <typename index_t>
struct BlockCoord {
  index_t bz, by, bx;  // block coordinates
  index_t z0, y0, x0;  // first voxel
};

template <int Conn, typename index_t>
LC_HOST_DEVICE inline BlockCoord<index_t> block_coord(const Problem<index_t>& p, index_t blk) {
  BlockCoord<index_t> c;
  c.bx = blk % p.nbx;
  const index_t rest = blk / p.nbx;
  c.by = rest % p.nby;
  c.bz = rest / p.nby;
  c.z0 = c.bz * block_dim_z(Conn);
  c.y0 = c.by * block_dim_y(Conn);
  c.x0 = c.bx * block_dim_x(Conn);
  return c;
}

template <int Conn, typename index_t>
LC_HOST_DEVICE inline bool voxel_inside(const Problem<index_t>& p, const BlockCoord<index_t>& c, int i) {
  return c.z0 + local_z(Conn, i) < p.depth && c.y0 + local_y(Conn, i) < p.height &&
         c.x0 + local_x(Conn, i) < p.width;
}

// Item-local flat index of voxel bit i of the block.
template <int Conn, typename index_t>
LC_HOST_DEVICE inline index_t voxel_index(const Problem<index_t>& p, const BlockCoord<index_t>& c, int i) {
  return ((c.z0 + local_z(Conn, i)) * p.height + (c.y0 + local_y(Conn, i))) * p.width +
         (c.x0 + local_x(Conn, i));
}

// Node id of a node (voxel mask, nonzero) of the block: its first voxel.
template <int Conn, typename index_t>
LC_HOST_DEVICE inline index_t node_id(const Problem<index_t>& p, const BlockCoord<index_t>& c,
                                      uint32_t node_mask) {
  return voxel_index<Conn>(p, c, lowest_bit(node_mask));
}

// ---------------------------------------------------------------------------------------------
// atomics policies and union-find
// ---------------------------------------------------------------------------------------------

#if defined(__CUDACC__)
// CUDA policy: device atomics; loads are volatile (served by L2, never a stale L1 line) because
// other threads link roots and halve paths concurrently during the merge phase.
struct CudaAtomics {
  template <typename T>
  __device__ static T load(const T* p) { return *reinterpret_cast<const volatile T*>(p); }
  // Plain (volatile, so neither cached nor elided) store: path compression, see uf_find_halving.
  template <typename T>
  __device__ static void store(T* p, T v) { *reinterpret_cast<volatile T*>(p) = v; }
  __device__ static int32_t cas(int32_t* p, int32_t expected, int32_t desired) {
    return atomicCAS(p, expected, desired);
  }
  __device__ static int64_t cas(int64_t* p, int64_t expected, int64_t desired) {
    return static_cast<int64_t>(atomicCAS(reinterpret_cast<unsigned long long*>(p),
                                          static_cast<unsigned long long>(expected),
                                          static_cast<unsigned long long>(desired)));
  }
  __device__ static int32_t fetch_add(int32_t* p, int32_t v) { return atomicAdd(p, v); }
  __device__ static int64_t fetch_add(int64_t* p, int64_t v) {
    return static_cast<int64_t>(atomicAdd(reinterpret_cast<unsigned long long*>(p),
                                          static_cast<unsigned long long>(v)));
  }
  __device__ static uint32_t fetch_or(uint32_t* p, uint32_t v) { return atomicOr(p, v); }
};
#endif

// Root of x without writing anything (phase 3, where other threads write final roots).
// parent[x] < x for every non-root x, so the walk strictly decreases and terminates.
template <typename A, typename index_t>
LC_HOST_DEVICE inline index_t uf_find(const index_t* parent, index_t x) {
  index_t p = A::load(parent + x);
  while (p != x) {
    x = p;
    p = A::load(parent + x);
  }
  return x;
}

// Root of x with path halving (merge phase): every second node on the walk is relinked to its
// grandparent, so a chain of length L is walked in about L/2 steps and left half as long; repeated
// finds keep the trees shallow (without it, 50% noise builds chains of thousands of nodes that every
// later find walks again).
//
// Why the racy plain stores are safe, while other threads link roots (uf_union) and halve paths:
//   (a) a root r is only ever written by uf_union's compare-and-swap parent[r]: r -> a with a < r,
//       which succeeds only while r is still a root; a node that is not a root never becomes one
//       again, since every value written into parent[y] afterwards is < y (below). So the CAS and
//       the halving stores never write the same node at the same time: halving writes only nodes x
//       it has seen with parent[x] != x.
//   (b) trees never split: a halving store replaces x's parent by a node of x's own tree, and a CAS
//       only hangs a whole tree under a node of another tree. The value stored, g = parent[p] read
//       after p = parent[x], is in x's tree (p was, trees never split, and a parent is in its
//       child's tree), though perhaps no longer on x's path if another thread halved past it (a
//       store that loses such a race only puts back a less-compressed parent); and g < p < x:
//       parents point to smaller ids.
//   (c) so the partition into trees changes only through the CAS links of uf_union, exactly as
//       without compression; no cycle can form and every walk strictly decreases, so it
//       terminates; the root of a tree is its smallest node id, the component's first voxel in
//       raster order (SciPy's numbering).
// Stale reads (a parent that another thread has just lowered) only cost extra steps: the walk goes
// on until it reads parent[x] == x, and a root's CAS fails if the root was linked meanwhile.
template <typename A, typename index_t>
LC_HOST_DEVICE inline index_t uf_find_halving(index_t* parent, index_t x) {
  index_t p = A::load(parent + x);
  while (p != x) {
    const index_t g = A::load(parent + p);
    if (g == p) return p;
    A::store(parent + x, g);  // x is not a root (p != x); g is an ancestor of x, g < p < x
    x = g;
    p = A::load(parent + x);
  }
  return x;
}

// Joins the trees of a and b: links the larger root under the smaller with a compare-and-swap that
// succeeds only while the larger one is still a root (so no root is ever relinked, and only
// uf_find_halving's stores touch non-roots). If the CAS fails, another thread linked that root in
// between; the loop goes on from its new parent (ECL-CC style; Jaiganesh & Burtscher, HPDC 2018).
template <typename A, typename index_t>
LC_HOST_DEVICE inline void uf_union(index_t* parent, index_t a, index_t b) {
  for (;;) {
    a = uf_find_halving<A>(parent, a);
    b = uf_find_halving<A>(parent, b);
    if (a == b) return;
    if (a > b) {
      const index_t t = a;
      a = b;
      b = t;
    }
    const index_t old = A::cas(parent + b, b, a);  // a < b
    if (old == b) return;
    b = old;  // b was linked under old < b meanwhile
  }
}

// Consecutive label of root r of item b (0 if r's component was filtered out): the renumbering
// rule. Needs the root bitmap and its exclusive prefix sums.
template <typename index_t>
LC_HOST_DEVICE inline index_t label_of_root(const Problem<index_t>& p, int64_t b, index_t r) {
  const int64_t base = b * p.words;
  const int64_t w = base + static_cast<int64_t>(r >> 5);
  const uint32_t word = p.roots[w];
  const uint32_t bit = 1u << (static_cast<uint32_t>(r) & 31u);
  if (!(word & bit)) return 0;
  return static_cast<index_t>(p.offsets[w] - p.offsets[base] + popcount32(word & (bit - 1u)) + 1);
}

// ---------------------------------------------------------------------------------------------
// the phases, one call per (item b, block blk); each is one kernel on the GPU
// ---------------------------------------------------------------------------------------------

// Phase 1. `fg(global_voxel_index, nan, out_of_range)` returns whether the voxel is foreground,
// sets `nan` on a NaN and, only if it checks values (then p.in_range is not null), `out_of_range`
// on a value outside [0, 1] or NaN. Stores the block mask and initialises its nodes.
template <int Conn, typename A, typename index_t, typename Foreground>
LC_HOST_DEVICE inline void init_block(const Problem<index_t>& p, int64_t b, index_t blk,
                                      const Foreground& fg) {
  const BlockCoord<index_t> c = block_coord<Conn>(p, blk);
  const int64_t item = b * static_cast<int64_t>(p.voxels);
  uint32_t mask = 0;
  bool nan = false, out_of_range = false;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 8; ++i) {
    if (i >= block_voxels(Conn) || !voxel_inside<Conn>(p, c, i)) continue;
    if (fg(item + voxel_index<Conn>(p, c, i), nan, out_of_range)) mask |= 1u << i;
  }
  p.masks[b * static_cast<int64_t>(p.nblocks) + blk] = static_cast<uint8_t>(mask);
  if (nan) p.nan_flags[b] = 1;
  if (out_of_range) *p.in_range = 0;  // every writer stores the same 0: a benign race
  uint32_t nodes[2];
  const int n = node_masks(Conn, mask, nodes);
  index_t* parent = p.parent + item;
  for (int k = 0; k < n; ++k) {
    const index_t id = node_id<Conn>(p, c, nodes[k]);
    parent[id] = id;
    if (p.sizes) p.sizes[item + id] = 0;
  }
}

// Phase 2. Unions the block's nodes with the touching nodes of its preceding neighbour blocks.
template <int Conn, typename A, typename index_t>
LC_HOST_DEVICE inline void merge_block(const Problem<index_t>& p, int64_t b, index_t blk) {
  const uint8_t* masks = p.masks + b * static_cast<int64_t>(p.nblocks);
  const uint32_t mask = masks[blk];
  if (mask == 0) return;
  const BlockCoord<index_t> c = block_coord<Conn>(p, blk);
  index_t* parent = p.parent + b * static_cast<int64_t>(p.voxels);
  uint32_t nodes[2];
  const int n = node_masks(Conn, mask, nodes);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < kNumPrecedingDirs; ++d) {
    if (!dir_used(Conn, d)) continue;
    const index_t nz = c.bz + dir_z(d), ny = c.by + dir_y(d), nx = c.bx + dir_x(d);
    if (nz < 0 || ny < 0 || ny >= p.nby || nx < 0 || nx >= p.nbx) continue;
    const index_t nblk = (nz * p.nby + ny) * p.nbx + nx;
    const uint32_t nmask = masks[nblk];
    if (nmask == 0) continue;
    BlockCoord<index_t> nc;
    nc.bz = nz; nc.by = ny; nc.bx = nx;
    nc.z0 = nz * block_dim_z(Conn);
    nc.y0 = ny * block_dim_y(Conn);
    nc.x0 = nx * block_dim_x(Conn);
    uint32_t nnodes[2];
    const int nn = node_masks(Conn, nmask, nnodes);
    for (int k = 0; k < n; ++k) {
      const uint32_t t = touch_mask(Conn, d, nodes[k]);
      if (!(t & nmask)) continue;
      for (int l = 0; l < nn; ++l)
        if (t & nnodes[l]) uf_union<A>(parent, node_id<Conn>(p, c, nodes[k]), node_id<Conn>(p, nc, nnodes[l]));
    }
  }
}

// Phase 3. parent[node] = root. Without a size filter, roots set their bit; with one, each node
// adds its voxel count to its root's size.
template <int Conn, typename A, typename index_t>
LC_HOST_DEVICE inline void compress_block(const Problem<index_t>& p, int64_t b, index_t blk) {
  const uint32_t mask = p.masks[b * static_cast<int64_t>(p.nblocks) + blk];
  if (mask == 0) return;
  const BlockCoord<index_t> c = block_coord<Conn>(p, blk);
  const int64_t item = b * static_cast<int64_t>(p.voxels);
  index_t* parent = p.parent + item;
  uint32_t nodes[2];
  const int n = node_masks(Conn, mask, nodes);
  for (int k = 0; k < n; ++k) {
    const index_t id = node_id<Conn>(p, c, nodes[k]);
    const index_t r = uf_find<A>(parent, id);
    if (r != id) parent[id] = r;
    if (p.min_size <= 1) {
      if (r == id)
        A::fetch_or(p.roots + b * p.words + static_cast<int64_t>(r >> 5), 1u << (static_cast<uint32_t>(r) & 31u));
    } else {
      A::fetch_add(p.sizes + item + r, static_cast<index_t>(popcount32(nodes[k])));
    }
  }
}

// Phase 4 (min_size > 1 only). Roots of components with at least min_size voxels set their bit.
template <int Conn, typename A, typename index_t>
LC_HOST_DEVICE inline void flag_block(const Problem<index_t>& p, int64_t b, index_t blk) {
  const uint32_t mask = p.masks[b * static_cast<int64_t>(p.nblocks) + blk];
  if (mask == 0) return;
  const BlockCoord<index_t> c = block_coord<Conn>(p, blk);
  const int64_t item = b * static_cast<int64_t>(p.voxels);
  uint32_t nodes[2];
  const int n = node_masks(Conn, mask, nodes);
  for (int k = 0; k < n; ++k) {
    const index_t id = node_id<Conn>(p, c, nodes[k]);
    if (p.parent[item + id] == id && static_cast<int64_t>(p.sizes[item + id]) >= p.min_size)
      A::fetch_or(p.roots + b * p.words + static_cast<int64_t>(id >> 5), 1u << (static_cast<uint32_t>(id) & 31u));
  }
}

// Phase 6. Writes the block's labels (overwriting the parent pointers it read first) and, for the
// item's block 0, num[b].
template <int Conn, typename index_t>
LC_HOST_DEVICE inline void final_block(const Problem<index_t>& p, int64_t b, index_t blk) {
  const BlockCoord<index_t> c = block_coord<Conn>(p, blk);
  const int64_t item = b * static_cast<int64_t>(p.voxels);
  const bool nan = p.nan_flags[b] != 0;
  if (blk == 0)
    p.num[b] = nan ? -1 : p.offsets[(b + 1) * p.words] - p.offsets[b * p.words];
  const uint32_t mask = nan ? 0u : p.masks[b * static_cast<int64_t>(p.nblocks) + blk];
  uint32_t nodes[2] = {0u, 0u};
  index_t lab[2] = {0, 0};
  const int n = node_masks(Conn, mask, nodes);
  for (int k = 0; k < n; ++k) {
    const index_t r = p.parent[item + node_id<Conn>(p, c, nodes[k])];  // compressed: the root
    lab[k] = label_of_root(p, b, r);
  }
  index_t* out = p.parent + item;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 8; ++i) {
    if (i >= block_voxels(Conn) || !voxel_inside<Conn>(p, c, i)) continue;
    const index_t v = ((nodes[0] >> i) & 1u) ? lab[0] : (((nodes[1] >> i) & 1u) ? lab[1] : index_t(0));
    out[voxel_index<Conn>(p, c, i)] = v;
  }
}

// Largest float <= threshold: for every float (or float-representable) x,
// double(x) > threshold  <=>  x > bound (compared in float). Host only.
inline float float_bound_below(double threshold) {
  float f = static_cast<float>(threshold);
  if (static_cast<double>(f) > threshold) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

}  // namespace buf
}  // namespace lesioncount
