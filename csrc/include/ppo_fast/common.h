// What every op shares: the numeric helpers of the kernels, the job plumbing between the host
// entry points (csrc/host/) and the backends, and the host-side argument checks. Every message
// starts with the op's name and says what was expected and what came.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

namespace ppo_fast {

// TRL's masked_whiten epsilon: whitening divides by sqrt(var + kWhitenEps).
constexpr double kWhitenEps = 1e-8;

// A libm function in C10_HOST_DEVICE code: the device's (::f) on the GPU, the C++ library's on the CPU.
#ifdef __CUDA_ARCH__
#define PPO_FAST_LIBM(f) ::f
#else
#define PPO_FAST_LIBM(f) std::f
#endif

template <typename T>
C10_HOST_DEVICE inline T exp_(T x) {
  return PPO_FAST_LIBM(exp)(x);
}

template <typename T>
C10_HOST_DEVICE inline T log_(T x) {
  return PPO_FAST_LIBM(log)(x);
}

// Welford/Chan moments of a set of numbers: count, mean and the sum of squared deviations M2.
// Merging two sets is Chan et al.'s parallel formula (1979), which never forms sum(x^2) and so
// does not cancel for data far from zero.
template <typename T>
struct Moments {
  T n;
  T mean;
  T m2;
};

template <typename T>
C10_HOST_DEVICE inline Moments<T> moments_merge(Moments<T> a, Moments<T> b) {
  const T n = a.n + b.n;
  if (n == T(0)) {
    return a;
  }
  const T delta = b.mean - a.mean;
  const T wb = b.n / n;
  // An infinite mean on either side makes delta inf - inf = NaN; the weighted mean keeps the inf
  // (inf + finite), as a plain sum / n does (and NaN for +inf with -inf). M2 is NaN either way.
  const T mean = delta - delta == T(0) ? a.mean + delta * wb : a.mean * (a.n / n) + b.mean * wb;
  return {n, mean, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Elements per moment partial. Fixed, so that partials merged in a fixed order give results that
// do not depend on the thread count (CPU) or the grid (CUDA).
constexpr int64_t kMomentChunk = 8192;

C10_HOST_DEVICE constexpr int64_t num_chunks(int64_t n) {
  return (n + kMomentChunk - 1) / kMomentChunk;
}

// Mean and Bessel-corrected variance. With fewer than two samples the variance is undefined
// (TRL raises for zero and returns NaN for one); here it is taken as 1 so that whitening is a
// plain centring and never poisons a batch with NaN or a division by zero.
template <typename T>
C10_HOST_DEVICE inline void moments_finalize(Moments<T> m, T& mean, T& var) {
  mean = m.n > T(0) ? m.mean : T(0);
  var = m.n > T(1) ? m.m2 / (m.n - T(1)) : T(1);
}

// ---------------------------------------------------------------------------------------------
// Jobs. An op's host entry point (csrc/host/<op>.cpp, compiled once) checks its arguments, makes
// its inputs usable, allocates its outputs and fills one plain job struct (<op>.h: raw pointers,
// sizes, scalars, the dtype; usable on the device as a kernel argument), then hands it to the
// backend's kernels: a table of functions that each backend file fills, which loop over the job
// (csrc/cpu) or launch on it (csrc/cuda).

// A job's tensor pointer as the type its backend reads.
template <typename T>
C10_HOST_DEVICE inline const T* as(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
C10_HOST_DEVICE inline T* as(void* p) {
  return static_cast<T*>(p);
}

// The accumulation dtype of a job's outputs and scratch: fp32, or fp64 for fp64 inputs (CPU gradcheck).
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// bound<&entry, kKernels> is the host entry point `R entry(const Kernels&, Args...)` with one
// backend's kernel table filled in: the plain function of Args... that m.impl() registers.
template <auto Entry, const auto& K, typename R, typename Kernels, typename... Args>
R bound_call(Args... args) {
  return Entry(K, std::forward<Args>(args)...);
}

template <auto Entry, const auto& K, typename R, typename Kernels, typename... Args>
constexpr auto bound_of(R (*)(const Kernels&, Args...)) {
  return &bound_call<Entry, K, R, Kernels, Args...>;
}

template <auto Entry, const auto& K>
constexpr auto bound = bound_of<Entry, K>(Entry);

namespace check {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += (i ? ", " : "") + std::to_string(t.size(i));
  }
  return s + "]";
}

inline void floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float32, bfloat16, float16 or float64), got ", t.scalar_type());
}

inline void rank(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", shape_str(t));
}

inline void same_shape(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              shape_str(ref), ", got ", shape_str(t));
}

inline void same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

inline void nonempty(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " is empty (shape ", shape_str(t), "); an empty batch has nothing to do");
}

// A mask is read as "position counts" where it is non-zero. bool and the values' own dtype are
// read by the kernels directly; any other dtype (int64 attention masks, say) is converted once.
inline at::Tensor mask(const char* op, const at::Tensor& mask, const char* ref_name, const at::Tensor& ref) {
  same_device(op, "mask", mask, ref_name, ref);
  same_shape(op, "mask", mask, ref_name, ref);
  TORCH_CHECK(mask.scalar_type() != at::kComplexFloat && mask.scalar_type() != at::kComplexDouble, op,
              ": mask must be bool, integer or floating-point, got ", mask.scalar_type());
  if (mask.scalar_type() == at::kBool || mask.scalar_type() == ref.scalar_type()) {
    return mask.contiguous();
  }
  return mask.ne(0);
}

inline void finite(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
}

}  // namespace check
}  // namespace ppo_fast
