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
void step_block(const Item& it, uint32_t tensor, int64_t block, const Step& s) {
  const int64_t lo = block * kBlock, len = std::min<int64_t>(kBlock, it.p.numel() - lo);
  scalar_t* p = it.p.data_ptr<scalar_t>() + lo;
  const scalar_t* g = it.g.data_ptr<scalar_t>() + lo;
  if constexpr (kQuantized) {
    uint8_t* q = it.m.data_ptr<uint8_t>() + lo;
    float* absmax = it.absmax.data_ptr<float>() + block;
    float m[kBlock];
    dequantize_block(q, *absmax, s.tables->code, m, len);
    update_block<scalar_t, kStochastic>(p, g, m, len, s, tensor, lo);
    *absmax = quantize_block(m, len, s.tables->bucket, q);
  } else {
    update_block<scalar_t, kStochastic>(p, g, it.m.data_ptr<float>() + lo, len, s, tensor, lo);
  }
}

using BlockFn = void (*)(const Item&, uint32_t, int64_t, const Step&);

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

void lion8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList absmax,
                       double lr, double beta1, double beta2, double weight_decay, bool stochastic_rounding,
                       int64_t seed) {
  const char* op = "lion8bit_step_";
  const std::vector<Item> items = check_inputs(op, params, grads, momentum, absmax, lr, beta1, beta2, weight_decay);
  // first[t]: index of tensor t's first block in the list's block space.
  std::vector<int64_t> first(items.size() + 1, 0);
  std::vector<BlockFn> fns(items.size());
  for (size_t t = 0; t < items.size(); ++t) {
    first[t + 1] = first[t] + num_blocks(items[t].p.numel());
    const at::ScalarType dt = items[t].p.scalar_type();
    fns[t] = items[t].quantized ? block_fn<true>(dt, stochastic_rounding) : block_fn<false>(dt, stochastic_rounding);
  }
  const int64_t total = first.back();
  if (total == 0) return;
  const Step s{make_consts(lr, beta1, beta2, weight_decay), static_cast<uint32_t>(seed), &host_tables()};
  // 32 blocks (8192 elements) per grain: large enough to amortise the scheduling.
  at::parallel_for(0, total, 32, [&](int64_t b0, int64_t b1) {
    size_t t = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
      fns[t](items[t], static_cast<uint32_t>(t), b - first[t], s);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("lion8bit_step_", &lion8bit_step_cpu);
}

}  // namespace lion8bit
}  // namespace ppo_fast
