// Zero-filled allocation of large CPU outputs (label maps, dense sparse-gradients).
//
// A fresh multi-megabyte tensor from the default CPU allocator is mmap'ed memory that the kernel maps
// 4 KiB at a time on first touch, and at::zeros then writes every byte once more. For a
// (4, 64, 192, 192) int32 label map that is ~9,000 page faults plus a 38 MB memset, which measured
// here cost more than the labelling itself. Outputs of at least 8 MiB are therefore mapped directly
// (anonymous mmap: the kernel guarantees zeros), 2 MiB-aligned and marked MADV_HUGEPAGE (honoured when
// the system's THP mode is "madvise" or "always"). Kernels then write only their non-zero entries;
// untouched pages are never faulted in until someone reads or writes them (as with calloc). The
// tensor owns its mapping through a deleter; otherwise it is an ordinary contiguous CPU tensor.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lesioncount {

struct ZeroedOutput {
  at::Tensor tensor;
  bool zeroed;  // true: every element is already 0
};

// Returns an uninitialised small tensor (zeroed = false) or a zero-filled large one (zeroed = true).
// `dense`: the kernel will write most of the output (use huge pages); otherwise it writes a few
// scattered entries (4 KiB pages, so each touched spot costs 4 KiB of zeroing, not 2 MiB).
inline ZeroedOutput empty_or_zeroed_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                                               bool dense = true) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes >= 4 * kHugePage) {
    const size_t mapped = (nbytes + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
      void* data = reinterpret_cast<void*>(aligned);
      if (dense) madvise(data, mapped - (aligned - reinterpret_cast<uintptr_t>(base)), MADV_HUGEPAGE);  // advisory
      auto release = [base, mapped](void*) { munmap(base, mapped); };
      return {at::from_blob(data, sizes, release, options.device(at::kCPU)), true};
    }
  }
#endif
  return {at::empty(sizes, options.device(at::kCPU)), false};
}

}  // namespace lesioncount
