// CPU kernels for log-probs and entropy from logits: logprob = z[label] - lse(z), H = lse - sum p z.
// Each (b, t) row of the vocabulary is read once into cache: its max first, then the exp sums
// (logits * 1/temperature on the fly); no [B, T, V] temporary is ever allocated.
#include <ppo_fast/logprobs.h>

#include <ATen/Dispatch.h>
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

// Softmax statistics of one row of z = x * inv_t: exact max first, then the sums.
template <typename scalar_t>
Online row_stats(const scalar_t* x, int64_t V, float inv_t) {
  float m = kNegInf;
  for (int64_t j = 0; j < V; ++j) {
    const float z = static_cast<float>(x[j]) * inv_t;
    m = z > m ? z : m;
  }
  if (m == kNegInf) return online_init();
  float s = 0.f, sz = 0.f;
  for (int64_t j = 0; j < V; ++j) {
    const float z = static_cast<float>(x[j]) * inv_t;
    const float e = std::exp(z - m);
    s += e;
    sz += e > 0.f ? e * z : 0.f;
  }
  return {m, s, sz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                            double temperature) {
  const char* op = "logprobs";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprob = at::empty({B, T}, f32), entropy = at::empty({B, T}, f32), lse = at::empty({B, T}, f32);
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_fast_logprobs", [&] {
    const auto rows = rows_of<scalar_t>(logits);
    const int64_t* lab = labels.data_ptr<int64_t>();
    float *lp = logprob.data_ptr<float>(), *ent = entropy.data_ptr<float>(), *ls = lse.data_ptr<float>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = rows.row(r);
        float l, h;
        online_finish(row_stats(x, V, inv_t), l, h);
        const int64_t y = lab[r];
        ls[r] = l;
        ent[r] = h;
        // An out-of-range label (refused by the Python checks) gives NaN rather than a wild read.
        lp[r] = (y >= 0 && y < V) ? static_cast<float>(x[y]) * inv_t - l : std::numeric_limits<float>::quiet_NaN();
      }
    });
  });
  return {logprob, entropy, lse};
}

at::Tensor logprobs_backward_cpu(const at::Tensor& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
                                 const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse,
                                 const at::Tensor& entropy, double temperature) {
  const char* op = "logprobs_backward";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_logprob", &grad_logprob},
                                {"lse", &lse},
                                {"entropy", &entropy},
                                {"grad_entropy", grad_entropy ? &*grad_entropy : nullptr}}) {
    if (t == nullptr) continue;
    check::same_device(op, name, *t, "logits", logits);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == T, op, ": ", name, " must be [B, T] = [", B, ", ",
                T, "], got ", check::shape_str(*t));
  }
  const at::Tensor g_lp = grad_logprob.to(at::kFloat).contiguous(), ls = lse.to(at::kFloat).contiguous();
  const at::Tensor ent = entropy.to(at::kFloat).contiguous();
  const at::Tensor g_h = grad_entropy ? grad_entropy->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor grad = at::empty({B, T, V}, logits.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_fast_logprobs_backward", [&] {
    const auto rows = rows_of<scalar_t>(logits);
    const int64_t* lab = labels.data_ptr<int64_t>();
    const float *glp = g_lp.data_ptr<float>(), *lsp = ls.data_ptr<float>(), *hp = ent.data_ptr<float>();
    const float* ghp = g_h.defined() ? g_h.data_ptr<float>() : nullptr;
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = rows.row(r);
        scalar_t* o = out + r * V;
        const float a = glp[r] * inv_t, c = ghp ? ghp[r] * inv_t : 0.f;  // chain rule through z = x / t
        const int64_t y = lab[r];
        for (int64_t j = 0; j < V; ++j) {
          o[j] = static_cast<scalar_t>(grad_z(static_cast<float>(x[j]) * inv_t, j == y, lsp[r], hp[r], a, c));
        }
      }
    });
  });
  return grad;
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
  at::Tensor kl = at::empty({B, T}, logits.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_fast_full_kl", [&] {
    const auto zr = rows_of<scalar_t>(logits), rr = rows_of<scalar_t>(ref);
    float* out = kl.data_ptr<float>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *x = zr.row(r), *q = rr.row(r);
        float lz, lr, h;
        online_finish(row_stats(x, V, inv_t), lz, h);
        online_finish(row_stats(q, V, inv_t), lr, h);
        // KL = sum_j p_j (z_j - r_j) - lse_z + lse_r, over entries the policy gives mass to.
        float acc = 0.f;
        for (int64_t j = 0; j < V; ++j) {
          const float z = static_cast<float>(x[j]) * inv_t;
          const float p = z == kNegInf ? 0.f : std::exp(z - lz);
          if (p > 0.f) acc += p * (z - static_cast<float>(q[j]) * inv_t);
        }
        out[r] = acc - lz + lr;
      }
    });
  });
  return kl;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("logprobs", &logprobs_cpu);
  m.impl("logprobs_backward", &logprobs_backward_cpu);
  m.impl("full_kl", &full_kl_cpu);
}

}  // namespace logprobs
}  // namespace ppo_fast
