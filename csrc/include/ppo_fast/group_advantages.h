// Value-free per-sample advantages from scores in groups of n consecutive samples, written once for
// CPU and CUDA (mean_g, sum_g, std_g: the group's mean, sum and Bessel-corrected std):
//   grpo:                  (s - mean_g) / (std_g + eps), 0 for a group of one    (Shao et al. 2024, DeepSeekMath)
//   dr_grpo:               s - mean_g                                             (Liu et al. 2025, Dr. GRPO)
//   rloo:                  s - (sum_g - s) / (n - 1), 0 for a group of one       (Ahmadian et al. 2024)
//   reinforce_pp_baseline: s - mean_g (whitened over the batch by the trainer)   (Hu 2025, REINFORCE++)
//   reinforce_pp:          s (the trainer builds token-level returns from it)
// Group moments accumulate in fp64: sum first, mean = sum / n, then (grpo) M2 about that mean.
#pragma once

#include <ppo_fast/common.h>

#include <string>

namespace ppo_fast {
namespace group_advantages {

enum Estimator : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kReinforcePpBaseline = 3, kReinforcePp = 4 };

// What an estimator needs of its group: grpo also needs M2 (a second pass over the group).
C10_HOST_DEVICE inline bool needs_m2(int estimator) {
  return estimator == kGrpo;
}

// A group's count, sum and mean (= sum / n) in fp64, and for grpo the divisor std + eps, with std
// the Bessel-corrected std from the group's sum of squared deviations from its mean (M2).
struct Group {
  double n, sum, mean, denom;
};

C10_HOST_DEVICE inline Group group_of(double n, double sum) {
  return Group{n, sum, sum / n, 1.0};
}

C10_HOST_DEVICE inline void set_spread(Group& g, double m2, double eps) {
  if (g.n >= 2) g.denom = PPO_FAST_LIBM(sqrt)(m2 / (g.n - 1.0)) + eps;
}

// The advantage of score s in group g. A zero deviation gives 0 whatever the spread (so equal
// scores with eps = 0 give 0, not 0 / 0); NaN or inf in a group makes every advantage of the group
// NaN or inf by the plain arithmetic, the same on every backend and in the reference.
C10_HOST_DEVICE inline double advantage(int estimator, double s, const Group& g) {
  switch (estimator) {
    case kGrpo: {
      const double d = s - g.mean;
      return g.n < 2 || d == 0.0 ? 0.0 : d / g.denom;
    }
    case kDrGrpo:
    case kReinforcePpBaseline:
      return s - g.mean;
    case kRloo:
      return g.n < 2 ? 0.0 : s - (g.sum - s) / (g.n - 1.0);
    default:
      return s;
  }
}

inline int parse_estimator(const char* op, const std::string& s) {
  if (s == "grpo") return kGrpo;
  if (s == "dr_grpo") return kDrGrpo;
  if (s == "rloo") return kRloo;
  if (s == "reinforce_pp_baseline") return kReinforcePpBaseline;
  if (s == "reinforce_pp") return kReinforcePp;
  TORCH_CHECK(false, op,
              ": estimator must be one of 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp_baseline', 'reinforce_pp', got '", s,
              "'");
  return kGrpo;
}

// ---------------------------------------------------------------------------------------------
// The job, filled by the host entry point (csrc/host/group_advantages.cpp) and run by a backend's kernel.

struct Job {
  const char* op;
  c10::DeviceIndex device;
  at::ScalarType dtype;  // of scores
  const void* scores;    // [N], contiguous
  int64_t N, group_size;
  int estimator;
  double eps;
  void* out;  // [N] in the accumulation dtype (fp32, or fp64 for fp64 scores)
};

struct Kernels {
  void (*run)(const Job&);
};

// The entry point (csrc/host/group_advantages.cpp).
at::Tensor group_advantages(const Kernels& k, const at::Tensor& scores, int64_t group_size,
                            c10::string_view estimator, double eps);

}  // namespace group_advantages
}  // namespace ppo_fast
