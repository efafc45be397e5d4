// Host entry points of the running moments (moments.h), shared by the CPU and CUDA backends:
// argument checks, contiguous inputs, outputs, and the job the kernels run on.
#include <ppo_fast/moments.h>

namespace ppo_fast {
namespace moments {
namespace {

// x of any shape (at least one element), mask optional with x's shape; returns the mask in a
// dtype the kernels read (bool or x's dtype), undefined when absent.
at::Tensor check_x(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check::floating(op, "x", x);
  check::nonempty(op, "x", x);
  if (!mask) return at::Tensor();
  return check::mask(op, *mask, "x", x);
}

void check_state(const char* op, const at::Tensor& state, const at::Tensor& x) {
  check::same_device(op, "state", state, "x", x);
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.dim() == 1 && state.size(0) == kSlots, op,
              ": state must be float64 [4] (count, mean, M2, rejected), got ", state.scalar_type(), " ",
              check::shape_str(state));
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous");
}

void check_batches(const char* op, const at::Tensor& state, const at::Tensor& batches) {
  check_state(op, state, state);
  check::same_device(op, "batches", batches, "state", state);
  TORCH_CHECK(batches.scalar_type() == at::kDouble && batches.dim() == 2 && batches.size(1) == kSlots, op,
              ": batches must be float64 [K, 4] (count, mean, M2, non-finite per batch), got ", batches.scalar_type(),
              " ", check::shape_str(batches));
}

Normalize check_normalize(const char* op, bool scale, bool center, std::optional<double> clip, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  if (clip) TORCH_CHECK(!std::isnan(*clip) && *clip > 0, op, ": clip must be > 0 (or None), got ", *clip);
  return Normalize{scale, center, clip.has_value(), clip.value_or(0.0), eps};
}

// A job over x (contiguous) read under mask (undefined: every entry counts).
Job job_of(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  Job j{};
  j.op = op;
  j.device = x.device().index();
  j.dtype = x.scalar_type();
  j.mask_bool = !mask.defined() || mask.scalar_type() == at::kBool;
  j.x = x.data_ptr();
  j.mask = mask.defined() ? mask.data_ptr() : nullptr;
  j.N = x.numel();
  return j;
}

at::Tensor slots(const at::Tensor& like) {
  return at::empty({kSlots}, like.options().dtype(at::kDouble));
}

}  // namespace

at::Tensor moments(const Kernels& k, const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in) {
  const char* op = "moments";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = slots(x);
  Job job = job_of(op, x, mask);
  job.batch = out.data_ptr<double>();
  k.moments(job);
  return out;
}

void moments_merge_(const Kernels& k, at::Tensor& state, const at::Tensor& batches) {
  const char* op = "moments_merge_";
  check_batches(op, state, batches);
  const at::Tensor b = batches.contiguous();
  Job job{};
  job.op = op;
  job.device = state.device().index();
  job.state = state.data_ptr<double>();
  job.batches = b.data_ptr<double>();
  job.n_batches = b.size(0);
  k.merge(job);
}

at::Tensor moments_normalize(const Kernels& k, const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                             const at::Tensor& state, bool scale, bool center, std::optional<double> clip,
                             double eps) {
  const char* op = "moments_normalize";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  check_state(op, state, x_in);
  const Normalize p = check_normalize(op, scale, center, clip, eps);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  Job job = job_of(op, x, mask);
  job.out = out.data_ptr();
  job.state = state.data_ptr<double>();
  job.p = p;
  k.normalize(job);
  return out;
}

std::tuple<at::Tensor, at::Tensor> moments_update_normalize_(const Kernels& k, at::Tensor& state,
                                                             const at::Tensor& x_in,
                                                             const std::optional<at::Tensor>& mask_in, bool scale,
                                                             bool center, std::optional<double> clip, double eps) {
  const char* op = "moments_update_normalize_";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  check_state(op, state, x_in);
  const Normalize p = check_normalize(op, scale, center, clip, eps);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x), batch = slots(x);
  Job job = job_of(op, x, mask);
  job.out = out.data_ptr();
  job.state = state.data_ptr<double>();
  job.batch = batch.data_ptr<double>();
  job.p = p;
  k.update_normalize(job);
  return {out, batch};
}

}  // namespace moments
}  // namespace ppo_fast
