// CPU kernels for rollout post-processing: A_t = r_t + gamma V_{t+1} - V_t + gamma lam A_{t+1}.
// Rows run in parallel; within a row the reverse affine recurrence of gae.h is applied in order.
// Reductions (whitening moments) are per row or per fixed chunk, merged in index order in fp64,
// so results do not depend on the thread count.
#include <ppo_fast/gae.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace ppo_fast {
namespace gae {
namespace {

using MomentsD = Moments<double>;

// One pass over each row, right to left. Every pointer but mask may be null: the job computes
// what its outputs ask for.
template <typename scalar_t>
struct RowJob {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t B = 0, T = 0;
  // Reward inputs: either rewards_in, or (scores, logprobs, ref_logprobs) with kl_coef/kl_mode.
  const scalar_t* rewards_in = nullptr;
  const acc_t* scores = nullptr;
  const scalar_t* logprobs = nullptr;
  const scalar_t* ref_logprobs = nullptr;
  acc_t kl_coef = 0;
  int kl_mode = kKl;
  // Reward outputs.
  scalar_t* rewards_out = nullptr;
  scalar_t* non_score_out = nullptr;
  scalar_t* kl_out = nullptr;
  // GAE: runs when values is set.
  const scalar_t* values = nullptr;
  acc_t gamma = 1, lam = 1;
  bool carry_masked = false;
  bool whiten_rewards = false;
  acc_t reward_mean = 0, reward_rstd = 1;
  scalar_t* adv_out = nullptr;  // advantages in the input dtype (no whitening follows)
  acc_t* adv_acc = nullptr;     // raw advantages kept in fp32 for the whitening pass
  scalar_t* returns_out = nullptr;
  // Per-row moments over unmasked positions of the advantages (GAE) or of the rewards.
  MomentsD* row_moments = nullptr;
};

template <typename scalar_t, typename mask_t>
void run_rows(const RowJob<scalar_t>& job, const mask_t* mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = job.T;
  const bool scan = job.values != nullptr;
  at::parallel_for(0, job.B, std::max<int64_t>(1, 16384 / T), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> stash(job.row_moments ? T : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      const mask_t* m_row = mask + o;
      int64_t last = -1;
      if (!job.rewards_in) {
        for (int64_t t = T - 1; t >= 0; --t) {
          if (m_row[t] != mask_t(0)) {
            last = t;
            break;
          }
        }
      }
      acc_t A = 0, v_next = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const bool m = m_row[t] != mask_t(0);
        acc_t r;
        if (job.rewards_in) {
          r = static_cast<acc_t>(job.rewards_in[o + t]);
        } else {
          const acc_t kl = kl_penalty<acc_t>(static_cast<acc_t>(job.logprobs[o + t]),
                                             static_cast<acc_t>(job.ref_logprobs[o + t]), job.kl_mode);
          const acc_t nsr = -job.kl_coef * kl;
          r = t == last ? nsr + job.scores[b] : nsr;
          if (job.kl_out) job.kl_out[o + t] = static_cast<scalar_t>(kl);
          if (job.non_score_out) job.non_score_out[o + t] = static_cast<scalar_t>(nsr);
          if (job.rewards_out) job.rewards_out[o + t] = static_cast<scalar_t>(r);
        }
        // Moments of the rewards as stored (rounded to scalar_t): the scan that whitens them reads
        // them back from memory, and whitening amplifies any mismatch by 1/std.
        acc_t tracked = masked(static_cast<acc_t>(static_cast<scalar_t>(r)), m);
        if (scan) {
          const acc_t r_eff = job.whiten_rewards ? whiten_reward(r, m, job.reward_mean, job.reward_rstd) : tracked;
          const acc_t v = masked(static_cast<acc_t>(job.values[o + t]), m);
          A = apply(advantage_map(r_eff, v, v_next, m, job.carry_masked, job.gamma, job.lam), A);
          v_next = apply(next_value_map(v, m, job.carry_masked), v_next);
          if (job.adv_out) job.adv_out[o + t] = static_cast<scalar_t>(A);
          if (job.adv_acc) job.adv_acc[o + t] = A;
          job.returns_out[o + t] = static_cast<scalar_t>(A + v);
          tracked = A;
        }
        if (job.row_moments) stash[t] = tracked;
      }
      if (job.row_moments) {
        // Two passes over the row, which is still in cache: exact mean first, then M2.
        double n = 0, sum = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (m_row[t] != mask_t(0)) {
            n += 1;
            sum += stash[t];
          }
        }
        const double mean = n > 0 ? sum / n : 0.0;
        double m2 = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (m_row[t] != mask_t(0)) {
            const double d = stash[t] - mean;
            m2 += d * d;
          }
        }
        job.row_moments[b] = {n, mean, m2};
      }
    }
  });
}

// Moments of x over mask != 0 in fixed chunks (independent of the thread count).
template <typename scalar_t, typename mask_t>
std::vector<MomentsD> chunk_moments(const scalar_t* x, const mask_t* mask, int64_t N) {
  constexpr int64_t kChunk = 8192;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<MomentsD> out(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
      double n = 0, sum = 0, m2 = 0;
      for (int64_t i = lo; i < hi; ++i) {
        if (mask[i] != mask_t(0)) {
          n += 1;
          sum += static_cast<double>(x[i]);
        }
      }
      const double mean = n > 0 ? sum / n : 0.0;
      for (int64_t i = lo; i < hi; ++i) {
        if (mask[i] != mask_t(0)) {
          const double d = static_cast<double>(x[i]) - mean;
          m2 += d * d;
        }
      }
      out[c] = {n, mean, m2};
    }
  });
  return out;
}

// mean and 1 / sqrt(var + eps) of the union of the parts, merged in order.
void reduce_moments(const std::vector<MomentsD>& parts, double eps, double& mean, double& rstd) {
  MomentsD acc{0, 0, 0};
  for (const auto& p : parts) acc = moments_merge(acc, p);
  double var;
  moments_finalize(acc, mean, var);
  rstd = 1.0 / std::sqrt(var + eps);
}

template <typename in_t, typename out_t>
void whiten_apply(const in_t* x, out_t* out, int64_t N, double mean, double rstd, bool shift_mean) {
  using acc_t = at::opmath_type<out_t>;
  const acc_t mean_a = static_cast<acc_t>(mean), rstd_a = static_cast<acc_t>(rstd);
  at::parallel_for(0, N, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      out[i] = static_cast<out_t>(whiten<acc_t>(static_cast<acc_t>(x[i]), mean_a, rstd_a, shift_mean));
    }
  });
}

// Calls f(scalar_t{}, mask_t{}) with the mask read as bool or as the values' dtype.
template <typename F>
void dispatch(const char* /*op*/, const at::Tensor& x, const at::Tensor& mask, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ppo_fast_gae", [&] {
    if (mask.scalar_type() == at::kBool) {
      f(scalar_t{}, bool{});
    } else {
      f(scalar_t{}, scalar_t{});
    }
  });
}

constexpr double kWhitenEps = 1e-8;  // TRL's masked_whiten

// Kept in the accumulation dtype so double stays double.
at::Tensor acc_scores(const at::Tensor& scores, const at::Tensor& like) {
  return scores.to(like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compute_rewards_cpu(const at::Tensor& scores,
                                                                   const at::Tensor& logprobs,
                                                                   const at::Tensor& ref_logprobs,
                                                                   const at::Tensor& mask_in, double kl_coef,
                                                                   c10::string_view kl_penalty_name) {
  const char* op = "compute_rewards";
  const int mode = parse_kl_penalty(op, std::string(kl_penalty_name));
  check::finite(op, "kl_coef", kl_coef);
  const at::Tensor mask = check_bt(op, logprobs, "logprobs", {{"ref_logprobs", &ref_logprobs}}, mask_in);
  check_scores(op, scores, logprobs);
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous();
  const at::Tensor sc = acc_scores(scores, lp);
  at::Tensor rewards = at::empty_like(lp), nsr = at::empty_like(lp), kl = at::empty_like(lp);
  dispatch(op, lp, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    RowJob<scalar_t> job;
    job.B = lp.size(0);
    job.T = lp.size(1);
    job.scores = sc.data_ptr<at::opmath_type<scalar_t>>();
    job.logprobs = lp.data_ptr<scalar_t>();
    job.ref_logprobs = ref.data_ptr<scalar_t>();
    job.kl_coef = kl_coef;
    job.kl_mode = mode;
    job.rewards_out = rewards.data_ptr<scalar_t>();
    job.non_score_out = nsr.data_ptr<scalar_t>();
    job.kl_out = kl.data_ptr<scalar_t>();
    run_rows<scalar_t, mask_t>(job, mask.data_ptr<mask_t>());
  });
  return {rewards, nsr, kl};
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& values, const at::Tensor& rewards,
                                           const at::Tensor& mask_in, double gamma, double lam, bool carry_masked) {
  const char* op = "gae";
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask = check_bt(op, values, "values", {{"rewards", &rewards}}, mask_in);
  const at::Tensor v = values.contiguous(), r = rewards.contiguous();
  at::Tensor adv = at::empty_like(v), ret = at::empty_like(v);
  dispatch(op, v, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    RowJob<scalar_t> job;
    job.B = v.size(0);
    job.T = v.size(1);
    job.rewards_in = r.data_ptr<scalar_t>();
    job.values = v.data_ptr<scalar_t>();
    job.gamma = gamma;
    job.lam = lam;
    job.carry_masked = carry_masked;
    job.adv_out = adv.data_ptr<scalar_t>();
    job.returns_out = ret.data_ptr<scalar_t>();
    run_rows<scalar_t, mask_t>(job, mask.data_ptr<mask_t>());
  });
  return {adv, ret};
}

at::Tensor masked_whiten_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean, double eps) {
  const char* op = "masked_whiten";
  check::floating(op, "x", x_in);
  check::nonempty(op, "x", x_in);
  check::finite(op, "eps", eps);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor mask = check::mask(op, mask_in, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  dispatch(op, x, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    double mean, rstd;
    reduce_moments(chunk_moments(x.data_ptr<scalar_t>(), mask.data_ptr<mask_t>(), x.numel()), eps, mean, rstd);
    whiten_apply(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), mean, rstd, shift_mean);
  });
  return out;
}

// GAE with whitened advantages; the scan writes raw advantages in fp32 and per-row moments, then
// one pass whitens them into the output dtype.
template <typename scalar_t, typename mask_t>
void advantages_and_whiten(RowJob<scalar_t>& job, const mask_t* mask, at::Tensor& adv) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor adv_raw = at::empty(adv.sizes(), adv.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  std::vector<MomentsD> rows(job.B);
  job.adv_acc = adv_raw.data_ptr<acc_t>();
  job.row_moments = rows.data();
  run_rows<scalar_t, mask_t>(job, mask);
  double mean, rstd;
  reduce_moments(rows, kWhitenEps, mean, rstd);
  whiten_apply(job.adv_acc, adv.data_ptr<scalar_t>(), adv.numel(), mean, rstd, /*shift_mean=*/true);
}

std::tuple<at::Tensor, at::Tensor> compute_advantages_cpu(const at::Tensor& values, const at::Tensor& rewards,
                                                          const at::Tensor& mask_in, double gamma, double lam,
                                                          bool whiten_rewards, bool carry_masked) {
  const char* op = "compute_advantages";
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask = check_bt(op, values, "values", {{"rewards", &rewards}}, mask_in);
  const at::Tensor v = values.contiguous(), r = rewards.contiguous();
  at::Tensor adv = at::empty_like(v), ret = at::empty_like(v);
  dispatch(op, v, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    RowJob<scalar_t> job;
    job.B = v.size(0);
    job.T = v.size(1);
    job.rewards_in = r.data_ptr<scalar_t>();
    job.values = v.data_ptr<scalar_t>();
    job.gamma = gamma;
    job.lam = lam;
    job.carry_masked = carry_masked;
    job.returns_out = ret.data_ptr<scalar_t>();
    if (whiten_rewards) {
      double mean, rstd;
      reduce_moments(chunk_moments(job.rewards_in, mask.data_ptr<mask_t>(), r.numel()), kWhitenEps, mean, rstd);
      job.whiten_rewards = true;
      job.reward_mean = mean;
      job.reward_rstd = rstd;
    }
    advantages_and_whiten(job, mask.data_ptr<mask_t>(), adv);
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rollout_advantages_cpu(
    const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values,
    const at::Tensor& mask_in, double kl_coef, c10::string_view kl_penalty_name, double gamma, double lam,
    bool whiten_rewards, bool carry_masked) {
  const char* op = "rollout_advantages";
  const int mode = parse_kl_penalty(op, std::string(kl_penalty_name));
  check::finite(op, "kl_coef", kl_coef);
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask =
      check_bt(op, logprobs, "logprobs", {{"ref_logprobs", &ref_logprobs}, {"values", &values}}, mask_in);
  check_scores(op, scores, logprobs);
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous(), v = values.contiguous();
  const at::Tensor sc = acc_scores(scores, lp);
  at::Tensor rewards = at::empty_like(lp), nsr = at::empty_like(lp), kl = at::empty_like(lp);
  at::Tensor adv = at::empty_like(lp), ret = at::empty_like(lp);
  dispatch(op, lp, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    const mask_t* m = mask.data_ptr<mask_t>();
    RowJob<scalar_t> job;
    job.B = lp.size(0);
    job.T = lp.size(1);
    job.scores = sc.data_ptr<at::opmath_type<scalar_t>>();
    job.logprobs = lp.data_ptr<scalar_t>();
    job.ref_logprobs = ref.data_ptr<scalar_t>();
    job.kl_coef = kl_coef;
    job.kl_mode = mode;
    job.rewards_out = rewards.data_ptr<scalar_t>();
    job.non_score_out = nsr.data_ptr<scalar_t>();
    job.kl_out = kl.data_ptr<scalar_t>();
    if (whiten_rewards) {
      // Rewards first (their moments are needed before the scan), then the scan reads them back.
      std::vector<MomentsD> rows(job.B);
      job.row_moments = rows.data();
      run_rows<scalar_t, mask_t>(job, m);
      double mean, rstd;
      reduce_moments(rows, kWhitenEps, mean, rstd);
      RowJob<scalar_t> scan;
      scan.B = job.B;
      scan.T = job.T;
      scan.rewards_in = job.rewards_out;
      scan.whiten_rewards = true;
      scan.reward_mean = mean;
      scan.reward_rstd = rstd;
      job = scan;
    }
    job.values = v.data_ptr<scalar_t>();
    job.gamma = gamma;
    job.lam = lam;
    job.carry_masked = carry_masked;
    job.returns_out = ret.data_ptr<scalar_t>();
    advantages_and_whiten(job, m, adv);
  });
  return {rewards, nsr, kl, adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("compute_rewards", &compute_rewards_cpu);
  m.impl("gae", &gae_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
  m.impl("compute_advantages", &compute_advantages_cpu);
  m.impl("rollout_advantages", &rollout_advantages_cpu);
}

}  // namespace gae
}  // namespace ppo_fast
