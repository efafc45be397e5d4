// Log-probabilities and entropy from logits in one pass over the vocabulary, written once for CPU
// and CUDA (online log-sum-exp; Milakov & Gimelshein 2018, "Online normalizer calculation"):
//   z = logits / temperature;  lse = log sum_j exp(z_j);  logprob = z[label] - lse;
//   entropy = lse - sum_j softmax(z)_j z_j;  full KL(p || q) = sum_j p_j (z_j - r_j) - lse_z + lse_r
// Backward (from the saved lse): dz_j = g_lp (1[j = label] - p_j) - g_H p_j (z_j - lse + H), p_j = exp(z_j - lse).
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
  const T m = a.m > b.m ? a.m : b.m;
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

// log s, lse = m + log s and entropy = log s - sd / s. A row of only -inf has lse -inf, entropy 0.
template <typename T>
C10_HOST_DEVICE inline void online_finish(Online<T> o, T& log_s, T& lse, T& entropy) {
  if (is_neg_inf(o.m) || !(o.s > T(0))) {
    log_s = std::numeric_limits<T>::infinity();
    lse = -std::numeric_limits<T>::infinity();
    entropy = T(0);
    return;
  }
  log_s = log_(o.s);
  lse = o.m + log_s;
  entropy = log_s - o.sd / o.s;
}

// d(logprob, entropy)/dz_j for one vocabulary entry (g_lp, g_h already divided by the temperature).
template <typename T>
C10_HOST_DEVICE inline T grad_z(T z, bool is_label, T lse, T entropy, T g_lp, T g_h) {
  const T p = is_neg_inf(z) ? T(0) : exp_(z - lse);
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
