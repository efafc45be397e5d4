// CPU kernels for log-probs and entropy from logits: logprob = z[label] - lse(z), H = lse - sum p z.
// Each (b, t) row of the vocabulary is read from memory once, in blocks that stay in L1: a block's
// max, then its exp sums relative to the running max (logits * 1/temperature on the fly); no
// [B, T, V] temporary is ever allocated.
#include <ppo_fast/cpu_avx2.h>  // first: it builds ATen's vec headers for AVX2
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/logprobs.h>

#include <torch/library.h>

#include <type_traits>

namespace ppo_fast {
namespace logprobs {
namespace {

#ifdef PPO_FAST_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// No contraction of a * b + c into an FMA (the plain loops, built without FMA, round a * b first):
// z - r and the lse difference must round alike, so that a row equal to its reference gives KL = 0.
#pragma GCC optimize("fp-contract=off")
namespace avx2 {

using namespace cpu::avx2;  // fVec, kW, kChunk, load_chunk, store_chunk
// Entries per fp32 partial sum: each lane of each accumulator adds 16 terms before the block's sum
// goes into the fp64 total, so a 150k vocabulary keeps the fp64 accuracy of the plain loops.
constexpr int64_t kBlock = 256;
static_assert(kW == 8 && kBlock % kChunk == 0, "AVX2 layout");
constexpr float kInf = std::numeric_limits<float>::infinity();

// The last n < kChunk entries of a row, copied into a full chunk whose other entries are `fill`.
template <typename scalar_t>
inline void load_tail(const scalar_t* p, int64_t n, scalar_t fill, fVec& a, fVec& b) {
  scalar_t buf[kChunk];
  for (int64_t i = 0; i < kChunk; ++i) buf[i] = i < n ? p[i] : fill;
  load_chunk(buf, a, b);
}

// max over the lanes that keeps a NaN (a lane's NaN from at::vec::maximum).
inline float lanes_max(const fVec& v) {
  float l[kW];
  v.store(l);
  float m = l[0];
  for (int64_t i = 1; i < kW; ++i) m = max_nan(m, l[i]);
  return m;
}

// row_stats for fp32/bf16/fp16 rows, in one pass over memory: per block of kBlock entries,
// z = x * inv_t into an L1 buffer with its max, the fp64 totals rebased when the max grows
// (online_rebase), then exp(z - m) and the sums. The -inf entries (and the padding of the last
// chunk) give exp = 0 and add nothing, e * d masked where e = 0 (-inf * 0 would be NaN). A NaN or
// +inf logit leaves no distribution: every result of the row is NaN, as online_finish gives for it.
template <typename scalar_t>
Online<float> row_stats(const scalar_t* x, int64_t V, float inv_t) {
  const fVec vt(inv_t), zero(0.f);
  const scalar_t pad = static_cast<scalar_t>(-kInf);
  float m = -kInf;
  double s = 0, sd = 0;
  alignas(32) float z[kBlock];
  alignas(32) float e[kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const int64_t nz = (n + kChunk - 1) / kChunk * kChunk;
    fVec mx0(-kInf), mx1(-kInf);
    for (int64_t k = 0; k < nz; k += kChunk) {
      fVec a, b;
      if (k + kChunk <= n) {
        load_chunk(x + j0 + k, a, b);
      } else {
        load_tail(x + j0 + k, n - k, pad, a, b);
      }
      a = a * vt;
      b = b * vt;
      a.store(z + k);
      b.store(z + k + kW);
      mx0 = at::vec::maximum(mx0, a);
      mx1 = at::vec::maximum(mx1, b);
    }
    const float bm = lanes_max(at::vec::maximum(mx0, mx1));
    if (is_neg_inf(bm)) continue;  // a block of -inf only
    if (!(bm <= m)) {
      if (!(bm < kInf)) return {nan_<float>(), nan_<float>(), nan_<float>()};
      if (!is_neg_inf(m)) {
        const double dm = static_cast<double>(m) - static_cast<double>(bm), scale = std::exp(dm);
        sd = scale * (sd + s * dm);
        s *= scale;
      }
      m = bm;
    }
    // The exps first, into e: Sleef's exp is a call, across which no vector register survives.
    const fVec vm(m);
    for (int64_t k = 0; k < nz; k += kW) (fVec::loadu(z + k) - vm).exp().store(e + k);
    fVec s0(0.f), s1(0.f), d0(0.f), d1(0.f);
    for (int64_t k = 0; k < nz; k += kChunk) {
      const fVec ea = fVec::loadu(e + k), eb = fVec::loadu(e + k + kW);
      const fVec da = fVec::loadu(z + k) - vm, db = fVec::loadu(z + k + kW) - vm;
      s0 = s0 + ea;
      s1 = s1 + eb;
      d0 = d0 + ((ea * da) & (ea > zero));
      d1 = d1 + ((eb * db) & (eb > zero));
    }
    s += static_cast<double>((s0 + s1).reduce_add());
    sd += static_cast<double>((d0 + d1).reduce_add());
  }
  return {m, static_cast<float>(s), static_cast<float>(sd)};
}

// backward_rows for fp32/bf16/fp16: grad_z of every entry (logprobs.h), the label's entry taken
// apart (its logit read before the row is overwritten in place). p = exp(z - lse) with p = 0 at
// z = -inf (exp(-inf - lse) would be NaN for lse = -inf), and the entropy term only where p > 0;
// a row with a NaN lse is NaN throughout.
template <typename scalar_t>
void backward_rows(const Job& job, int64_t r0, int64_t r1, float inv_t) {
  const int64_t V = job.V;
  const Rows logits = job.logits, grad = job.grad;
  const int64_t* labels = job.labels;
  const float *glp = as<float>(job.grad_logprob), *lsp = as<float>(job.lse), *hp = as<float>(job.entropy);
  const float* ghp = as<float>(job.grad_entropy);
  const fVec vt(inv_t), zero(0.f), ninf(-kInf);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* x = logits.row<scalar_t>(r);
    scalar_t* o = const_cast<scalar_t*>(grad.row<scalar_t>(r));
    const float a = glp[r] * inv_t, c = ghp ? ghp[r] * inv_t : 0.f, lse = lsp[r], h = hp[r];
    const int64_t y = labels[r];
    const bool has_label = y >= 0 && y < V;
    const float zy = has_label ? static_cast<float>(x[y]) * inv_t : 0.f;
    if (lse != lse) {
      std::fill(o, o + V, static_cast<scalar_t>(nan_<float>()));
      continue;
    }
    const fVec va(a), vc(c), vlse(lse), vh(h);
    const auto grad_chunk = [&](fVec xv) {
      const fVec z = xv * vt, zl = z - vlse;
      const fVec p = zl.exp() & (z != ninf);
      fVec d = va * (zero - p);
      if (c != 0.f) d = d - (((vc * p) * (zl + vh)) & (p > zero));
      return d;
    };
    int64_t j = 0;
    for (; j + kChunk <= V; j += kChunk) {
      fVec xa, xb;
      load_chunk(x + j, xa, xb);
      const fVec da = grad_chunk(xa), db = grad_chunk(xb);
      store_chunk(o + j, da, db);
    }
    if (j < V) {
      fVec xa, xb;
      load_tail(x + j, V - j, static_cast<scalar_t>(0.f), xa, xb);
      scalar_t buf[kChunk];
      const fVec da = grad_chunk(xa), db = grad_chunk(xb);
      store_chunk(buf, da, db);
      std::copy(buf, buf + (V - j), o + j);
    }
    if (has_label) o[y] = static_cast<scalar_t>(grad_z<float>(zy, true, lse, h, a, c));
  }
}

// sum_j p_j (z_j - r_j) for fp32/bf16/fp16 rows, p_j = exp((z_j - m_z) - log s_z), each term
// where p > 0 only (z = r = -inf would give 0 * NaN), blocked into fp64 like row_stats.
template <typename scalar_t>
double kl_sum(const scalar_t* x, const scalar_t* q, int64_t V, float inv_t, float mz, float log_sz) {
  const fVec vt(inv_t), vm(mz), vl(log_sz), zero(0.f);
  const scalar_t pad = static_cast<scalar_t>(-kInf);
  double acc = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    fVec s0(0.f), s1(0.f);
    for (int64_t k = 0; k < n; k += kChunk) {
      fVec xa, xb, qa, qb;
      if (k + kChunk <= n) {
        load_chunk(x + j0 + k, xa, xb);
        load_chunk(q + j0 + k, qa, qb);
      } else {
        load_tail(x + j0 + k, n - k, pad, xa, xb);
        load_tail(q + j0 + k, n - k, pad, qa, qb);
      }
      const fVec za = xa * vt, zb = xb * vt;
      const fVec pa = ((za - vm) - vl).exp(), pb = ((zb - vm) - vl).exp();
      s0 = s0 + ((pa * (za - qa * vt)) & (pa > zero));
      s1 = s1 + ((pb * (zb - qb * vt)) & (pb > zero));
    }
    acc += static_cast<double>((s0 + s1).reduce_add());
  }
  return acc;
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // PPO_FAST_CPU_AVX2

// Softmax statistics of one row of z = x * inv_t: the exact max first, then the sums, which are
// accumulated in fp64 (a vocabulary of 150k terms in one fp32 sum would lose ~1e-4 of the lse).
template <typename acc_t, typename scalar_t>
Online<acc_t> row_stats(const scalar_t* x, int64_t V, acc_t inv_t) {
#ifdef PPO_FAST_CPU_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::avx2_usable()) return avx2::row_stats(x, V, inv_t);
  }
#endif
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < V; ++j) {
    const acc_t z = static_cast<acc_t>(x[j]) * inv_t;
    m = z > m ? z : m;
  }
  if (is_neg_inf(m)) return online_init<acc_t>();
  double s = 0, sd = 0;
  for (int64_t j = 0; j < V; ++j) {
    const acc_t d = static_cast<acc_t>(x[j]) * inv_t - m;
    const acc_t e = std::exp(d);  // exp(-inf) = 0
    s += e;
    sd += e > acc_t(0) ? static_cast<double>(e * d) : 0.0;
  }
  return {m, static_cast<acc_t>(s), static_cast<acc_t>(sd)};
}

// Rows [r0, r1) of each pass: plain functions, so that the job's pointers and scalars are locals
// the compiler keeps in registers.
template <typename scalar_t, typename acc_t>
void forward_rows(const Job& job, int64_t r0, int64_t r1, acc_t inv_t) {
  const int64_t V = job.V;
  const Rows logits = job.logits;
  const int64_t* labels = job.labels;
  acc_t *lp = as<acc_t>(job.logprob), *ent = as<acc_t>(job.entropy), *ls = as<acc_t>(job.lse);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* x = logits.row<scalar_t>(r);
    const Online<acc_t> o = row_stats<acc_t>(x, V, inv_t);
    acc_t log_s, l, h;
    online_finish(o, log_s, l, h);
    const int64_t y = labels[r];
    ls[r] = l;
    ent[r] = h;
    // An out-of-range label (refused by the Python checks) gives NaN rather than a wild read.
    lp[r] = (y >= 0 && y < V) ? (static_cast<acc_t>(x[y]) * inv_t - o.m) - log_s
                              : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows(const Job& job, int64_t r0, int64_t r1, acc_t inv_t) {
#ifdef PPO_FAST_CPU_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::avx2_usable()) return avx2::backward_rows<scalar_t>(job, r0, r1, inv_t);
  }
#endif
  const int64_t V = job.V;
  const Rows logits = job.logits, grad = job.grad;
  const int64_t* labels = job.labels;
  const acc_t *glp = as<acc_t>(job.grad_logprob), *lsp = as<acc_t>(job.lse), *hp = as<acc_t>(job.entropy);
  const acc_t* ghp = as<acc_t>(job.grad_entropy);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* x = logits.row<scalar_t>(r);
    scalar_t* o = const_cast<scalar_t*>(grad.row<scalar_t>(r));
    const acc_t a = glp[r] * inv_t, c = ghp ? ghp[r] * inv_t : acc_t(0);  // chain rule through z = x / t
    const int64_t y = labels[r];
    for (int64_t j = 0; j < V; ++j) {
      o[j] = static_cast<scalar_t>(grad_z<acc_t>(static_cast<acc_t>(x[j]) * inv_t, j == y, lsp[r], hp[r], a, c));
    }
  }
}

template <typename scalar_t, typename acc_t>
void full_kl_range(const Job& job, int64_t r0, int64_t r1, acc_t inv_t) {
  const int64_t V = job.V;
  const Rows logits = job.logits, ref = job.ref_logits;
  acc_t* out = as<acc_t>(job.kl);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t *x = logits.row<scalar_t>(r), *q = ref.row<scalar_t>(r);
    const Online<acc_t> oz = row_stats<acc_t>(x, V, inv_t), oq = row_stats<acc_t>(q, V, inv_t);
    acc_t log_sz, lz, log_sq, lq, h;
    online_finish(oz, log_sz, lz, h);
    online_finish(oq, log_sq, lq, h);
    // KL = sum_j p_j (z_j - r_j) - lse_z + lse_r, with the lse difference taken as
    // (m_r - m_z) + (log s_r - log s_z) so the logits' magnitude does not cancel.
    double acc = 0;
#ifdef PPO_FAST_CPU_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      if (cpu::avx2_usable()) {
        out[r] = static_cast<acc_t>(avx2::kl_sum(x, q, V, inv_t, oz.m, log_sz)) + (oq.m - oz.m) + (log_sq - log_sz);
        continue;
      }
    }
#endif
    for (int64_t j = 0; j < V; ++j) {
      const acc_t z = static_cast<acc_t>(x[j]) * inv_t;
      const acc_t p = std::exp((z - oz.m) - log_sz);
      if (p > acc_t(0)) acc += static_cast<double>(p * (z - static_cast<acc_t>(q[j]) * inv_t));
    }
    out[r] = static_cast<acc_t>(acc) + (oq.m - oz.m) + (log_sq - log_sz);
  }
}

// Dispatches on the logits' dtype and runs f(scalar_t{}, r0, r1, inv_t) over the (b, t) rows in
// parallel (about 32k logits per grain), inv_t = 1 / temperature in the accumulation type.
template <typename F>
void parallel_rows(const Job& job, const F& f) {
  cpu::dispatch(job.dtype, [&](auto s) {
    const auto inv_t = static_cast<at::opmath_type<decltype(s)>>(job.inv_t);
    at::parallel_for(0, job.B * job.T, std::max<int64_t>(1, 32768 / job.V),
                     [&](int64_t r0, int64_t r1) { f(s, r0, r1, inv_t); });
  });
}

void forward(const Job& job) {
  parallel_rows(job,
                [&](auto s, int64_t r0, int64_t r1, auto inv_t) { forward_rows<decltype(s)>(job, r0, r1, inv_t); });
}

void backward(const Job& job) {
  parallel_rows(job,
                [&](auto s, int64_t r0, int64_t r1, auto inv_t) { backward_rows<decltype(s)>(job, r0, r1, inv_t); });
}

void full_kl_rows(const Job& job) {
  parallel_rows(job,
                [&](auto s, int64_t r0, int64_t r1, auto inv_t) { full_kl_range<decltype(s)>(job, r0, r1, inv_t); });
}

}  // namespace

const Kernels kCpuKernels{&forward, &backward, &full_kl_rows};

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("logprobs", bound<&logprobs, kCpuKernels>);
  m.impl("logprobs_backward", bound<&logprobs_backward, kCpuKernels>);
  m.impl("logprobs_backward_", bound<&logprobs_backward_, kCpuKernels>);
  m.impl("full_kl", bound<&full_kl, kCpuKernels>);
}

}  // namespace logprobs
}  // namespace ppo_fast
