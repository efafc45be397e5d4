// Host entry points of the PPO loss (ppo_loss.h), shared by the CPU and CUDA backends: argument
// checks, contiguous inputs, outputs, and the job the kernels run on.
#include <ppo_fast/ppo_loss.h>

#include <string>
#include <utility>

namespace ppo_fast {
namespace ppo_loss {
namespace {

int parse_kl_estimator(const char* op, const std::string& s) {
  if (s == "k1") return kK1;
  if (s == "k2") return kK2;
  if (s == "k3") return kK3;
  TORCH_CHECK(false, op, ": kl_estimator must be one of 'k1', 'k2', 'k3', got '", s, "'");
  return kK1;
}

int parse_aggregation(const char* op, const std::string& s) {
  if (s == "token_mean") return kTokenMean;
  if (s == "seq_mean_token_mean") return kSeqMeanTokenMean;
  if (s == "seq_mean_token_sum") return kSeqMeanTokenSum;
  TORCH_CHECK(false, op, ": aggregation must be one of 'token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum', got '",
              s, "'");
  return kTokenMean;
}

struct Tensors {
  at::Tensor logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref;  // contiguous
};

Tensors check_inputs(const char* op, const at::Tensor& logprobs, const at::Tensor& vpreds,
                     const at::Tensor& old_logprobs, const at::Tensor& old_values, const at::Tensor& advantages,
                     const at::Tensor& returns, const at::Tensor& mask, const std::optional<at::Tensor>& ref_logprobs,
                     double kl_coef) {
  check::rank(op, "logprobs", logprobs, 2, "[B, T]");
  check::floating(op, "logprobs", logprobs);
  check::nonempty(op, "logprobs", logprobs);
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"vpreds", &vpreds},         {"old_logprobs", &old_logprobs}, {"old_values", &old_values},
      {"advantages", &advantages}, {"returns", &returns},           {"ref_logprobs", ref_logprobs ? &*ref_logprobs : nullptr}};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    check::same_device(op, name, *t, "logprobs", logprobs);
    check::rank(op, name, *t, 2, "[B, T]");
    check::floating(op, name, *t);
    check::same_shape(op, name, *t, "logprobs", logprobs);
    check::same_dtype(op, name, *t, "logprobs", logprobs);
  }
  at::Tensor m = check::mask(op, mask, "logprobs", logprobs);
  TORCH_CHECK(kl_coef == 0.0 || ref_logprobs.has_value(), op, ": kl_coef is ", kl_coef,
              " but ref_logprobs is None; pass the reference log-probs or set kl_coef=0");
  return Tensors{logprobs.contiguous(),  vpreds.contiguous(),  old_logprobs.contiguous(),
                 old_values.contiguous(), advantages.contiguous(), returns.contiguous(),
                 m,                       ref_logprobs ? ref_logprobs->contiguous() : at::Tensor()};
}

Params check_params(const char* op, double cliprange, double cliprange_value, double vf_coef, double kl_coef,
                    const std::string& kl_estimator, std::optional<double> dual_clip,
                    std::optional<double> log_ratio_clamp, std::optional<double> cliprange_high) {
  check::finite(op, "cliprange", cliprange);
  check::finite(op, "cliprange_value", cliprange_value);
  check::finite(op, "vf_coef", vf_coef);
  check::finite(op, "kl_coef", kl_coef);
  TORCH_CHECK(cliprange >= 0, op, ": cliprange must be >= 0, got ", cliprange);
  TORCH_CHECK(cliprange_value >= 0, op, ": cliprange_value must be >= 0, got ", cliprange_value);
  if (cliprange_high) {
    TORCH_CHECK(std::isfinite(*cliprange_high) && *cliprange_high >= 0, op,
                ": cliprange_high must be finite and >= 0 (or None), got ", *cliprange_high);
  }
  Params p{};
  p.cliprange = cliprange;
  p.cliprange_high = cliprange_high.value_or(cliprange);
  p.cliprange_value = cliprange_value;
  p.kl_coef = kl_coef;
  p.kl_estimator = parse_kl_estimator(op, kl_estimator);
  if (dual_clip) {
    TORCH_CHECK(std::isfinite(*dual_clip) && *dual_clip > 1.0, op, ": dual_clip must be > 1 (or None), got ",
                *dual_clip);
    p.has_dual_clip = true;
    p.dual_clip = *dual_clip;
  }
  if (log_ratio_clamp) {
    TORCH_CHECK(std::isfinite(*log_ratio_clamp) && *log_ratio_clamp > 0.0, op,
                ": log_ratio_clamp must be > 0 (or None), got ", *log_ratio_clamp);
    p.has_log_ratio_clamp = true;
    p.log_ratio_clamp = *log_ratio_clamp;
  }
  return p;
}

void check_ratio_threshold(const char* op, double ratio_threshold) {
  TORCH_CHECK(!std::isnan(ratio_threshold) && ratio_threshold > 0, op,
              ": ratio_threshold must be > 0 (inf disables it), got ", ratio_threshold);
}

Job job_of(const char* op, const Tensors& t, const Params& p, double vf_coef) {
  Job j{};
  j.op = op;
  j.device = t.logprobs.device().index();
  j.dtype = t.logprobs.scalar_type();
  j.mask_bool = t.mask.scalar_type() == at::kBool;
  j.B = t.logprobs.size(0);
  j.T = t.logprobs.size(1);
  j.logp = t.logprobs.data_ptr();
  j.v = t.vpreds.data_ptr();
  j.old = t.old_logprobs.data_ptr();
  j.v_old = t.old_values.data_ptr();
  j.adv = t.advantages.data_ptr();
  j.ret = t.returns.data_ptr();
  j.ref = t.ref.defined() ? t.ref.data_ptr() : nullptr;
  j.mask = t.mask.data_ptr();
  j.p = p;
  j.vf_coef = vf_coef;
  return j;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss(
    const Kernels& k, const at::Tensor& logprobs, const at::Tensor& vpreds, const at::Tensor& old_logprobs,
    const at::Tensor& old_values, const at::Tensor& advantages, const at::Tensor& returns, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref_logprobs, double cliprange, double cliprange_value, double vf_coef,
    double kl_coef, c10::string_view kl_estimator, std::optional<double> dual_clip,
    std::optional<double> log_ratio_clamp, c10::string_view aggregation, double ratio_threshold,
    std::optional<double> cliprange_high) {
  const char* op = "ppo_loss";
  const Params p = check_params(op, cliprange, cliprange_value, vf_coef, kl_coef, std::string(kl_estimator), dual_clip,
                                log_ratio_clamp, cliprange_high);
  const int agg_mode = parse_aggregation(op, std::string(aggregation));
  check_ratio_threshold(op, ratio_threshold);
  const Tensors t =
      check_inputs(op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, kl_coef);
  // Loss, stats and row scales in the accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck).
  const auto acc = logprobs.options().dtype(acc_dtype(logprobs.scalar_type()));
  at::Tensor loss = at::empty({}, acc), stats = at::empty({kNumStats}, acc), scale = at::empty({logprobs.size(0)}, acc);
  Job job = job_of(op, t, p, vf_coef);
  job.aggregation = agg_mode;
  job.ratio_threshold = ratio_threshold;
  job.loss = loss.data_ptr();
  job.stats = stats.data_ptr();
  job.row_scale = scale.data_ptr();
  k.forward(job);
  return {loss, stats, scale};
}

std::tuple<at::Tensor, at::Tensor> ppo_loss_backward(
    const Kernels& k, const at::Tensor& grad_loss, const at::Tensor& row_scale, const at::Tensor& logprobs,
    const at::Tensor& vpreds, const at::Tensor& old_logprobs, const at::Tensor& old_values,
    const at::Tensor& advantages, const at::Tensor& returns, const at::Tensor& mask,
    const std::optional<at::Tensor>& ref_logprobs, double cliprange, double cliprange_value, double vf_coef,
    double kl_coef, c10::string_view kl_estimator, std::optional<double> dual_clip,
    std::optional<double> log_ratio_clamp, std::optional<double> cliprange_high) {
  const char* op = "ppo_loss_backward";
  const Params p = check_params(op, cliprange, cliprange_value, vf_coef, kl_coef, std::string(kl_estimator), dual_clip,
                                log_ratio_clamp, cliprange_high);
  const Tensors t =
      check_inputs(op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, kl_coef);
  const int64_t B = logprobs.size(0);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ",
              check::shape_str(grad_loss));
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == B, op, ": row_scale must be [B] with B = ", B, ", got ",
              check::shape_str(row_scale));
  check::same_device(op, "grad_loss", grad_loss, "logprobs", logprobs);
  check::same_device(op, "row_scale", row_scale, "logprobs", logprobs);
  const auto acc = acc_dtype(logprobs.scalar_type());
  const at::Tensor g = grad_loss.to(acc).contiguous(), scale = row_scale.to(acc).contiguous();
  at::Tensor d_logp = at::empty_like(t.logprobs), d_v = at::empty_like(t.logprobs);
  Job job = job_of(op, t, p, vf_coef);
  job.grad_loss = g.data_ptr();
  job.row_scale_in = scale.data_ptr();
  job.d_logp = d_logp.data_ptr();
  job.d_v = d_v.data_ptr();
  k.backward(job);
  return {d_logp, d_v};
}

}  // namespace ppo_loss
}  // namespace ppo_fast
