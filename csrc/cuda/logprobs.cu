// CUDA kernels for log-probs and entropy from logits: logprob = z[label] - lse(z), H = lse - sum p z.
//
// One 256-thread block per (b, t) row of the vocabulary. Each thread keeps online softmax
// statistics (max m, sum exp(z - m), sum exp(z - m) (z - m)) over its strided 8-wide vectors,
// rebasing once per vector,
// and the block merges them in a fixed order: one read of the logits, no [B, T, V] temporary,
// deterministic. The backward recomputes p = exp(z - lse) from the saved lse and writes the
// gradient in one more pass; full_kl keeps the same statistics for both models at once.
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/logprobs.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ppo_fast {
namespace logprobs {
namespace {

using namespace ppo_fast::cuda;

constexpr int kThreads = 256;

template <typename scalar_t>
struct Rows {
  const scalar_t* base;
  int64_t T, V, sb, st;
  bool vec;  // every row starts 16-byte aligned and V is a multiple of kItems
  __device__ const scalar_t* row(int64_t r) const {
    return base + (r / T) * sb + (r % T) * st;
  }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  Rows<scalar_t> r{x.data_ptr<scalar_t>(), x.size(1), x.size(2), x.stride(0), x.stride(1), false};
  const size_t w = sizeof(scalar_t) * kItems;
  r.vec = r.V % kItems == 0 && aligned(r.base, w) && (r.sb * sizeof(scalar_t)) % w == 0 &&
          (r.st * sizeof(scalar_t)) % w == 0;
  return r;
}

using OnlineF = Online<float>;

// Folds kItems values of z into the running statistics: one rebase per vector. The max keeps a NaN
// (max_nan), so a thread whose logits are only NaN and -inf still marks its row (logprobs.h).
__device__ __forceinline__ void fold(OnlineF& o, const float (&z)[kItems]) {
  float m = o.m;
#pragma unroll
  for (int i = 0; i < kItems; ++i) m = max_nan(z[i], m);
  if (m == kNegInf) return;
  if (!(m <= o.m)) o = online_rebase(o, m);  // m > o.m, or m NaN
#pragma unroll
  for (int i = 0; i < kItems; ++i) online_add(o, z[i]);
}

template <typename scalar_t>
__device__ __forceinline__ void load_z(const scalar_t* x, int64_t j0, int64_t V, bool vec, float inv_t,
                                       float (&z)[kItems]) {
  load_items(x, j0, V, vec, z, kNegInf);
#pragma unroll
  for (int i = 0; i < kItems; ++i) z[i] *= inv_t;  // -inf past the end stays -inf
}

__device__ __forceinline__ OnlineF shfl_down(OnlineF o, int off) {
  return {__shfl_down_sync(kFull, o.m, off), __shfl_down_sync(kFull, o.s, off), __shfl_down_sync(kFull, o.sd, off)};
}

// Fixed-order merge over the block; every thread gets the result. Merge(a, b) combines two.
template <typename Merge>
__device__ OnlineF block_merge(OnlineF o, Merge merge) {
  __shared__ OnlineF sm[kThreads / 32];
  __shared__ OnlineF result;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const OnlineF other = shfl_down(o, off);
    if ((threadIdx.x & 31) + off < 32) o = merge(o, other);
  }
  if ((threadIdx.x & 31) == 0) sm[threadIdx.x >> 5] = o;
  __syncthreads();
  if (threadIdx.x == 0) {
    OnlineF r = sm[0];
    for (int w = 1; w < kThreads / 32; ++w) r = merge(r, sm[w]);
    result = r;
  }
  __syncthreads();
  return result;
}

struct MergeOnline {
  __device__ OnlineF operator()(OnlineF a, OnlineF b) const {
    return online_merge(a, b);
  }
};

// For full_kl: (m, s, acc) where acc = sum exp(z - m) (z - r) only rescales with the max.
struct MergeScaled {
  __device__ OnlineF operator()(OnlineF a, OnlineF b) const {
    if (a.m == kNegInf) return b;
    if (b.m == kNegInf) return a;
    const float m = max_nan(a.m, b.m);
    const float ea = exp_(a.m - m), eb = exp_(b.m - m);
    return {m, a.s * ea + b.s * eb, a.sd * ea + b.sd * eb};
  }
};

template <typename scalar_t>
__device__ OnlineF row_online(const scalar_t* x, int64_t V, bool vec, float inv_t) {
  OnlineF o = online_init<float>();
  for (int64_t j0 = int64_t(threadIdx.x) * kItems; j0 < V; j0 += int64_t(kThreads) * kItems) {
    float z[kItems];
    load_z(x, j0, V, vec, inv_t, z);
    fold(o, z);
  }
  return block_merge(o, MergeOnline{});
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Rows<scalar_t> rows, const int64_t* __restrict__ labels, float inv_t,
                   float* __restrict__ logprob, float* __restrict__ entropy, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const scalar_t* x = rows.row(r);
  const OnlineF o = row_online(x, rows.V, rows.vec, inv_t);
  if (threadIdx.x == 0) {
    float log_s, l, h;
    online_finish(o, log_s, l, h);
    const int64_t y = labels[r];
    lse[r] = l;
    entropy[r] = h;
    // An out-of-range label (refused by the Python checks) gives NaN rather than a wild read.
    logprob[r] = (y >= 0 && y < rows.V) ? (static_cast<float>(x[y]) * inv_t - o.m) - log_s : __int_as_float(0x7fc00000);
  }
}

// out may be the logits themselves (in place): no __restrict__ on the rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Rows<scalar_t> rows, const int64_t* __restrict__ labels, float inv_t,
                    const float* __restrict__ g_lp, const float* __restrict__ g_h, const float* __restrict__ lse,
                    const float* __restrict__ entropy, const Rows<scalar_t> out) {
  const int64_t r = blockIdx.x;
  const scalar_t* x = rows.row(r);
  scalar_t* o = const_cast<scalar_t*>(out.row(r));
  const bool out_vec = out.vec;
  const float a = g_lp[r] * inv_t, c = g_h ? g_h[r] * inv_t : 0.f;  // chain rule through z = x / t
  const float l = lse[r], h = entropy[r];
  const int64_t y = labels[r];
  for (int64_t j0 = int64_t(threadIdx.x) * kItems; j0 < rows.V; j0 += int64_t(kThreads) * kItems) {
    float z[kItems], d[kItems];
    load_z(x, j0, rows.V, rows.vec, inv_t, z);
#pragma unroll
    for (int i = 0; i < kItems; ++i) d[i] = grad_z<float>(z[i], j0 + i == y, l, h, a, c);
    store_items(o, j0, rows.V, out_vec, d);
  }
}

// KL(p || q) = sum_j p_j (z_j - r_j) - lse_z + lse_r, with acc = sum exp(z - m_z) (z - r) kept in
// step with z's running sum (same max, same rescaling).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    full_kl_kernel(const Rows<scalar_t> zr, const Rows<scalar_t> rr, float inv_t, float* __restrict__ kl) {
  const int64_t row = blockIdx.x;
  const scalar_t *x = zr.row(row), *q = rr.row(row);
  const bool vec = zr.vec && rr.vec;
  OnlineF oz = online_init<float>(), orr = online_init<float>();
  float acc = 0.f;  // sum exp(z - m_z) (z - r), rescaled whenever m_z grows
  for (int64_t j0 = int64_t(threadIdx.x) * kItems; j0 < zr.V; j0 += int64_t(kThreads) * kItems) {
    float z[kItems], r[kItems];
    load_z(x, j0, zr.V, vec, inv_t, z);
    load_z(q, j0, zr.V, vec, inv_t, r);
    const float m_old = oz.m;
    fold(oz, z);
    if (oz.m != m_old && m_old != kNegInf) acc *= exp_(m_old - oz.m);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float e = z[i] == kNegInf ? 0.f : exp_(z[i] - oz.m);
      if (e > 0.f) acc += e * (z[i] - r[i]);
    }
    fold(orr, r);
  }
  const OnlineF mz = block_merge(OnlineF{oz.m, oz.s, acc}, MergeScaled{});
  const OnlineF mr = block_merge(orr, MergeOnline{});
  if (threadIdx.x == 0) {
    // KL = acc / s_z - lse_z + lse_r, the lse difference as (m_r - m_z) + (log s_r - log s_z); NaN
    // when either row has no distribution (logprobs.h).
    kl[row] = online_valid(mz) && online_valid(mr)
                  ? mz.sd / mz.s + (mr.m - mz.m) + (log_(mr.s) - log_(mz.s))
                  : nan_<float>();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                             double temperature) {
  const char* op = "logprobs";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor labels = check_labels(op, labels_in, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprob = at::empty({B, T}, f32), entropy = at::empty({B, T}, f32), lse = at::empty({B, T}, f32);
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch(op, logits, logits, [&](auto s, auto) {
    using scalar_t = decltype(s);
    forward_kernel<<<B * T, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(logits), labels.data_ptr<int64_t>(), inv_t, logprob.data_ptr<float>(),
        entropy.data_ptr<float>(), lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logprob, entropy, lse};
}

// The gradient into a new tensor, or (inplace) into the logits' own storage: each element is read,
// then overwritten by the same thread.
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
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g_lp = grad_logprob.to(at::kFloat).contiguous(), ls = lse.to(at::kFloat).contiguous();
  const at::Tensor ent = entropy.to(at::kFloat).contiguous();
  const at::Tensor g_h = grad_entropy ? grad_entropy->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor grad = inplace ? logits : at::empty({B, T, V}, logits.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch(op, logits, logits, [&](auto s, auto) {
    using scalar_t = decltype(s);
    const auto out_rows = rows_of<scalar_t>(grad);
    backward_kernel<<<B * T, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(logits), labels.data_ptr<int64_t>(), inv_t, g_lp.data_ptr<float>(),
        g_h.defined() ? g_h.data_ptr<float>() : nullptr, ls.data_ptr<float>(), ent.data_ptr<float>(), out_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

at::Tensor logprobs_backward_cuda(const at::Tensor& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& entropy, double temperature) {
  return backward_impl("logprobs_backward", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature,
                       false);
}

void logprobs_backward_inplace_cuda(at::Tensor& logits, const at::Tensor& grad_logprob,
                                    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                                    const at::Tensor& lse, const at::Tensor& entropy, double temperature) {
  backward_impl("logprobs_backward_", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature, true);
}

at::Tensor full_kl_cuda(const at::Tensor& logits_in, const at::Tensor& ref_in, double temperature) {
  const char* op = "full_kl";
  check_temperature(op, temperature);
  const at::Tensor logits = check_logits(op, "logits", logits_in);
  const at::Tensor ref = check_logits(op, "ref_logits", ref_in);
  check::same_device(op, "ref_logits", ref, "logits", logits);
  check::same_shape(op, "ref_logits", ref, "logits", logits);
  check::same_dtype(op, "ref_logits", ref, "logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1);
  at::Tensor kl = at::empty({B, T}, logits.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch(op, logits, logits, [&](auto s, auto) {
    using scalar_t = decltype(s);
    full_kl_kernel<<<B * T, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(logits), rows_of<scalar_t>(ref), inv_t, kl.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return kl;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("logprobs", &logprobs_cuda);
  m.impl("logprobs_backward", &logprobs_backward_cuda);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cuda);
  m.impl("full_kl", &full_kl_cuda);
}

}  // namespace logprobs
}  // namespace ppo_fast
