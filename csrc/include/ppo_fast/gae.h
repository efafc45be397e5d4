// Rollout post-processing, written once for the CPU and CUDA kernels:
//   kl_t = penalty(logp_t, ref_t);  r_t = -kl_coef * kl_t (+ score at the row's last unmasked t)
//   delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t
//   whiten(x) = (x - mean) * rsqrt(var + eps) (+ mean when the mean is not shifted)
// (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"; TRL 0.11's
// PPOTrainer.compute_rewards / compute_advantages / masked_whiten.)
#pragma once

#include <ppo_fast/common.h>

#include <cmath>
#include <string>

namespace ppo_fast {
namespace gae {

// KL estimators per token. k3 = exp(r) - r - 1 with r = ref - logp (Schulman, "Approximating KL
// divergence", 2020), written with expm1 so it stays accurate when logp and ref are close.
enum KlPenalty : int { kKl = 0, kAbs = 1, kMse = 2, kK3 = 3 };

template <typename acc_t>
C10_HOST_DEVICE inline acc_t kl_penalty(acc_t logp, acc_t ref, int mode) {
  const acc_t d = logp - ref;
  switch (mode) {
    case kAbs:
      return d < acc_t(0) ? -d : d;
    case kMse:
      return acc_t(0.5) * d * d;
    case kK3: {
      const acc_t r = -d;
#ifdef __CUDA_ARCH__
      return ::expm1(r) - r;
#else
      return std::expm1(r) - r;
#endif
    }
    default:
      return d;
  }
}

// The recurrences are reverse affine maps x_t = a_t x_{t+1} + b_t. Maps compose associatively,
// which is what lets the GPU scan a row in parallel; the CPU applies them one by one. Composing
// never divides, so unlike the cumprod/cumsum closed form it cannot underflow on long rows.
template <typename acc_t>
struct Affine {
  acc_t a;
  acc_t b;
};

// earlier o later: apply the map of the later positions first.
template <typename acc_t>
C10_HOST_DEVICE inline Affine<acc_t> compose(Affine<acc_t> earlier, Affine<acc_t> later) {
  return {earlier.a * later.a, earlier.a * later.b + earlier.b};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t apply(Affine<acc_t> f, acc_t x) {
  return f.a * x + f.b;
}

// Next-value recurrence. Plain GAE (TRL): V_next(t) is V_{t+1}, masked to 0 — the map always
// takes the position's value. With carry_masked, masked positions are skipped: V_next(t) is the
// value at the next unmasked position (multi-turn rollouts whose observation tokens are masked).
template <typename acc_t>
C10_HOST_DEVICE inline Affine<acc_t> next_value_map(acc_t v, bool m, bool carry_masked) {
  const bool take = m || !carry_masked;
  return {take ? acc_t(0) : acc_t(1), take ? v : acc_t(0)};
}

// Advantage recurrence A_t = gamma lam A_{t+1} + delta_t; identity on masked positions when
// carry_masked (the advantage is carried through them unchanged).
template <typename acc_t>
C10_HOST_DEVICE inline Affine<acc_t> advantage_map(acc_t r, acc_t v, acc_t v_next, bool m, bool carry_masked,
                                                   acc_t gamma, acc_t lam) {
  if (!m && carry_masked) {
    return {acc_t(1), acc_t(0)};
  }
  return {gamma * lam, r + gamma * v_next - v};
}

// TRL pre-multiplies rewards and values by the mask.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t masked(acc_t x, bool m) {
  return m ? x : acc_t(0);
}

// Reward whitening (whiten_rewards) keeps the mean (TRL's shift_mean=False) and, unlike TRL,
// re-applies the mask: TRL's whitened padding is non-zero and leaks into the last response
// token's advantage through the scan.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t whiten_reward(acc_t r, bool m, acc_t mean, acc_t rstd) {
  return m ? (r - mean) * rstd + mean : acc_t(0);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t whiten(acc_t x, acc_t mean, acc_t rstd, bool shift_mean) {
  const acc_t w = (x - mean) * rstd;
  return shift_mean ? w : w + mean;
}

// ---------------------------------------------------------------------------------------------
// Host-side argument checks, shared by the CPU and CUDA entry points.

inline int parse_kl_penalty(const char* op, const std::string& s) {
  if (s == "kl") return kKl;
  if (s == "abs") return kAbs;
  if (s == "mse") return kMse;
  if (s == "k3") return kK3;
  TORCH_CHECK(s != "full", op,
              ": kl_penalty='full' needs the full vocabulary KL, computed from logits; pass it as logprobs with "
              "ref_logprobs of zeros and kl_penalty='kl'");
  TORCH_CHECK(false, op, ": kl_penalty must be one of 'kl', 'abs', 'mse', 'k3', got '", s, "'");
  return kKl;
}

// [B, T] float tensors of one dtype and device; returns the mask in a dtype the kernels read.
inline at::Tensor check_bt(const char* op, const at::Tensor& first, const char* first_name,
                           std::initializer_list<std::pair<const char*, const at::Tensor*>> others,
                           const at::Tensor& mask) {
  check::rank(op, first_name, first, 2, "[B, T]");
  check::floating(op, first_name, first);
  check::nonempty(op, first_name, first);
  for (const auto& [name, t] : others) {
    check::same_device(op, name, *t, first_name, first);
    check::rank(op, name, *t, 2, "[B, T]");
    check::floating(op, name, *t);
    check::same_shape(op, name, *t, first_name, first);
    check::same_dtype(op, name, *t, first_name, first);
  }
  return check::mask(op, mask, first_name, first);
}

inline void check_scores(const char* op, const at::Tensor& scores, const at::Tensor& logprobs) {
  check::same_device(op, "scores", scores, "logprobs", logprobs);
  check::floating(op, "scores", scores);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == logprobs.size(0), op,
              ": scores must be 1-D [B] with B = logprobs.size(0) = ", logprobs.size(0), ", got shape ",
              check::shape_str(scores));
}

inline void check_gae_scalars(const char* op, double gamma, double lam) {
  check::finite(op, "gamma", gamma);
  check::finite(op, "lam", lam);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1], got ", lam);
}

}  // namespace gae
}  // namespace ppo_fast
