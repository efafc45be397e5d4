// CUDA kernels for running reward moments: Chan-merged (count, mean, M2) in fp64, then
// x -> clip((x - mean?) / (std + eps)), std taken as 1 below two samples or when std <= eps.
//
// Update + normalise + clip is two launches and no host synchronisation:
//   1. partials_kernel: per fixed chunk of kMomentChunk elements, fp64 Welford moments of the counted
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
  const int64_t lo = int64_t(blockIdx.x) * kMomentChunk, hi = min(N, lo + kMomentChunk);
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

// ---------------------------------------------------------------------------------------------
// Host side: launches on the current stream of the job's device.

// Normalises x into out with state_in, or (parts given) with the old state in parts[0] merged with
// the batch of parts[1..1+P), writing the new state and the batch.
template <typename scalar_t, typename mask_t>
void launch_normalize(const Job& job, const double* state_in, const double* parts, int64_t P, double* state_out,
                      double* batch_out) {
  const int64_t N = job.N;
  const mask_t* m = as<mask_t>(job.mask);
  const bool vec = aligned(job.x, sizeof(scalar_t) * kItems) && aligned(job.out, sizeof(scalar_t) * kItems) &&
                   aligned(m, sizeof(mask_t) * kItems);
  const int64_t work = (N + int64_t(kThreads) * kItems - 1) / (int64_t(kThreads) * kItems);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Each block first merges all the partials: keep the grid near the number of resident blocks.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(work, sms * 4));
  normalize_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      as<scalar_t>(job.x), m, as<scalar_t>(job.out), N, state_in, parts, P, state_out, batch_out, job.p, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The chunk partials of x, [1 + P, kSlots]; row 0 is a copy of old_state when given.
template <typename scalar_t, typename mask_t>
at::Tensor launch_partials(const Job& job, const double* old_state) {
  const int64_t P = num_chunks(job.N);
  at::Tensor parts = at::empty({1 + P, kSlots}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, job.device));
  partials_kernel<<<P, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      as<scalar_t>(job.x), as<mask_t>(job.mask), job.N, old_state, parts.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return parts;
}

void moments_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) {
    const at::Tensor parts = launch_partials<decltype(s), decltype(mk)>(job, nullptr);
    reduce_kernel<<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(parts.data_ptr<double>(), parts.size(0) - 1,
                                                                         job.batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void merge_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  merge_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(job.state, job.batches, job.n_batches);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void normalize_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) {
    launch_normalize<decltype(s), decltype(mk)>(job, job.state, nullptr, 0, nullptr, nullptr);
  });
}

void update_normalize_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) {
    const at::Tensor parts = launch_partials<decltype(s), decltype(mk)>(job, job.state);
    launch_normalize<decltype(s), decltype(mk)>(job, nullptr, parts.data_ptr<double>(), parts.size(0) - 1, job.state,
                                                job.batch);
  });
}

constexpr Kernels kCuda{&moments_pass, &merge_pass, &normalize_pass, &update_normalize_pass};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("moments", bound<&moments, kCuda>);
  m.impl("moments_merge_", bound<&moments_merge_, kCuda>);
  m.impl("moments_normalize", bound<&moments_normalize, kCuda>);
  m.impl("moments_update_normalize_", bound<&moments_update_normalize_, kCuda>);
}

}  // namespace moments
}  // namespace ppo_fast
