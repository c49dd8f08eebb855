// Allocation of large CPU outputs (labels, dense gradients) on transparent huge pages.
//
// A fresh multi-megabyte tensor from the default CPU allocator is mmap'ed memory that the kernel
// maps 4 KiB at a time on first touch; for a (4, 64, 192, 192) int32 label map that is ~9,000 page
// faults, which measured here cost more than the labelling itself. Outputs of at least 8 MiB are
// therefore allocated 2 MiB-aligned and marked MADV_HUGEPAGE (honoured when the system's THP mode is
// "madvise" or "always"), so they fault in 2 MiB at a time. The tensor owns its memory through a
// deleter; everything else about it is an ordinary contiguous CPU tensor.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lesioncount {

inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes >= 4 * kHugePage) {
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, bytes);
    if (data != nullptr) {
      madvise(data, bytes, MADV_HUGEPAGE);  // advisory: failure only costs speed
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, options.device(at::kCPU));
}

}  // namespace lesioncount
