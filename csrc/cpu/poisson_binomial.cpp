// CPU truncated Poisson-binomial pmf of independent Bernoulli candidates, forward and backward.
//
// Forward: per batch item, the in-place dynamic program of common/poisson_binomial_dp.h over the K
// candidates and M+1 bins (0..M-1 and the tail "M or more"), in float64 (linear space) or in
// float64 log space (logaddexp), whatever the input dtype: O(K*M) time, O(M) memory.
// Backward: reverse mode through the same recursion. The states before each candidate are needed in
// reverse order; instead of storing all K of them (O(K*M) memory) the forward states are saved every
// S = ceil(sqrt(K)) candidates and each segment is recomputed from its checkpoint, so the backward
// costs about two forward passes of time and O(sqrt(K)*M) memory. In log space the adjoint is signed
// and kept as (sign, log|value|); with logits the chain-rule factor p(1-p) is folded into the
// exponent (log p + log(1-p)), so gradients stay exact for saturated logits.
// Batch items run in parallel.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/op_arguments.h"
#include "common/poisson_binomial_dp.h"

namespace lesioncount {
namespace {

using pb::neg_inf;

// Per-candidate factors: (p, q) in linear space, (log p, log q) in log space.
struct CandidateFactors {
  std::vector<double> p_or_log_p;
  std::vector<double> q_or_log_q;
  std::vector<double> log_pq;  // log p + log q, for the logit chain rule in log space
};

// Reads one item's K inputs. Returns the index of the first invalid input, or -1.
template <typename scalar_t>
int64_t read_candidates(const scalar_t* x, int64_t K, bool log_space, bool from_logits,
                        CandidateFactors& out) {
  out.p_or_log_p.resize(K);
  out.q_or_log_q.resize(K);
  out.log_pq.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    const double v = static_cast<double>(x[k]);
    if (std::isnan(v)) return k;
    double lp, lq;
    if (from_logits) {
      lp = pb::log_sigmoid(v);
      lq = pb::log_sigmoid(-v);
    } else {
      if (!(v >= 0.0 && v <= 1.0)) return k;
      lp = std::log(v);
      lq = std::log1p(-v);
    }
    out.log_pq[k] = lp + lq;
    if (log_space) {
      out.p_or_log_p[k] = lp;
      out.q_or_log_q[k] = lq;
    } else if (from_logits) {
      out.p_or_log_p[k] = std::exp(lp);
      out.q_or_log_q[k] = std::exp(lq);
    } else {
      out.p_or_log_p[k] = v;
      out.q_or_log_q[k] = 1.0 - v;
    }
  }
  return -1;
}

// Batch items per parallel task: enough work (~64k DP cells) that waking a thread pays off.
inline int64_t items_per_task(int64_t K, int64_t M) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / ((K + 1) * (M + 1)));
}

inline void initial_state(double* f, int64_t M, bool log_space) {
  for (int64_t j = 0; j <= M; ++j) f[j] = log_space ? neg_inf() : 0.0;
  f[0] = log_space ? 0.0 : 1.0;
}

// Advances state `f` (after `added` candidates) by candidate k.
inline void add_candidate(double* f, int64_t added, int64_t M, const CandidateFactors& c, int64_t k,
                          bool log_space) {
  const int64_t top = pb::top_bin(added + 1, M);
  if (log_space) pb::log_step(f, top, M, c.p_or_log_p[k], c.q_or_log_q[k]);
  else pb::linear_step(f, top, M, c.p_or_log_p[k], c.q_or_log_q[k]);
}

void check_probs_arg(const Tensor& probs, int64_t max_count, const char* op) {
  check_poisson_binomial_arguments(probs, max_count, op);
  LC_CHECK(probs.is_cpu(), op, ": expected a CPU tensor for `probs`, got one on ", device_name(probs));
}

[[noreturn]] void report_bad_candidate(const char* op, bool from_logits, int64_t b, int64_t k, double v) {
  if (from_logits) LC_CHECK(false, op, ": `probs` (logits) must not be NaN; batch item ", b, ", candidate ", k);
  LC_CHECK(false, op, ": `probs` must lie in [0, 1] (use from_logits=True for logits); got ", v,
              " at batch item ", b, ", candidate ", k);
}

Tensor poisson_binomial_cpu(const Tensor& probs, int64_t max_count, bool log_space, bool from_logits) {
  check_probs_arg(probs, max_count, "poisson_binomial");
  const int64_t B = probs.size(0), K = probs.size(1), M = max_count;
  const Tensor x = dense(probs);
  Tensor out64 = new_empty(x, {B, M + 1}, ScalarType::Double);
  std::vector<int64_t> bad(B, -1);
  dispatch_floating(x.scalar_type(), "poisson_binomial", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    double* op = out64.mutable_data_ptr<double>();
    torch::stable::parallel_for(0, B, items_per_task(K, M), [&](int64_t b0, int64_t b1) {
      CandidateFactors c;
      for (int64_t b = b0; b < b1; ++b) {
        double* f = op + b * (M + 1);
        initial_state(f, M, log_space);
        bad[b] = read_candidates(xp + b * K, K, log_space, from_logits, c);
        if (bad[b] >= 0) continue;
        for (int64_t k = 0; k < K; ++k) add_candidate(f, k, M, c, k, log_space);
      }
    });
    for (int64_t b = 0; b < B; ++b)
      if (bad[b] >= 0) report_bad_candidate("poisson_binomial", from_logits, b, bad[b], (double)xp[b * K + bad[b]]);
  });
  return contiguous_as(out64, x.scalar_type());
}

// Reverse mode for one item. `grad` has M+1 entries (dL/dpmf or dL/dlogpmf), `out` receives K.
void backward_item(const CandidateFactors& c, int64_t K, int64_t M, bool log_space, bool from_logits,
                   const double* grad, double* out) {
  if (K == 0) return;
  if (M == 0) {  // the single bin P(C >= 0) = 1 does not depend on the candidates
    std::fill(out, out + K, 0.0);
    return;
  }
  const int64_t S = std::max<int64_t>(1, (int64_t)std::ceil(std::sqrt((double)K)));
  const int64_t num_segments = (K + S - 1) / S;
  const int64_t W = M + 1;
  // Forward pass saving the state before candidates 0, S, 2S, ...
  std::vector<double> checkpoints(num_segments * W);
  std::vector<double> state(W);
  initial_state(state.data(), M, log_space);
  for (int64_t k = 0; k < K; ++k) {
    if (k % S == 0) std::copy(state.begin(), state.end(), checkpoints.begin() + (k / S) * W);
    add_candidate(state.data(), k, M, c, k, log_space);
  }
  std::vector<double> segment(S * W);

  if (!log_space) {
    std::vector<double> a(grad, grad + W);  // adjoint of the current state
    for (int64_t s = num_segments - 1; s >= 0; --s) {
      const int64_t k0 = s * S, k1 = std::min(K, k0 + S);
      std::copy(checkpoints.begin() + s * W, checkpoints.begin() + (s + 1) * W, segment.begin());
      for (int64_t k = k0 + 1; k < k1; ++k) {
        std::copy(segment.begin() + (k - 1 - k0) * W, segment.begin() + (k - k0) * W, segment.begin() + (k - k0) * W);
        add_candidate(segment.data() + (k - k0) * W, k - 1, M, c, k - 1, log_space);
      }
      for (int64_t k = k1 - 1; k >= k0; --k) {
        const double* f = segment.data() + (k - k0) * W;  // state before candidate k
        const double p = c.p_or_log_p[k], q = c.q_or_log_q[k];
        const int64_t upto = std::min<int64_t>(pb::top_bin(k, M) + 1, M - 1);
        double g = a[M] * f[M - 1] - a[0] * f[0];
        for (int64_t j = 1; j <= upto; ++j) g += a[j] * (f[j - 1] - f[j]);
        out[k] = from_logits ? g * p * q : g;
        for (int64_t j = 0; j < M; ++j) a[j] = q * a[j] + p * a[j + 1];
      }
    }
    return;
  }

  // Log space: the adjoint of the final log-pmf state is g[j] / F[j], held as (sign, log|.|).
  std::vector<pb::SignedLog> a(W);
  for (int64_t j = 0; j <= M; ++j) {
    const double g = grad[j];
    if (g == 0.0 || state[j] == neg_inf() || std::isnan(g)) {
      a[j] = {neg_inf(), std::isnan(g) ? 1 : 0};
      if (std::isnan(g)) a[j].log_magnitude = std::nan("");
    } else {
      a[j] = {std::log(std::fabs(g)) - state[j], g > 0 ? 1 : -1};
    }
  }
  auto term = [](const pb::SignedLog& x, double log_factor) {
    return x.sign == 0 ? 0.0 : x.sign * std::exp(x.log_magnitude + log_factor);
  };
  for (int64_t s = num_segments - 1; s >= 0; --s) {
    const int64_t k0 = s * S, k1 = std::min(K, k0 + S);
    std::copy(checkpoints.begin() + s * W, checkpoints.begin() + (s + 1) * W, segment.begin());
    for (int64_t k = k0 + 1; k < k1; ++k) {
      std::copy(segment.begin() + (k - 1 - k0) * W, segment.begin() + (k - k0) * W, segment.begin() + (k - k0) * W);
      add_candidate(segment.data() + (k - k0) * W, k - 1, M, c, k - 1, log_space);
    }
    for (int64_t k = k1 - 1; k >= k0; --k) {
      const double* lf = segment.data() + (k - k0) * W;
      const double lp = c.p_or_log_p[k], lq = c.q_or_log_q[k];
      const double extra = from_logits ? c.log_pq[k] : 0.0;
      const int64_t upto = std::min<int64_t>(pb::top_bin(k, M) + 1, M - 1);
      double g = term(a[M], lf[M - 1] + extra) - term(a[0], lf[0] + extra);
      for (int64_t j = 1; j <= upto; ++j) g += term(a[j], lf[j - 1] + extra) - term(a[j], lf[j] + extra);
      out[k] = g;
      for (int64_t j = 0; j < M; ++j) {
        pb::SignedLog x{a[j].log_magnitude + lq, a[j].sign};
        pb::SignedLog y{a[j + 1].log_magnitude + lp, a[j + 1].sign};
        if (x.log_magnitude == neg_inf()) x.sign = 0;
        if (y.log_magnitude == neg_inf()) y.sign = 0;
        a[j] = pb::signed_log_add(x, y);
      }
    }
  }
}

Tensor poisson_binomial_backward_cpu(const Tensor& grad, const Tensor& probs, int64_t max_count,
                                         bool log_space, bool from_logits) {
  check_probs_arg(probs, max_count, "_poisson_binomial_backward");
  const int64_t B = probs.size(0), K = probs.size(1), M = max_count;
  LC_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == M + 1,
              "_poisson_binomial_backward: `grad` must have shape (", B, ", ", M + 1, "), got ", shape_of(grad));
  LC_CHECK(grad.is_cpu(), "_poisson_binomial_backward: expected a CPU tensor for `grad`, got one on ", device_name(grad));
  const Tensor x = dense(probs);
  const Tensor g64 = contiguous_as(grad, ScalarType::Double);
  Tensor out64 = new_zeros(x, {B, K}, ScalarType::Double);
  std::vector<int64_t> bad(B, -1);
  dispatch_floating(x.scalar_type(), "_poisson_binomial_backward", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const double* gp = g64.const_data_ptr<double>();
    double* op = out64.mutable_data_ptr<double>();
    torch::stable::parallel_for(0, B, items_per_task(K, M), [&](int64_t b0, int64_t b1) {
      CandidateFactors c;
      for (int64_t b = b0; b < b1; ++b) {
        bad[b] = read_candidates(xp + b * K, K, log_space, from_logits, c);
        if (bad[b] >= 0) continue;
        backward_item(c, K, M, log_space, from_logits, gp + b * (M + 1), op + b * K);
      }
    });
    for (int64_t b = 0; b < B; ++b)
      if (bad[b] >= 0)
        report_bad_candidate("_poisson_binomial_backward", from_logits, b, bad[b], (double)xp[b * K + bad[b]]);
  });
  return contiguous_as(out64, x.scalar_type());
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lesioncount, CPU, m) {
  m.impl("poisson_binomial", TORCH_BOX(&poisson_binomial_cpu));
  m.impl("_poisson_binomial_backward", TORCH_BOX(&poisson_binomial_backward_cpu));
}

}  // namespace lesioncount
