// Host entry point of the group advantages (group_advantages.h), shared by the CPU and CUDA
// backends: argument checks, the contiguous input, the output, and the job the kernel runs on.
// Scores are not checked for NaN or inf here (that would synchronise with the device); such a
// group's advantages come out NaN or inf. functional.group_advantages checks them (validate=True).
#include <ppo_fast/group_advantages.h>

namespace ppo_fast {
namespace group_advantages {

at::Tensor group_advantages(const Kernels& k, const at::Tensor& scores_in, int64_t group_size,
                            c10::string_view estimator, double eps) {
  const char* op = "group_advantages";
  const int est = parse_estimator(op, std::string(estimator));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  check::floating(op, "scores", scores_in);
  check::rank(op, "scores", scores_in, 1, "[N]");
  check::nonempty(op, "scores", scores_in);
  const int64_t N = scores_in.size(0);
  TORCH_CHECK(N % group_size == 0, op, ": scores has ", N, " entries, not a multiple of group_size ", group_size,
              " (each group is group_size consecutive samples)");
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor out = at::empty({N}, scores.options().dtype(acc_dtype(scores.scalar_type())));
  Job job{};
  job.op = op;
  job.device = scores.device().index();
  job.dtype = scores.scalar_type();
  job.scores = scores.data_ptr();
  job.N = N;
  job.group_size = group_size;
  job.estimator = est;
  job.eps = eps;
  job.out = out.data_ptr();
  k.run(job);
  return out;
}

}  // namespace group_advantages
}  // namespace ppo_fast
