// CPU kernels for rollout post-processing: A_t = r_t + gamma V_{t+1} - V_t + gamma lam A_{t+1}.
// Rows run in parallel; within a row the reverse affine recurrence of gae.h is applied in order.
// Reductions (whitening moments) are per row or per fixed chunk, merged in index order in fp64,
// so results do not depend on the thread count.
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/gae.h>

#include <torch/library.h>

#include <vector>

namespace ppo_fast {
namespace gae {
namespace {

// mean and 1 / sqrt(var + eps) of the union of parts[0..n) (fp64 [n, 3]), merged in order.
void reduce_parts(const void* parts, int64_t n, double eps, double& mean, double& rstd) {
  const double* p = as<double>(parts);
  Moments<double> acc{0, 0, 0};
  for (int64_t i = 0; i < n; ++i) acc = moments_merge(acc, Moments<double>{p[3 * i], p[3 * i + 1], p[3 * i + 2]});
  double var;
  moments_finalize(acc, mean, var);
  rstd = 1.0 / std::sqrt(var + eps);
}

void store_part(void* parts, int64_t i, const Moments<double>& m) {
  double* p = as<double>(parts) + 3 * i;
  p[0] = m.n;
  p[1] = m.mean;
  p[2] = m.m2;
}

// Rows [b0, b1) of a rows pass, right to left: the rewards, the scan, the per-row moments, as the
// job asks. Its own function, so that the job's pointers are locals the compiler keeps in registers.
template <typename scalar_t, typename mask_t>
void rows_range(const Job& job, int64_t b0, int64_t b1, at::opmath_type<scalar_t> reward_mean,
                at::opmath_type<scalar_t> reward_rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = job.T;
  const mask_t* mask = as<mask_t>(job.mask);
  const scalar_t* rewards_in = as<scalar_t>(job.rewards_in);
  const acc_t* scores = as<acc_t>(job.scores);
  const scalar_t* logprobs = as<scalar_t>(job.logprobs);
  const scalar_t* ref_logprobs = as<scalar_t>(job.ref_logprobs);
  scalar_t* rewards_out = as<scalar_t>(job.rewards_out);
  scalar_t* non_score_out = as<scalar_t>(job.non_score_out);
  scalar_t* kl_out = as<scalar_t>(job.kl_out);
  const scalar_t* values = as<scalar_t>(job.values);
  scalar_t* adv_out = as<scalar_t>(job.adv_out);
  acc_t* adv_acc = as<acc_t>(job.adv_acc);
  scalar_t* returns_out = as<scalar_t>(job.returns_out);
  const acc_t kl_coef = job.kl_coef, gamma = job.gamma, lam = job.lam;
  const int kl_mode = job.kl_mode;
  const bool carry_masked = job.carry_masked;
  const bool scan = values != nullptr;
  const bool whiten_rewards = job.reward_parts != nullptr;
  void* row_moments = job.row_moments;
  std::vector<acc_t> stash(row_moments ? T : 0);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * T;
    const mask_t* m_row = mask + o;
    int64_t last = -1;
    if (!rewards_in) {
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
      if (rewards_in) {
        r = static_cast<acc_t>(rewards_in[o + t]);
      } else {
        const acc_t kl = kl_penalty<acc_t>(static_cast<acc_t>(logprobs[o + t]),
                                           static_cast<acc_t>(ref_logprobs[o + t]), kl_mode);
        const acc_t nsr = -kl_coef * kl;
        r = t == last ? nsr + scores[b] : nsr;
        if (kl_out) kl_out[o + t] = static_cast<scalar_t>(kl);
        if (non_score_out) non_score_out[o + t] = static_cast<scalar_t>(nsr);
        if (rewards_out) rewards_out[o + t] = static_cast<scalar_t>(r);
      }
      // Moments of the rewards as stored (rounded to scalar_t): the scan that whitens them reads
      // them back from memory, and whitening amplifies any mismatch by 1/std.
      acc_t tracked = masked(static_cast<acc_t>(static_cast<scalar_t>(r)), m);
      if (scan) {
        const acc_t r_eff = whiten_rewards ? whiten_reward(r, m, reward_mean, reward_rstd) : tracked;
        const acc_t v = masked(static_cast<acc_t>(values[o + t]), m);
        A = apply(advantage_map(r_eff, v, v_next, m, carry_masked, gamma, lam), A);
        v_next = apply(next_value_map(v, m, carry_masked), v_next);
        if (adv_out) adv_out[o + t] = static_cast<scalar_t>(A);
        if (adv_acc) adv_acc[o + t] = A;
        returns_out[o + t] = static_cast<scalar_t>(A + v);
        tracked = A;
      }
      if (row_moments) stash[t] = tracked;
    }
    if (row_moments) {
      // The row is still in cache: exact mean first, then M2.
      const auto counted = [&](int64_t t) { return m_row[t] != mask_t(0); };
      const auto value = [&](int64_t t) { return static_cast<double>(stash[t]); };
      store_part(row_moments, b, cpu::masked_moments<false>(0, T, counted, value).m);
    }
  }
}

void rows_pass(const Job& job) {
  // Reward whitening: the moments merged once, before the rows.
  double mean = 0, rstd = 1;
  if (job.reward_parts) reduce_parts(job.reward_parts, job.n_reward_parts, kWhitenEps, mean, rstd);
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) {
    using acc_t = at::opmath_type<decltype(s)>;
    const acc_t reward_mean = mean, reward_rstd = rstd;
    at::parallel_for(0, job.B, std::max<int64_t>(1, 16384 / job.T), [&](int64_t b0, int64_t b1) {
      rows_range<decltype(s), decltype(mk)>(job, b0, b1, reward_mean, reward_rstd);
    });
  });
}

// One part per fixed chunk: the moments of moments_in over the mask.
void moments_pass(const Job& job) {
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) {
    const auto* x = as<decltype(s)>(job.moments_in);
    const auto* mask = as<decltype(mk)>(job.mask);
    cpu::parallel_chunks(job.N, [&](int64_t c, int64_t lo, int64_t hi) {
      const auto counted = [&](int64_t i) { return mask[i] != decltype(mk)(0); };
      const auto value = [&](int64_t i) { return static_cast<double>(x[i]); };
      store_part(job.moments_out, c, cpu::masked_moments<false>(lo, hi, counted, value).m);
    });
  });
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

void whiten_pass(const Job& job) {
  double mean, rstd;
  reduce_parts(job.whiten_parts, job.n_whiten_parts, job.eps, mean, rstd);
  cpu::dispatch(job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    scalar_t* out = as<scalar_t>(job.whiten_out);
    if (job.whiten_in_acc) {
      whiten_apply(as<at::opmath_type<scalar_t>>(job.whiten_in), out, job.N, mean, rstd, job.shift_mean);
    } else {
      whiten_apply(as<scalar_t>(job.whiten_in), out, job.N, mean, rstd, job.shift_mean);
    }
  });
}

constexpr Kernels kCpu{at::kDouble, &rows_pass, &moments_pass, &whiten_pass};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("compute_rewards", bound<&compute_rewards, kCpu>);
  m.impl("gae", bound<&gae, kCpu>);
  m.impl("masked_whiten", bound<&masked_whiten, kCpu>);
  m.impl("compute_advantages", bound<&compute_advantages, kCpu>);
  m.impl("rollout_advantages", bound<&rollout_advantages, kCpu>);
}

}  // namespace gae
}  // namespace ppo_fast
