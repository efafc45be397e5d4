// CPU kernels of the tanh-GELU: out = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), and its
// backward grad * (s + x s (1 - s) 2u') (gelu_tanh.h), elementwise over contiguous memory, in blocks
// of kBlock elements run in parallel (a tensor of under kGrain elements stays on one thread).
#include <ppo_fast/cpu_avx2.h>  // first: it builds ATen's vec headers for AVX2
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/gelu_tanh.h>

#include <torch/library.h>

#include <type_traits>

namespace ppo_fast {
namespace gelu_tanh {
namespace {

constexpr int64_t kBlock = 4096;  // elements per parallel work item
constexpr int64_t kGrain = 8;     // blocks: 32k elements before a second thread joins

#ifdef PPO_FAST_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// No contraction of a * b + c into an FMA: the plain loops, built without FMA, round a * b first,
// and the two paths then differ only by Sleef's exp against libm's.
#pragma GCC optimize("fp-contract=off")
namespace avx2 {

using namespace cpu::avx2;  // fVec, kW, kChunk, load_chunk, store_chunk
static_assert(kW == 8 && kBlock % kChunk == 0, "AVX2 layout");

// gelu_tanh.h's forward and backward on 8 lanes, operation for operation.
inline fVec forward_vec(const fVec& x) {
  const fVec one(1.f), a(static_cast<float>(kA)), b(static_cast<float>(kB));
  const fVec two_u = x * (a + b * (x * x));
  const fVec e = (fVec(0.f) - two_u).exp();
  return x * (one / (one + e));
}

inline fVec backward_vec(const fVec& g, const fVec& x) {
  const fVec one(1.f), three(3.f), a(static_cast<float>(kA)), b(static_cast<float>(kB));
  const fVec x2 = x * x;
  const fVec two_u = x * (a + b * x2);
  const fVec e = (fVec(0.f) - two_u).exp();
  const fVec s = one / (one + e);
  const fVec one_minus_s = fVec::blendv(one - s, e * s, e < one);
  const fVec du = a + b * (x2 * three);
  return g * s + (((g * x) * s) * one_minus_s) * du;
}

// Elements [i0, i1): full chunks straight from memory, the last n < kChunk through a buffer.
template <typename scalar_t>
void forward_range(const scalar_t* x, scalar_t* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + kChunk <= i1; i += kChunk) {
    fVec xa, xb;
    load_chunk(x + i, xa, xb);
    const fVec ya = forward_vec(xa), yb = forward_vec(xb);
    store_chunk(out + i, ya, yb);
  }
  if (i < i1) {
    scalar_t buf[kChunk] = {};
    std::copy(x + i, x + i1, buf);
    fVec xa, xb;
    load_chunk(buf, xa, xb);
    const fVec ya = forward_vec(xa), yb = forward_vec(xb);
    store_chunk(buf, ya, yb);
    std::copy(buf, buf + (i1 - i), out + i);
  }
}

template <typename scalar_t>
void backward_range(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + kChunk <= i1; i += kChunk) {
    fVec ga, gb, xa, xb;
    load_chunk(g + i, ga, gb);
    load_chunk(x + i, xa, xb);
    const fVec da = backward_vec(ga, xa), db = backward_vec(gb, xb);
    store_chunk(out + i, da, db);
  }
  if (i < i1) {
    scalar_t gbuf[kChunk] = {}, xbuf[kChunk] = {};
    std::copy(g + i, g + i1, gbuf);
    std::copy(x + i, x + i1, xbuf);
    fVec ga, gb, xa, xb;
    load_chunk(gbuf, ga, gb);
    load_chunk(xbuf, xa, xb);
    const fVec da = backward_vec(ga, xa), db = backward_vec(gb, xb);
    store_chunk(gbuf, da, db);
    std::copy(gbuf, gbuf + (i1 - i), out + i);
  }
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // PPO_FAST_CPU_AVX2

// The plain loops: gelu_tanh.h's math per element in the accumulation type (fp32, fp64 for fp64).
template <typename scalar_t>
void forward_range(const scalar_t* x, scalar_t* out, int64_t i0, int64_t i1) {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef PPO_FAST_CPU_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::avx2_usable()) return avx2::forward_range(x, out, i0, i1);
  }
#endif
  for (int64_t i = i0; i < i1; ++i) out[i] = static_cast<scalar_t>(forward<acc_t>(static_cast<acc_t>(x[i])));
}

template <typename scalar_t>
void backward_range(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t i0, int64_t i1) {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef PPO_FAST_CPU_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::avx2_usable()) return avx2::backward_range(g, x, out, i0, i1);
  }
#endif
  for (int64_t i = i0; i < i1; ++i) {
    out[i] = static_cast<scalar_t>(backward<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(x[i])));
  }
}

// f(scalar_t{}, i0, i1) over the job's elements, blocks of kBlock in parallel.
template <typename F>
void parallel_blocks(const Job& job, const F& f) {
  const int64_t blocks = (job.n + kBlock - 1) / kBlock;
  cpu::dispatch(job.dtype, [&](auto s) {
    at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
      f(s, b0 * kBlock, std::min(job.n, b1 * kBlock));
    });
  });
}

void forward_job(const Job& job) {
  parallel_blocks(job, [&](auto s, int64_t i0, int64_t i1) {
    using scalar_t = decltype(s);
    forward_range(as<scalar_t>(job.x), as<scalar_t>(job.out), i0, i1);
  });
}

void backward_job(const Job& job) {
  parallel_blocks(job, [&](auto s, int64_t i0, int64_t i1) {
    using scalar_t = decltype(s);
    backward_range(as<scalar_t>(job.grad), as<scalar_t>(job.x), as<scalar_t>(job.out), i0, i1);
  });
}

constexpr Kernels kCpu{&forward_job, &backward_job};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("gelu_tanh", bound<&gelu_tanh, kCpu>);
  m.impl("gelu_tanh_backward", bound<&gelu_tanh_backward, kCpu>);
}

}  // namespace gelu_tanh
}  // namespace ppo_fast
