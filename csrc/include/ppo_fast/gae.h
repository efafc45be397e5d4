// Rollout post-processing, written once for the CPU and CUDA kernels:
//   kl_t = penalty(logp_t, ref_t);  r_t = -kl_coef * kl_t (+ score at the row's last unmasked t)
//   delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t
//   whiten(x) = (x - mean) * rsqrt(var + eps) (+ mean when the mean is not shifted)
// (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"; TRL 0.11's
// PPOTrainer.compute_rewards / compute_advantages / masked_whiten.)
#pragma once

#include <ppo_fast/common.h>

#include <cmath>
#include <tuple>

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
      return PPO_FAST_LIBM(expm1)(r) - r;
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
// The job: one description of every pass of the rollout ops, filled by the host entry points
// (csrc/host/gae.cpp) and run by a backend's kernels. Tensors are contiguous; the [B, T] ones
// (and x, out) are of `dtype`, the mask bool or `dtype`. A null output is not computed.
// Moment partials ("parts") are [n, 3] (count, mean, M2) in the backend's Kernels::parts_dtype.
struct Job {
  const char* op;
  c10::DeviceIndex device;
  at::ScalarType dtype;
  bool mask_bool;
  const void* mask;
  int64_t B, T, N;  // rows (B x T = N elements); masked_whiten: N elements of any shape
  // Rows pass, rewards: read (rewards_in), or computed from the KL penalty of (logprobs,
  // ref_logprobs) with scores [B] (in the accumulation dtype) added at each row's last unmasked token.
  const void* rewards_in;
  const void* scores;
  const void* logprobs;
  const void* ref_logprobs;
  double kl_coef;
  int kl_mode;
  void* rewards_out;
  void* non_score_out;
  void* kl_out;
  // Rows pass, GAE (runs when values is set).
  const void* values;
  double gamma, lam;
  bool carry_masked;
  const void* reward_parts;  // whiten the rewards (moments merged from these parts) before the scan
  int64_t n_reward_parts;
  void* adv_out;      // advantages in dtype
  void* adv_acc;      // or in the accumulation dtype, for the whitening pass
  void* returns_out;  // (needed when values is set)
  void* row_moments;  // [B, 3] parts: per row, of the advantages (GAE) or of the rewards as stored
  // Moments pass: one part per kMomentChunk elements of moments_in (dtype) over the mask.
  const void* moments_in;
  void* moments_out;
  // Whitening pass: whiten_out (dtype) = whiten(whiten_in) with the moments merged from whiten_parts.
  const void* whiten_in;  // of dtype, or of the accumulation dtype (whiten_in_acc); may be whiten_out
  bool whiten_in_acc;
  void* whiten_out;
  const void* whiten_parts;
  int64_t n_whiten_parts;
  bool shift_mean;
  double eps;
};

// A backend's kernels: each runs one pass of a job.
struct Kernels {
  at::ScalarType parts_dtype;
  void (*rows)(const Job&);
  void (*moments)(const Job&);
  void (*whiten)(const Job&);
};

// The entry points (csrc/host/gae.cpp), one per op of the schema; a backend registers them with
// its kernels bound (common.h: bound).
std::tuple<at::Tensor, at::Tensor, at::Tensor> compute_rewards(const Kernels& k, const at::Tensor& scores,
                                                               const at::Tensor& logprobs,
                                                               const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                               double kl_coef, c10::string_view kl_penalty);
std::tuple<at::Tensor, at::Tensor> gae(const Kernels& k, const at::Tensor& values, const at::Tensor& rewards,
                                       const at::Tensor& mask, double gamma, double lam, bool carry_masked);
at::Tensor masked_whiten(const Kernels& k, const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps);
std::tuple<at::Tensor, at::Tensor> compute_advantages(const Kernels& k, const at::Tensor& values,
                                                      const at::Tensor& rewards, const at::Tensor& mask, double gamma,
                                                      double lam, bool whiten_rewards, bool carry_masked);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rollout_advantages(
    const Kernels& k, const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
    const at::Tensor& values, const at::Tensor& mask, double kl_coef, c10::string_view kl_penalty, double gamma,
    double lam, bool whiten_rewards, bool carry_masked);

}  // namespace gae
}  // namespace ppo_fast
