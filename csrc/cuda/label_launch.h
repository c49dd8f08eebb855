// C-style launcher API of the CUDA connected-component labeler (csrc/cuda/label.cu).
//
// label.cu holds pure CUDA (no torch headers); label_cuda.cpp validates arguments, allocates the
// outputs and the workspace with torch and calls these functions on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/dtype.h"

#include <cstddef>
#include <cstdint>

namespace lesioncount {
namespace cuda {

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

// Bytes of device workspace launch_label needs. Depends on the shape only (never on the data).
size_t label_workspace_bytes(const LabelShape& shape);

struct LabelArgs {
  LabelShape shape;
  const void* input;  // [batch, depth, height, width] contiguous, device memory
  DType input_type;   // kBool, kUInt8, kHalf, kBFloat16, kFloat or kDouble (foreground: double(value) > threshold)
  double threshold;
  void* labels;       // output, same shape; int32, or int64 when label_is_wide
  int64_t* num;       // output (batch,) int64
  void* workspace;    // label_workspace_bytes(shape) bytes of device memory
  size_t workspace_bytes;
  // check_probabilities (device, one byte; null: values not checked): launch_label sets it to 1 and
  // the first pass clears it to 0 if any value lies outside [0, 1] or is NaN (the caller turns it
  // into a device-side assertion; no host sync).
  uint8_t* in_range;
};

// Labels `input` into `labels` and writes num[b] = number of components of item b, or -1 when item
// b contains NaN (its labels are then all 0). Components are numbered 1..K in raster order of their
// first voxel (= scipy.ndimage.label), consecutively after the min_size filter. Enqueued on
// `stream`; never synchronises. batch and the item size must be positive. Returns the first launch
// error (cudaSuccess otherwise). The launch convention of every op (docs/ARCHITECTURE.md).
cudaError_t launch_label(const LabelArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lesioncount
