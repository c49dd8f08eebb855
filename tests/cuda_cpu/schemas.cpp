// CUDA-on-CPU test build: the operator schemas of csrc/lesioncount.cpp, under the namespace
// lesioncount_cuda_cpu that the emulated CUDA launchers register their CPU kernels in.
#define LC_OPS_NAMESPACE lesioncount_cuda_cpu
#include "lesioncount.cpp"
