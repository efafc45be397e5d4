// CUDA kernels for running reward moments: Chan-merged (count, mean, M2) in fp64, then
// x -> clip((x - mean?) / (std + eps)), std taken as 1 below two samples or when std <= eps.
//
// Update + normalise + clip is two launches and no host synchronisation:
//   1. partials_kernel: per fixed chunk of kChunk elements, fp64 Welford moments of the counted
//      finite entries (and a count of non-finite ones); block 0 also copies the old state, so the
//      next launch can rewrite the state without a race.
//   2. normalize_kernel: every block merges the chunk partials in one fixed order (identical bits
//      in every block), merges the batch into the old state (or rejects it if non-finite), and
//      normalises its share of x; block 0 writes the new state and the batch moments.
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/moments.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ppo_fast {
namespace moments {
namespace {

using namespace ppo_fast::cuda;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;

template <typename mask_t>
__device__ __forceinline__ bool counted(const mask_t* mask, int64_t i) {
  return mask == nullptr || is_set(mask[i]);
}

struct Part {
  double n, mean, m2, bad;
};

__device__ __forceinline__ Part merge(Part a, Part b) {
  const Moments<double> m = moments_merge(Moments<double>{a.n, a.mean, a.m2}, Moments<double>{b.n, b.mean, b.m2});
  return {m.n, m.mean, m.m2, a.bad + b.bad};
}

// Fixed-order tree over the block; thread 0 gets the result.
__device__ Part block_merge(Part p) {
  __shared__ Part sm[kThreads];
  sm[threadIdx.x] = p;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sm[threadIdx.x] = merge(sm[threadIdx.x], sm[threadIdx.x + s]);
    __syncthreads();
  }
  const Part r = sm[0];
  __syncthreads();  // sm may be reused
  return r;
}

// parts: [1 + P, 4]; row 0 is the old state (copied by block 0 when old_state is given).
template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads) partials_kernel(const scalar_t* __restrict__ x,
                                                            const mask_t* __restrict__ mask, int64_t N,
                                                            const double* __restrict__ old_state,
                                                            double* __restrict__ parts) {
  const int64_t lo = int64_t(blockIdx.x) * kChunk, hi = min(N, lo + kChunk);
  Part p{0, 0, 0, 0};
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    if (!counted(mask, i)) continue;
    const double v = static_cast<double>(static_cast<float>(x[i]));
    if (!is_finite(v)) {
      p.bad += 1;
      continue;
    }
    p.n += 1;  // Welford, one sample at a time
    const double d = v - p.mean;
    p.mean += d / p.n;
    p.m2 += d * (v - p.mean);
  }
  p = block_merge(p);
  if (threadIdx.x == 0) {
    double* out = parts + (1 + int64_t(blockIdx.x)) * kSlots;
    out[kCount] = p.n;
    out[kMean] = p.mean;
    out[kM2] = p.m2;
    out[kNonFinite] = p.bad;
    if (blockIdx.x == 0 && old_state != nullptr) {
      for (int k = 0; k < kSlots; ++k) parts[k] = old_state[k];
    }
  }
}

// Merges parts[1..1+P) in a fixed order; every thread gets the batch.
__device__ void batch_of(const double* parts, int64_t P, double* batch) {
  __shared__ double sb[kSlots];
  Part p{0, 0, 0, 0};
  for (int64_t i = threadIdx.x; i < P; i += kThreads) {
    const double* q = parts + (1 + i) * kSlots;
    p = merge(p, Part{q[kCount], q[kMean], q[kM2], q[kNonFinite]});
  }
  p = block_merge(p);
  if (threadIdx.x == 0) {
    sb[kCount] = p.n;
    sb[kMean] = p.mean;
    sb[kM2] = p.m2;
    sb[kNonFinite] = p.bad;
  }
  __syncthreads();
  for (int k = 0; k < kSlots; ++k) batch[k] = sb[k];
}

__global__ void reduce_kernel(const double* __restrict__ parts, int64_t P, double* __restrict__ batch_out) {
  double batch[kSlots];
  batch_of(parts, P, batch);
  if (threadIdx.x == 0) {
    for (int k = 0; k < kSlots; ++k) batch_out[k] = batch[k];
  }
}

__global__ void merge_kernel(double* state, const double* __restrict__ batches, int64_t k) {
  merge_batches(state, batches, k);
}

// With parts: state = merge(parts[0] (old state), batch of parts[1..]) first; block 0 writes it to
// state_out and the batch to batch_out. Without: normalise with state_in.
template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const scalar_t* __restrict__ x, const mask_t* __restrict__ mask, scalar_t* __restrict__ out,
                     int64_t N, const double* __restrict__ state_in, const double* __restrict__ parts, int64_t P,
                     double* __restrict__ state_out, double* __restrict__ batch_out, const Normalize p, bool vec) {
  double state[kSlots];
  if (parts != nullptr) {
    double batch[kSlots];
    batch_of(parts, P, batch);
    for (int k = 0; k < kSlots; ++k) state[k] = parts[k];
    merge_batches(state, batch, 1);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      for (int k = 0; k < kSlots; ++k) {
        state_out[k] = state[k];
        batch_out[k] = batch[k];
      }
    }
  } else {
    for (int k = 0; k < kSlots; ++k) state[k] = state_in[k];
  }
  float shift, mul;
  affine_of(state, p, shift, mul);
  const int64_t stride = int64_t(gridDim.x) * kThreads * kItems;
  for (int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kItems; i0 < N; i0 += stride) {
    float v[kItems];
    load_items(x, i0, N, vec, v, 0.f);
    bool m[kItems];
    if (mask != nullptr) {
      load_mask(mask, i0, N, vec, m);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) m[i] = true;
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = m[i] ? normalize(v[i], shift, mul, p) : v[i];
    store_items(out, i0, N, vec, v);
  }
}

template <typename mask_t>
const mask_t* mask_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.data_ptr<mask_t>() : nullptr;
}

int64_t chunks_of(int64_t N) {
  return (N + kChunk - 1) / kChunk;
}

template <typename scalar_t, typename mask_t>
void launch_normalize(const at::Tensor& x, const at::Tensor& mask, at::Tensor& out, const double* state_in,
                      const double* parts, int64_t P, double* state_out, double* batch_out, const Normalize& p) {
  const int64_t N = x.numel();
  const mask_t* m = mask_ptr<mask_t>(mask);
  const bool vec = aligned(x.data_ptr(), sizeof(scalar_t) * kItems) && aligned(out.data_ptr(), sizeof(scalar_t) * kItems) &&
                   aligned(m, sizeof(mask_t) * kItems);
  const int64_t work = (N + int64_t(kThreads) * kItems - 1) / (int64_t(kThreads) * kItems);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Each block first merges all the partials: keep the grid near the number of resident blocks.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(work, sms * 4));
  normalize_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), m, out.data_ptr<scalar_t>(), N, state_in, parts, P, state_out, batch_out, p, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mask_t>
at::Tensor launch_partials(const at::Tensor& x, const at::Tensor& mask, const double* old_state) {
  const int64_t P = chunks_of(x.numel());
  at::Tensor parts = at::empty({1 + P, kSlots}, x.options().dtype(at::kDouble));
  partials_kernel<<<P, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), mask_ptr<mask_t>(mask), x.numel(), old_state, parts.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return parts;
}

at::Tensor moments_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in) {
  const char* op = "moments";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({kSlots}, x.options().dtype(at::kDouble));
  dispatch(op, x, mask.defined() ? mask : x, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    const at::Tensor parts = launch_partials<scalar_t, mask_t>(x, mask, nullptr);
    reduce_kernel<<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(parts.data_ptr<double>(), parts.size(0) - 1,
                                                                         out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void moments_merge_cuda(at::Tensor& state, const at::Tensor& batches) {
  const char* op = "moments_merge_";
  check_batches(op, state, batches);
  const c10::cuda::CUDAGuard guard(state.device());
  const at::Tensor b = batches.contiguous();
  merge_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(state.data_ptr<double>(), b.data_ptr<double>(),
                                                             b.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moments_normalize_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                                  const at::Tensor& state, bool scale, bool center, std::optional<double> clip,
                                  double eps) {
  const char* op = "moments_normalize";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  check_state(op, state, x_in);
  const Normalize p = check_normalize(op, scale, center, clip, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  dispatch(op, x, mask.defined() ? mask : x, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    launch_normalize<scalar_t, mask_t>(x, mask, out, state.data_ptr<double>(), nullptr, 0, nullptr, nullptr, p);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moments_update_normalize_cuda(at::Tensor& state, const at::Tensor& x_in,
                                                                 const std::optional<at::Tensor>& mask_in, bool scale,
                                                                 bool center, std::optional<double> clip, double eps) {
  const char* op = "moments_update_normalize_";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  check_state(op, state, x_in);
  const Normalize p = check_normalize(op, scale, center, clip, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x), batch = at::empty({kSlots}, x.options().dtype(at::kDouble));
  dispatch(op, x, mask.defined() ? mask : x, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    const at::Tensor parts = launch_partials<scalar_t, mask_t>(x, mask, state.data_ptr<double>());
    launch_normalize<scalar_t, mask_t>(x, mask, out, nullptr, parts.data_ptr<double>(), parts.size(0) - 1,
                                       state.data_ptr<double>(), batch.data_ptr<double>(), p);
  });
  return {out, batch};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("moments", &moments_cuda);
  m.impl("moments_merge_", &moments_merge_cuda);
  m.impl("moments_normalize", &moments_normalize_cuda);
  m.impl("moments_update_normalize_", &moments_update_normalize_cuda);
}

}  // namespace moments
}  // namespace ppo_fast
