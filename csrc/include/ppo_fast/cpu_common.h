// What the CPU kernels share: the dtype dispatch of a job, and the fixed-chunk masked moments
// (fp64, exact mean then M2) that whitening and the running moments reduce with.
#pragma once

#include <ppo_fast/common.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace ppo_fast {
namespace cpu {

// Calls f(scalar_t{}, mask_t{}) for a job's dtype, with the mask read as bool or as the values' dtype.
template <typename F>
void dispatch(at::ScalarType dtype, bool mask_bool, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppo_fast", [&] {
    if (mask_bool) {
      f(scalar_t{}, bool{});
    } else {
      f(scalar_t{}, scalar_t{});
    }
  });
}

// Calls f(scalar_t{}) for a job without a mask.
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppo_fast", [&] { f(scalar_t{}); });
}

struct MaskedMoments {
  Moments<double> m;
  double nonfinite;  // values left out (kSkipNonFinite)
};

// Moments in fp64 of value(i) over the i in [lo, hi) with counted(i): the exact mean first, then
// M2 (a second pass over data still in cache). With kSkipNonFinite, NaN and inf values are left
// out of the moments and counted apart.
template <bool kSkipNonFinite, typename Counted, typename Value>
MaskedMoments masked_moments(int64_t lo, int64_t hi, const Counted& counted, const Value& value) {
  double n = 0, sum = 0, bad = 0;
  for (int64_t i = lo; i < hi; ++i) {
    if (!counted(i)) continue;
    const double v = value(i);
    if (kSkipNonFinite && !std::isfinite(v)) {
      bad += 1;
      continue;
    }
    n += 1;
    sum += v;
  }
  const double mean = n > 0 ? sum / n : 0.0;
  double m2 = 0;
  for (int64_t i = lo; i < hi; ++i) {
    if (!counted(i)) continue;
    const double v = value(i);
    if (kSkipNonFinite && !std::isfinite(v)) continue;
    const double d = v - mean;
    m2 += d * d;
  }
  return {{n, mean, m2}, bad};
}

// f(c, lo, hi) for every chunk [lo, hi) of kMomentChunk elements of [0, N), the chunks in parallel.
// The chunks are fixed, so partials merged in chunk order do not depend on the thread count.
template <typename F>
void parallel_chunks(int64_t N, const F& f) {
  const int64_t chunks = num_chunks(N);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kMomentChunk;
      f(c, lo, std::min(N, lo + kMomentChunk));
    }
  });
}

}  // namespace cpu
}  // namespace ppo_fast
