// CUDA kernels for the clipped PPO loss: loss = agg(max(-A r, -A clip(r))) + vf_coef agg(vf) + kl_coef agg(kl).
//
// Forward, two launches, no host synchronisation, deterministic:
//   1. partials_kernel: one warp per (row, chunk of kChunk tokens) accumulates the per-token terms
//      of ppo_loss.h into fp32 partial sums and moments, merges its lanes in a fixed tree, and
//      writes one partial (structure of arrays, [kNumParts, B * C]).
//   2. finalize_kernel: one block merges each row's chunks, then the rows, in a fixed order in
//      fp64; writes the loss, the statistics (ratio_threshold decided here, on the device) and the
//      per-row gradient weight row_scale.
// Backward, one launch: backward_kernel is elementwise, d/d(logp, v) of the token terms times
// grad_loss * row_scale[b].
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/ppo_loss.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ppo_fast {
namespace ppo_loss {
namespace {

using namespace ppo_fast::cuda;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 4 * 32 * kItems;  // tokens per warp work item (4 passes of 256)
constexpr int kFinalizeThreads = 256;  // one block; 1024 threads would cap registers at 64 and spill

// Chunks of kChunk tokens per row: a warp's work item.
inline int64_t chunks_of(int64_t T) {
  return (T + kChunk - 1) / kChunk;
}

// One lane's kItems tokens of every [B, T] input (ref 0 without one), and the mask.
struct TokenItems {
  float lp[kItems], v[kItems], old[kItems], v_old[kItems], adv[kItems], ret[kItems], ref[kItems];
  bool m[kItems];
};

// f(o, t0, items) for each of this lane's groups of kItems tokens [t0, t0 + kItems) in warp work
// item w (row b = w / C at offset o = b T, chunk w % C). vec: every [B, T] pointer of the job is
// aligned for kItems-wide vector accesses.
template <typename scalar_t, typename mask_t, typename F>
__device__ __forceinline__ void for_items(const Job& a, int64_t C, bool vec, int64_t w, const F& f) {
  const int lane = threadIdx.x & 31;
  const int64_t b = w / C, c = w % C, o = b * a.T;
  for (int pass = 0; pass < kChunk / (32 * kItems); ++pass) {
    const int64_t t0 = c * kChunk + (int64_t(pass) * 32 + lane) * kItems;
    if (t0 >= a.T) break;
    TokenItems x;
    load_mask(as<mask_t>(a.mask) + o, t0, a.T, vec, x.m);
    load_items(as<scalar_t>(a.logp) + o, t0, a.T, vec, x.lp, 0.f);
    load_items(as<scalar_t>(a.v) + o, t0, a.T, vec, x.v, 0.f);
    load_items(as<scalar_t>(a.old) + o, t0, a.T, vec, x.old, 0.f);
    load_items(as<scalar_t>(a.v_old) + o, t0, a.T, vec, x.v_old, 0.f);
    load_items(as<scalar_t>(a.adv) + o, t0, a.T, vec, x.adv, 0.f);
    load_items(as<scalar_t>(a.ret) + o, t0, a.T, vec, x.ret, 0.f);
    if (a.ref) {
      load_items(as<scalar_t>(a.ref) + o, t0, a.T, vec, x.ref, 0.f);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) x.ref[i] = 0.f;
    }
    f(o, t0, x);
  }
}

// Fixed-order tree over a warp's lanes, merge(into, from) combining two arrays: lane 0 ends with
// the merge of all 32.
template <int N, typename T, typename Merge>
__device__ __forceinline__ void warp_tree(T (&acc)[N], const Merge& merge) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    T other[N];
#pragma unroll
    for (int k = 0; k < N; ++k) other[k] = __shfl_down_sync(kFull, acc[k], off);
    if (lane + off < 32) merge(acc, other);
  }
}

struct MergeParts {
  __device__ void operator()(float* into, const float* from) const {
    merge_parts(into, from);
  }
};

template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    partials_kernel(const Job a, int64_t C, bool vec, float* __restrict__ parts) {
  const int lane = threadIdx.x & 31;
  const int64_t w = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t P = a.B * C;
  if (w >= P) return;  // whole warps leave together
  float part[kNumParts];
#pragma unroll
  for (int k = 0; k < kNumParts; ++k) part[k] = 0.f;
  for_items<scalar_t, mask_t>(a, C, vec, w, [&](int64_t, int64_t, const TokenItems& x) {
    accumulate<kItems, float, float>(x.lp, x.v, x.old, x.v_old, x.adv, x.ret, x.ref, x.m, a.p, part);
  });
  warp_tree(part, MergeParts{});  // lane 0 ends with the warp's partial
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kNumParts; ++k) parts[int64_t(k) * P + w] = part[k];
  }
}

// Sum of the entries the block's threads hold (fp64), in a fixed order; `partial` arrays of n
// doubles, with merge(into, from) combining two. The result lands in thread 0's `acc`.
template <int N, typename Merge>
__device__ void block_merge(double (&acc)[N], double* smem, Merge merge) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_tree(acc, merge);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[warp * N + k] = acc[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 1; j < kFinalizeThreads / 32; ++j) merge(acc, &smem[j * N]);
  }
}

// Per thread: [0, kNumParts) merged totals, then agg (3), then the number of non-empty rows.
constexpr int kAcc = kNumParts + 4;

struct MergeAcc {
  __device__ void operator()(double* into, const double* from) const {
    merge_parts(into, from);
    for (int k = kNumParts; k < kAcc; ++k) into[k] += from[k];
  }
};

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const float* __restrict__ parts, int64_t B, int64_t C, int aggregation, double vf_coef,
                    double kl_coef, double ratio_threshold, float* __restrict__ loss, float* __restrict__ stats,
                    float* __restrict__ row_scale_out) {
  __shared__ double smem[kFinalizeThreads / 32 * kAcc];
  __shared__ float st[kNumStats];
  const int64_t P = B * C;
  double acc[kAcc];
#pragma unroll
  for (int k = 0; k < kAcc; ++k) acc[k] = 0.0;
  for (int64_t b = threadIdx.x; b < B; b += kFinalizeThreads) {
    double row[kNumParts];
#pragma unroll
    for (int k = 0; k < kNumParts; ++k) row[k] = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      float chunk[kNumParts];
#pragma unroll
      for (int k = 0; k < kNumParts; ++k) chunk[k] = parts[int64_t(k) * P + b * C + c];
      merge_parts(row, chunk);
    }
    merge_parts(acc, row);
    row_contribution(row, aggregation, &acc[kNumParts]);
    acc[kNumParts + 3] += row[kN] > 0 ? 1.0 : 0.0;
  }
  block_merge<kAcc>(acc, smem, MergeAcc{});
  if (threadIdx.x == 0) {
    finalize(acc, &acc[kNumParts], acc[kNumParts + 3], aggregation, vf_coef, kl_coef, ratio_threshold, st);
    for (int k = 0; k < kNumStats; ++k) stats[k] = st[k];
    *loss = st[sLossTotal];
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < B; b += kFinalizeThreads) {
    double n = 0.0;
    for (int64_t c = 0; c < C; ++c) n += parts[int64_t(kN) * P + b * C + c];
    row_scale_out[b] = row_scale(n, st, aggregation);
  }
}

template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Job a, int64_t C, bool vec, const float* __restrict__ grad_loss,
                    const float* __restrict__ row_scale, float vf_coef, scalar_t* __restrict__ d_logp,
                    scalar_t* __restrict__ d_v) {
  const int64_t w = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (w >= a.B * C) return;
  const float scale = *grad_loss * row_scale[w / C];
  for_items<scalar_t, mask_t>(a, C, vec, w, [&](int64_t o, int64_t t0, const TokenItems& x) {
    float gl[kItems], gv[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float dl = 0.f, dv = 0.f;
      if (x.m[i] && scale != 0.f) {
        token_backward<float>(x.lp[i], x.v[i], x.old[i], x.v_old[i], x.adv[i], x.ret[i], x.ref[i], a.p, vf_coef, dl,
                              dv);
      }
      gl[i] = dl * scale;
      gv[i] = dv * scale;
    }
    store_items(d_logp + o, t0, a.T, vec, gl);
    store_items(d_v + o, t0, a.T, vec, gv);
  });
}

// ---------------------------------------------------------------------------------------------
// Host side: launches on the current stream of the job's device.

template <typename scalar_t, typename mask_t>
bool vec_of(const Job& a) {
  const size_t bytes = sizeof(scalar_t) * kItems;
  return a.T % kItems == 0 && aligned(a.mask, sizeof(mask_t) * kItems) && aligned(a.logp, bytes) &&
         aligned(a.v, bytes) && aligned(a.old, bytes) && aligned(a.v_old, bytes) && aligned(a.adv, bytes) &&
         aligned(a.ret, bytes) && aligned(a.ref, bytes);
}

int64_t work_blocks(int64_t B, int64_t C) {
  return (B * C + kWarps - 1) / kWarps;
}

void forward(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  const int64_t B = job.B, C = chunks_of(job.T);
  const at::Tensor parts =
      at::empty({kNumParts, B * C}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, job.device));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    partials_kernel<scalar_t, mask_t><<<work_blocks(B, C), kThreads, 0, stream>>>(job, C, vec_of<scalar_t, mask_t>(job),
                                                                                  parts.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(parts.data_ptr<float>(), B, C, job.aggregation, job.vf_coef,
                                                      job.p.kl_coef, job.ratio_threshold, as<float>(job.loss),
                                                      as<float>(job.stats), as<float>(job.row_scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  const int64_t C = chunks_of(job.T);
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    backward_kernel<scalar_t, mask_t><<<work_blocks(job.B, C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        job, C, vec_of<scalar_t, mask_t>(job), as<float>(job.grad_loss), as<float>(job.row_scale_in),
        static_cast<float>(job.vf_coef), as<scalar_t>(job.d_logp), as<scalar_t>(job.d_v));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr Kernels kCuda{&forward, &backward};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("ppo_loss", bound<&ppo_loss, kCuda>);
  m.impl("ppo_loss_backward", bound<&ppo_loss_backward, kCuda>);
}

}  // namespace ppo_loss
}  // namespace ppo_fast
