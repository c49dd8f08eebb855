// CUDA-on-CPU test runtime: the host-side runtime API subset the project's launchers use.
//
// Part of tests/cuda_cpu (see cuda_runtime.h there for the device side and its limits). Only the
// calls the launchers make exist here, all of them asynchronous and allocation-free on a real GPU
// (launches, cudaMemsetAsync, cudaGetLastError): a launcher that started calling a synchronising
// API (cudaMemcpy, cudaStreamSynchronize, cudaMalloc, ...) would fail to compile against this
// runtime, which is how the test build guards CUDA-graph capture safety at compile time.
#pragma once

#include <cstddef>
#include <cstdint>

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// Runs synchronously on the host (the emulated device memory is host memory).
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
// Returns and clears the error of the last launch on this host thread, like the CUDA runtime.
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
// The detailed message of the last failed launch for a launch failure (which kernel, which block
// and thread, what went wrong), else the error's name.
const char* cudaGetErrorString(cudaError_t error);
