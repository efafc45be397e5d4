// CPU kernels for log-probs and entropy from logits: logprob = z[label] - lse(z), H = lse - sum p z.
// Each (b, t) row of the vocabulary is read once into cache: its max first, then the exp sums
// (logits * 1/temperature on the fly); no [B, T, V] temporary is ever allocated.
#include <ppo_fast/logprobs.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace ppo_fast {
namespace logprobs {
namespace {

template <typename scalar_t>
struct Rows {
  const scalar_t* base;
  int64_t T, V, sb, st;  // strides of b and t (the vocabulary is contiguous)
  const scalar_t* row(int64_t r) const {
    return base + (r / T) * sb + (r % T) * st;
  }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  return {x.data_ptr<scalar_t>(), x.size(1), x.size(2), x.stride(0), x.stride(1)};
}

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

// fp32 outputs, or fp64 for fp64 logits (gradcheck).
at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                            double temperature) {
  const char* op = "logprobs";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc = logits.options().dtype(acc_type(logits));
  at::Tensor logprob = at::empty({B, T}, acc), entropy = at::empty({B, T}, acc), lse = at::empty({B, T}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_fast_logprobs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const auto rows = rows_of<scalar_t>(logits);
    const int64_t* lab = labels.data_ptr<int64_t>();
    acc_t *lp = logprob.data_ptr<acc_t>(), *ent = entropy.data_ptr<acc_t>(), *ls = lse.data_ptr<acc_t>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = rows.row(r);
        const Online<acc_t> o = row_stats<acc_t>(x, V, inv_t);
        acc_t log_s, l, h;
        online_finish(o, log_s, l, h);
        const int64_t y = lab[r];
        ls[r] = l;
        ent[r] = h;
        // An out-of-range label (refused by the Python checks) gives NaN rather than a wild read.
        lp[r] = (y >= 0 && y < V) ? (static_cast<acc_t>(x[y]) * inv_t - o.m) - log_s
                                  : std::numeric_limits<acc_t>::quiet_NaN();
      }
    });
  });
  return {logprob, entropy, lse};
}

// The gradient w.r.t. logits into a new tensor, or (inplace) into the logits' own storage: each
// element is read, then overwritten by the same thread, so no row is needed twice.
at::Tensor backward_impl(const char* op, const at::Tensor& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
                         const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse,
                         const at::Tensor& entropy, double temperature, bool inplace) {
  check_temperature(op, temperature);
  TORCH_CHECK(!inplace || logits_in.dim() != 3 || logits_in.stride(2) == 1, op,
              ": logits must have a contiguous last dimension to take its gradient in place");
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_backward_inputs(op, logits, grad_logprob, grad_entropy, lse, entropy);
  const auto acc = acc_type(logits);
  const at::Tensor g_lp = grad_logprob.to(acc).contiguous(), ls = lse.to(acc).contiguous();
  const at::Tensor ent = entropy.to(acc).contiguous();
  const at::Tensor g_h = grad_entropy ? grad_entropy->to(acc).contiguous() : at::Tensor();
  at::Tensor grad = inplace ? logits : at::empty({B, T, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_fast_logprobs_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const auto rows = rows_of<scalar_t>(logits);
    const auto out_rows = rows_of<scalar_t>(grad);
    const int64_t* lab = labels.data_ptr<int64_t>();
    const acc_t *glp = g_lp.data_ptr<acc_t>(), *lsp = ls.data_ptr<acc_t>(), *hp = ent.data_ptr<acc_t>();
    const acc_t* ghp = g_h.defined() ? g_h.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = rows.row(r);
        scalar_t* o = const_cast<scalar_t*>(out_rows.row(r));
        const acc_t a = glp[r] * inv_t, c = ghp ? ghp[r] * inv_t : acc_t(0);  // chain rule through z = x / t
        const int64_t y = lab[r];
        for (int64_t j = 0; j < V; ++j) {
          o[j] = static_cast<scalar_t>(grad_z<acc_t>(static_cast<acc_t>(x[j]) * inv_t, j == y, lsp[r], hp[r], a, c));
        }
      }
    });
  });
  return grad;
}

at::Tensor logprobs_backward_cpu(const at::Tensor& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
                                 const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                 const at::Tensor& entropy, double temperature) {
  return backward_impl("logprobs_backward", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature,
                       false);
}

void logprobs_backward_inplace_cpu(at::Tensor& logits, const at::Tensor& grad_logprob,
                                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                                   const at::Tensor& lse, const at::Tensor& entropy, double temperature) {
  backward_impl("logprobs_backward_", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature, true);
}

at::Tensor full_kl_cpu(const at::Tensor& logits_in, const at::Tensor& ref_in, double temperature) {
  const char* op = "full_kl";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor ref = check_logits(op, "ref_logits", ref_in);
  check::same_device(op, "ref_logits", ref, "logits", logits);
  check::same_shape(op, "ref_logits", ref, "logits", logits);
  check::same_dtype(op, "ref_logits", ref, "logits", logits);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  at::Tensor kl = at::empty({B, T}, logits.options().dtype(acc_type(logits)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_fast_full_kl", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const auto zr = rows_of<scalar_t>(logits), rr = rows_of<scalar_t>(ref);
    acc_t* out = kl.data_ptr<acc_t>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *x = zr.row(r), *q = rr.row(r);
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
    });
  });
  return kl;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("logprobs", &logprobs_cpu);
  m.impl("logprobs_backward", &logprobs_backward_cpu);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cpu);
  m.impl("full_kl", &full_kl_cpu);
}

}  // namespace logprobs
}  // namespace ppo_fast
