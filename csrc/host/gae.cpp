// Host entry points of the rollout ops (gae.h), shared by the CPU and CUDA backends: argument
// checks, contiguous inputs, outputs and scratch, and the job each pass runs on.
#include <ppo_fast/gae.h>

#include <initializer_list>
#include <string>
#include <utility>

namespace ppo_fast {
namespace gae {
namespace {

int parse_kl_penalty(const char* op, const std::string& s) {
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
at::Tensor check_bt(const char* op, const at::Tensor& first, const char* first_name,
                    std::initializer_list<std::pair<const char*, const at::Tensor*>> others, const at::Tensor& mask) {
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

void check_scores(const char* op, const at::Tensor& scores, const at::Tensor& logprobs) {
  check::same_device(op, "scores", scores, "logprobs", logprobs);
  check::floating(op, "scores", scores);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == logprobs.size(0), op,
              ": scores must be 1-D [B] with B = logprobs.size(0) = ", logprobs.size(0), ", got shape ",
              check::shape_str(scores));
}

void check_gae_scalars(const char* op, double gamma, double lam) {
  check::finite(op, "gamma", gamma);
  check::finite(op, "lam", lam);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, op, ": lam must be in [0, 1], got ", lam);
}

// A job over the elements of `like` (contiguous; [B, T] rows when 2-D) read under `mask`.
Job job_of(const char* op, const at::Tensor& like, const at::Tensor& mask) {
  Job j{};
  j.op = op;
  j.device = like.device().index();
  j.dtype = like.scalar_type();
  j.mask_bool = mask.scalar_type() == at::kBool;
  j.mask = mask.data_ptr();
  j.B = like.dim() == 2 ? like.size(0) : 1;
  j.T = like.dim() == 2 ? like.size(1) : like.numel();
  j.N = like.numel();
  j.gamma = j.lam = 1;
  return j;
}

at::Tensor parts(const Kernels& k, int64_t n, const at::Tensor& like) {
  return at::empty({n, 3}, like.options().dtype(k.parts_dtype));
}

// The moments pass over `in` (the job's dtype and elements); returns its parts.
at::Tensor moments_of(const Kernels& k, Job& job, const at::Tensor& in) {
  at::Tensor p = parts(k, num_chunks(job.N), in);
  job.moments_in = in.data_ptr();
  job.moments_out = p.data_ptr();
  k.moments(job);
  return p;
}

// The reward pass's inputs (contiguous), outputs and job: compute_rewards, rollout_advantages.
struct Rewards {
  at::Tensor lp, ref, scores, rewards, nsr, kl;
  Job job;
};

Rewards rewards_of(const char* op, const at::Tensor& scores, const at::Tensor& logprobs,
                   const at::Tensor& ref_logprobs, const at::Tensor& mask, double kl_coef, int kl_mode) {
  Rewards r;
  r.lp = logprobs.contiguous();
  r.ref = ref_logprobs.contiguous();
  r.scores = scores.to(acc_dtype(r.lp.scalar_type())).contiguous();
  r.rewards = at::empty_like(r.lp);
  r.nsr = at::empty_like(r.lp);
  r.kl = at::empty_like(r.lp);
  r.job = job_of(op, r.lp, mask);
  r.job.scores = r.scores.data_ptr();
  r.job.logprobs = r.lp.data_ptr();
  r.job.ref_logprobs = r.ref.data_ptr();
  r.job.kl_coef = kl_coef;
  r.job.kl_mode = kl_mode;
  r.job.rewards_out = r.rewards.data_ptr();
  r.job.non_score_out = r.nsr.data_ptr();
  r.job.kl_out = r.kl.data_ptr();
  return r;
}

void set_scan(Job& job, const at::Tensor& values, double gamma, double lam, bool carry_masked, at::Tensor& ret) {
  job.values = values.data_ptr();
  job.gamma = gamma;
  job.lam = lam;
  job.carry_masked = carry_masked;
  job.returns_out = ret.data_ptr();
}

// The GAE scan's inputs (contiguous), outputs and job: gae, compute_advantages.
struct Scan {
  at::Tensor mask, values, rewards, adv, ret;
  Job job;
};

Scan scan_of(const char* op, const at::Tensor& values, const at::Tensor& rewards, const at::Tensor& mask_in,
             double gamma, double lam, bool carry_masked) {
  check_gae_scalars(op, gamma, lam);
  Scan s;
  s.mask = check_bt(op, values, "values", {{"rewards", &rewards}}, mask_in);
  s.values = values.contiguous();
  s.rewards = rewards.contiguous();
  s.adv = at::empty_like(s.values);
  s.ret = at::empty_like(s.values);
  s.job = job_of(op, s.values, s.mask);
  s.job.rewards_in = s.rewards.data_ptr();
  set_scan(s.job, s.values, gamma, lam, carry_masked, s.ret);
  return s;
}

// GAE with whitened advantages: the scan writes raw advantages in the accumulation dtype (into the
// output itself when that is its dtype) and per-row moments, then one pass whitens them.
void advantages_and_whiten(const Kernels& k, Job& job, at::Tensor& adv) {
  const at::ScalarType acc = acc_dtype(job.dtype);
  const at::Tensor raw = job.dtype == acc ? adv : at::empty(adv.sizes(), adv.options().dtype(acc));
  const at::Tensor rows = parts(k, job.B, adv);
  job.adv_out = nullptr;
  job.adv_acc = raw.data_ptr();
  job.row_moments = rows.data_ptr();
  k.rows(job);
  job.whiten_in = raw.data_ptr();
  job.whiten_in_acc = true;
  job.whiten_out = adv.data_ptr();
  job.whiten_parts = rows.data_ptr();
  job.n_whiten_parts = job.B;
  job.shift_mean = true;
  job.eps = kWhitenEps;
  k.whiten(job);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> compute_rewards(const Kernels& k, const at::Tensor& scores,
                                                               const at::Tensor& logprobs,
                                                               const at::Tensor& ref_logprobs,
                                                               const at::Tensor& mask_in, double kl_coef,
                                                               c10::string_view kl_penalty) {
  const char* op = "compute_rewards";
  const int mode = parse_kl_penalty(op, std::string(kl_penalty));
  check::finite(op, "kl_coef", kl_coef);
  const at::Tensor mask = check_bt(op, logprobs, "logprobs", {{"ref_logprobs", &ref_logprobs}}, mask_in);
  check_scores(op, scores, logprobs);
  const Rewards r = rewards_of(op, scores, logprobs, ref_logprobs, mask, kl_coef, mode);
  k.rows(r.job);
  return {r.rewards, r.nsr, r.kl};
}

std::tuple<at::Tensor, at::Tensor> gae(const Kernels& k, const at::Tensor& values, const at::Tensor& rewards,
                                       const at::Tensor& mask, double gamma, double lam, bool carry_masked) {
  Scan s = scan_of("gae", values, rewards, mask, gamma, lam, carry_masked);
  s.job.adv_out = s.adv.data_ptr();
  k.rows(s.job);
  return {s.adv, s.ret};
}

at::Tensor masked_whiten(const Kernels& k, const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean,
                         double eps) {
  const char* op = "masked_whiten";
  check::floating(op, "x", x_in);
  check::nonempty(op, "x", x_in);
  check::finite(op, "eps", eps);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor mask = check::mask(op, mask_in, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  Job job = job_of(op, x, mask);
  const at::Tensor p = moments_of(k, job, x);
  job.whiten_in = x.data_ptr();
  job.whiten_out = out.data_ptr();
  job.whiten_parts = p.data_ptr();
  job.n_whiten_parts = p.size(0);
  job.shift_mean = shift_mean;
  job.eps = eps;
  k.whiten(job);
  return out;
}

std::tuple<at::Tensor, at::Tensor> compute_advantages(const Kernels& k, const at::Tensor& values,
                                                      const at::Tensor& rewards, const at::Tensor& mask, double gamma,
                                                      double lam, bool whiten_rewards, bool carry_masked) {
  Scan s = scan_of("compute_advantages", values, rewards, mask, gamma, lam, carry_masked);
  at::Tensor reward_parts;
  if (whiten_rewards) {
    reward_parts = moments_of(k, s.job, s.rewards);
    s.job.reward_parts = reward_parts.data_ptr();
    s.job.n_reward_parts = reward_parts.size(0);
  }
  advantages_and_whiten(k, s.job, s.adv);
  return {s.adv, s.ret};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rollout_advantages(
    const Kernels& k, const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
    const at::Tensor& values, const at::Tensor& mask_in, double kl_coef, c10::string_view kl_penalty, double gamma,
    double lam, bool whiten_rewards, bool carry_masked) {
  const char* op = "rollout_advantages";
  const int mode = parse_kl_penalty(op, std::string(kl_penalty));
  check::finite(op, "kl_coef", kl_coef);
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask =
      check_bt(op, logprobs, "logprobs", {{"ref_logprobs", &ref_logprobs}, {"values", &values}}, mask_in);
  check_scores(op, scores, logprobs);
  const Rewards r = rewards_of(op, scores, logprobs, ref_logprobs, mask, kl_coef, mode);
  const at::Tensor v = values.contiguous();
  at::Tensor adv = at::empty_like(r.lp), ret = at::empty_like(r.lp);
  Job job = r.job;
  at::Tensor reward_rows;
  if (whiten_rewards) {
    // A first pass computes the rewards and their per-row moments; the scan reads them back, whitened.
    reward_rows = parts(k, job.B, r.lp);
    job.row_moments = reward_rows.data_ptr();
    k.rows(job);
    job = job_of(op, r.lp, mask);
    job.rewards_in = r.rewards.data_ptr();
    job.reward_parts = reward_rows.data_ptr();
    job.n_reward_parts = job.B;
  }
  set_scan(job, v, gamma, lam, carry_masked, ret);
  advantages_and_whiten(k, job, adv);
  return {r.rewards, r.nsr, r.kl, adv, ret};
}

}  // namespace gae
}  // namespace ppo_fast
