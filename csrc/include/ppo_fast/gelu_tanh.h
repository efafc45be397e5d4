// tanh-GELU (Hendrycks & Gimpel 2016; GPT-2's gelu_new), forward and backward, per element:
//   u = sqrt(2/pi) (x + 0.044715 x^3),  gelu(x) = 0.5 x (1 + tanh u) = x s,  s = sigmoid(2u) = 1 / (1 + e),
//   e = exp(-2u),  d gelu / dx = s + x s (1 - s) 2u',  2u' = 2 sqrt(2/pi) (1 + 0.044715 * 3 x^2).
// x * sigmoid(2u) is the same function as 0.5 x (1 + tanh u) without its cancellation for negative x
// (1 + tanh u -> 0), and one exp per element. 1 - s is taken as e * s where e < 1 (s near 1, where
// 1 - s would cancel), else as 1 - s (s <= 1/2: exact enough, and finite where e overflows to inf).
//
// Special values follow the eager reference (ppo_fast.reference.gelu_tanh, the formula in torch ops,
// differentiated by autograd) element for element: gelu(+inf) = inf, gelu(-inf) = NaN (-inf * 0),
// gelu(x) = -0 for x far below zero, NaN in, NaN out. Its autograd multiplies the zero slope of a
// saturated tanh by 3 x^2, which is inf once 3 x^2 overflows (|x| > ~1.06e19 in fp32): the gradient
// is NaN there and at +-inf. The backward below forms 3 x^2 the same way ((x * x) * 3) and multiplies
// x s (1 - s) by it last, so it is NaN exactly there too and finite (0) for every other large |x|.
// One difference remains, for an infinite upstream gradient only: the reference's seven-op chain
// also gives NaN where one of its local slopes underflows to 0 (positive subnormal x, whose 3 x^2 is
// 0; in fp64, x ~ 20, where tanh reaches 1 before the sigmoid does), the fused backward +-inf.
#pragma once

#include <ppo_fast/common.h>

namespace ppo_fast {
namespace gelu_tanh {

// 2 sqrt(2/pi), and 2 sqrt(2/pi) * 0.044715: 2u = x (kA + kB x^2), 2u' = kA + kB (3 x^2).
constexpr double kA = 1.5957691216057308;
constexpr double kB = 0.07135481627260025;

template <typename acc_t>
C10_HOST_DEVICE inline acc_t forward(acc_t x) {
  const acc_t two_u = x * (acc_t(kA) + acc_t(kB) * (x * x));
  const acc_t e = exp_(-two_u);  // inf for x far below zero: s = 0, and x s = -0
  const acc_t s = acc_t(1) / (acc_t(1) + e);
  return x * s;
}

// grad * d gelu / dx at x.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t backward(acc_t grad, acc_t x) {
  const acc_t x2 = x * x;
  const acc_t two_u = x * (acc_t(kA) + acc_t(kB) * x2);
  const acc_t e = exp_(-two_u);
  const acc_t s = acc_t(1) / (acc_t(1) + e);
  const acc_t one_minus_s = e < acc_t(1) ? e * s : acc_t(1) - s;
  const acc_t du = acc_t(kA) + acc_t(kB) * (x2 * acc_t(3));  // inf where 3 x^2 overflows, as in the reference
  // grad distributed over the two terms as the reference's chain rule does: an infinite grad then
  // gives NaN where they have opposite signs or a term's slope is 0 (x far from zero), as there.
  return grad * s + (((grad * x) * s) * one_minus_s) * du;
}

// ---------------------------------------------------------------------------------------------
// The job, filled by the host entry point (csrc/host/gelu_tanh.cpp) and run by a backend's kernel.

struct Job {
  const char* op;
  c10::DeviceIndex device;
  at::ScalarType dtype;  // of x (and grad, out)
  const void* x;         // [n], contiguous
  const void* grad;      // [n], contiguous (backward only)
  void* out;             // [n], contiguous, x's dtype
  int64_t n;
};

struct Kernels {
  void (*forward)(const Job&);
  void (*backward)(const Job&);
};

// The entry points (csrc/host/gelu_tanh.cpp).
at::Tensor gelu_tanh(const Kernels& k, const at::Tensor& x);
at::Tensor gelu_tanh_backward(const Kernels& k, const at::Tensor& grad, const at::Tensor& x);

}  // namespace gelu_tanh
}  // namespace ppo_fast
