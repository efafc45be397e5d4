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

namespace ppo_fast {
namespace logprobs {

template <typename T>
C10_HOST_DEVICE inline T exp_(T x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline T log_(T x) {
#ifdef __CUDA_ARCH__
  return ::log(x);
#else
  return std::log(x);
#endif
}

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
// Host-side checks.

// logits [B, T, V] with a contiguous last dimension; returns it with that guaranteed (a copy only
// when the last stride is not 1).
inline at::Tensor check_logits(const char* op, const char* name, const at::Tensor& logits) {
  check::rank(op, name, logits, 3, "[B, T, V]");
  check::floating(op, name, logits);
  check::nonempty(op, name, logits);
  return logits.stride(2) == 1 ? logits : logits.contiguous();
}

inline at::Tensor check_labels(const char* op, const at::Tensor& labels, const at::Tensor& logits) {
  check::same_device(op, "labels", labels, "logits", logits);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels must be [B, T] = [", logits.size(0), ", ", logits.size(1), "] to match logits ",
              check::shape_str(logits), ", got ", check::shape_str(labels));
  return labels.to(at::kLong).contiguous();
}

// The [B, T] side inputs of the backward: grad_logprob, lse, entropy and (optional) grad_entropy.
inline void check_backward_inputs(const char* op, const at::Tensor& logits, const at::Tensor& grad_logprob,
                                  const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                                  const at::Tensor& entropy) {
  const int64_t B = logits.size(0), T = logits.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_logprob", &grad_logprob},
                                {"lse", &lse},
                                {"entropy", &entropy},
                                {"grad_entropy", grad_entropy ? &*grad_entropy : nullptr}}) {
    if (t == nullptr) continue;
    check::same_device(op, name, *t, "logits", logits);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == T, op, ": ", name, " must be [B, T] = [", B, ", ",
                T, "], got ", check::shape_str(*t));
  }
}

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

}  // namespace logprobs
}  // namespace ppo_fast
