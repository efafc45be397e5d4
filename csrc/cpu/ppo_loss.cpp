// CPU kernels for the clipped PPO loss: loss = agg(max(-A r, -A clip(r))) + vf_coef agg(vf) + kl_coef agg(kl).
// Rows run in parallel, each accumulating fp64 partials over groups of 8 tokens (ppo_loss.h);
// the rows are then merged in index order, so the result does not depend on the thread count.
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/ppo_loss.h>

#include <torch/library.h>

#include <vector>

namespace ppo_fast {
namespace ppo_loss {
namespace {

constexpr int kGroup = 64;  // tokens per accumulate(): one moment merge per group

template <typename scalar_t, typename mask_t>
struct Rows {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t B, T;
  const scalar_t *logp, *v, *old, *v_old, *adv, *ret, *ref;  // ref may be null
  const mask_t* mask;

  // Loads the group of tokens [t0, t0 + kGroup) of row b; positions past T are masked.
  void load(int64_t b, int64_t t0, acc_t (&lp)[kGroup], acc_t (&vp)[kGroup], acc_t (&o)[kGroup],
            acc_t (&vo)[kGroup], acc_t (&a)[kGroup], acc_t (&r)[kGroup], acc_t (&rf)[kGroup],
            bool (&m)[kGroup]) const {
    const int64_t base = b * T;
    for (int i = 0; i < kGroup; ++i) {
      const int64_t t = t0 + i;
      const bool in = t < T;
      const int64_t j = base + (in ? t : 0);
      lp[i] = static_cast<acc_t>(logp[j]);
      vp[i] = static_cast<acc_t>(v[j]);
      o[i] = static_cast<acc_t>(old[j]);
      vo[i] = static_cast<acc_t>(v_old[j]);
      a[i] = static_cast<acc_t>(adv[j]);
      r[i] = static_cast<acc_t>(ret[j]);
      rf[i] = ref ? static_cast<acc_t>(ref[j]) : acc_t(0);
      m[i] = in && mask[j] != mask_t(0);
    }
  }
};

template <typename scalar_t, typename mask_t>
Rows<scalar_t, mask_t> rows_of(const Job& j) {
  return {j.B,
          j.T,
          as<scalar_t>(j.logp),
          as<scalar_t>(j.v),
          as<scalar_t>(j.old),
          as<scalar_t>(j.v_old),
          as<scalar_t>(j.adv),
          as<scalar_t>(j.ret),
          as<scalar_t>(j.ref),
          as<mask_t>(j.mask)};
}

// Rows [b0, b1) of each pass: plain functions, so that the job's pointers and scalars are locals
// the compiler keeps in registers.
template <typename scalar_t, typename mask_t>
void forward_rows(const Job& job, int64_t b0, int64_t b1, double* parts) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rows = rows_of<scalar_t, mask_t>(job);
  const Params p = job.p;
  acc_t lp[kGroup], vp[kGroup], o[kGroup], vo[kGroup], a[kGroup], r[kGroup], rf[kGroup];
  bool m[kGroup];
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t0 = 0; t0 < rows.T; t0 += kGroup) {
      rows.load(b, t0, lp, vp, o, vo, a, r, rf, m);
      // The group in the accumulation dtype, merged into the row's fp64 partial.
      acc_t group[kNumParts] = {};
      accumulate<kGroup, acc_t, acc_t>(lp, vp, o, vo, a, r, rf, m, p, group);
      merge_parts(&parts[b * kNumParts], group);
    }
  }
}

template <typename scalar_t, typename mask_t>
void backward_rows(const Job& job, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rows = rows_of<scalar_t, mask_t>(job);
  const Params p = job.p;
  const int64_t T = job.T;
  const acc_t* sc = as<acc_t>(job.row_scale_in);
  const acc_t g = *as<acc_t>(job.grad_loss);
  scalar_t* gl = as<scalar_t>(job.d_logp);
  scalar_t* gv = as<scalar_t>(job.d_v);
  const acc_t vfc = static_cast<acc_t>(job.vf_coef);
  for (int64_t b = b0; b < b1; ++b) {
    const acc_t w = g * sc[b];
    for (int64_t i = b * T; i < (b + 1) * T; ++i) {
      acc_t dl = 0, dv = 0;
      if (w != acc_t(0) && rows.mask[i] != mask_t(0)) {
        token_backward<acc_t>(static_cast<acc_t>(rows.logp[i]), static_cast<acc_t>(rows.v[i]),
                              static_cast<acc_t>(rows.old[i]), static_cast<acc_t>(rows.v_old[i]),
                              static_cast<acc_t>(rows.adv[i]), static_cast<acc_t>(rows.ret[i]),
                              rows.ref ? static_cast<acc_t>(rows.ref[i]) : acc_t(0), p, vfc, dl, dv);
      }
      gl[i] = static_cast<scalar_t>(dl * w);
      gv[i] = static_cast<scalar_t>(dv * w);
    }
  }
}

// Rows in parallel, a few thousand tokens per grain.
template <typename F>
void parallel_rows(const Job& job, const F& f) {
  at::parallel_for(0, job.B, std::max<int64_t>(1, 4096 / job.T), f);
}

void forward(const Job& job) {
  const int64_t B = job.B;
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) {
    using acc_t = at::opmath_type<decltype(s)>;
    std::vector<double> parts(B * kNumParts, 0.0);
    parallel_rows(job, [&](int64_t b0, int64_t b1) {
      forward_rows<decltype(s), decltype(mk)>(job, b0, b1, parts.data());
    });
    double tot[kNumParts] = {0}, agg[3] = {0, 0, 0}, nonempty = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double* row = &parts[b * kNumParts];
      merge_parts(tot, row);
      row_contribution(row, job.aggregation, agg);
      nonempty += row[kN] > 0 ? 1 : 0;
    }
    acc_t* st = as<acc_t>(job.stats);
    finalize(tot, agg, nonempty, job.aggregation, job.vf_coef, job.p.kl_coef, job.ratio_threshold, st);
    acc_t* sc = as<acc_t>(job.row_scale);
    for (int64_t b = 0; b < B; ++b) sc[b] = row_scale(parts[b * kNumParts + kN], st, job.aggregation);
    *as<acc_t>(job.loss) = st[sLossTotal];
  });
}

void backward(const Job& job) {
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) {
    parallel_rows(job, [&](int64_t b0, int64_t b1) { backward_rows<decltype(s), decltype(mk)>(job, b0, b1); });
  });
}

constexpr Kernels kCpu{&forward, &backward};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("ppo_loss", bound<&ppo_loss, kCpu>);
  m.impl("ppo_loss_backward", bound<&ppo_loss_backward, kCpu>);
}

}  // namespace ppo_loss
}  // namespace ppo_fast
