// Running reward moments, written once for CPU and CUDA:
//   state = (count, mean, M2, rejected) in fp64; a batch's (n, mean, M2) merges with Chan et al.'s
//   parallel formula; std = sqrt(M2 / (count - 1)), taken as 1 below two samples or when std <= eps;
//   normalise: x / (std + eps) (scale), (x - mean) / (std + eps) (scale + center), then clip.
// A batch holding NaN or inf is not merged (the state stays clean) and `rejected` counts it.
#pragma once

#include <ppo_fast/common.h>

#include <cmath>

namespace ppo_fast {
namespace moments {

// Layout of a batch's moments [4] and of the running state [4] (fp64).
enum Slot : int { kCount = 0, kMean = 1, kM2 = 2, kNonFinite = 3 };  // batch: non-finite values seen
constexpr int kRejected = 3;                                        // state: batches rejected
constexpr int kSlots = 4;

C10_HOST_DEVICE inline bool is_finite(double x) {
#ifdef __CUDA_ARCH__
  return ::isfinite(x);
#else
  return std::isfinite(x);
#endif
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
// Host-side checks.

// x of any shape (at least one element), mask optional with x's shape; returns the mask in a
// dtype the kernels read (bool or x's dtype), undefined when absent.
inline at::Tensor check_x(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check::floating(op, "x", x);
  check::nonempty(op, "x", x);
  if (!mask) return at::Tensor();
  return check::mask(op, *mask, "x", x);
}

inline void check_state(const char* op, const at::Tensor& state, const at::Tensor& x) {
  check::same_device(op, "state", state, "x", x);
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.dim() == 1 && state.size(0) == kSlots, op,
              ": state must be float64 [4] (count, mean, M2, rejected), got ", state.scalar_type(), " ",
              check::shape_str(state));
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous");
}

inline void check_batches(const char* op, const at::Tensor& state, const at::Tensor& batches) {
  check_state(op, state, state);
  check::same_device(op, "batches", batches, "state", state);
  TORCH_CHECK(batches.scalar_type() == at::kDouble && batches.dim() == 2 && batches.size(1) == kSlots, op,
              ": batches must be float64 [K, 4] (count, mean, M2, non-finite per batch), got ", batches.scalar_type(),
              " ", check::shape_str(batches));
}

inline Normalize check_normalize(const char* op, bool scale, bool center, std::optional<double> clip, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  if (clip) TORCH_CHECK(!std::isnan(*clip) && *clip > 0, op, ": clip must be > 0 (or None), got ", *clip);
  return Normalize{scale, center, clip.has_value(), clip.value_or(0.0), eps};
}

}  // namespace moments
}  // namespace ppo_fast
