// CPU kernels for the clipped PPO loss: loss = agg(max(-A r, -A clip(r))) + vf_coef agg(vf) + kl_coef agg(kl).
// Rows run in parallel, each accumulating fp64 partials over groups of 8 tokens (ppo_loss.h);
// the rows are then merged in index order, so the result does not depend on the thread count.
#include <ppo_fast/ppo_loss.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
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
Rows<scalar_t, mask_t> rows_of(const Tensors& t) {
  return {t.logprobs.size(0),
          t.logprobs.size(1),
          t.logprobs.data_ptr<scalar_t>(),
          t.vpreds.data_ptr<scalar_t>(),
          t.old_logprobs.data_ptr<scalar_t>(),
          t.old_values.data_ptr<scalar_t>(),
          t.advantages.data_ptr<scalar_t>(),
          t.returns.data_ptr<scalar_t>(),
          t.ref.defined() ? t.ref.data_ptr<scalar_t>() : nullptr,
          t.mask.data_ptr<mask_t>()};
}

template <typename F>
void dispatch(const at::Tensor& x, const at::Tensor& mask, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ppo_fast_ppo_loss", [&] {
    if (mask.scalar_type() == at::kBool) {
      f(scalar_t{}, bool{});
    } else {
      f(scalar_t{}, scalar_t{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& vpreds, const at::Tensor& old_logprobs,
    const at::Tensor& old_values, const at::Tensor& advantages, const at::Tensor& returns, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref_logprobs, double cliprange, double cliprange_value, double vf_coef,
    double kl_coef, c10::string_view kl_estimator, std::optional<double> dual_clip,
    std::optional<double> log_ratio_clamp, c10::string_view aggregation, double ratio_threshold) {
  const char* op = "ppo_loss";
  const Params p = check_params(op, cliprange, cliprange_value, vf_coef, kl_coef, std::string(kl_estimator), dual_clip,
                                log_ratio_clamp);
  const int agg_mode = parse_aggregation(op, std::string(aggregation));
  check_ratio_threshold(op, ratio_threshold);
  const Tensors t =
      check_inputs(op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, kl_coef);
  const int64_t B = logprobs.size(0);
  // Loss, stats and row scales in the accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck).
  const auto acc = logprobs.options().dtype(logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor stats = at::empty({kNumStats}, acc), scale = at::empty({B}, acc), loss = at::empty({}, acc);
  dispatch(t.logprobs, t.mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    using acc_t = at::opmath_type<scalar_t>;
    const auto rows = rows_of<scalar_t, mask_t>(t);
    std::vector<double> parts(B * kNumParts, 0.0);
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / rows.T), [&](int64_t b0, int64_t b1) {
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
    });
    double tot[kNumParts] = {0}, agg[3] = {0, 0, 0}, nonempty = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double* row = &parts[b * kNumParts];
      merge_parts(tot, row);
      row_contribution(row, agg_mode, agg);
      nonempty += row[kN] > 0 ? 1 : 0;
    }
    acc_t* st = stats.data_ptr<acc_t>();
    finalize(tot, agg, nonempty, agg_mode, vf_coef, kl_coef, ratio_threshold, st);
    acc_t* sc = scale.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) sc[b] = row_scale(parts[b * kNumParts + kN], st, agg_mode);
    *loss.data_ptr<acc_t>() = st[sLossTotal];
  });
  return {loss, stats, scale};
}

std::tuple<at::Tensor, at::Tensor> ppo_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& row_scale_t, const at::Tensor& logprobs, const at::Tensor& vpreds,
    const at::Tensor& old_logprobs, const at::Tensor& old_values, const at::Tensor& advantages,
    const at::Tensor& returns, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs, double cliprange,
    double cliprange_value, double vf_coef, double kl_coef, c10::string_view kl_estimator,
    std::optional<double> dual_clip, std::optional<double> log_ratio_clamp) {
  const char* op = "ppo_loss_backward";
  const Params p = check_params(op, cliprange, cliprange_value, vf_coef, kl_coef, std::string(kl_estimator), dual_clip,
                                log_ratio_clamp);
  const Tensors t =
      check_inputs(op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, kl_coef);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ",
              check::shape_str(grad_loss));
  TORCH_CHECK(row_scale_t.dim() == 1 && row_scale_t.size(0) == B, op, ": row_scale must be [B] with B = ", B,
              ", got ", check::shape_str(row_scale_t));
  const auto acc_type = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scale = row_scale_t.to(acc_type).contiguous(), g_t = grad_loss.to(acc_type).reshape({});
  at::Tensor d_logp = at::empty_like(t.logprobs), d_v = at::empty_like(t.logprobs);
  dispatch(t.logprobs, t.mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    using acc_t = at::opmath_type<scalar_t>;
    const auto rows = rows_of<scalar_t, mask_t>(t);
    const acc_t* sc = scale.data_ptr<acc_t>();
    const acc_t g = *g_t.data_ptr<acc_t>();
    scalar_t* gl = d_logp.data_ptr<scalar_t>();
    scalar_t* gv = d_v.data_ptr<scalar_t>();
    const acc_t vfc = static_cast<acc_t>(vf_coef);
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / T), [&](int64_t b0, int64_t b1) {
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
    });
  });
  return {d_logp, d_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("ppo_loss", &ppo_loss_cpu);
  m.impl("ppo_loss_backward", &ppo_loss_backward_cpu);
}

}  // namespace ppo_loss
}  // namespace ppo_fast
