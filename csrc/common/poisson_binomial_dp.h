// The truncated Poisson-binomial dynamic program, shared by the CPU and CUDA kernels.
//
// f holds M+1 bins: f[j] = P(C = j) for j < M and the tail bin f[M] = P(C >= M), for the count C of
// the candidates added so far. Adding a candidate with success probability p (q = 1 - p):
//     f'[j] = q f[j] + p f[j-1]     (0 <= j < M, f[-1] = 0)
//     f'[M] = f[M] + p f[M-1]       (the tail never leaves)
// Updating from the top bin down lets the update run in place. In log space the same recursion uses
// logaddexp, which stays exact where the linear pmf underflows (e.g. 400 candidates at p = 0.999:
// log P(C = 0) = 400 log(0.001)).
//
// Reverse mode (the backward pass) runs the recursion's adjoint: with a = dL/df' and f the state
// before candidate k,
//     dL/dp_k = sum_{j<M} a[j] (f[j-1] - f[j]) + a[M] f[M-1]
//     (dL/df)[j] = q a[j] + p a[j+1]  (j < M),   (dL/df)[M] = a[M].
// In log space the adjoint is signed, so it is stored as (sign, log|a|) pairs.
#pragma once

#include <cmath>
#include <limits>

#include "common/connectivity.h"  // LC_HOST_DEVICE

namespace lesioncount {
namespace pb {

// -infinity without std::numeric_limits (not a __device__ function without --expt-relaxed-constexpr).
LC_HOST_DEVICE inline double neg_inf() { return -__builtin_huge_val(); }

// log(exp(a) + exp(b)) without overflow; -inf + -inf = -inf.
LC_HOST_DEVICE inline double log_add(double a, double b) {
  const double hi = a > b ? a : b;
  const double lo = a > b ? b : a;
  if (hi == neg_inf()) return hi;
  return hi + log1p(exp(lo - hi));
}

// log(sigmoid(z)) = -softplus(-z), exact for large |z|.
LC_HOST_DEVICE inline double log_sigmoid(double z) {
  return z >= 0 ? -log1p(exp(-z)) : z - log1p(exp(z));
}

// A signed number stored as sign * exp(log_magnitude); sign 0 is zero.
struct SignedLog {
  double log_magnitude;
  int sign;
};

LC_HOST_DEVICE inline SignedLog signed_log_add(SignedLog x, SignedLog y) {
  if (x.sign == 0) return y;
  if (y.sign == 0) return x;
  if (x.sign == y.sign) return {log_add(x.log_magnitude, y.log_magnitude), x.sign};
  // Opposite signs: |x| - |y| with the sign of the larger magnitude.
  const bool x_larger = x.log_magnitude >= y.log_magnitude;
  const double hi = x_larger ? x.log_magnitude : y.log_magnitude;
  const double lo = x_larger ? y.log_magnitude : x.log_magnitude;
  if (lo == hi) return {neg_inf(), 0};
  return {hi + log1p(-exp(lo - hi)), x_larger ? x.sign : y.sign};
}

// In-place linear-space update of bins 0..top (top <= M; bins above top are zero and stay so,
// except the tail which is handled when top == M).
LC_HOST_DEVICE inline void linear_step(double* f, long long top, long long M, double p, double q) {
  if (M == 0) return;
  long long j = top;
  if (j == M) {
    f[M] += p * f[M - 1];
    --j;
  }
  for (; j >= 1; --j) f[j] = q * f[j] + p * f[j - 1];
  f[0] = q * f[0];
}

LC_HOST_DEVICE inline void log_step(double* lf, long long top, long long M, double log_p, double log_q) {
  if (M == 0) return;
  long long j = top;
  if (j == M) {
    lf[M] = log_add(lf[M], lf[M - 1] + log_p);
    --j;
  }
  for (; j >= 1; --j) lf[j] = log_add(lf[j] + log_q, lf[j - 1] + log_p);
  lf[0] = lf[0] + log_q;
}

// Highest bin that can be non-zero after `added` candidates: min(added, M).
LC_HOST_DEVICE inline long long top_bin(long long added, long long M) { return added < M ? added : M; }

}  // namespace pb
}  // namespace lesioncount
