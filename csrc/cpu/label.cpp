// CPU connected-component labeling of `input > threshold`, numbered exactly like scipy.ndimage.label.
//
// Algorithm (run-based union-find, per batch item):
//  1. Scan: every row (z, y) is thresholded into a byte mask and compressed into runs [x0, x1) of
//     foreground voxels. Rows are split into contiguous chunks, one per thread, so the concatenated
//     run list is in raster order and run index order equals the order of each run's first voxel.
//  2. Merge: each run is unioned with the runs it touches in the (up to four) preceding neighbour
//     rows given by the connectivity (common/connectivity.h), with a two-pointer sweep over the two
//     sorted run lists. Union links the larger root to the smaller one, so every root is the first
//     run of its component. Chunks merge in parallel inside themselves (they touch disjoint runs);
//     rows whose neighbours lie in an earlier chunk are merged afterwards, serially.
//  3. Number: one pass over runs in order flattens the forest (a run's parent precedes it, so its
//     parent's parent is already a root) and gives each root the next label: labels 1..K in raster
//     order of each component's first voxel, which is SciPy's order. With min_size, component sizes
//     are summed first and small components get label 0; the rest stay consecutive.
//  4. Write: each row's runs are painted with their labels (parallel). Large outputs come zero-filled
//     from the kernel (cpu/output_alloc.h), so background is never written; small ones are memset.
//     Each 2 MiB block of a large output gets huge pages only where a sample of the input says most
//     of it is foreground; mostly-background blocks get 4 KiB pages on the zero page, so a sparse
//     map costs fresh memory only where it has labels (see output_alloc.h).
// Cost: one read of the input, one write of the labels, and work proportional to the number of runs.
// Batch items run in parallel when there are at least as many items as threads; otherwise the chunks
// of one item run in parallel.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/connectivity.h"
#include "common/op_arguments.h"
#include "cpu/output_alloc.h"

namespace lesioncount {
namespace {

struct Run {
  int32_t x0;  // first foreground column
  int32_t x1;  // one past the last foreground column
};

// Threshold comparison `double(value) > threshold`, rewritten per dtype so the inner loop stays in
// the input's own precision (and vectorises) while giving exactly the float64 answer.
template <typename scalar_t>
struct ForegroundTest {
  using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  compare_t bound;  // value > threshold  <=>  compare_t(value) > bound
  explicit ForegroundTest(double threshold) {
    if constexpr (std::is_same_v<compare_t, double>) {
      bound = threshold;
    } else {
      // Largest float <= threshold: for any float x, x > threshold <=> x > bound.
      float f = static_cast<float>(threshold);
      if (static_cast<double>(f) > threshold) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
      bound = f;
    }
  }
};

// Thresholds one row into `mask` (1 byte per voxel). Returns true if any voxel is foreground; sets
// `saw_bad` when a NaN is present or, with kCheckProbabilities, a value outside [0, 1] (checked in
// the same pass, so count_distribution needs no separate range check on the CPU).
template <bool kCheckProbabilities, typename scalar_t>
inline bool threshold_row(const scalar_t* row, int64_t width, const ForegroundTest<scalar_t>& test,
                          uint8_t* mask, bool& saw_bad) {
  using compare_t = typename ForegroundTest<scalar_t>::compare_t;
  const compare_t bound = test.bound;
  uint8_t any = 0;
  uint8_t nan = 0;
  for (int64_t x = 0; x < width; ++x) {
    const compare_t v = static_cast<compare_t>(row[x]);
    const uint8_t fg = v > bound;
    mask[x] = fg;
    any |= fg;
    if constexpr (!std::is_integral_v<scalar_t> && !std::is_same_v<scalar_t, bool>) nan |= (v != v);
    if constexpr (kCheckProbabilities) nan |= (v < compare_t(0)) | (v > compare_t(1));
  }
  if (nan) saw_bad = true;
  return any != 0;
}

// Packs a byte mask (each byte 0 or 1) into bits, 8 bytes per multiply: byte i of the little-endian
// word lands on bit 56 + i of the product (the eight partial products never overlap).
inline uint64_t pack_eight_bytes(const uint8_t* bytes) {
  uint64_t word;
  std::memcpy(&word, bytes, 8);
  return (word * 0x0102040810204080ULL) >> 56;
}

// Appends the runs of a thresholded row. `mask` must be readable up to a multiple of 64 bytes past
// `width` with zeros after `width`. Run starts and ends are found 64 voxels at a time with bit
// arithmetic (start: foreground after background; end: background after foreground), which avoids
// a mispredicted branch per voxel on noisy masks.
inline void extract_runs(const uint8_t* mask, int32_t width, std::vector<Run>& runs) {
  uint64_t carry = 0;  // last bit of the previous word
  const int32_t words = (width + 63) / 64;
  for (int32_t w = 0; w < words; ++w) {
    uint64_t bits = 0;
    for (int k = 0; k < 8; ++k) bits |= pack_eight_bytes(mask + w * 64 + k * 8) << (8 * k);
    const uint64_t shifted = (bits << 1) | carry;
    uint64_t starts = bits & ~shifted;
    uint64_t ends = ~bits & shifted;
    carry = bits >> 63;
    const int32_t base = w * 64;
    // Starts and ends alternate; an end in this word may close a run opened in an earlier word.
    while (starts | ends) {
      const int s_pos = starts ? __builtin_ctzll(starts) : 64;
      const int e_pos = ends ? __builtin_ctzll(ends) : 64;
      if (e_pos < s_pos) {
        runs.back().x1 = base + e_pos;
        ends &= ends - 1;
      } else {
        runs.push_back({base + s_pos, width});  // x1 fixed when its end is seen
        starts &= starts - 1;
      }
    }
  }
}

template <typename index_t>
inline index_t find_root(index_t* parent, index_t i) {
  while (parent[i] != i) {
    parent[i] = parent[parent[i]];  // path halving
    i = parent[i];
  }
  return i;
}

// Union that keeps the smaller index as the root, so a root is its component's first run.
template <typename index_t>
inline void unite(index_t* parent, index_t a, index_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a < b) parent[b] = a;
  else if (b < a) parent[a] = b;
}

// Unions runs [cur_begin, cur_end) of one row with the touching runs [nb_begin, nb_end) of a
// preceding neighbour row. Both lists are sorted and disjoint, so a sweep that always steps past
// the run that ends first visits every touching pair once; the step itself is branch-free.
template <typename index_t>
inline void merge_rows(const Run* runs, index_t* parent, index_t cur_begin, index_t cur_end,
                       index_t nb_begin, index_t nb_end, int reach) {
  index_t i = cur_begin, j = nb_begin;
  while (i < cur_end && j < nb_end) {
    const Run a = runs[i], b = runs[j];
    const bool touching = (b.x0 <= a.x1 - 1 + reach) & (a.x0 <= b.x1 - 1 + reach);
    if (touching && parent[i] != parent[j]) unite(parent, i, j);
    const bool step_current = a.x1 < b.x1;
    i += step_current;
    j += !step_current;
  }
}

// Whether the labels of voxels [begin, end) will be mostly background, for choosing the memory of
// one 2 MiB block of a large label map (cpu/output_alloc.h; performance only, any answer is right):
// every 8th 4 KiB page's worth of voxels is tested, and the block counts as sparse when fewer than a
// quarter of those pages hold a foreground voxel. Reads at most 1/8 of the input.
template <typename scalar_t>
bool mostly_background(const scalar_t* input, int64_t begin, int64_t end, int64_t voxels_per_page,
                       const ForegroundTest<scalar_t>& test) {
  using compare_t = typename ForegroundTest<scalar_t>::compare_t;
  const compare_t bound = test.bound;
  int64_t sampled = 0, foreground = 0;
  for (int64_t page = begin; page < end; page += 8 * voxels_per_page) {
    const int64_t stop = std::min(end, page + voxels_per_page);
    uint8_t any = 0;
    for (int64_t i = page; i < stop; ++i) any |= static_cast<compare_t>(input[i]) > bound;
    ++sampled;
    foreground += any;
  }
  return 4 * foreground < sampled;
}

// Labels one batch item. `labels_out` has depth*height*width entries.
template <typename scalar_t, typename label_t, typename index_t>
int64_t label_item(const scalar_t* input, label_t* labels_out, int64_t depth, int64_t height,
                   int64_t width, double threshold, int connectivity, int64_t min_size,
                   bool check_probabilities, bool output_zeroed, bool& saw_nan, bool allow_parallel) {
  const int64_t num_rows = depth * height;
  const ForegroundTest<scalar_t> test(threshold);
  PrecedingRow neighbours[4];
  const int num_neighbours = preceding_rows(connectivity, neighbours);

  // ---- 1. scan rows into runs, one chunk of rows per task ----
  int64_t num_chunks = 1;
  if (allow_parallel) {
    const int64_t voxels = num_rows * width;
    num_chunks = std::max<int64_t>(1, std::min<int64_t>({(int64_t)torch::stable::get_num_threads(), num_rows,
                                                         voxels / (1 << 16)}));
  }
  std::vector<std::vector<Run>> chunk_runs(num_chunks);
  std::vector<index_t> row_begin(num_rows + 1);  // first run index of each row (global)
  std::vector<int64_t> chunk_first_row(num_chunks + 1);
  for (int64_t c = 0; c <= num_chunks; ++c) chunk_first_row[c] = num_rows * c / num_chunks;
  std::vector<uint8_t> chunk_nan(num_chunks, 0);

  torch::stable::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<uint8_t> mask((width + 63) / 64 * 64, 0);
    for (int64_t c = c_begin; c < c_end; ++c) {
      std::vector<Run>& runs = chunk_runs[c];
      bool nan = false;
      for (int64_t r = chunk_first_row[c]; r < chunk_first_row[c + 1]; ++r) {
        row_begin[r] = static_cast<index_t>(runs.size());  // local for now
        const bool any = check_probabilities
                             ? threshold_row<true>(input + r * width, width, test, mask.data(), nan)
                             : threshold_row<false>(input + r * width, width, test, mask.data(), nan);
        if (any)
          extract_runs(mask.data(), static_cast<int32_t>(width), runs);
      }
      chunk_nan[c] = nan;
    }
  });
  for (int64_t c = 0; c < num_chunks; ++c)
    if (chunk_nan[c]) saw_nan = true;
  if (saw_nan) return 0;

  // Concatenate the chunks' runs (raster order) and make row_begin global.
  std::vector<int64_t> chunk_offset(num_chunks + 1, 0);
  for (int64_t c = 0; c < num_chunks; ++c) chunk_offset[c + 1] = chunk_offset[c] + chunk_runs[c].size();
  const int64_t num_runs = chunk_offset[num_chunks];
  LC_CHECK(num_runs < static_cast<int64_t>(std::numeric_limits<index_t>::max()),
              "label: too many foreground runs for the index type");
  std::vector<Run> runs_storage;
  const Run* runs;
  if (num_chunks == 1) {
    runs = chunk_runs[0].data();
  } else {
    runs_storage.resize(num_runs);
    torch::stable::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        std::copy(chunk_runs[c].begin(), chunk_runs[c].end(), runs_storage.begin() + chunk_offset[c]);
        for (int64_t r = chunk_first_row[c]; r < chunk_first_row[c + 1]; ++r)
          row_begin[r] += static_cast<index_t>(chunk_offset[c]);
      }
    });
    runs = runs_storage.data();
  }
  row_begin[num_rows] = static_cast<index_t>(num_runs);
  if (num_runs == 0) {
    if (!output_zeroed) std::fill(labels_out, labels_out + num_rows * width, label_t(0));
    return 0;
  }

  // ---- 2. union runs with the touching runs of preceding neighbour rows ----
  std::vector<index_t> parent(num_runs);
  for (int64_t i = 0; i < num_runs; ++i) parent[i] = static_cast<index_t>(i);

  // Merges row r with its neighbour rows whose index lies in [min_row, max_row).
  auto merge_row = [&](int64_t r, int64_t min_row, int64_t max_row) {
    const index_t cur_begin = row_begin[r], cur_end = row_begin[r + 1];
    if (cur_begin == cur_end) return;
    const int64_t z = r / height, y = r % height;
    for (int n = 0; n < num_neighbours; ++n) {
      const int64_t nz = z + neighbours[n].dz, ny = y + neighbours[n].dy;
      if (nz < 0 || ny < 0 || ny >= height) continue;
      const int64_t nr = nz * height + ny;
      if (nr < min_row || nr >= max_row) continue;
      merge_rows(runs, parent.data(), cur_begin, cur_end, row_begin[nr], row_begin[nr + 1],
                 neighbours[n].reach);
    }
  };
  torch::stable::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c)
      for (int64_t r = chunk_first_row[c]; r < chunk_first_row[c + 1]; ++r)
        merge_row(r, chunk_first_row[c], r);
  });
  // Rows whose neighbours lie in an earlier chunk (at most height + 1 rows per chunk boundary).
  for (int64_t c = 1; c < num_chunks; ++c) {
    const int64_t first = chunk_first_row[c];
    const int64_t last = std::min(chunk_first_row[c + 1], first + height + 1);
    for (int64_t r = first; r < last; ++r) merge_row(r, 0, first);
  }

  // ---- 3. number components in order of their first run ----
  // After this loop parent[i] is the root of run i.
  std::vector<label_t> root_label(num_runs, label_t(0));
  int64_t num_components = 0;
  if (min_size <= 1) {
    for (int64_t i = 0; i < num_runs; ++i) {
      if (parent[i] == static_cast<index_t>(i)) {
        root_label[i] = static_cast<label_t>(++num_components);
      } else {
        parent[i] = parent[parent[i]];
      }
    }
  } else {
    std::vector<int64_t> size(num_runs, 0);
    for (int64_t i = 0; i < num_runs; ++i) {
      if (parent[i] != static_cast<index_t>(i)) parent[i] = parent[parent[i]];
      size[parent[i]] += runs[i].x1 - runs[i].x0;
    }
    for (int64_t i = 0; i < num_runs; ++i)
      if (parent[i] == static_cast<index_t>(i) && size[i] >= min_size)
        root_label[i] = static_cast<label_t>(++num_components);
  }

  // ---- 4. write labels row by row ----
  torch::stable::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t r = chunk_first_row[c]; r < chunk_first_row[c + 1]; ++r) {
        label_t* out_row = labels_out + r * width;
        if (!output_zeroed) std::memset(out_row, 0, sizeof(label_t) * width);
        for (index_t i = row_begin[r]; i < row_begin[r + 1]; ++i) {
          const label_t lab = root_label[parent[i]];
          if (lab == 0) continue;
          std::fill(out_row + runs[i].x0, out_row + runs[i].x1, lab);
        }
      }
    }
  });
  return num_components;
}

std::tuple<Tensor, Tensor> label_cpu(const Tensor& input, double threshold, int64_t connectivity,
                                     int64_t min_size, bool check_probabilities) {
  check_label_arguments(input, threshold, connectivity, min_size);
  LC_CHECK(input.is_cpu(), "label: expected a CPU tensor for `input`, got one on ", device_name(input));
  const int spatial_rank = static_cast<int>(input.dim()) - 1;
  const ScalarType dtype = input.scalar_type();

  const Tensor x = dense(input);
  const int64_t batch = x.size(0);
  const int64_t depth = spatial_rank == 3 ? x.size(1) : 1;
  const int64_t height = x.size(spatial_rank - 1), width = x.size(spatial_rank);
  const int64_t item_voxels = depth * height * width;
  const bool wide = item_voxels >= (int64_t(1) << 31);
  const ScalarType label_dtype = wide ? ScalarType::Long : ScalarType::Int;
  const std::vector<int64_t> label_sizes = shape_of(x).dims;
  Tensor num = new_zeros(x, {batch}, ScalarType::Long);
  if (batch == 0 || item_voxels == 0) return {new_zeros(x, label_sizes, label_dtype), num};
  Tensor labels;
  bool output_zeroed = false;

  int64_t* num_ptr = num.mutable_data_ptr<int64_t>();
  std::vector<uint8_t> item_nan(batch, 0);
  // Whole items per thread when there are enough of them and they are worth a thread.
  const bool items_in_parallel = batch >= static_cast<int64_t>(torch::stable::get_num_threads()) && batch > 1 && item_voxels >= (1 << 14);

  auto dispatch = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* in_ptr = static_cast<const scalar_t*>(x.const_data_ptr());
    const ForegroundTest<scalar_t> test(threshold);
    const int64_t label_size = wide ? 8 : 4;
    const ZeroedOutput output = zeroed_cpu_output_by_block(
        label_sizes, label_dtype, [&](int64_t byte_begin, int64_t byte_end) {
          return mostly_background(in_ptr, byte_begin / label_size, byte_end / label_size,
                                   static_cast<int64_t>(kSmallPage) / label_size, test);
        });
    labels = output.tensor;
    output_zeroed = output.zeroed;
    auto run_item = [&](int64_t b) {
      bool nan = false;
      if (wide) {
        num_ptr[b] = label_item<scalar_t, int64_t, int64_t>(
            in_ptr + b * item_voxels, labels.mutable_data_ptr<int64_t>() + b * item_voxels, depth, height,
            width, threshold, (int)connectivity, min_size, check_probabilities, output_zeroed, nan,
            !items_in_parallel);
      } else {
        num_ptr[b] = label_item<scalar_t, int32_t, int32_t>(
            in_ptr + b * item_voxels, labels.mutable_data_ptr<int32_t>() + b * item_voxels, depth, height,
            width, threshold, (int)connectivity, min_size, check_probabilities, output_zeroed, nan,
            !items_in_parallel);
      }
      item_nan[b] = nan;
    };
    if (items_in_parallel) {
      torch::stable::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) run_item(b);
      });
    } else {
      for (int64_t b = 0; b < batch; ++b) run_item(b);
    }
  };
  switch (dtype) {
    case ScalarType::Float: dispatch(float{}); break;
    case ScalarType::Double: dispatch(double{}); break;
    case ScalarType::Half: dispatch(Half{}); break;
    case ScalarType::BFloat16: dispatch(BFloat16{}); break;
    case ScalarType::Byte: dispatch(uint8_t{}); break;
    case ScalarType::Bool: dispatch(uint8_t{}); break;  // torch bools are stored as bytes 0/1
    default: LC_CHECK(false, "label: unsupported dtype ", dtype);
  }
  for (int64_t b = 0; b < batch; ++b)
    LC_CHECK(!item_nan[b], "label: `input` ",
                check_probabilities ? "must hold probabilities in [0, 1] without NaN (pass from_logits=True for logits)"
                                    : "contains NaN",
                " (batch item ", b, ")");
  return {labels, num};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lesioncount, CPU, m) { m.impl("label", TORCH_BOX(&label_cpu)); }

}  // namespace lesioncount
