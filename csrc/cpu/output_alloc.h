// Zero-filled allocation of large CPU outputs (label maps, dense sparse-gradients).
//
// A fresh multi-megabyte tensor from the default CPU allocator is mmap'ed memory that the kernel maps
// 4 KiB at a time on first touch, and at::zeros then writes every byte once more. Outputs of at
// least 8 MiB are therefore mapped directly (anonymous mmap: the kernel guarantees zeros), 2 MiB
// aligned, and kernels write only their non-zero entries. The tensor owns its mapping through a
// deleter; otherwise it is an ordinary contiguous CPU tensor.
//
// How each 2 MiB block of the mapping gets its memory is chosen per block, from what the caller
// will write there:
//  - dense blocks (most of the block will be written): MADV_HUGEPAGE, so the first write maps one
//    zeroed 2 MiB page (one fault instead of 512);
//  - sparse blocks (a few scattered writes, the rest stays zero and is only read): the block is
//    mapped read-only to the kernel's huge zero page (one read fault), which is then split into 512
//    read-only 4 KiB zero-page entries (MADV_DONTNEED of one 4 KiB page inside it: a partial unmap
//    splits the huge mapping), and the block is marked MADV_NOHUGEPAGE. A write then faults in one
//    private 4 KiB page, and reads of the untouched zeros (e.g. region_max scanning a label map)
//    cost no fault and no memory. The split is needed: a write into the unsplit huge zero page
//    allocates a whole zeroed 2 MiB page (Linux 6.x), and plain 4 KiB memory without the zero-page
//    entries would take one read fault per 4 KiB when the zeros are read.
//
// Why sparse blocks matter (issue 16, item 7, cold start): with huge pages everywhere, a realistic
// label map (4 x 64x192x192 int32, 36 MiB, ~0.2% of voxels labelled) got all of its 18 huge pages
// written on every call, so every call zeroed 36 MiB of fresh memory. On a VM whose freed memory goes
// back to the hypervisor (virtio-balloon free page reporting; on the Firecracker VM of BENCHMARKS.md
// free 2 MiB blocks are reported within seconds, page_reporting_order 9), memory that was reported costs a
// host fault per 4 KiB on first touch again: ~5 ms per huge page, 70-110 ms per call instead of
// ~8 ms, until the process happened to recycle huge pages that were still backed (the "first ~10
// calls" of a process). With sparse blocks the same map writes ~875 4 KiB pages (3.5 MiB), which
// the kernel recycles from its per-CPU free lists call after call, and the first call of a process
// touches 10x less fresh memory.
//
// Correctness never depends on the choice: every block reads as zeros until the caller writes it.
//
// Stable ABI: a tensor that owns foreign memory through a deleter needs the C shim function
// torch_from_blob, which torch has from 2.11 on. The library targets 2.10, so the function is
// declared weak here: on torch >= 2.11 it resolves and large outputs are mapped as above; on 2.10 it
// is null and every output is an ordinary torch allocation filled by the caller (zeroed = false).
#pragma once

#include "common/stable_api.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if TORCH_FEATURE_VERSION < TORCH_VERSION_2_11_0
// Declared by torch/csrc/stable/c/shim.h only for targets >= 2.11; the same signature, weak.
extern "C" AOTI_TORCH_EXPORT AOTITorchError torch_from_blob(
    void* data, int64_t ndim, const int64_t* sizes_ptr, const int64_t* strides_ptr, int64_t storage_offset,
    int32_t dtype, int32_t device_type, int32_t device_index, AtenTensorHandle* ret_new_tensor, int32_t layout,
    const uint8_t* opaque_metadata, int64_t opaque_metadata_size, void (*deleter)(void* data, void* context),
    void* deleter_context) __attribute__((weak));
#endif

namespace lesioncount {

struct ZeroedOutput {
  Tensor tensor;
  bool zeroed;  // true: every element is already 0
};

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallPage = size_t(4) << 10;

// Size in bytes of a CPU output of `sizes` and `dtype`.
inline size_t output_nbytes(const std::vector<int64_t>& sizes, ScalarType dtype) {
  size_t n = 1;
  for (int64_t s : sizes) n *= static_cast<size_t>(s);
  return n * element_size(dtype);
}

// Wraps `data` (owned by an anonymous mapping [base, base + mapped)) as a contiguous CPU tensor that
// unmaps it when freed. Returns nothing when torch lacks torch_from_blob (2.10) or it fails.
inline std::optional<Tensor> tensor_owning_mapping(char* data, const std::vector<int64_t>& sizes, ScalarType dtype, void* base,
                                    size_t mapped) {
  if (&torch_from_blob == nullptr) return std::nullopt;
  std::vector<int64_t> strides(sizes.size(), 1);
  for (size_t d = sizes.size(); d-- > 1;) strides[d - 1] = strides[d] * std::max<int64_t>(sizes[d], 1);
  struct Mapping {
    void* base;
    size_t bytes;
  };
  auto* mapping = new Mapping{base, mapped};
  auto release = [](void* /*data*/, void* context) {
    auto* m = static_cast<Mapping*>(context);
    munmap(m->base, m->bytes);
    delete m;
  };
  AtenTensorHandle handle = nullptr;
  const AOTITorchError error = torch_from_blob(
      data, static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), 0,
      torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype)), aoti_torch_device_type_cpu(), /*device_index=*/-1,
      &handle, aoti_torch_layout_strided(), nullptr, 0, release, mapping);
  if (error != AOTI_TORCH_SUCCESS) {
    delete mapping;
    return std::nullopt;
  }
  return Tensor(handle);
}

// Whether read faults in MADV_HUGEPAGE memory map the kernel's shared huge zero page (the default);
// when they allocate a real huge page instead (use_zero_page = 0), sparse blocks skip the zero-page
// mapping and stay plain lazily-faulted 4 KiB memory.
inline bool huge_zero_page_enabled() {
#if defined(__linux__)
  static const bool enabled = [] {
    FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/use_zero_page", "r");
    if (f == nullptr) return false;
    int value = 0;
    const bool ok = std::fscanf(f, "%d", &value) == 1;
    std::fclose(f);
    return ok && value == 1;
  }();
  return enabled;
#else
  return false;
#endif
}

// Returns an uninitialised small tensor (zeroed = false) or a zero-filled large one (zeroed = true).
// `sparse_block(byte_begin, byte_end)` is asked, for each 2 MiB block of a large output (byte
// offsets into the output), whether the caller will write only a small part of it (see above); it is
// not called for small outputs.
template <typename SparseBlock>
inline ZeroedOutput zeroed_cpu_output_by_block(const std::vector<int64_t>& sizes, ScalarType dtype,
                                               SparseBlock&& sparse_block) {
#if defined(__linux__) && defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
  const size_t nbytes = output_nbytes(sizes, dtype);
  if (nbytes >= 4 * kHugePage && &torch_from_blob != nullptr) {
    const size_t mapped = (nbytes + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
      char* data = reinterpret_cast<char*>(aligned);
      const size_t blocks = (nbytes + kHugePage - 1) / kHugePage;
      std::vector<uint8_t> sparse(blocks);
      for (size_t k = 0; k < blocks; ++k)
        sparse[k] = sparse_block(static_cast<int64_t>(k * kHugePage),
                                 static_cast<int64_t>(std::min(nbytes, (k + 1) * kHugePage)));
      // All madvise calls are advisory: if one fails, the memory is still zero-filled.
      madvise(data, blocks * kHugePage, MADV_HUGEPAGE);
      const bool zero_page = huge_zero_page_enabled();
      for (size_t k = 0; k < blocks && zero_page; ++k) {
        if (!sparse[k]) continue;
        char* block = data + k * kHugePage;
        (void)*static_cast<volatile char*>(block);  // maps the huge zero page (nothing written yet)
        madvise(block, kSmallPage, MADV_DONTNEED);   // partial unmap: splits it into 4 KiB entries
      }
      for (size_t k = 0; k < blocks;) {  // runs of sparse blocks: no huge pages on later faults
        size_t end = k;
        while (end < blocks && sparse[end]) ++end;
        if (end > k) madvise(data + k * kHugePage, (end - k) * kHugePage, MADV_NOHUGEPAGE);
        k = end + 1;
      }
      std::optional<Tensor> owned = tensor_owning_mapping(data, sizes, dtype, base, mapped);
      if (owned) return {*owned, true};
      munmap(base, mapped);
    }
  }
#else
  (void)sparse_block;
#endif
  return {torch::stable::empty(sizes, dtype, std::nullopt, torch::stable::Device(torch::headeronly::DeviceType::CPU)),
          false};
}

// The same with one choice for the whole output: `dense` (the kernel will write most of it) or
// sparse (a few scattered entries, e.g. one gradient value per region).
inline ZeroedOutput empty_or_zeroed_cpu_output(const std::vector<int64_t>& sizes, ScalarType dtype,
                                               bool dense = true) {
  return zeroed_cpu_output_by_block(sizes, dtype, [dense](int64_t, int64_t) { return !dense; });
}

}  // namespace lesioncount
