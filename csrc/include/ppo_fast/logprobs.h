// Log-probabilities and entropy from logits in one pass over the vocabulary, written once for CPU
// and CUDA (online log-sum-exp; Milakov & Gimelshein 2018, "Online normalizer calculation"):
//   z = logits / temperature;  lse = log sum_j exp(z_j);  logprob = z[label] - lse;
//   entropy = lse - sum_j softmax(z)_j z_j;  full KL(p || q) = sum_j p_j (z_j - r_j) - lse_z + lse_r
// Backward (from the saved lse): dz_j = g_lp (1[j = label] - p_j) - g_H p_j (z_j - lse + H), p_j = exp(z_j - lse).
//
// Non-finite logits follow log_softmax's own arithmetic, as the eager reference does: a row holding a
// NaN or a +inf (inf - inf), or only -inf (log 0 - log 0), has no distribution, so its logprob,
// entropy, lse and full KL are NaN and so is every entry of its gradient. A -inf elsewhere is a
// token of probability 0 (a masked vocabulary): it adds nothing, and the results stay finite.
// Such a row is detected without an extra pass: a NaN or +inf logit makes the running sum NaN
// (exp(NaN), exp(inf - inf)) or the running max non-finite, and online_finish looks at both.
#pragma once

#include <ppo_fast/common.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace ppo_fast {
namespace logprobs {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Running softmax statistics of a set of values z, relative to their running max m:
// s = sum exp(z - m), sd = sum exp(z - m) (z - m). Keeping sd relative to m (not sum exp(z - m) z)
// avoids the cancellation of lse - sum p z, two numbers of the size of the logits.
// -inf entries (a masked vocabulary) contribute nothing. T: float, or double for fp64 logits on CPU.
template <typename T>
struct Online {
  T m, s, sd;
};

template <typename T>
C10_HOST_DEVICE inline Online<T> online_init() {
  return {-std::numeric_limits<T>::infinity(), T(0), T(0)};
}

template <typename T>
C10_HOST_DEVICE inline bool is_neg_inf(T x) {
  return x == -std::numeric_limits<T>::infinity();
}

// max(a, b) that keeps a NaN (a plain `a > b ? a : b` drops it, and a running max must carry it:
// a thread or a merge may see the NaN only through the other operand's max).
template <typename T>
C10_HOST_DEVICE inline T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
C10_HOST_DEVICE inline T nan_() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Re-expresses o relative to a larger max m (shifting sd by (o.m - m) per unit of mass).
template <typename T>
C10_HOST_DEVICE inline Online<T> online_rebase(Online<T> o, T m) {
  if (is_neg_inf(o.m)) return {m, T(0), T(0)};
  const T scale = exp_(o.m - m);
  return {m, o.s * scale, scale * (o.sd + o.s * (o.m - m))};
}

template <typename T>
C10_HOST_DEVICE inline Online<T> online_merge(Online<T> a, Online<T> b) {
  if (is_neg_inf(a.m)) return b;
  if (is_neg_inf(b.m)) return a;
  const T m = max_nan(a.m, b.m);
  const Online<T> ra = online_rebase(a, m), rb = online_rebase(b, m);
  return {m, ra.s + rb.s, ra.sd + rb.sd};
}

// Adds one value (already known to be <= o.m).
template <typename T>
C10_HOST_DEVICE inline void online_add(Online<T>& o, T z) {
  if (is_neg_inf(z)) return;
  const T d = z - o.m;
  const T e = exp_(d);
  o.s += e;
  o.sd += e * d;
}

// Whether the statistics describe a distribution: a finite max (not a row of only -inf, no NaN or
// +inf max) and a positive, non-NaN sum (a NaN or +inf logit makes it NaN). Either way every result
// of the row is NaN (see the top of this file).
template <typename T>
C10_HOST_DEVICE inline bool online_valid(Online<T> o) {
  return o.m - o.m == T(0) && o.s > T(0);  // m - m is NaN for +-inf and NaN
}

// log s, lse = m + log s and entropy = log s - sd / s; all three NaN for a row without a
// distribution, so that logprob = (z - m) - log s is NaN there too.
template <typename T>
C10_HOST_DEVICE inline void online_finish(Online<T> o, T& log_s, T& lse, T& entropy) {
  if (!online_valid(o)) {
    log_s = lse = entropy = nan_<T>();
    return;
  }
  log_s = log_(o.s);
  lse = o.m + log_s;
  entropy = log_s - o.sd / o.s;
}

// d(logprob, entropy)/dz_j for one vocabulary entry (g_lp, g_h already divided by the temperature).
// A row without a distribution has a NaN lse: p, and so every entry's gradient, is NaN there (the
// -inf entries included, as in log_softmax's backward), even where g_lp is 0.
template <typename T>
C10_HOST_DEVICE inline T grad_z(T z, bool is_label, T lse, T entropy, T g_lp, T g_h) {
  const T p = is_neg_inf(z) && lse == lse ? T(0) : exp_(z - lse);
  T d = g_lp * ((is_label ? T(1) : T(0)) - p);
  if (g_h != T(0) && p > T(0)) d -= g_h * p * ((z - lse) + entropy);
  return d;
}

// ---------------------------------------------------------------------------------------------
// The job, filled by the host entry points (csrc/host/logprobs.cpp) and run by a backend's kernels.

// A [B, T, V] tensor with a contiguous last dimension, as B * T rows of V entries.
struct Rows {
  const void* base;
  int64_t T, V, sb, st;  // strides of b and t

  template <typename scalar_t>
  C10_HOST_DEVICE const scalar_t* row(int64_t r) const {
    return as<scalar_t>(base) + (r / T) * sb + (r % T) * st;
  }
};

struct Job {
  const char* op;
  c10::DeviceIndex device;
  at::ScalarType dtype;  // of the logits
  int64_t B, T, V;
  double inv_t;  // 1 / temperature
  Rows logits;
  Rows ref_logits;  // full_kl
  Rows grad;        // backward: the gradient w.r.t. the logits (in place: the logits themselves)
  const int64_t* labels;  // [B, T]
  // [B, T] in the accumulation dtype (fp32, or fp64 for fp64 logits): written by the forward
  // (logprob, entropy, lse) and full_kl (kl); read by the backward (entropy, lse, the gradients).
  void* logprob;
  void* entropy;
  void* lse;
  void* kl;
  const void* grad_logprob;
  const void* grad_entropy;  // may be null
};

// A backend's kernels, one per kind of pass over the rows.
struct Kernels {
  void (*forward)(const Job&);
  void (*backward)(const Job&);
  void (*full_kl)(const Job&);
};

// Each backend's table (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu; the CUDA one exists only in a
// CUDA build). Besides this op's own entry points, the fused LM-head op (linear_logprobs.h) runs them
// on each block of logits it computes.
extern const Kernels kCpuKernels;
extern const Kernels kCudaKernels;

// The entry points (csrc/host/logprobs.cpp), one per op of the schema.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs(const Kernels& k, const at::Tensor& logits,
                                                        const at::Tensor& labels, double temperature);
at::Tensor logprobs_backward(const Kernels& k, const at::Tensor& grad_logprob,
                             const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                             const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                             double temperature);
void logprobs_backward_(const Kernels& k, at::Tensor& logits, const at::Tensor& grad_logprob,
                        const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& entropy, double temperature);
at::Tensor full_kl(const Kernels& k, const at::Tensor& logits, const at::Tensor& ref_logits, double temperature);

}  // namespace logprobs
}  // namespace ppo_fast
