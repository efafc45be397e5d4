// Host entry points of the tanh-GELU (gelu_tanh.h), shared by the CPU and CUDA backends: argument
// checks, the contiguous inputs (a strided x is copied once), the output in x's shape and dtype,
// and the job the kernels run on. Empty tensors give empty outputs.
#include <ppo_fast/gelu_tanh.h>

namespace ppo_fast {
namespace gelu_tanh {

namespace {

Job job_of(const char* op, const at::Tensor& x, const at::Tensor& out) {
  Job job{};
  job.op = op;
  job.device = x.device().index();
  job.dtype = x.scalar_type();
  job.x = x.data_ptr();
  job.grad = nullptr;
  job.out = out.data_ptr();
  job.n = x.numel();
  return job;
}

}  // namespace

at::Tensor gelu_tanh(const Kernels& k, const at::Tensor& x_in) {
  const char* op = "gelu_tanh";
  check::floating(op, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  k.forward(job_of(op, x, out));
  return out;
}

at::Tensor gelu_tanh_backward(const Kernels& k, const at::Tensor& grad_in, const at::Tensor& x_in) {
  const char* op = "gelu_tanh_backward";
  check::floating(op, "x", x_in);
  check::same_device(op, "grad", grad_in, "x", x_in);
  check::same_shape(op, "grad", grad_in, "x", x_in);
  check::same_dtype(op, "grad", grad_in, "x", x_in);
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  Job job = job_of(op, x, out);
  job.grad = grad.data_ptr();
  k.backward(job);
  return out;
}

}  // namespace gelu_tanh
}  // namespace ppo_fast
