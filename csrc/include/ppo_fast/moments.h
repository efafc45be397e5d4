// Running reward moments, written once for CPU and CUDA:
//   state = (count, mean, M2, rejected) in fp64; a batch's (n, mean, M2) merges with Chan et al.'s
//   parallel formula; std = sqrt(M2 / (count - 1)), taken as 1 below two samples or when std <= eps;
//   normalise: x / (std + eps) (scale), (x - mean) / (std + eps) (scale + center), then clip.
// A batch holding NaN or inf is not merged (the state stays clean) and `rejected` counts it.
#pragma once

#include <ppo_fast/common.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace ppo_fast {
namespace moments {

// Layout of a batch's moments [4] and of the running state [4] (fp64).
enum Slot : int { kCount = 0, kMean = 1, kM2 = 2, kNonFinite = 3 };  // batch: non-finite values seen
constexpr int kRejected = 3;                                        // state: batches rejected
constexpr int kSlots = 4;

C10_HOST_DEVICE inline bool is_finite(double x) {
  return PPO_FAST_LIBM(isfinite)(x);
}

// Merges batches[0..k) (each kSlots doubles, in order) into state, unless any holds a non-finite
// value: then the state keeps its moments and counts one rejected update.
C10_HOST_DEVICE inline void merge_batches(double* state, const double* batches, int64_t k) {
  double nonfinite = 0;
  for (int64_t i = 0; i < k; ++i) nonfinite += batches[i * kSlots + kNonFinite];
  if (nonfinite > 0) {
    state[kRejected] += 1;
    return;
  }
  Moments<double> m{state[kCount], state[kMean], state[kM2]};
  for (int64_t i = 0; i < k; ++i) {
    const double* b = batches + i * kSlots;
    m = moments_merge(m, Moments<double>{b[kCount], b[kMean], b[kM2]});
  }
  state[kCount] = m.n;
  state[kMean] = m.mean;
  state[kM2] = m.m2;
}

// Bessel-corrected std of a state or batch, the one normalisation divides by: 1 with fewer than two
// samples (TRL: inf), and 1 when std <= eps, as for equal scores, where x / (0 + eps) would scale
// them by 1 / eps (8.4e6 for float32 eps). "<=" so that eps = 0 still never divides by a zero std.
// A NaN std (a corrupt state) stays NaN.
C10_HOST_DEVICE inline double std_of(const double* s, double eps) {
  const double std = s[kCount] > 1 ? ::sqrt(s[kM2] / (s[kCount] - 1)) : 1.0;
  return std <= eps ? 1.0 : std;
}

struct Normalize {
  bool scale, center, has_clip;
  double clip, eps;
};

// The affine map x -> (x - shift) * mul of the normalisation, from the running state.
// In the accumulation type T: fp32, or fp64 for fp64 inputs.
template <typename T>
C10_HOST_DEVICE inline void affine_of(const double* state, const Normalize& p, T& shift, T& mul) {
  shift = p.center ? static_cast<T>(state[kMean]) : T(0);
  mul = p.scale ? static_cast<T>(1.0 / (std_of(state, p.eps) + p.eps)) : T(1);
}

template <typename T>
C10_HOST_DEVICE inline T normalize(T x, T shift, T mul, const Normalize& p) {
  T y = (x - shift) * mul;
  if (p.has_clip) {
    const T c = static_cast<T>(p.clip);
    y = y < -c ? -c : (y > c ? c : y);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// The job, filled by the host entry points (csrc/host/moments.cpp) and run by a backend's kernels.

struct Job {
  const char* op;
  c10::DeviceIndex device;
  at::ScalarType dtype;  // of x and out
  bool mask_bool;        // mask is bool, else of dtype
  const void* x;
  const void* mask;  // may be null: every entry counts
  int64_t N;
  void* out;      // the normalised x (masked-out entries pass through)
  double* state;  // [kSlots] running state: read by the normalisation, merged into by the updates
  double* batch;  // [kSlots] a batch's moments (moments, moments_update_normalize_)
  const double* batches;  // [n_batches, kSlots] (moments_merge_)
  int64_t n_batches;
  Normalize p;
};

// A backend's kernels, one per op of the schema.
struct Kernels {
  void (*moments)(const Job&);
  void (*merge)(const Job&);
  void (*normalize)(const Job&);
  void (*update_normalize)(const Job&);
};

// The entry points (csrc/host/moments.cpp).
at::Tensor moments(const Kernels& k, const at::Tensor& x, const std::optional<at::Tensor>& mask);
void moments_merge_(const Kernels& k, at::Tensor& state, const at::Tensor& batches);
at::Tensor moments_normalize(const Kernels& k, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                             const at::Tensor& state, bool scale, bool center, std::optional<double> clip,
                             double eps);
std::tuple<at::Tensor, at::Tensor> moments_update_normalize_(const Kernels& k, at::Tensor& state, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& mask, bool scale,
                                                             bool center, std::optional<double> clip, double eps);

}  // namespace moments
}  // namespace ppo_fast
