// C-style launcher API of the CUDA connected-component labeler (csrc/cuda/label.cu).
//
// label.cu holds pure CUDA (no torch headers); label_cuda.cpp validates arguments, allocates the
// outputs and the workspace with torch and calls these functions on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace lesioncount {
namespace cuda {

// Input element types the labeler reads (foreground = double(value) > threshold).
enum LabelInputType : int {
  kLabelInputBool = 0,
  kLabelInputUInt8 = 1,
  kLabelInputHalf = 2,
  kLabelInputBFloat16 = 3,
  kLabelInputFloat = 4,
  kLabelInputDouble = 5,
};

struct LabelShape {
  int64_t batch;
  int64_t depth;   // 1 for 2D input
  int64_t height;
  int64_t width;
  int connectivity;  // 4 or 8 (2D), 6, 18 or 26 (3D)
  int64_t min_size;
};

// Whether the labels are int64 (an item has >= 2^31 voxels) rather than int32.
bool label_is_wide(const LabelShape& shape);

// Bytes of device workspace label_launch needs. Depends on the shape only (never on the data).
size_t label_workspace_bytes(const LabelShape& shape);

// Labels `input` ([batch, depth, height, width] contiguous, device memory) into `labels` (same
// shape; int32, or int64 when label_is_wide) and writes num[b] (int64, device) = number of
// components of item b, or -1 when item b contains NaN (its labels are then all 0). Components are
// numbered 1..K in raster order of their first voxel (= scipy.ndimage.label), consecutively after
// the min_size filter. Enqueued on `stream`; never synchronises. batch and the item size must be
// positive. Returns the first launch error (cudaSuccess otherwise).
// `in_range` (device, one byte; null: values not checked) is check_probabilities: the launcher sets
// it to 1 and the first pass clears it to 0 if any value lies outside [0, 1] or is NaN (the caller
// turns it into a device-side assertion; no host sync).
cudaError_t label_launch(const LabelShape& shape, const void* input, LabelInputType type, double threshold,
                         void* labels, int64_t* num, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream, uint8_t* in_range = nullptr);

}  // namespace cuda
}  // namespace lesioncount
