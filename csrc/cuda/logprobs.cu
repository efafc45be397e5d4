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

// Whether every row of r starts aligned for kItems-wide vector loads and V is a multiple of kItems.
template <typename scalar_t>
bool vec_rows(const Rows& r) {
  const size_t w = sizeof(scalar_t) * kItems;
  return r.V % kItems == 0 && aligned(r.base, w) && (r.sb * sizeof(scalar_t)) % w == 0 &&
         (r.st * sizeof(scalar_t)) % w == 0;
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
    forward_kernel(const Rows rows, bool vec, const int64_t* __restrict__ labels, float inv_t,
                   float* __restrict__ logprob, float* __restrict__ entropy, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const scalar_t* x = rows.row<scalar_t>(r);
  const OnlineF o = row_online(x, rows.V, vec, inv_t);
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
    backward_kernel(const Rows rows, bool vec, const int64_t* __restrict__ labels, float inv_t,
                    const float* __restrict__ g_lp, const float* __restrict__ g_h, const float* __restrict__ lse,
                    const float* __restrict__ entropy, const Rows out, bool out_vec) {
  const int64_t r = blockIdx.x;
  const scalar_t* x = rows.row<scalar_t>(r);
  scalar_t* o = const_cast<scalar_t*>(out.row<scalar_t>(r));
  const float a = g_lp[r] * inv_t, c = g_h ? g_h[r] * inv_t : 0.f;  // chain rule through z = x / t
  const float l = lse[r], h = entropy[r];
  const int64_t y = labels[r];
  for (int64_t j0 = int64_t(threadIdx.x) * kItems; j0 < rows.V; j0 += int64_t(kThreads) * kItems) {
    float z[kItems], d[kItems];
    load_z(x, j0, rows.V, vec, inv_t, z);
#pragma unroll
    for (int i = 0; i < kItems; ++i) d[i] = grad_z<float>(z[i], j0 + i == y, l, h, a, c);
    store_items(o, j0, rows.V, out_vec, d);
  }
}

// KL(p || q) = sum_j p_j (z_j - r_j) - lse_z + lse_r, with acc = sum exp(z - m_z) (z - r) kept in
// step with z's running sum (same max, same rescaling).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    full_kl_kernel(const Rows zr, const Rows rr, bool vec_z, bool vec_r, float inv_t, float* __restrict__ kl) {
  const int64_t row = blockIdx.x;
  const bool vec = vec_z && vec_r;
  const scalar_t *x = zr.row<scalar_t>(row), *q = rr.row<scalar_t>(row);
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

// ---------------------------------------------------------------------------------------------
// Host side: one block per row, on the current stream of the job's device.

void forward(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    forward_kernel<scalar_t><<<job.B * job.T, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        job.logits, vec_rows<scalar_t>(job.logits), job.labels, static_cast<float>(job.inv_t),
        as<float>(job.logprob), as<float>(job.entropy), as<float>(job.lse));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    backward_kernel<scalar_t><<<job.B * job.T, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        job.logits, vec_rows<scalar_t>(job.logits), job.labels, static_cast<float>(job.inv_t),
        as<float>(job.grad_logprob), as<float>(job.grad_entropy), as<float>(job.lse), as<float>(job.entropy),
        job.grad, vec_rows<scalar_t>(job.grad));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void full_kl_rows(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    full_kl_kernel<scalar_t><<<job.B * job.T, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        job.logits, job.ref_logits, vec_rows<scalar_t>(job.logits), vec_rows<scalar_t>(job.ref_logits),
        static_cast<float>(job.inv_t), as<float>(job.kl));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

const Kernels kCudaKernels{&forward, &backward, &full_kl_rows};

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("logprobs", bound<&logprobs, kCudaKernels>);
  m.impl("logprobs_backward", bound<&logprobs_backward, kCudaKernels>);
  m.impl("logprobs_backward_", bound<&logprobs_backward_, kCudaKernels>);
  m.impl("full_kl", bound<&full_kl, kCudaKernels>);
}

}  // namespace logprobs
}  // namespace ppo_fast
