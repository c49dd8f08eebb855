// CPU fused per-region max and argmax.
//
// For every batch item, one pass over its voxels in flat order keeps, per label r > 0, the largest
// value seen and the flat index where it was first reached (a strictly larger value replaces it, an
// equal one does not, so ties go to the smallest index). When a batch has fewer items than threads,
// an item's voxels are split into contiguous chunks with their own per-region partial results,
// merged afterwards in chunk order (again only a strictly larger value wins), which preserves the
// smallest-index tie rule. Absent regions get value 0 and argmax -1. Memory: O(num_regions) per
// chunk. _region_topk is the same scan with per-region arrays grown to the largest label seen,
// followed by a partial selection of the k best regions (static output shape, any region count).
// The backward (_region_max_backward) scatters one gradient per region to its argmax voxel.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/op_arguments.h"
#include "cpu/output_alloc.h"

namespace lesioncount {
namespace {

template <typename scalar_t>
struct RegionBest {
  std::vector<scalar_t> value;
  std::vector<int64_t> index;  // -1 while the region has not been seen
  explicit RegionBest(int64_t n) : value(n, scalar_t(0)), index(n, -1) {}
};

// Scans voxels [begin, end) of one item. Returns false (and stops) on a bad label or a NaN value,
// reporting it through `bad_label` / `saw_nan`.
template <typename scalar_t, typename label_t>
inline bool scan_voxel(const scalar_t* values, const label_t* labels, int64_t i, int64_t num_regions,
                       scalar_t* best_value, int64_t* best_index, int64_t& bad_label, bool& saw_nan) {
  const int64_t lab = static_cast<int64_t>(labels[i]);
  if (lab == 0) return true;
  if (lab < 0 || lab > num_regions) {
    bad_label = lab;
    return false;
  }
  const scalar_t v = values[i];
  if (v != v) {
    saw_nan = true;
    return false;
  }
  const int64_t r = lab - 1;
  if (best_index[r] < 0 || v > best_value[r]) {
    best_value[r] = v;
    best_index[r] = i;
  }
  return true;
}

// Scans voxels [begin, end) of one item. Background is skipped 32 labels at a time (an OR over the
// block vectorises), so mostly-empty maps cost little more than reading the labels once. Returns
// false (and stops) on a bad label or a NaN value, reporting it through `bad_label` / `saw_nan`.
template <typename scalar_t, typename label_t>
bool scan_range(const scalar_t* values, const label_t* labels, int64_t begin, int64_t end,
                int64_t num_regions, scalar_t* best_value, int64_t* best_index, int64_t& bad_label,
                bool& saw_nan) {
  constexpr int64_t kBlock = 32;
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    label_t any = 0;
    for (int64_t k = 0; k < kBlock; ++k) any |= labels[i + k];
    if (any == 0) continue;
    for (int64_t k = 0; k < kBlock; ++k)
      if (!scan_voxel(values, labels, i + k, num_regions, best_value, best_index, bad_label, saw_nan))
        return false;
  }
  for (; i < end; ++i)
    if (!scan_voxel(values, labels, i, num_regions, best_value, best_index, bad_label, saw_nan)) return false;
  return true;
}

std::tuple<Tensor, Tensor> region_max_cpu(const Tensor& input, const Tensor& labels,
                                                 int64_t num_regions) {
  check_region_max_arguments(input, labels, num_regions);
  LC_CHECK(input.is_cpu() && labels.is_cpu(), "region_max: `input` and `labels` must both be CPU tensors here, got ",
           device_name(input), " and ", device_name(labels));

  const int64_t batch = input.size(0);
  const int64_t item_voxels = batch == 0 ? 0 : input.numel() / batch;
  const Tensor x = dense(input);
  const Tensor lab = dense(labels);
  Tensor values = new_zeros(x, {batch, num_regions}, x.scalar_type());
  Tensor argmax = new_full(x, {batch, num_regions}, ScalarType::Long, -1);
  if (batch == 0 || num_regions == 0 || item_voxels == 0) {
    if (num_regions == 0 && item_voxels > 0 && batch > 0) {
      // Still reject labels that name regions that do not exist.
      bool any_region = false;
      auto scan = [&](auto label_tag) {
        using label_t = decltype(label_tag);
        const label_t* lv = lab.const_data_ptr<label_t>();
        for (int64_t i = 0, n = batch * item_voxels; i < n && !any_region; ++i) any_region = lv[i] != 0;
      };
      if (lab.scalar_type() == ScalarType::Int) scan(int32_t{});
      else scan(int64_t{});
      LC_CHECK(!any_region, "region_max: `labels` must lie in [0, num_regions=0]");
    }
    return {values, argmax};
  }

  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const bool items_in_parallel = batch >= threads && item_voxels >= (1 << 14);
  std::vector<int64_t> bad_label(batch, 0);
  std::vector<uint8_t> item_nan(batch, 0);
  std::vector<uint8_t> item_ok(batch, 1);

  dispatch_floating(x.scalar_type(), "region_max", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    auto with_labels = [&](auto label_tag) {
      using label_t = decltype(label_tag);
      const scalar_t* xv = x.const_data_ptr<scalar_t>();
      const label_t* lv = lab.const_data_ptr<label_t>();
      scalar_t* out_v = values.mutable_data_ptr<scalar_t>();
      int64_t* out_i = argmax.mutable_data_ptr<int64_t>();

      auto run_item = [&](int64_t b, bool split) {
        const scalar_t* item_x = xv + b * item_voxels;
        const label_t* item_l = lv + b * item_voxels;
        scalar_t* bv = out_v + b * num_regions;
        int64_t* bi = out_i + b * num_regions;
        bool nan = false;
        int64_t bad = 0;
        int64_t chunks = split ? std::max<int64_t>(1, std::min<int64_t>(threads, item_voxels / (1 << 16))) : 1;
        if (chunks == 1) {
          item_ok[b] = scan_range(item_x, item_l, 0, item_voxels, num_regions, bv, bi, bad, nan);
        } else {
          std::vector<RegionBest<scalar_t>> partial;
          partial.reserve(chunks);
          for (int64_t c = 0; c < chunks; ++c) partial.emplace_back(num_regions);
          std::vector<uint8_t> ok(chunks, 1), chunk_nan(chunks, 0);
          std::vector<int64_t> chunk_bad(chunks, 0);
          torch::stable::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
              bool n = false;
              ok[c] = scan_range(item_x, item_l, item_voxels * c / chunks, item_voxels * (c + 1) / chunks,
                                 num_regions, partial[c].value.data(), partial[c].index.data(),
                                 chunk_bad[c], n);
              chunk_nan[c] = n;
            }
          });
          for (int64_t c = 0; c < chunks; ++c) {
            if (!ok[c]) {
              item_ok[b] = 0;
              nan = nan || chunk_nan[c];
              if (chunk_bad[c] != 0) bad = chunk_bad[c];
            }
          }
          // Merge in chunk order: a later chunk wins only with a strictly larger value.
          for (int64_t c = 0; c < chunks; ++c) {
            const auto& pv = partial[c].value;
            const auto& pi = partial[c].index;
            for (int64_t r = 0; r < num_regions; ++r) {
              if (pi[r] < 0) continue;
              if (bi[r] < 0 || pv[r] > bv[r]) {
                bv[r] = pv[r];
                bi[r] = pi[r];
              }
            }
          }
        }
        item_nan[b] = nan;
        bad_label[b] = bad;
      };
      if (items_in_parallel) {
        torch::stable::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) run_item(b, false);
        });
      } else {
        for (int64_t b = 0; b < batch; ++b) run_item(b, true);
      }
    };
    if (lab.scalar_type() == ScalarType::Int) with_labels(int32_t{});
    else with_labels(int64_t{});
  });

  for (int64_t b = 0; b < batch; ++b) {
    if (item_ok[b]) continue;
    LC_CHECK(!item_nan[b], "region_max: `input` contains NaN inside a region (batch item ", b, ")");
    LC_CHECK(false, "region_max: `labels` must lie in [0, num_regions=", num_regions, "], found ",
                bad_label[b], " in batch item ", b);
  }
  return {values, argmax};
}

// The k best regions of one item, without knowing the number of regions in advance: per-region
// maxima grow with the largest label seen, then a partial selection by (value desc, label asc)
// keeps k of them, returned in label order. Returns false on a bad label or NaN.
template <typename scalar_t, typename label_t>
bool topk_item(const scalar_t* values, const label_t* labels, int64_t voxels, int64_t k, scalar_t* out_v,
               int64_t* out_i, int64_t* out_id, int64_t& bad_label, bool& saw_nan) {
  std::vector<scalar_t> best_value;
  std::vector<int64_t> best_index;
  constexpr int64_t kBlock = 32;
  for (int64_t start = 0; start < voxels; start += kBlock) {
    const int64_t stop = std::min(voxels, start + kBlock);
    label_t any = 0;
    for (int64_t i = start; i < stop; ++i) any |= labels[i];
    if (any == 0) continue;
    for (int64_t i = start; i < stop; ++i) {
      const int64_t lab = static_cast<int64_t>(labels[i]);
      if (lab == 0) continue;
      if (lab < 0) {
        bad_label = lab;
        return false;
      }
      if (lab > static_cast<int64_t>(best_index.size())) {
        const int64_t grown = std::max<int64_t>(lab, 2 * static_cast<int64_t>(best_index.size()));
        best_value.resize(grown, scalar_t(0));
        best_index.resize(grown, -1);
      }
      if (!scan_voxel(values, labels, i, static_cast<int64_t>(best_index.size()), best_value.data(),
                      best_index.data(), bad_label, saw_nan))
        return false;
    }
  }
  std::vector<int64_t> present;
  for (int64_t r = 0; r < static_cast<int64_t>(best_index.size()); ++r)
    if (best_index[r] >= 0) present.push_back(r);
  if (static_cast<int64_t>(present.size()) > k) {
    auto better = [&](int64_t a, int64_t b) {
      if (best_value[a] > best_value[b]) return true;
      if (best_value[b] > best_value[a]) return false;
      return a < b;
    };
    std::nth_element(present.begin(), present.begin() + k, present.end(), better);
    present.resize(k);
    std::sort(present.begin(), present.end());
  }
  for (int64_t c = 0; c < k; ++c) {
    if (c < static_cast<int64_t>(present.size())) {
      out_v[c] = best_value[present[c]];
      out_i[c] = best_index[present[c]];
      out_id[c] = present[c] + 1;
    } else {
      out_v[c] = scalar_t(0);
      out_i[c] = -1;
      out_id[c] = 0;
    }
  }
  return true;
}

std::tuple<Tensor, Tensor, Tensor> region_topk_cpu(const Tensor& input, const Tensor& labels,
                                                              int64_t k) {
  check_region_arguments(input, labels, "_region_topk");
  LC_CHECK(k >= 0, "_region_topk: `k` must be >= 0, got ", k);
  LC_CHECK(input.is_cpu() && labels.is_cpu(), "_region_topk: `input` and `labels` must both be CPU tensors here, got ",
           device_name(input), " and ", device_name(labels));
  const int64_t batch = input.size(0);
  const int64_t item_voxels = batch == 0 ? 0 : input.numel() / batch;
  const Tensor x = dense(input);
  const Tensor lab = dense(labels);
  Tensor values = new_empty(x, {batch, k}, x.scalar_type());
  Tensor argmax = new_empty(x, {batch, k}, ScalarType::Long);
  Tensor ids = new_empty(x, {batch, k}, ScalarType::Long);
  std::vector<int64_t> bad_label(batch, 0);
  std::vector<uint8_t> item_nan(batch, 0), item_ok(batch, 1);
  dispatch_floating(x.scalar_type(), "_region_topk", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    auto with_labels = [&](auto label_tag) {
      using label_t = decltype(label_tag);
      const scalar_t* xv = x.const_data_ptr<scalar_t>();
      const label_t* lv = lab.const_data_ptr<label_t>();
      torch::stable::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          bool nan = false;
          item_ok[b] = topk_item(xv + b * item_voxels, lv + b * item_voxels, item_voxels, k,
                                 values.mutable_data_ptr<scalar_t>() + b * k, argmax.mutable_data_ptr<int64_t>() + b * k,
                                 ids.mutable_data_ptr<int64_t>() + b * k, bad_label[b], nan);
          item_nan[b] = nan;
        }
      });
    };
    if (lab.scalar_type() == ScalarType::Int) with_labels(int32_t{});
    else with_labels(int64_t{});
  });
  for (int64_t b = 0; b < batch; ++b) {
    if (item_ok[b]) continue;
    LC_CHECK(!item_nan[b], "_region_topk: `input` contains NaN inside a region (batch item ", b, ")");
    LC_CHECK(false, "_region_topk: `labels` must be >= 0, found ", bad_label[b], " in batch item ", b);
  }
  return {values, argmax, ids};
}

// Sparse backward: a zero dense gradient (large ones come zero-filled from the kernel, see
// cpu/output_alloc.h; small ones are memset) plus one scattered value per present region.
Tensor region_max_backward_cpu(const Tensor& grad_values, const Tensor& argmax, std::vector<int64_t> input_shape) {
  check_region_max_backward_arguments(grad_values, argmax, input_shape);
  LC_CHECK(grad_values.is_cpu() && argmax.is_cpu(), "_region_max_backward: `grad_values` and `argmax` must both be CPU "
           "tensors here, got ", device_name(grad_values), " and ", device_name(argmax));
  const ZeroedOutput output = empty_or_zeroed_cpu_output(input_shape, grad_values.scalar_type(), /*dense=*/false);
  Tensor grad_input = output.tensor;
  const int64_t batch = grad_values.size(0), regions = grad_values.size(1);
  const int64_t total = grad_input.numel();
  const int64_t item = batch == 0 ? 0 : total / batch;
  const size_t elem = grad_input.element_size();
  char* base = static_cast<char*>(grad_input.mutable_data_ptr());
  if (!output.zeroed) {
    torch::stable::parallel_for(0, total, int64_t(1) << 18, [&](int64_t b0, int64_t b1) {
      std::memset(base + b0 * elem, 0, (b1 - b0) * elem);
    });
  }
  const Tensor g = dense(grad_values);
  const Tensor a = dense(argmax);
  const int64_t* ap = a.const_data_ptr<int64_t>();
  dispatch_floating(g.scalar_type(), "_region_max_backward", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t r = 0; r < regions; ++r) {
        const int64_t idx = ap[b * regions + r];
        if (idx < 0) continue;
        LC_CHECK(idx < item, "_region_max_backward: `argmax` ", idx, " is outside an item of ", item, " voxels");
        out[b * item + idx] += gp[b * regions + r];
      }
    }
  });
  return grad_input;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lesioncount, CPU, m) {
  m.impl("region_max", TORCH_BOX(&region_max_cpu));
  m.impl("_region_max_backward", TORCH_BOX(&region_max_backward_cpu));
  m.impl("_region_topk", TORCH_BOX(&region_topk_cpu));
}

}  // namespace lesioncount
