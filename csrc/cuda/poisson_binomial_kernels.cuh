// The kernels of the CUDA Poisson-binomial pmf and their typed launchers, included by the four
// per-dtype translation units poisson_binomial_{half,bfloat16,float,double}.cu (each instantiates ~20
// kernels for its dtype, so nvcc compiles the four in parallel instead of ~80 kernels in one unit)
// and by nothing else; poisson_binomial.cu holds the dtype dispatch. Everything here is in an
// anonymous namespace: each unit has its own copy of what it instantiates.
//
// Truncated Poisson-binomial pmf, forward and backward, linear and log space (pure CUDA: no
// torch headers; see poisson_binomial_cuda.cpp). The kernels and their launch plan are described
// in poisson_binomial_launch.h. Accumulation is float64 (or float64 log space) for every input
// dtype; the per-element DP formulas are those of common/poisson_binomial_dp.h and of the CPU
// kernel, with products and sums rounded separately (__dmul_rn/__dadd_rn, no FMA contraction) so
// that the linear-space block kernel reproduces the CPU's float64 arithmetic operation for
// operation. The split kernel multiplies chunk pmfs in a different order than the CPU's sequential
// DP (all terms non-negative, so it agrees to a few ulps); log space uses CUDA's exp/log1p.
//
// Invalid inputs (NaN; without from_logits, p outside [0, 1]) are treated as p = 0 and clear the
// `ok` byte; the torch launcher turns it into an asynchronous device assertion.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/poisson_binomial_dp.h"
#include "cuda/kernel_launch.h"
#include "cuda/poisson_binomial_launch.h"

namespace lesioncount {
namespace cuda {
namespace {

using pb::log_add;
using pb::neg_inf;
using pb::SignedLog;
using pb::signed_log_add;

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }
__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(double v) { return v; }

// double -> output dtype the way at::Tensor::to does on the CPU (half/bfloat16 via float).
__device__ __forceinline__ void store(__half* p, double v) { *p = __float2half_rn(static_cast<float>(v)); }
__device__ __forceinline__ void store(__nv_bfloat16* p, double v) { *p = __float2bfloat16_rn(static_cast<float>(v)); }
__device__ __forceinline__ void store(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }

// Per-candidate factors: (p, q) in linear space, (log p, log q) in log space; lpq = log p + log q
// (only meaningful with from_logits). An invalid input clears *ok and acts as p = 0.
struct Factors {
  double a, b, lpq;
};

template <bool LOG>
__device__ __forceinline__ Factors make_factors(double v, bool from_logits, unsigned char* ok) {
  const bool bad = v != v || (!from_logits && !(v >= 0.0 && v <= 1.0));
  if (bad) {
    *ok = 0;
    return LOG ? Factors{neg_inf(), 0.0, neg_inf()} : Factors{0.0, 1.0, neg_inf()};
  }
  if (from_logits) {
    const double lp = pb::log_sigmoid(v), lq = pb::log_sigmoid(-v);
    if (LOG) return {lp, lq, lp + lq};
    return {exp(lp), exp(lq), lp + lq};
  }
  if (LOG) {
    const double lp = log(v), lq = log1p(-v);
    return {lp, lq, lp + lq};
  }
  return {v, sub(1.0, v), 0.0};
}

__device__ __forceinline__ SignedLog normalized(double lm, int sign) {
  return {lm, lm == neg_inf() ? 0 : sign};
}

// term(a, lf) = a * exp(lf) for a signed-log adjoint, as in the CPU kernel.
__device__ __forceinline__ double term(SignedLog a, double log_factor) {
  return a.sign == 0 ? 0.0 : a.sign * exp(a.log_magnitude + log_factor);
}

// Initial log-space adjoint dL/dF = g / F of the final state, as (sign, log|.|) (CPU semantics).
__device__ __forceinline__ SignedLog initial_log_adjoint(double g, double lf) {
  if (g != g) return {g, 1};
  if (g == 0.0 || lf == neg_inf()) return {neg_inf(), 0};
  return {log(fabs(g)) - lf, g > 0 ? 1 : -1};
}

// ================================ split kernel (M + 1 <= 16) ================================

// A candidate whose step is not the identity: a valid p != 0 (a logit other than -inf). Invalid
// inputs act as p = 0 (make_factors), an exact identity step in both spaces (q = 1, log q = 0), as
// is p = 0 itself, so skipping them changes no bit. Decided on the raw value, so that both passes
// of the split forward agree without computing the factors twice; clears *ok on invalid input.
__device__ __forceinline__ bool active_candidate(double v, bool from_logits, unsigned char* ok) {
  if (from_logits) {
    if (v != v) *ok = 0;
    return v == v && v != neg_inf();
  }
  if (!(v >= 0.0 && v <= 1.0)) *ok = 0;
  return v > 0.0 && v <= 1.0;
}

template <int NB, bool LOG>
__device__ __forceinline__ void init_state(double (&f)[NB]) {
#pragma unroll
  for (int j = 0; j < NB; ++j) f[j] = LOG ? neg_inf() : 0.0;
  f[0] = LOG ? 0.0 : 1.0;
}

// One candidate, in place (bins above M stay zero).
template <int NB, bool LOG>
__device__ __forceinline__ void step(double (&f)[NB], int M, double a, double b) {
#pragma unroll
  for (int j = NB - 1; j >= 1; --j) {
    if (LOG) {
      if (j < M) f[j] = log_add(f[j] + b, f[j - 1] + a);
      else if (j == M) f[j] = log_add(f[j], f[j - 1] + a);
    } else {
      if (j < M) f[j] = add(mul(b, f[j]), mul(a, f[j - 1]));
      else if (j == M) f[j] = add(f[j], mul(a, f[j - 1]));
    }
  }
  if (M > 0) f[0] = LOG ? f[0] + b : mul(b, f[0]);
}

// H = P * Q truncated to bins 0..M-1 and the tail M (sums of P[a] Q[b] over a + b >= M). The
// arrays are in local memory: this runs O(log 32) times per item, not per candidate.
template <bool LOG>
__device__ __noinline__ void conv_local(const double* P, const double* Q, double* H, int M, int NB) {
  for (int j = 0; j < NB; ++j) H[j] = LOG ? neg_inf() : 0.0;
  for (int a = 0; a <= M; ++a) {
    for (int b = 0; b <= M; ++b) {
      const int s = a + b < M ? a + b : M;
      if (LOG) H[s] = log_add(H[s], P[a] + Q[b]);
      else H[s] = add(H[s], mul(P[a], Q[b]));
    }
  }
}

template <int NB, bool LOG>
__device__ __forceinline__ void conv(double (&P)[NB], const double (&Q)[NB], int M) {
  double lp[NB], lq[NB], lh[NB];
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    lp[j] = P[j];
    lq[j] = Q[j];
  }
  conv_local<LOG>(lp, lq, lh, M, NB);
#pragma unroll
  for (int j = 0; j < NB; ++j) P[j] = lh[j];
}

template <int NB>
__device__ __forceinline__ void shfl_down_all(const double (&f)[NB], double (&o)[NB], int d) {
#pragma unroll
  for (int j = 0; j < NB; ++j) o[j] = __shfl_down_sync(kFull, f[j], d);
}
template <int NB>
__device__ __forceinline__ void shfl_up_all(const double (&f)[NB], double (&o)[NB], int d) {
#pragma unroll
  for (int j = 0; j < NB; ++j) o[j] = __shfl_up_sync(kFull, f[j], d);
}

template <typename T, int NB, bool LOG>
__global__ void __launch_bounds__(32 * kPbSplitWarpsPerBlock)
    pb_split_forward(const T* __restrict__ x, long long B, long long K, int M, bool from_logits,
                     T* __restrict__ out, unsigned char* ok) {
  const int lane = threadIdx.x & 31;
  const long long warp = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  const long long nwarps = (long long)gridDim.x * (blockDim.x >> 5);
  const long long chunk = (K + 31) / 32;
  for (long long item = warp; item < B; item += nwarps) {
    const T* xi = x + item * K;
    const long long k0 = min(K, lane * chunk), k1 = min(K, k0 + chunk);
    // Zero padding must be exact: a p = 0 candidate is an exact identity step, but where the
    // candidates sit decides the grouping of the chunk products (and so the rounding). Chunks are
    // therefore cut over the active (p != 0) candidates only: count them per raw chunk, scan the
    // counts across the warp, and let lane l take active ranks [l * e, (l + 1) * e).
    long long active = 0;
    for (long long k = k0; k < k1; ++k) active += active_candidate(to_double(xi[k]), from_logits, ok);
    long long first_rank = active;  // inclusive scan, then exclusive
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const long long y = __shfl_up_sync(kFull, first_rank, d);
      if (lane >= d) first_rank += y;
    }
    const long long total_active = __shfl_sync(kFull, first_rank, 31);
    first_rank -= active;
    const long long e = (total_active + 31) / 32;
    const long long want_begin = min(total_active, lane * e), want_end = min(total_active, want_begin + e);
    int start_chunk = 0;  // the raw chunk holding active rank want_begin: the last with first_rank <= it
    for (int src = 0; src < 32; ++src) {
      const long long r = __shfl_sync(kFull, first_rank, src);
      if (r <= want_begin) start_chunk = src;
    }
    double f[NB];
    init_state<NB, LOG>(f);
    long long rank = __shfl_sync(kFull, first_rank, start_chunk);
    for (long long k = min(K, start_chunk * chunk); k < K && rank < want_end; ++k) {
      unsigned char unused = 1;  // invalid inputs were reported by the counting pass
      const double v = to_double(xi[k]);
      if (!active_candidate(v, from_logits, &unused)) continue;
      if (rank >= want_begin) {
        const Factors c = make_factors<LOG>(v, from_logits, &unused);
        step<NB, LOG>(f, M, c.a, c.b);
      }
      ++rank;
    }
    for (int d = 1; d < 32; d <<= 1) {
      double o[NB];
      shfl_down_all<NB>(f, o, d);
      if ((lane & (2 * d - 1)) == 0) conv<NB, LOG>(f, o, M);
    }
    if (lane == 0) {
      T* oi = out + item * (M + 1);
#pragma unroll
      for (int j = 0; j < NB; ++j)
        if (j <= M) store(oi + j, f[j]);
    }
  }
}

// Adjoint of one chunk's pmf P from the adjoint G of the total T = trunc(P * R):
//   A[a] = sum_{a <= j < M} G[j] R[j - a] + G[M] sum_{M - a <= b <= M} R[b].
__device__ __noinline__ void chunk_adjoint_linear(const double* G, const double* R, double* A, int M, int NB) {
  for (int a = 0; a < NB; ++a) {
    double s = 0.0;
    if (a <= M) {
      for (int j = a; j < M; ++j) s = add(s, mul(G[j], R[j - a]));
      double tail = 0.0;
      for (int b = M - a; b <= M; ++b) tail = add(tail, R[b]);
      s = add(s, mul(G[M], tail));
    }
    A[a] = s;
  }
}

__device__ __noinline__ void chunk_adjoint_log(const double* Glm, const int* Gs, const double* R, double* Alm,
                                               int* As, int M, int NB) {
  for (int a = 0; a < NB; ++a) {
    SignedLog s{neg_inf(), 0};
    if (a <= M) {
      for (int j = a; j < M; ++j) s = signed_log_add(s, normalized(Glm[j] + R[j - a], Gs[j]));
      double tail = neg_inf();
      for (int b = M - a; b <= M; ++b) tail = log_add(tail, R[b]);
      s = signed_log_add(s, normalized(Glm[M] + tail, Gs[M]));
    }
    Alm[a] = s.log_magnitude;
    As[a] = s.sign;
  }
}

template <typename T, int NB, bool LOG>
__global__ void __launch_bounds__(32 * kPbSplitWarpsPerBlock)
    pb_split_backward(const T* __restrict__ x, const double* __restrict__ grad, long long B, long long K, int M,
                      bool from_logits, long long S, long long nckpt, double* __restrict__ scratch,
                      T* __restrict__ gx, unsigned char* ok) {
  const int lane = threadIdx.x & 31;
  const long long warp = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  const long long nwarps = (long long)gridDim.x * (blockDim.x >> 5);
  const long long chunk = (K + 31) / 32;
  // this warp's rows: [0, nckpt) checkpoints, [nckpt, nckpt + S) the recomputed segment;
  // element (row, bin) of this lane at ((row * NB + bin) * 32 + lane): coalesced across lanes
  double* sw = scratch + warp * 32LL * (nckpt + S) * NB;
  auto cell = [&](long long row, int j) -> double& { return sw[(row * NB + j) * 32 + lane]; };
  for (long long item = warp; item < B; item += nwarps) {
    const T* xi = x + item * K;
    T* gi = gx + item * K;
    const long long k0 = min(K, lane * chunk), k1 = min(K, k0 + chunk);
    if (M == 0) {  // P(C >= 0) = 1 does not depend on the candidates
      for (long long k = k0; k < k1; ++k) {
        make_factors<LOG>(to_double(xi[k]), from_logits, ok);
        store(gi + k, 0.0);
      }
      continue;
    }
    // 1. chunk DP with checkpoints every S candidates
    double f[NB];
    init_state<NB, LOG>(f);
    for (long long k = k0; k < k1; ++k) {
      if ((k - k0) % S == 0) {
#pragma unroll
        for (int j = 0; j < NB; ++j) cell((k - k0) / S, j) = f[j];
      }
      const Factors c = make_factors<LOG>(to_double(xi[k]), from_logits, ok);
      step<NB, LOG>(f, M, c.a, c.b);
    }
    // 2. products of the other chunks: exclusive prefix and suffix scans across lanes
    double pre[NB], suf[NB], o[NB], E[NB], R[NB], total[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) pre[j] = suf[j] = f[j];
    for (int d = 1; d < 32; d <<= 1) {
      shfl_up_all<NB>(pre, o, d);
      if (lane >= d) conv<NB, LOG>(pre, o, M);
      shfl_down_all<NB>(suf, o, d);
      if (lane + d < 32) conv<NB, LOG>(suf, o, M);
    }
#pragma unroll
    for (int j = 0; j < NB; ++j) total[j] = __shfl_sync(kFull, pre[j], 31);
    shfl_up_all<NB>(pre, E, 1);
    shfl_down_all<NB>(suf, R, 1);
    if (lane == 0) init_state<NB, LOG>(E);
    if (lane == 31) init_state<NB, LOG>(R);
    conv<NB, LOG>(R, E, M);
    // 3. adjoint of this chunk's pmf, then 4. reverse DP over the chunk
    const double* gr = grad + item * (M + 1);
    double alm[NB];
    int as[NB];
    {
      double Rl[NB], Gl[NB], Al[NB];
      int Gs[NB], Asl[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        Rl[j] = R[j];
        const double g = j <= M ? gr[j] : 0.0;
        if (LOG) {
          const SignedLog s = j <= M ? initial_log_adjoint(g, total[j]) : SignedLog{neg_inf(), 0};
          Gl[j] = s.log_magnitude;
          Gs[j] = s.sign;
        } else {
          Gl[j] = g;
          Gs[j] = 0;
        }
      }
      if (LOG) chunk_adjoint_log(Gl, Gs, Rl, Al, Asl, M, NB);
      else chunk_adjoint_linear(Gl, Rl, Al, M, NB);
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        alm[j] = Al[j];
        as[j] = LOG ? Asl[j] : 0;
      }
    }
    const long long n = k1 - k0;
    const long long nseg = (n + S - 1) / S;
    for (long long s = nseg - 1; s >= 0; --s) {
      const long long kk0 = k0 + s * S, kk1 = min(k1, kk0 + S);
      double st[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) st[j] = cell(s, j);
      for (long long k = kk0; k < kk1; ++k) {
#pragma unroll
        for (int j = 0; j < NB; ++j) cell(nckpt + (k - kk0), j) = st[j];
        if (k + 1 < kk1) {
          const Factors c = make_factors<LOG>(to_double(xi[k]), from_logits, ok);
          step<NB, LOG>(st, M, c.a, c.b);
        }
      }
      for (long long k = kk1 - 1; k >= kk0; --k) {
        double fr[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j) fr[j] = cell(nckpt + (k - kk0), j);
        const Factors c = make_factors<LOG>(to_double(xi[k]), from_logits, ok);
        const long long added = k - k0;  // candidates before k in this chunk's DP
        const long long upto = min(min(added, (long long)M) + 1, (long long)M - 1);
        double g = 0.0;
        if (!LOG) {
          double aM = 0.0, fMm1 = 0.0;
#pragma unroll
          for (int j = 1; j < NB; ++j)
            if (j == M) {
              aM = alm[j];
              fMm1 = fr[j - 1];
            }
          g = sub(mul(aM, fMm1), mul(alm[0], fr[0]));
#pragma unroll
          for (int j = 1; j < NB; ++j)
            if (j <= upto) g = add(g, mul(alm[j], sub(fr[j - 1], fr[j])));
          if (from_logits) g = mul(mul(g, c.a), c.b);
          // adjoint update a[j] = q a[j] + p a[j+1] (j < M)
#pragma unroll
          for (int j = 0; j + 1 < NB; ++j)
            if (j < M) alm[j] = add(mul(c.b, alm[j]), mul(c.a, alm[j + 1]));
        } else {
          const double extra = from_logits ? c.lpq : 0.0;
          SignedLog aM{neg_inf(), 0};
          double fMm1 = neg_inf();
#pragma unroll
          for (int j = 1; j < NB; ++j)
            if (j == M) {
              aM = {alm[j], as[j]};
              fMm1 = fr[j - 1];
            }
          g = term(aM, fMm1 + extra) - term({alm[0], as[0]}, fr[0] + extra);
#pragma unroll
          for (int j = 1; j < NB; ++j)
            if (j <= upto) {
              const SignedLog aj{alm[j], as[j]};
              g += term(aj, fr[j - 1] + extra) - term(aj, fr[j] + extra);
            }
#pragma unroll
          for (int j = 0; j + 1 < NB; ++j)
            if (j < M) {
              SignedLog u{alm[j] + c.b, as[j]};
              SignedLog v{alm[j + 1] + c.a, as[j + 1]};
              if (u.log_magnitude == neg_inf()) u.sign = 0;
              if (v.log_magnitude == neg_inf()) v.sign = 0;
              const SignedLog r = signed_log_add(u, v);
              alm[j] = r.log_magnitude;
              as[j] = r.sign;
            }
        }
        store(gi + k, g);
      }
    }
  }
}

// ================================== block kernel (any M) ==================================

template <bool LOG>
__device__ __forceinline__ double bin_step(const double* src, long long j, long long M, double a, double b) {
  if (M == 0) return src[0];
  if (j == M) return LOG ? log_add(src[M], src[M - 1] + a) : add(src[M], mul(a, src[M - 1]));
  if (j == 0) return LOG ? src[0] + b : mul(b, src[0]);
  return LOG ? log_add(src[j] + b, src[j - 1] + a) : add(mul(b, src[j]), mul(a, src[j - 1]));
}

// Per-block scratch: factors a, b, lpq (3K), then (when not in shared memory) the double buffer.
template <typename T, bool LOG>
__device__ void block_factors(const T* xi, long long K, bool from_logits, double* fa, double* fb, double* fl,
                              unsigned char* ok) {
  for (long long k = threadIdx.x; k < K; k += blockDim.x) {
    const Factors c = make_factors<LOG>(to_double(xi[k]), from_logits, ok);
    fa[k] = c.a;
    fb[k] = c.b;
    fl[k] = c.lpq;
  }
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(kPbBlockThreads)
    pb_block_forward(const T* __restrict__ x, long long B, long long K, long long M, bool from_logits,
                     bool smem_state, long long per_block, double* __restrict__ scratch, T* __restrict__ out,
                     unsigned char* ok) {
  LC_DYNAMIC_SHARED_MEMORY(double, smem);
  const long long W = M + 1;
  double* my = scratch + blockIdx.x * per_block;
  double *fa = my, *fb = my + K, *fl = my + 2 * K;
  double* st = smem_state ? smem + 2 * (kPbBlockThreads / 32) : my + 3 * K;
  for (long long item = blockIdx.x; item < B; item += gridDim.x) {
    block_factors<T, LOG>(x + item * K, K, from_logits, fa, fb, fl, ok);
    for (long long j = threadIdx.x; j < W; j += blockDim.x) st[j] = j == 0 ? (LOG ? 0.0 : 1.0) : (LOG ? neg_inf() : 0.0);
    __syncthreads();
    int cur = 0;
    for (long long k = 0; k < K; ++k) {
      const double a = fa[k], b = fb[k];
      const double* src = st + cur * W;
      double* dst = st + (1 - cur) * W;
      for (long long j = threadIdx.x; j < W; j += blockDim.x) dst[j] = bin_step<LOG>(src, j, M, a, b);
      __syncthreads();
      cur ^= 1;
    }
    for (long long j = threadIdx.x; j < W; j += blockDim.x) store(out + item * W + j, st[cur * W + j]);
    __syncthreads();
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(kPbBlockThreads)
    pb_block_backward(const T* __restrict__ x, const double* __restrict__ grad, long long B, long long K,
                      long long M, bool from_logits, long long S, long long nckpt, bool smem_state,
                      long long per_block, double* __restrict__ scratch, T* __restrict__ gx, unsigned char* ok) {
  LC_DYNAMIC_SHARED_MEMORY(double, smem);
  const long long W = M + 1;
  const int nw = kPbBlockThreads / 32;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  double* red = smem;  // 2 * nw partial sums (double-buffered by candidate parity)
  double* my = scratch + blockIdx.x * per_block;
  double *fa = my, *fb = my + K, *fl = my + 2 * K;
  double* buf = smem_state ? smem + 2 * nw : my + 3 * K;  // 2W doubles, then 2W int8 signs
  signed char* sgn = reinterpret_cast<signed char*>(buf + 2 * W);
  double* ckpt = my + 3 * K + (smem_state ? 0 : pb_ceil_div(2 * W * 8 + 2 * W, 8));
  double* seg = ckpt + nckpt * W;
  for (long long item = blockIdx.x; item < B; item += gridDim.x) {
    const T* xi = x + item * K;
    T* gi = gx + item * K;
    block_factors<T, LOG>(xi, K, from_logits, fa, fb, fl, ok);
    if (M == 0) {
      for (long long k = threadIdx.x; k < K; k += blockDim.x) store(gi + k, 0.0);
      __syncthreads();
      continue;
    }
    // forward with checkpoints
    for (long long j = threadIdx.x; j < W; j += blockDim.x) buf[j] = j == 0 ? (LOG ? 0.0 : 1.0) : (LOG ? neg_inf() : 0.0);
    __syncthreads();
    int cur = 0;
    for (long long k = 0; k < K; ++k) {
      const double* src = buf + cur * W;
      double* dst = buf + (1 - cur) * W;
      if (k % S == 0)
        for (long long j = threadIdx.x; j < W; j += blockDim.x) ckpt[(k / S) * W + j] = src[j];
      const double a = fa[k], b = fb[k];
      for (long long j = threadIdx.x; j < W; j += blockDim.x) dst[j] = bin_step<LOG>(src, j, M, a, b);
      __syncthreads();
      cur ^= 1;
    }
    // initial adjoint (in place of the final state): g (linear) or g / F as (sign, log|.|)
    double* av = buf + cur * W;
    signed char* as = sgn + cur * W;
    for (long long j = threadIdx.x; j < W; j += blockDim.x) {
      const double g = grad[item * W + j];
      if (LOG) {
        const SignedLog s = initial_log_adjoint(g, av[j]);
        av[j] = s.log_magnitude;
        as[j] = static_cast<signed char>(s.sign);
      } else {
        av[j] = g;
      }
    }
    __syncthreads();
    for (long long s = nckpt - 1; s >= 0; --s) {
      const long long kk0 = s * S, kk1 = min(K, kk0 + S);
      for (long long j = threadIdx.x; j < W; j += blockDim.x) seg[j] = ckpt[s * W + j];
      __syncthreads();
      for (long long k = kk0 + 1; k < kk1; ++k) {
        const double* src = seg + (k - 1 - kk0) * W;
        double* dst = seg + (k - kk0) * W;
        const double a = fa[k - 1], b = fb[k - 1];
        for (long long j = threadIdx.x; j < W; j += blockDim.x) dst[j] = bin_step<LOG>(src, j, M, a, b);
        __syncthreads();
      }
      for (long long k = kk1 - 1; k >= kk0; --k) {
        const double* f = seg + (k - kk0) * W;
        const double p = fa[k], q = fb[k];
        const double extra = from_logits ? fl[k] : 0.0;
        const long long upto = min(min(k, M) + 1, M - 1);
        const double* a_cur = buf + cur * W;
        double* a_nxt = buf + (1 - cur) * W;
        const signed char* s_cur = sgn + cur * W;
        signed char* s_nxt = sgn + (1 - cur) * W;
        double part = 0.0;
        for (long long j = threadIdx.x; j < W; j += blockDim.x) {
          if (!LOG) {
            const double aj = a_cur[j];
            if (j == M) part = add(part, mul(aj, f[M - 1]));
            else if (j == 0) part = sub(part, mul(aj, f[0]));
            else if (j <= upto) part = add(part, mul(aj, sub(f[j - 1], f[j])));
            a_nxt[j] = j < M ? add(mul(q, aj), mul(p, a_cur[j + 1])) : aj;
          } else {
            const SignedLog aj{a_cur[j], s_cur[j]};
            if (j == M) part += term(aj, f[M - 1] + extra);
            else if (j == 0) part -= term(aj, f[0] + extra);
            else if (j <= upto) part += term(aj, f[j - 1] + extra) - term(aj, f[j] + extra);
            if (j < M) {
              SignedLog u{aj.log_magnitude + q, aj.sign};
              SignedLog v{a_cur[j + 1] + p, s_cur[j + 1]};
              if (u.log_magnitude == neg_inf()) u.sign = 0;
              if (v.log_magnitude == neg_inf()) v.sign = 0;
              const SignedLog r = signed_log_add(u, v);
              a_nxt[j] = r.log_magnitude;
              s_nxt[j] = static_cast<signed char>(r.sign);
            } else {
              a_nxt[j] = aj.log_magnitude;
              s_nxt[j] = static_cast<signed char>(aj.sign);
            }
          }
        }
        part = warp_sum(part);
        if (lane == 0) red[(k & 1) * nw + wid] = part;
        __syncthreads();
        if (threadIdx.x == 0) {
          double g = 0.0;
          for (int w = 0; w < nw; ++w) g += red[(k & 1) * nw + w];
          if (!LOG && from_logits) g = mul(mul(g, p), q);
          store(gi + k, g);
        }
        cur ^= 1;
      }
    }
    __syncthreads();
  }
}

// ======================================== dispatch ========================================

template <typename T, bool LOG>
cudaError_t launch_forward_typed(const PoissonBinomialArgs& a, cudaStream_t stream) {
  const PbPlan p = pb_plan(a.batch, a.K, a.M, false);
  const T* x = static_cast<const T*>(a.probs);
  T* out = static_cast<T*>(a.out);
  const int M = static_cast<int>(a.M);
  if (p.split) {
    const unsigned grid = static_cast<unsigned>(p.blocks);
    switch (p.bins) {
      case 2:
        return launch_kernel(pb_split_forward<T, 2, LOG>, grid, p.threads, 0, stream, x, a.batch, a.K, M,
                             a.from_logits, out, a.ok);
      case 4:
        return launch_kernel(pb_split_forward<T, 4, LOG>, grid, p.threads, 0, stream, x, a.batch, a.K, M,
                             a.from_logits, out, a.ok);
      case 8:
        return launch_kernel(pb_split_forward<T, 8, LOG>, grid, p.threads, 0, stream, x, a.batch, a.K, M,
                             a.from_logits, out, a.ok);
      default:
        return launch_kernel(pb_split_forward<T, 16, LOG>, grid, p.threads, 0, stream, x, a.batch, a.K, M,
                             a.from_logits, out, a.ok);
    }
  }
  return launch_kernel(pb_block_forward<T, LOG>, static_cast<unsigned>(p.blocks), p.threads,
                       static_cast<size_t>(p.smem_bytes), stream, x, a.batch, a.K, a.M, a.from_logits, p.smem_state,
                       p.scratch_per_unit, a.scratch, out, a.ok);
}

template <typename T, bool LOG>
cudaError_t launch_backward_typed(const PoissonBinomialArgs& a, cudaStream_t stream) {
  const PbPlan p = pb_plan(a.batch, a.K, a.M, true);
  const T* x = static_cast<const T*>(a.probs);
  T* out = static_cast<T*>(a.out);
  const int M = static_cast<int>(a.M);
  if (p.split) {
    const unsigned grid = static_cast<unsigned>(p.blocks);
#define LC_SPLIT_BWD(NB)                                                                                 \
  launch_kernel(pb_split_backward<T, NB, LOG>, grid, p.threads, 0, stream, x, a.grad, a.batch, a.K, M, \
                a.from_logits, p.seg_len, p.num_ckpt, a.scratch, out, a.ok)
    switch (p.bins) {
      case 2: return LC_SPLIT_BWD(2);
      case 4: return LC_SPLIT_BWD(4);
      case 8: return LC_SPLIT_BWD(8);
      default: return LC_SPLIT_BWD(16);
    }
#undef LC_SPLIT_BWD
  }
  return launch_kernel(pb_block_backward<T, LOG>, static_cast<unsigned>(p.blocks), p.threads,
                       static_cast<size_t>(p.smem_bytes), stream, x, a.grad, a.batch, a.K, a.M, a.from_logits,
                       p.seg_len, p.num_ckpt, p.smem_state, p.scratch_per_unit, a.scratch, out, a.ok);
}

template <bool BACKWARD, typename T>
cudaError_t launch_mode(const PoissonBinomialArgs& a, cudaStream_t stream) {
  if (BACKWARD) return a.log_space ? launch_backward_typed<T, true>(a, stream) : launch_backward_typed<T, false>(a, stream);
  return a.log_space ? launch_forward_typed<T, true>(a, stream) : launch_forward_typed<T, false>(a, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace lesioncount

// The one definition each per-dtype unit poisson_binomial_<NAME>.cu makes: its entry point
// launch_pb_<NAME> (declared in poisson_binomial_launch.h), instantiating every kernel for T.
#define LC_DEFINE_PB_LAUNCH(NAME, T)                                                                 \
  namespace lesioncount {                                                                            \
  namespace cuda {                                                                                   \
  cudaError_t launch_pb_##NAME(const PoissonBinomialArgs& a, bool backward, cudaStream_t stream) {                        \
    return backward ? launch_mode<true, T>(a, stream) : launch_mode<false, T>(a, stream);            \
  }                                                                                                  \
  }                                                                                                  \
  }
