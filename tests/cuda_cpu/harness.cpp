// CUDA-on-CPU test runtime: a torch-free harness for tests/test_cuda_cpu_runtime.py.
//
// Built with one of LC_HARNESS_SELFTEST / _REGION_MAX / _POISSON_BINOMIAL / _LABEL and linked with
// runtime.cpp (and, except for the self-test, one kernel file: the project's csrc/cuda/<op>.cu or a
// deliberately broken copy of it). Prints "ok" and exits 0 when every check passes; otherwise prints
// what differed and exits 1. The mutation tests use it to show that a broken kernel fails.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      std::printf("FAILED (line %d) %s: ", __LINE__, #cond); \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
      return 1;                                               \
    }                                                         \
  } while (0)

#if defined(LC_HARNESS_SELFTEST)
#include <cuda_runtime.h>

#include "cuda/kernel_launch.h"

using lesioncount::cuda::launch_kernel;

// Block-wide inclusive scan through shared memory (Hillis-Steele), one barrier pair per step.
__global__ void scan_kernel(const int* in, int* out, int n) {
  __shared__ int buf[256];
  const int t = threadIdx.x;
  const int g = blockIdx.x * blockDim.x + t;
  buf[t] = g < n ? in[g] : 0;
  __syncthreads();
  for (int d = 1; d < 256; d <<= 1) {
    const int v = t >= d ? buf[t - d] : 0;
    __syncthreads();
    buf[t] += v;
    __syncthreads();
  }
  if (g < n) out[g] = buf[t];
}

// The same scan without the barrier between the read and the write of a step (a classic race).
__global__ void racy_scan_kernel(const int* in, int* out, int n) {
  __shared__ int buf[256];
  const int t = threadIdx.x;
  const int g = blockIdx.x * blockDim.x + t;
  buf[t] = g < n ? in[g] : 0;
  __syncthreads();
  for (int d = 1; d < 256; d <<= 1) {
    const int v = t >= d ? buf[t - d] : 0;
    buf[t] += v;
    __syncthreads();
  }
  if (g < n) out[g] = buf[t];
}

// Every warp collective, results per thread.
__global__ void warp_kernel(long long* out) {
  const int lane = threadIdx.x & 31;
  const long long v = 1000 + threadIdx.x;
  long long* o = out + threadIdx.x * 8;
  o[0] = __shfl_sync(0xffffffffu, v, 5);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 4, 16);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 1);
  o[4] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  o[5] = __any_sync(0xffffffffu, lane == 7);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  if (lane < 16) o[7] = __shfl_sync(0x0000ffffu, v, 15);  // a half-warp collective
  else o[7] = __shfl_xor_sync(0xffff0000u, v, 2);       // the other half, concurrently
}

__global__ void atomic_kernel(unsigned long long* counter, int* maximum, unsigned* bits) {
  atomicAdd(counter, 1ull);
  atomicMax(maximum, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
  atomicOr(bits, 1u << (threadIdx.x & 31));
}

__global__ void divergent_kernel(int* out) {  // lanes meet at different collectives
  if (threadIdx.x & 1) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  else out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}

__global__ void deadlock_kernel(int* out) {  // lane 0 waits at __syncwarp, the rest at __syncthreads
  if (threadIdx.x == 0) __syncwarp();
  else __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void self_not_in_mask_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0x1u, 1, 0); }

__global__ void smem_kernel(unsigned char* out) {
  LC_DYNAMIC_SHARED_MEMORY(unsigned char, smem);
  if (threadIdx.x == 0) std::memcpy(out + blockIdx.x * 16, smem, 16);
  __syncthreads();
  smem[threadIdx.x] = 7;  // must not leak into the next block
}

__global__ void grid_kernel(int* out) {
  if (threadIdx.x == 0) atomicAdd(out + blockIdx.z * 4 + blockIdx.y * 2 + blockIdx.x, 1);
}

int main() {
  // 1. barrier: the correct scan is exact, the racy one is caught
  const int n = 256 * 24;
  std::vector<int> in(n), out(n), ref(n);
  for (int i = 0; i < n; ++i) in[i] = (i * 7919) % 13 - 6;
  for (int b = 0; b < n / 256; ++b)
    for (int t = 0, s = 0; t < 256; ++t) ref[b * 256 + t] = s += in[b * 256 + t];
  CHECK(launch_kernel(scan_kernel, n / 256, 256, 0, nullptr, in.data(), out.data(), n) == cudaSuccess, "launch");
  CHECK(out == ref, "scan");
  CHECK(launch_kernel(racy_scan_kernel, n / 256, 256, 0, nullptr, in.data(), out.data(), n) == cudaSuccess, "launch");
  CHECK(out != ref, "the racy scan gave the right answer: the runtime does not interleave at barriers");

  // 2. warp collectives
  std::vector<long long> w(64 * 8);
  CHECK(launch_kernel(warp_kernel, 1, 64, 0, nullptr, w.data()) == cudaSuccess, "launch");
  for (int t = 0; t < 64; ++t) {
    const int lane = t & 31, base = t - lane;
    const long long* o = &w[t * 8];
    CHECK(o[0] == 1000 + base + 5, "shfl t=%d got %lld", t, o[0]);
    CHECK(o[1] == 1000 + (lane >= 3 ? t - 3 : t), "shfl_up t=%d got %lld", t, o[1]);
    CHECK(o[2] == 1000 + ((lane % 16) + 4 < 16 ? t + 4 : t), "shfl_down width 16 t=%d got %lld", t, o[2]);
    CHECK(o[3] == 1000 + (t ^ 1), "shfl_xor t=%d got %lld", t, o[3]);
    CHECK(o[4] == 0x49249249ll, "ballot t=%d got %llx", t, o[4]);
    CHECK(o[5] == 1 && o[6] == 0, "any/all t=%d", t);
    CHECK(o[7] == (lane < 16 ? 1000 + base + 15 : 1000 + (t ^ 2)), "half-warp t=%d got %lld", t, o[7]);
  }

  // 3. atomics across blocks running on several host threads
  unsigned long long counter = 0;
  int maximum = -1;
  unsigned bits = 0;
  CHECK(launch_kernel(atomic_kernel, 300, 128, 0, nullptr, &counter, &maximum, &bits) == cudaSuccess, "launch");
  CHECK(counter == 300ull * 128 && maximum == 300 * 128 - 1 && bits == 0xffffffffu, "atomics %llu %d %x", counter,
        maximum, bits);

  // 4. undefined behaviour is reported, with a message
  std::vector<int> scratch(256);
  CHECK(launch_kernel(divergent_kernel, 1, 32, 0, nullptr, scratch.data()) == cudaErrorLaunchFailure, "divergent");
  CHECK(std::string(cudaGetErrorString(cudaErrorLaunchFailure)).find("divergent warp collectives") != std::string::npos,
        "message");
  CHECK(launch_kernel(deadlock_kernel, 2, 64, 0, nullptr, scratch.data()) == cudaErrorLaunchFailure, "deadlock");
  CHECK(std::string(cudaGetErrorString(cudaErrorLaunchFailure)).find("deadlock") != std::string::npos, "message");
  CHECK(launch_kernel(self_not_in_mask_kernel, 1, 32, 0, nullptr, scratch.data()) == cudaErrorLaunchFailure, "mask");
  cudaGetLastError();

  // 5. launch configuration limits of a device
  CHECK(launch_kernel(grid_kernel, dim3(1, 65536), 32, 0, nullptr, scratch.data()) == cudaErrorInvalidConfiguration,
        "grid.y > 65535");
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration && cudaGetLastError() == cudaSuccess, "sticky error");
  CHECK(launch_kernel(grid_kernel, dim3(1, 1, 65536), 32, 0, nullptr, scratch.data()) == cudaErrorInvalidConfiguration,
        "grid.z");
  CHECK(launch_kernel(grid_kernel, dim3(0), 32, 0, nullptr, scratch.data()) == cudaErrorInvalidConfiguration, "empty grid");
  CHECK(launch_kernel(grid_kernel, 1, 1025, 0, nullptr, scratch.data()) == cudaErrorInvalidConfiguration, "block");
  CHECK(launch_kernel(grid_kernel, 1, 32, 49 * 1024, nullptr, scratch.data()) == cudaErrorInvalidValue, "smem");
  std::vector<int> cells(8, 0);
  CHECK(launch_kernel(grid_kernel, dim3(2, 2, 2), 32, 0, nullptr, cells.data()) == cudaSuccess, "3-D grid");
  CHECK(cells == std::vector<int>(8, 1), "every block of a 3-D grid runs once");
  cudaGetLastError();

  // 6. dynamic shared memory is poisoned before every block
  std::vector<unsigned char> seen(16 * 5);
  CHECK(launch_kernel(smem_kernel, 5, 64, 64, nullptr, seen.data()) == cudaSuccess, "smem launch");
  for (unsigned char c : seen) CHECK(c == 0xff, "shared memory not poisoned: %d", c);
  std::printf("ok\n");
  return 0;
}

#elif defined(LC_HARNESS_REGION_MAX)
#include <algorithm>

#include "cuda/region_max_launch.h"

// _region_topk and _region_max_backward against host references: the k best regions by (maximum
// desc, label asc) in label order with their first argmax; gradients summed per voxel in region order.
int check_topk_and_backward(const std::vector<int32_t>& lab, const std::vector<float>& x_tied, long long B, long long N,
                            long long R) {
  using namespace lesioncount::cuda;
  // the maxima of x_tied are nearly all equal; a per-label scale makes them differ (with ties left)
  std::vector<float> x_scaled(x_tied);
  for (long long i = 0; i < B * N; ++i) x_scaled[i] *= 1.0f + static_cast<float>(lab[i] * 7 % 11) / 16;
  for (int pass = 0; pass < 4; ++pass) {  // float (packed keys) and double (two passes, 128-bit selection)
    const std::vector<float>& x = pass < 2 ? x_tied : x_scaled;
    std::vector<double> xd(x.begin(), x.end());
    for (long long k : {0LL, 1LL, 5LL, R - 1, R, R + 4}) {
      std::vector<long long> ref_idx, ref_arg, ref_id;
      std::vector<double> ref_val;
      for (long long b = 0; b < B; ++b) {
        std::vector<long long> arg(R, -1);
        std::vector<double> val(R, 0);
        for (long long i = 0; i < N; ++i) {
          const int r = lab[b * N + i];
          if (r == 0) continue;
          if (arg[r - 1] < 0 || x[b * N + i] > val[r - 1]) {
            arg[r - 1] = i;
            val[r - 1] = x[b * N + i];
          }
        }
        std::vector<long long> present;
        for (long long r = 0; r < R; ++r)
          if (arg[r] >= 0) present.push_back(r);
        std::stable_sort(present.begin(), present.end(), [&](long long p, long long q) { return val[p] > val[q]; });
        if (static_cast<long long>(present.size()) > k) present.resize(k);
        std::sort(present.begin(), present.end());
        for (long long c = 0; c < k; ++c) {
          const bool has = c < static_cast<long long>(present.size());
          ref_arg.push_back(has ? arg[present[c]] : -1);
          ref_val.push_back(has ? val[present[c]] : 0.0);
          ref_id.push_back(has ? present[c] + 1 : 0);
        }
      }
      std::vector<long long> argmax(B * k), ids(B * k);
      std::vector<float> vf(B * k);
      std::vector<double> vd(B * k);
      std::vector<unsigned long long> keys(B * N), first(B * N), max_label(B);
      unsigned char ok = 1;
      RegionTopkArgs a{};
      const bool packed = pass % 2 == 0;
      a.input = packed ? static_cast<const void*>(x.data()) : static_cast<const void*>(xd.data());
      a.labels = lab.data();
      a.value_kind = packed ? DType::kFloat : DType::kDouble;
      a.label_kind = DType::kInt32;
      a.batch = B;
      a.item_voxels = N;
      a.k = k;
      a.values = packed ? static_cast<void*>(vf.data()) : static_cast<void*>(vd.data());
      a.argmax = argmax.data();
      a.ids = ids.data();
      a.keys = keys.data();
      a.first_index = packed ? nullptr : first.data();
      a.max_label = max_label.data();
      a.ok = &ok;
      CHECK(launch_region_topk(a, nullptr) == cudaSuccess, "topk launch");
      CHECK(ok == 1, "topk ok flag");
      for (long long c = 0; c < B * k; ++c) {
        CHECK(ids[c] == ref_id[c] && argmax[c] == ref_arg[c], "topk pass %d k %lld column %lld: id %lld argmax %lld, "
              "expected %lld and %lld", pass, k, c, ids[c], argmax[c], ref_id[c], ref_arg[c]);
        const double v = packed ? vf[c] : vd[c];
        CHECK(v == ref_val[c], "topk pass %d k %lld column %lld: value %g, expected %g", pass, k, c, v, ref_val[c]);
      }
    }
  }
  // backward: regions of item 1 share voxels 0..3; gradients of very different magnitudes, so the
  // order of the additions shows in the float sums
  std::vector<long long> argmax(B * R);
  std::vector<float> grad(B * R);
  for (long long t = 0; t < B * R; ++t) {
    argmax[t] = t < R ? (t % 5 == 0 ? -1 : t * 13 % N) : t % 4;
    grad[t] = std::ldexp(1.0f + static_cast<float>(t % 7) / 8, static_cast<int>(t % 40) - 20) * (t % 3 ? 1 : -1);
  }
  std::vector<float> ref(B * N, 0.0f), out(B * N, 7.0f);
  for (long long t = 0; t < B * R; ++t)
    if (argmax[t] >= 0) ref[(t / R) * N + argmax[t]] += grad[t];
  std::vector<unsigned long long> table(3 * region_grad_table_slots(B, R));
  unsigned char ok = 1;
  RegionMaxBackwardArgs g{};
  g.grad_values = grad.data();
  g.argmax = argmax.data();
  g.value_kind = DType::kFloat;
  g.batch = B;
  g.regions = R;
  g.item_voxels = N;
  g.grad_input = out.data();
  g.table = table.data();
  g.table_slots = region_grad_table_slots(B, R);
  g.ok = &ok;
  CHECK(launch_region_max_backward(g, nullptr) == cudaSuccess, "backward launch");
  CHECK(ok == 1, "backward ok flag");
  for (long long i = 0; i < B * N; ++i)
    CHECK(std::memcmp(&out[i], &ref[i], sizeof(float)) == 0, "backward voxel %lld: %.9g, expected %.9g", i, out[i], ref[i]);
  return 0;
}

int main() {
  using namespace lesioncount::cuda;
  std::mt19937 rng(5);
  const long long B = 2, N = 20000, R = 37;
  std::vector<int32_t> lab(B * N);
  std::vector<float> x(B * N);
  for (long long i = 0; i < B * N; ++i) {
    lab[i] = (i / 7 + rng() % 3) % (R + 1);     // runs with scattered interruptions
    x[i] = static_cast<float>(rng() % 5) / 4;   // many ties
  }
  for (int pass = 0; pass < 2; ++pass) {  // float (one packed pass) and double (two passes)
    std::vector<double> xd(x.begin(), x.end());
    std::vector<long long> argmax(B * R), ref_arg(B * R, -1);
    std::vector<unsigned long long> scratch(B * R);
    std::vector<float> vf(B * R);
    std::vector<double> vd(B * R);
    std::vector<double> ref_val(B * R, 0);
    for (long long b = 0; b < B; ++b)
      for (long long i = 0; i < N; ++i) {
        const int r = lab[b * N + i];
        if (r == 0) continue;
        const long long c = b * R + r - 1;
        if (ref_arg[c] < 0 || x[b * N + i] > ref_val[c]) {
          ref_arg[c] = i;
          ref_val[c] = x[b * N + i];
        }
      }
    unsigned char ok = 1;
    RegionMaxArgs a{};
    a.input = pass == 0 ? static_cast<const void*>(x.data()) : static_cast<const void*>(xd.data());
    a.labels = lab.data();
    a.value_kind = pass == 0 ? DType::kFloat : DType::kDouble;
    a.label_kind = DType::kInt32;
    a.batch = B;
    a.item_voxels = N;
    a.num_regions = R;
    a.values = pass == 0 ? static_cast<void*>(vf.data()) : static_cast<void*>(vd.data());
    a.argmax = argmax.data();
    a.scratch = scratch.data();
    a.ok = &ok;
    CHECK(launch_region_max(a, nullptr) == 0, "launch");
    CHECK(ok == 1, "ok flag");
    for (long long c = 0; c < B * R; ++c) {
      CHECK(argmax[c] == ref_arg[c], "pass %d region %lld: argmax %lld, expected %lld (first maximum)", pass, c, argmax[c],
            ref_arg[c]);
      const double v = pass == 0 ? vf[c] : vd[c];
      CHECK(v == ref_val[c], "pass %d region %lld: value %g, expected %g", pass, c, v, ref_val[c]);
    }
  }
  if (check_topk_and_backward(lab, x, B, N, R) != 0) return 1;
  std::printf("ok\n");
  return 0;
}

#elif defined(LC_HARNESS_POISSON_BINOMIAL)
#include "cuda/poisson_binomial_launch.h"

int main() {
  using namespace lesioncount::cuda;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const long long B = 3, K = 300;
  std::vector<double> p(B * K);
  for (double& v : p) v = u(rng);
  for (long long M : {5LL, 40LL, 300LL}) {  // split kernel, block kernel, M = K
    std::vector<double> out(B * (M + 1)), ref(B * (M + 1));
    for (long long b = 0; b < B; ++b) {  // sequential truncated DP, float64
      std::vector<double> f(M + 1, 0.0);
      f[0] = 1.0;
      for (long long k = 0; k < K; ++k) {
        const double a = p[b * K + k], q = 1.0 - a;
        if (M == 0) continue;
        f[M] = f[M] + a * f[M - 1];
        for (long long j = M - 1; j >= 1; --j) f[j] = q * f[j] + a * f[j - 1];
        f[0] = q * f[0];
      }
      for (long long j = 0; j <= M; ++j) ref[b * (M + 1) + j] = f[j];
    }
    const PbPlan plan = pb_plan(B, K, M, false);
    std::vector<double> scratch(plan.scratch_doubles + 1);
    unsigned char ok = 1;
    PoissonBinomialArgs a{};
    a.probs = p.data();
    a.kind = DType::kDouble;
    a.batch = B;
    a.K = K;
    a.M = M;
    a.out = out.data();
    a.scratch = scratch.data();
    a.ok = &ok;
    CHECK(launch_poisson_binomial(a, nullptr) == 0, "launch M=%lld", M);
    CHECK(ok == 1, "ok flag");
    for (size_t i = 0; i < out.size(); ++i)
      CHECK(std::fabs(out[i] - ref[i]) <= 1e-12 + 1e-10 * std::fabs(ref[i]), "M=%lld bin %zu: %.17g vs %.17g", M, i,
            out[i], ref[i]);
  }
  std::printf("ok\n");
  return 0;
}

#elif defined(LC_HARNESS_LABEL)
#include "cuda/label_launch.h"

// Reference: breadth-first flood fill started at each unlabelled foreground voxel in raster order,
// which numbers components exactly like scipy.ndimage.label.
static std::vector<int32_t> reference_labels(const std::vector<uint8_t>& fg, int D, int H, int W, int conn, int64_t* num) {
  std::vector<int32_t> lab(fg.size(), 0);
  int32_t next = 0;
  std::vector<int64_t> queue;
  for (int64_t s = 0; s < static_cast<int64_t>(fg.size()); ++s) {
    if (!fg[s] || lab[s]) continue;
    lab[s] = ++next;
    queue.assign(1, s);
    for (size_t qi = 0; qi < queue.size(); ++qi) {
      const int64_t v = queue[qi];
      const int z = static_cast<int>(v / (H * W)), y = static_cast<int>(v / W % H), x = static_cast<int>(v % W);
      for (int dz = -1; dz <= 1; ++dz)
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx) {
            const int m = std::abs(dz) + std::abs(dy) + std::abs(dx);
            if (m == 0 || (conn == 6 && m > 1) || (conn == 18 && m > 2)) continue;
            const int nz = z + dz, ny = y + dy, nx = x + dx;
            if (nz < 0 || nz >= D || ny < 0 || ny >= H || nx < 0 || nx >= W) continue;
            const int64_t nv = (int64_t(nz) * H + ny) * W + nx;
            if (fg[nv] && !lab[nv]) {
              lab[nv] = next;
              queue.push_back(nv);
            }
          }
    }
  }
  *num = next;
  return lab;
}

int main() {
  using namespace lesioncount::cuda;
  std::mt19937 rng(11);
  // many rows per item so that the root bitmap spans several scan warps and tiles
  const int B = 2, D = 23, H = 61, W = 67;
  const int64_t n = int64_t(D) * H * W;
  std::vector<float> x(B * n);
  for (float& v : x) v = static_cast<float>(rng() % 1000) / 1000.0f;
  for (int conn : {6, 18, 26}) {
    LabelShape s{B, D, H, W, conn, 0};
    std::vector<int32_t> labels(B * n);
    std::vector<int64_t> num(B);
    std::vector<char> ws(label_workspace_bytes(s));
    LabelArgs args{s, x.data(), DType::kFloat, 0.5, labels.data(), num.data(), ws.data(), ws.size(), nullptr};
    CHECK(launch_label(args, nullptr) == 0, "launch");
    for (int b = 0; b < B; ++b) {
      std::vector<uint8_t> fg(n);
      for (int64_t i = 0; i < n; ++i) fg[i] = x[b * n + i] > 0.5f;
      int64_t ref_num = 0;
      const std::vector<int32_t> ref = reference_labels(fg, D, H, W, conn, &ref_num);
      CHECK(num[b] == ref_num, "conn %d item %d: %lld components, expected %lld", conn, b, (long long)num[b],
            (long long)ref_num);
      for (int64_t i = 0; i < n; ++i)
        CHECK(labels[b * n + i] == ref[i], "conn %d item %d voxel %lld: label %d, expected %d", conn, b, (long long)i,
              labels[b * n + i], ref[i]);
    }
    // check_probabilities: the first pass clears the in-range byte on a value outside [0, 1] only
    std::vector<int32_t> again(B * n);
    uint8_t in_range = 7;
    args.labels = again.data();
    args.in_range = &in_range;
    CHECK(launch_label(args, nullptr) == 0 && in_range == 1 && again == labels,
          "conn %d: in-range input flagged (%d) or labelled differently", conn, in_range);
    std::vector<float> bad(x);
    bad[B * n - 1] = 1.0f + 1.0f / 8388608.0f;
    args.input = bad.data();
    CHECK(launch_label(args, nullptr) == 0 && in_range == 0,
          "conn %d: a value above 1 not flagged", conn);
  }
  std::printf("ok\n");
  return 0;
}
#else
#error "define one of LC_HARNESS_SELFTEST, LC_HARNESS_REGION_MAX, LC_HARNESS_POISSON_BINOMIAL, LC_HARNESS_LABEL"
#endif
