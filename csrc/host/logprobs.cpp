// Host entry points of the log-prob ops (logprobs.h), shared by the CPU and CUDA backends:
// argument checks, usable inputs, outputs, and the job the kernels run on.
#include <ppo_fast/logprobs.h>

#include <utility>

namespace ppo_fast {
namespace logprobs {
namespace {

// logits [B, T, V] with a contiguous last dimension; returns it with that guaranteed (a copy only
// when the last stride is not 1).
at::Tensor check_logits(const char* op, const char* name, const at::Tensor& logits) {
  check::rank(op, name, logits, 3, "[B, T, V]");
  check::floating(op, name, logits);
  check::nonempty(op, name, logits);
  return logits.stride(2) == 1 ? logits : logits.contiguous();
}

at::Tensor check_labels(const char* op, const at::Tensor& labels, const at::Tensor& logits) {
  check::same_device(op, "labels", labels, "logits", logits);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels must be [B, T] = [", logits.size(0), ", ", logits.size(1), "] to match logits ",
              check::shape_str(logits), ", got ", check::shape_str(labels));
  return labels.to(at::kLong).contiguous();
}

// The [B, T] side inputs of the backward: grad_logprob, lse, entropy and (optional) grad_entropy.
void check_backward_inputs(const char* op, const at::Tensor& logits, const at::Tensor& grad_logprob,
                           const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                           const at::Tensor& entropy) {
  const int64_t B = logits.size(0), T = logits.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_logprob", &grad_logprob},
                                {"lse", &lse},
                                {"entropy", &entropy},
                                {"grad_entropy", grad_entropy ? &*grad_entropy : nullptr}}) {
    if (t == nullptr) continue;
    check::same_device(op, name, *t, "logits", logits);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == T, op, ": ", name, " must be [B, T] = [", B, ", ",
                T, "], got ", check::shape_str(*t));
  }
}

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

Rows rows_of(const at::Tensor& x) {
  return {x.data_ptr(), x.size(1), x.size(2), x.stride(0), x.stride(1)};
}

Job job_of(const char* op, const at::Tensor& logits, double temperature) {
  Job j{};
  j.op = op;
  j.device = logits.device().index();
  j.dtype = logits.scalar_type();
  j.B = logits.size(0);
  j.T = logits.size(1);
  j.V = logits.size(2);
  j.inv_t = 1.0 / temperature;
  j.logits = rows_of(logits);
  return j;
}

// [B, T] in the accumulation dtype of the logits.
at::Tensor acc_bt(const at::Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(acc_dtype(logits.scalar_type())));
}

// The gradient w.r.t. logits into a new tensor, or (inplace) into the logits' own storage: each
// element is read, then overwritten by the same thread, so no row is needed twice.
at::Tensor backward_impl(const Kernels& k, const char* op, const at::Tensor& grad_logprob,
                         const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                         const at::Tensor& labels_in, const at::Tensor& lse, const at::Tensor& entropy,
                         double temperature, bool inplace) {
  check_temperature(op, temperature);
  TORCH_CHECK(!inplace || logits_in.dim() != 3 || logits_in.stride(2) == 1, op,
              ": logits must have a contiguous last dimension to take its gradient in place");
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  check_backward_inputs(op, logits, grad_logprob, grad_entropy, lse, entropy);
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor g_lp = grad_logprob.to(acc).contiguous(), ls = lse.to(acc).contiguous();
  const at::Tensor ent = entropy.to(acc).contiguous();
  const at::Tensor g_h = grad_entropy ? grad_entropy->to(acc).contiguous() : at::Tensor();
  at::Tensor grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  Job job = job_of(op, logits, temperature);
  job.grad = rows_of(grad);
  job.labels = labels.data_ptr<int64_t>();
  job.grad_logprob = g_lp.data_ptr();
  job.grad_entropy = g_h.defined() ? g_h.data_ptr() : nullptr;
  job.lse = ls.data_ptr();
  job.entropy = ent.data_ptr();
  k.backward(job);
  return grad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs(const Kernels& k, const at::Tensor& logits_in,
                                                        const at::Tensor& labels_in, double temperature) {
  const char* op = "logprobs";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  at::Tensor logprob = acc_bt(logits), entropy = acc_bt(logits), lse = acc_bt(logits);
  Job job = job_of(op, logits, temperature);
  job.labels = labels.data_ptr<int64_t>();
  job.logprob = logprob.data_ptr();
  job.entropy = entropy.data_ptr();
  job.lse = lse.data_ptr();
  k.forward(job);
  return {logprob, entropy, lse};
}

at::Tensor logprobs_backward(const Kernels& k, const at::Tensor& grad_logprob,
                             const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                             const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                             double temperature) {
  return backward_impl(k, "logprobs_backward", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature,
                       false);
}

void logprobs_backward_(const Kernels& k, at::Tensor& logits, const at::Tensor& grad_logprob,
                        const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& entropy, double temperature) {
  backward_impl(k, "logprobs_backward_", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature, true);
}

at::Tensor full_kl(const Kernels& k, const at::Tensor& logits_in, const at::Tensor& ref_in, double temperature) {
  const char* op = "full_kl";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor ref = check_logits(op, "ref_logits", ref_in);
  check::same_device(op, "ref_logits", ref, "logits", logits);
  check::same_shape(op, "ref_logits", ref, "logits", logits);
  check::same_dtype(op, "ref_logits", ref, "logits", logits);
  at::Tensor kl = acc_bt(logits);
  Job job = job_of(op, logits, temperature);
  job.ref_logits = rows_of(ref);
  job.kl = kl.data_ptr();
  k.full_kl(job);
  return kl;
}

}  // namespace logprobs
}  // namespace ppo_fast
