// Clipped PPO loss with value clipping and a KL penalty, per token, written once for CPU and CUDA:
//   r = exp(logp - old);  pg = max(-A r, -A clip(r, 1 - eps, 1 + eps_high))   [dual clip: min(pg, -A c) if A < 0]
//   vf = 0.5 max((v - R)^2, (clip(v, v_old - cv, v_old + cv) - R)^2);  kl = k1 | k2 | k3 (logp, ref)
//   loss = agg(pg) + vf_coef agg(vf) + kl_coef agg(kl)
// (Schulman et al. 2017; TRL 0.11 PPOTrainer.loss; dual clip: Ye et al. 2020; the decoupled upper
// clip eps_high, "clip-higher": Yu et al. 2025, DAPO; eps_high = eps is PPO's.) The backward is the
// derivative of the eager formula under autograd, ties included: torch.maximum/minimum send half
// the gradient to each side of a tie, torch.clamp passes it on both closed boundaries.
#pragma once

#include <ppo_fast/common.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace ppo_fast {
namespace ppo_loss {

enum KlEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2 };
enum Aggregation : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

struct Params {
  double cliprange;       // the ratio's lower clip: 1 - cliprange
  double cliprange_high;  // its upper clip: 1 + cliprange_high (= cliprange unless given)
  double cliprange_value;
  double kl_coef;  // 0: no KL term (ref_logprobs may be absent)
  int kl_estimator;
  bool has_dual_clip;
  double dual_clip;
  bool has_log_ratio_clamp;
  double log_ratio_clamp;
};

// Per-token forward terms (all before masking and aggregation), in the accumulation type T.
template <typename T>
struct Token {
  T pg;         // policy-gradient loss
  T vf;         // 0.5 * max of the two squared value errors
  T kl;         // KL-to-reference term (0 without a reference)
  T ratio;      // exp of the (clamped) log ratio
  T log_ratio;  // logp - old, unclamped (approxkl, policykl)
  bool pg_clipped;    // the clipped objective was taken (TRL's pg_losses2 > pg_losses)
  bool dual_clipped;  // the dual clip bound was taken
  bool vf_clipped;    // the clipped value error was larger (TRL's vf_losses2 > vf_losses1)
};

// torch.clamp / maximum / minimum keep a NaN (from x or a bound); the plain comparisons drop it,
// and a NaN value, old value or return would then vanish from the loss instead of showing in it.
template <typename T>
C10_HOST_DEVICE inline bool isnan_(T x) {
  return x != x;
}

template <typename T>
C10_HOST_DEVICE inline T clamp_(T x, T lo, T hi) {
  if (isnan_(lo) || isnan_(hi)) return lo + hi;  // NaN
  return x < lo ? lo : (x > hi ? hi : x);          // NaN x falls through as x
}

template <typename T>
C10_HOST_DEVICE inline T max_(T a, T b) {
  return (a > b || isnan_(a)) ? a : b;
}

template <typename T>
C10_HOST_DEVICE inline T min_(T a, T b) {
  return (a < b || isnan_(a)) ? a : b;
}

template <typename T>
C10_HOST_DEVICE inline T kl_term(T logp, T ref, int estimator) {
  const T d = logp - ref;
  switch (estimator) {
    case kK2:
      return T(0.5) * d * d;
    case kK3:
      return exp_(-d) + d - T(1);
    default:
      return d;
  }
}

template <typename T>
C10_HOST_DEVICE inline T kl_term_grad(T logp, T ref, int estimator) {
  const T d = logp - ref;
  switch (estimator) {
    case kK2:
      return d;
    case kK3:
      return T(1) - exp_(-d);
    default:
      return T(1);
  }
}

template <typename T>
C10_HOST_DEVICE inline Token<T> token_forward(T logp, T v, T old, T v_old, T adv, T ret, T ref, const Params& p) {
  Token<T> t;
  t.log_ratio = logp - old;
  const T c = static_cast<T>(p.log_ratio_clamp);
  const T lr = p.has_log_ratio_clamp ? clamp_(t.log_ratio, -c, c) : t.log_ratio;
  t.ratio = exp_(lr);
  const T pg1 = -adv * t.ratio;
  const T pg2 = -adv * clamp_(t.ratio, T(1) - static_cast<T>(p.cliprange), T(1) + static_cast<T>(p.cliprange_high));
  t.pg_clipped = pg2 > pg1;
  T pg = max_(pg1, pg2);
  t.dual_clipped = false;
  if (p.has_dual_clip && adv < T(0)) {
    const T bound = -adv * static_cast<T>(p.dual_clip);
    t.dual_clipped = bound < pg;
    pg = min_(pg, bound);
  }
  t.pg = pg;
  const T cv = static_cast<T>(p.cliprange_value);
  const T vclip = clamp_(v, v_old - cv, v_old + cv);
  const T e1 = (v - ret) * (v - ret);
  const T e2 = (vclip - ret) * (vclip - ret);
  t.vf_clipped = e2 > e1;
  t.vf = T(0.5) * max_(e1, e2);
  t.kl = p.kl_coef != 0.0 ? kl_term(logp, ref, p.kl_estimator) : T(0);
  return t;
}

// Share of the gradient that max(a, b) sends to a, as torch.maximum's backward: 0 if a < b, 1/2 on
// a tie, else 1 (so both sides get all of it when either is NaN). min_share: torch.minimum's.
template <typename T>
C10_HOST_DEVICE inline T max_share(T a, T b) {
  return a < b ? T(0) : (a == b ? T(0.5) : T(1));
}

template <typename T>
C10_HOST_DEVICE inline T min_share(T a, T b) {
  return a > b ? T(0) : (a == b ? T(0.5) : T(1));
}

// torch.clamp's gradient: g on [lo, hi] (closed), else 0 — a select, so a NaN g outside is dropped.
template <typename T>
C10_HOST_DEVICE inline T clamp_pass(T g, T x, T lo, T hi) {
  return (x >= lo && x <= hi) ? g : T(0);
}

// d(pg + kl_coef kl)/d logp and d(vf_coef vf)/d v for one token, before the aggregation weight.
template <typename T>
C10_HOST_DEVICE inline void token_backward(T logp, T v, T old, T v_old, T adv, T ret, T ref, const Params& p,
                                           T vf_coef, T& d_logp, T& d_v) {
  const T log_ratio = logp - old;
  T lr = log_ratio;
  if (p.has_log_ratio_clamp) {
    const T c = static_cast<T>(p.log_ratio_clamp);
    lr = clamp_(log_ratio, -c, c);
  }
  const T ratio = exp_(lr);
  const T lo = T(1) - static_cast<T>(p.cliprange), hi = T(1) + static_cast<T>(p.cliprange_high);
  const T pg1 = -adv * ratio;
  const T pg2 = -adv * clamp_(ratio, lo, hi);
  // d pg / d ratio through both branches of the max.
  T d_ratio = -adv * max_share(pg1, pg2) + clamp_pass(-adv * max_share(pg2, pg1), ratio, lo, hi);
  if (p.has_dual_clip && adv < T(0)) {
    // min(pg, bound): the share of the min that goes to pg.
    d_ratio *= min_share(max_(pg1, pg2), -adv * static_cast<T>(p.dual_clip));
  }
  d_logp = p.has_log_ratio_clamp ? clamp_pass(d_ratio * ratio, log_ratio, -static_cast<T>(p.log_ratio_clamp),
                                              static_cast<T>(p.log_ratio_clamp))
                                 : d_ratio * ratio;
  if (p.kl_coef != 0.0) d_logp += static_cast<T>(p.kl_coef) * kl_term_grad(logp, ref, p.kl_estimator);

  const T cv = static_cast<T>(p.cliprange_value);
  const T lo_v = v_old - cv, hi_v = v_old + cv;
  const T vclip = clamp_(v, lo_v, hi_v);
  const T e1 = (v - ret) * (v - ret);
  const T e2 = (vclip - ret) * (vclip - ret);
  // 0.5 * d/dv of each squared error: (v - R), and (vclip - R) through clamp's pass-through.
  d_v = vf_coef * (max_share(e1, e2) * (v - ret) + clamp_pass(max_share(e2, e1) * (vclip - ret), v, lo_v, hi_v));
}

// ---------------------------------------------------------------------------------------------
// Per-chunk partial sums over unmasked tokens, and the statistics built from them.

enum Part : int {
  kN = 0,
  kPg,
  kVf,
  kKl,
  kPgClip,
  kDualClip,
  kVfClip,
  kLogRatio2,
  kNegLogRatio,
  kAdv,
  kValueError,
  kRatioMean,  // moments (chunk mean, M2) follow, pairwise
  kRatioM2,
  kReturnsMean,
  kReturnsM2,
  kVpredMean,
  kVpredM2,
  kValuesMean,
  kValuesM2,
  kNumParts
};

// Layout of the stats vector the op returns (fp32), mirrored by ppo_fast/_ops.py:PPO_LOSS_STATS.
enum Stat : int {
  sLossTotal = 0,
  sLossPolicy,
  sLossValue,
  sLossKl,
  sPolicyClipfrac,
  sPolicyDualClipfrac,
  sPolicyApproxkl,
  sPolicyPolicykl,
  sPolicyRatioMean,
  sPolicyRatioVar,
  sPolicyAdvantagesMean,
  sReturnsMean,
  sReturnsVar,
  sValVpred,
  sValVpredVar,
  sValError,
  sValClipfrac,
  sValMean,
  sValVar,
  sSkipped,
  sTokens,
  sRows,
  kNumStats
};

// Bessel-corrected variance for statistics; 0 with fewer than two tokens (nothing to spread).
C10_HOST_DEVICE inline double stat_var(double n, double m2) {
  return n > 1 ? m2 / (n - 1) : 0.0;
}

// Merges partial b into a (sums add; the four (mean, M2) pairs merge with Chan's formula).
template <typename A, typename B>
C10_HOST_DEVICE inline void merge_parts(A* a, const B* b) {
  const double na = a[kN], nb = b[kN];
  for (int k = 0; k < kRatioMean; ++k) a[k] += b[k];
  for (int k = kRatioMean; k < kNumParts; k += 2) {
    const Moments<double> m = moments_merge(Moments<double>{na, double(a[k]), double(a[k + 1])},
                                            Moments<double>{nb, double(b[k]), double(b[k + 1])});
    a[k] = m.mean;
    a[k + 1] = m.m2;
  }
}

// Accumulates a group of N tokens into a partial: sums directly; the four moment pairs with an
// exact local mean then M2, merged into the partial with Chan's formula (no per-token division).
template <int N, typename T, typename P>
C10_HOST_DEVICE inline void accumulate(const T (&logp)[N], const T (&v)[N], const T (&old)[N], const T (&v_old)[N],
                                       const T (&adv)[N], const T (&ret)[N], const T (&ref)[N], const bool (&m)[N],
                                       const Params& p, P* part) {
  // Named scalars rather than an array, so the compiler keeps every running sum in a register.
  P n = 0, pg = 0, vf = 0, kl = 0, pg_clip = 0, dual_clip = 0, vf_clip = 0, lr2 = 0, neg_lr = 0, sum_adv = 0;
  P value_error = 0, sum_ratio = 0, sum_ret = 0, sum_v = 0, sum_v_old = 0;
  T ratio[N];
  for (int i = 0; i < N; ++i) {
    ratio[i] = T(0);
    if (!m[i]) continue;
    const Token<T> t = token_forward<T>(logp[i], v[i], old[i], v_old[i], adv[i], ret[i], ref[i], p);
    ratio[i] = t.ratio;
    n += P(1);
    pg += t.pg;
    vf += t.vf;
    kl += t.kl;
    pg_clip += t.pg_clipped ? P(1) : P(0);
    dual_clip += t.dual_clipped ? P(1) : P(0);
    vf_clip += t.vf_clipped ? P(1) : P(0);
    lr2 += t.log_ratio * t.log_ratio;
    neg_lr -= t.log_ratio;
    sum_adv += adv[i];
    value_error += (v[i] - ret[i]) * (v[i] - ret[i]);
    sum_ratio += t.ratio;
    sum_ret += ret[i];
    sum_v += v[i];
    sum_v_old += v_old[i];
  }
  if (n == P(0)) return;
  const P inv = P(1) / n;
  const P mean_ratio = sum_ratio * inv, mean_ret = sum_ret * inv, mean_v = sum_v * inv, mean_v_old = sum_v_old * inv;
  P m2_ratio = 0, m2_ret = 0, m2_v = 0, m2_v_old = 0;
  for (int i = 0; i < N; ++i) {
    if (!m[i]) continue;
    const P d0 = ratio[i] - mean_ratio, d1 = ret[i] - mean_ret, d2 = v[i] - mean_v, d3 = v_old[i] - mean_v_old;
    m2_ratio += d0 * d0;
    m2_ret += d1 * d1;
    m2_v += d2 * d2;
    m2_v_old += d3 * d3;
  }
  const P loc[kNumParts] = {n,       pg,          vf,         kl,         pg_clip,  dual_clip,  vf_clip,
                            lr2,     neg_lr,      sum_adv,    value_error, mean_ratio, m2_ratio, mean_ret,
                            m2_ret,  mean_v,      m2_v,       mean_v_old, m2_v_old};
  merge_parts(part, loc);
}

// A row's contribution to the aggregated pg / vf / kl sums: token sums (token_mean and
// seq_mean_token_sum) or their per-token mean (seq_mean_token_mean); rows with no token give none.
C10_HOST_DEVICE inline void row_contribution(const double* row, int aggregation, double* agg) {
  const double n = row[kN];
  if (n <= 0) return;
  const double w = aggregation == kSeqMeanTokenMean ? 1.0 / n : 1.0;
  agg[0] += row[kPg] * w;
  agg[1] += row[kVf] * w;
  agg[2] += row[kKl] * w;
}

// Gradient weight of every unmasked token of a row: d loss / d (token term).
template <typename S>
C10_HOST_DEVICE inline S row_scale(double n_row, const S* stats, int aggregation) {
  if (stats[sSkipped] != S(0) || n_row <= 0) return S(0);
  switch (aggregation) {
    case kSeqMeanTokenMean:
      return static_cast<S>(1.0 / (double(stats[sRows]) * n_row));
    case kSeqMeanTokenSum:
      return static_cast<S>(1.0 / double(stats[sRows]));
    default:
      return static_cast<S>(1.0 / double(stats[sTokens]));
  }
}

// The loss and the statistics from the merged totals, the aggregated sums and the number of rows
// with at least one token. TRL's ratio_threshold: when the mean ratio exceeds it, the losses (and
// so the gradients) are zero.
template <typename S>
C10_HOST_DEVICE inline void finalize(const double* tot, const double* agg, double rows, int aggregation,
                                     double vf_coef, double kl_coef, double ratio_threshold, S* stats) {
  const double n = tot[kN];
  const double inv_n = n > 0 ? 1.0 / n : 0.0;
  const double inv_agg = aggregation == kTokenMean ? inv_n : (rows > 0 ? 1.0 / rows : 0.0);
  const bool skip = n > 0 && tot[kRatioMean] > ratio_threshold;
  const double pg = skip ? 0.0 : agg[0] * inv_agg;
  const double vf = skip ? 0.0 : agg[1] * inv_agg;
  const double kl = agg[2] * inv_agg;
  stats[sLossPolicy] = static_cast<S>(pg);
  stats[sLossValue] = static_cast<S>(vf);
  stats[sLossKl] = static_cast<S>(kl);
  stats[sLossTotal] = skip ? S(0) : static_cast<S>(pg + vf_coef * vf + kl_coef * kl);
  stats[sPolicyClipfrac] = static_cast<S>(tot[kPgClip] * inv_n);
  stats[sPolicyDualClipfrac] = static_cast<S>(tot[kDualClip] * inv_n);
  stats[sPolicyApproxkl] = static_cast<S>(0.5 * tot[kLogRatio2] * inv_n);
  stats[sPolicyPolicykl] = static_cast<S>(tot[kNegLogRatio] * inv_n);
  stats[sPolicyRatioMean] = static_cast<S>(tot[kRatioMean]);
  stats[sPolicyRatioVar] = static_cast<S>(stat_var(n, tot[kRatioM2]));
  stats[sPolicyAdvantagesMean] = static_cast<S>(tot[kAdv] * inv_n);
  stats[sReturnsMean] = static_cast<S>(tot[kReturnsMean]);
  stats[sReturnsVar] = static_cast<S>(stat_var(n, tot[kReturnsM2]));
  stats[sValVpred] = static_cast<S>(tot[kVpredMean]);
  stats[sValVpredVar] = static_cast<S>(stat_var(n, tot[kVpredM2]));
  stats[sValError] = static_cast<S>(tot[kValueError] * inv_n);
  stats[sValClipfrac] = static_cast<S>(tot[kVfClip] * inv_n);
  stats[sValMean] = static_cast<S>(tot[kValuesMean]);
  stats[sValVar] = static_cast<S>(stat_var(n, tot[kValuesM2]));
  stats[sSkipped] = skip ? S(1) : S(0);
  stats[sTokens] = static_cast<S>(n);
  stats[sRows] = static_cast<S>(rows);
}

// ---------------------------------------------------------------------------------------------
// The job, filled by the host entry points (csrc/host/ppo_loss.cpp) and run by a backend's kernels.

struct Job {
  const char* op;
  c10::DeviceIndex device;
  at::ScalarType dtype;  // of the [B, T] inputs
  bool mask_bool;        // mask is bool, else of dtype
  int64_t B, T;
  // [B, T], contiguous; ref may be null (kl_coef 0).
  const void *logp, *v, *old, *v_old, *adv, *ret, *ref, *mask;
  Params p;
  double vf_coef;
  // Forward: loss [], stats [kNumStats] and row_scale [B] in the accumulation dtype (fp32, or fp64
  // for fp64 inputs).
  int aggregation;
  double ratio_threshold;
  void *loss, *stats, *row_scale;
  // Backward: grad_loss [1] and row_scale_in [B] in the accumulation dtype; d_logp, d_v [B, T] of dtype.
  const void *grad_loss, *row_scale_in;
  void *d_logp, *d_v;
};

struct Kernels {
  void (*forward)(const Job&);
  void (*backward)(const Job&);
};

// The entry points (csrc/host/ppo_loss.cpp), one per op of the schema.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss(
    const Kernels& k, const at::Tensor& logprobs, const at::Tensor& vpreds, const at::Tensor& old_logprobs,
    const at::Tensor& old_values, const at::Tensor& advantages, const at::Tensor& returns, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref_logprobs, double cliprange, double cliprange_value, double vf_coef,
    double kl_coef, c10::string_view kl_estimator, std::optional<double> dual_clip,
    std::optional<double> log_ratio_clamp, c10::string_view aggregation, double ratio_threshold,
    std::optional<double> cliprange_high);
std::tuple<at::Tensor, at::Tensor> ppo_loss_backward(
    const Kernels& k, const at::Tensor& grad_loss, const at::Tensor& row_scale, const at::Tensor& logprobs,
    const at::Tensor& vpreds, const at::Tensor& old_logprobs, const at::Tensor& old_values,
    const at::Tensor& advantages, const at::Tensor& returns, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref_logprobs, double cliprange, double cliprange_value, double vf_coef,
    double kl_coef, c10::string_view kl_estimator, std::optional<double> dual_clip,
    std::optional<double> log_ratio_clamp, std::optional<double> cliprange_high);

}  // namespace ppo_loss
}  // namespace ppo_fast
