// CPU kernels for log-probs and entropy from logits: logprob = z[label] - lse(z), H = lse - sum p z.
// Each (b, t) row of the vocabulary is read once into cache: its max first, then the exp sums
// (logits * 1/temperature on the fly); no [B, T, V] temporary is ever allocated.
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/logprobs.h>

#include <torch/library.h>

namespace ppo_fast {
namespace logprobs {
namespace {

// Softmax statistics of one row of z = x * inv_t: the exact max first, then the sums, which are
// accumulated in fp64 (a vocabulary of 150k terms in one fp32 sum would lose ~1e-4 of the lse).
template <typename acc_t, typename scalar_t>
Online<acc_t> row_stats(const scalar_t* x, int64_t V, acc_t inv_t) {
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
