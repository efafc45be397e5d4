// CPU kernel for the fused Lion step with 8-bit blockwise momentum, over a list of tensors:
//   p *= 1 - lr wd;  p -= lr sign(b1 m + (1 - b1) g);  m = b2 m + (1 - b2) g   (lion8bit.h)
// The 256-element blocks of every tensor form one index space split across threads; each block is
// dequantised, stepped and requantised in one pass (its absmax is the max over its own finite new
// momentum; an element with a non-finite gradient keeps its parameter and momentum), so the result
// does not depend on the thread count.
#include <ppo_fast/lion8bit.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace ppo_fast {
namespace lion8bit {
namespace {

struct Step {
  Consts c;
  uint32_t seed;
  const HostTables* tables;
};

// The table-lookup loops (dequantise, requantise) and the fp32 update are compiled twice, for
// baseline x86-64 and for AVX2, and the loader picks one (GCC's target_clones). AVX2 brings no FMA,
// so the fp32 arithmetic stays the separately rounded one of the reference.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PPO_FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PPO_FAST_CLONES
#endif

PPO_FAST_CLONES void dequantize_block(const uint8_t* __restrict__ q, float absmax, const float* __restrict__ code,
                                      float* __restrict__ m, int64_t len) {
  for (int64_t i = 0; i < len; ++i) m[i] = dequantize(q[i], absmax, code);
}

// The block's new absmax (the max over its own finite new momentum values), then its codes. Returns
// the absmax.
PPO_FAST_CLONES float quantize_block(const float* __restrict__ m, int64_t len, const uint32_t* __restrict__ table,
                                     uint8_t* __restrict__ q) {
  uint32_t max_bits = 0;
  for (int64_t i = 0; i < len; ++i) max_bits = std::max(max_bits, finite_abs_bits(m[i]));
  const float absmax = bits_float(max_bits);
  const float scale = quant_scale(absmax);
  for (int64_t i = 0; i < len; ++i) q[i] = quantize(m[i], scale, table);
  return absmax;
}

PPO_FAST_CLONES void update_block_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                      int64_t len, const Consts& c) {
  for (int64_t i = 0; i < len; ++i) {
    float pv = p[i];
    lion_update(pv, m[i], g[i], c);
    p[i] = pv;
  }
}

template <typename scalar_t, bool kStochastic>
void update_block(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, float* __restrict__ m, int64_t len,
                  const Step& s, uint32_t tensor, int64_t first) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    update_block_f32(p, g, m, len, s.c);
  } else {
    for (int64_t i = 0; i < len; ++i) {
      float pv = static_cast<float>(p[i]);
      lion_update(pv, m[i], static_cast<float>(g[i]), s.c);
      if constexpr (kStochastic) pv = stochastic_round_bf16(pv, sr_hash(s.seed, tensor, first + i));
      p[i] = static_cast<scalar_t>(pv);
    }
  }
}

// One 256-element block of tensor `tensor`: dequantise, step, requantise (8-bit state), or step
// the fp32 momentum in place.
template <typename scalar_t, bool kQuantized, bool kStochastic>
void step_block(const TensorJob& it, int64_t block, const Step& s) {
  const int64_t lo = block * kBlock, len = std::min<int64_t>(kBlock, it.numel - lo);
  scalar_t* p = as<scalar_t>(it.p) + lo;
  const scalar_t* g = as<scalar_t>(it.g) + lo;
  if constexpr (kQuantized) {
    uint8_t* q = as<uint8_t>(it.m) + lo;
    float* absmax = it.absmax + block;
    float m[kBlock];
    dequantize_block(q, *absmax, s.tables->code, m, len);
    update_block<scalar_t, kStochastic>(p, g, m, len, s, it.index, lo);
    *absmax = quantize_block(m, len, s.tables->bucket, q);
  } else {
    update_block<scalar_t, kStochastic>(p, g, as<float>(it.m) + lo, len, s, it.index, lo);
  }
}

using BlockFn = void (*)(const TensorJob&, int64_t, const Step&);

template <bool kQuantized>
BlockFn block_fn(at::ScalarType dt, bool stochastic_rounding) {
  switch (dt) {
    case at::kBFloat16:
      return stochastic_rounding ? &step_block<at::BFloat16, kQuantized, true>
                                 : &step_block<at::BFloat16, kQuantized, false>;
    case at::kHalf:
      return &step_block<at::Half, kQuantized, false>;
    default:
      return &step_block<float, kQuantized, false>;
  }
}

void step(const Job& job) {
  const int64_t* first = job.first;
  std::vector<BlockFn> fns(job.n_tensors);
  for (int t = 0; t < job.n_tensors; ++t) {
    const TensorJob& it = job.tensors[t];
    fns[t] = it.quantized ? block_fn<true>(it.dtype, job.stochastic_rounding)
                          : block_fn<false>(it.dtype, job.stochastic_rounding);
  }
  const Step s{job.c, job.seed, &host_tables()};
  // 32 blocks (8192 elements) per grain: large enough to amortise the scheduling.
  at::parallel_for(0, first[job.n_tensors], 32, [&](int64_t b0, int64_t b1) {
    int t = static_cast<int>(std::upper_bound(first, first + job.n_tensors + 1, b0) - first) - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
      fns[t](job.tensors[t], b - first[t], s);
    }
  });
}

constexpr Kernels kCpu{&step};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("lion8bit_step_", bound<&lion8bit_step_, kCpu>);
}

}  // namespace lion8bit
}  // namespace ppo_fast
