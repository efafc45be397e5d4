// ATen's Vectorized<float> for AVX2 (8 lanes) and Sleef's 1-ulp 8-lane exp, for the CPU kernel file
// that includes this header first, compiled for AVX2 whatever the flags of the rest of the build;
// `avx2_usable()` says at run time whether those loops may run (the CPU has AVX2, FMA and F16C, torch
// exported Sleef's exp, and ATen itself runs its AVX2 kernels, so ATEN_CPU_CAPABILITY=default selects
// a file's plain loops, which stay the reference path). Defines PPO_FAST_CPU_AVX2 where it is built.
//
// ATen's vec headers put every class in the namespace at::vec::CPU_CAPABILITY, so these AVX2
// instances cannot clash with another file's. GCC only (its target pragma). g++ does not define
// __AVX__ after the pragma, and sleef.h declares its 8-lane functions only under __AVX__: it is
// defined for that one include. Include it before any other ATen vec header of the file.
#pragma once

#include <ATen/Version.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CPU_CAPABILITY)
#define PPO_FAST_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#ifndef __AVX__
#define __AVX__ 1
#define PPO_FAST_UNDEF_AVX
#endif
#define SLEEF_STATIC_LIBS
#include <sleef.h>
#ifdef PPO_FAST_UNDEF_AVX
#undef __AVX__
#undef PPO_FAST_UNDEF_AVX
#endif
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // the headers' `#pragma unroll`
#pragma GCC diagnostic ignored "-Wpsabi"  // lambdas in unused bf16 operators, which the pragma does not reach
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#pragma GCC pop_options
// Weak: a torch build that did not export Sleef's exp leaves it null, and the plain loops run.
#pragma weak Sleef_expf8_u10

namespace ppo_fast {
namespace cpu {

// Whether the AVX2 loops may run here (decided once; compiled without AVX2, like all static data).
inline bool avx2_usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           &Sleef_expf8_u10 != nullptr && at::get_cpu_capability() != "DEFAULT";
  }();
  return ok;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();  // 8
constexpr int64_t kChunk = 2 * kW;    // entries per load: one Vectorized<BFloat16/Half>, two of float
static_assert(kW == 8, "AVX2 layout");

// kChunk entries of p as two float vectors, and back (round to nearest even, as static_cast).
template <typename scalar_t>
inline void load_chunk(const scalar_t* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kW);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store_chunk(scalar_t* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + kW);
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

}  // namespace avx2
#pragma GCC pop_options

}  // namespace cpu
}  // namespace ppo_fast
#endif  // PPO_FAST_CPU_AVX2
