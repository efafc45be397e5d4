// CPU kernel for value-free group advantages: per group of n consecutive scores, fp64 sum, mean and
// (grpo) M2, then group_advantages.h's advantage(estimator, s, group) for each member.
// Groups run in parallel; each group is summed in index order, so results do not depend on the
// thread count.
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/group_advantages.h>

#include <torch/library.h>

namespace ppo_fast {
namespace group_advantages {
namespace {

// Groups [g0, g1): a plain function, so that the job's pointers and scalars are locals in registers.
template <typename scalar_t>
void groups_range(const Job& job, int64_t g0, int64_t g1) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* scores = as<scalar_t>(job.scores);
  acc_t* out = as<acc_t>(job.out);
  const int64_t n = job.group_size;
  const int est = job.estimator;
  const double eps = job.eps;
  const bool m2 = needs_m2(est);
  for (int64_t g = g0; g < g1; ++g) {
    const scalar_t* s = scores + g * n;
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(s[i]);
    Group grp = group_of(double(n), sum);
    if (m2) {
      double m = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(s[i]) - grp.mean;
        m += d * d;
      }
      set_spread(grp, m, eps);
    }
    for (int64_t i = 0; i < n; ++i) {
      out[g * n + i] = static_cast<acc_t>(advantage(est, static_cast<double>(s[i]), grp));
    }
  }
}

void run(const Job& job) {
  const int64_t groups = job.N / job.group_size;
  cpu::dispatch(job.dtype, [&](auto s) {
    at::parallel_for(0, groups, std::max<int64_t>(1, 16384 / job.group_size),
                     [&](int64_t g0, int64_t g1) { groups_range<decltype(s)>(job, g0, g1); });
  });
}

constexpr Kernels kCpu{&run};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("group_advantages", bound<&group_advantages, kCpu>);
}

}  // namespace group_advantages
}  // namespace ppo_fast
