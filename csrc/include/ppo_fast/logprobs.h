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

// Running softmax statistics of a set of values z: max m, s = sum exp(z - m), sz = sum exp(z - m) z.
// -inf entries (a masked vocabulary) contribute nothing.
struct Online {
  float m, s, sz;
};

C10_HOST_DEVICE inline Online online_init() {
  return {kNegInf, 0.f, 0.f};
}

C10_HOST_DEVICE inline Online online_merge(Online a, Online b) {
  if (a.m == kNegInf) return b;
  if (b.m == kNegInf) return a;
  const float m = a.m > b.m ? a.m : b.m;
  const float ea = exp_(a.m - m), eb = exp_(b.m - m);
  return {m, a.s * ea + b.s * eb, a.sz * ea + b.sz * eb};
}

// lse and entropy from the final statistics. A row of only -inf has lse -inf and entropy 0.
C10_HOST_DEVICE inline void online_finish(Online o, float& lse, float& entropy) {
  if (o.m == kNegInf || !(o.s > 0.f)) {
    lse = kNegInf;
    entropy = 0.f;
    return;
  }
  lse = o.m + log_(o.s);
  entropy = lse - o.sz / o.s;
}

// d(logprob, entropy)/dz_j for one vocabulary entry.
C10_HOST_DEVICE inline float grad_z(float z, bool is_label, float lse, float entropy, float g_lp, float g_h) {
  const float p = z == kNegInf ? 0.f : exp_(z - lse);
  float d = g_lp * ((is_label ? 1.f : 0.f) - p);
  if (g_h != 0.f && p > 0.f) d -= g_h * p * (z - lse + entropy);
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

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

}  // namespace logprobs
}  // namespace ppo_fast
