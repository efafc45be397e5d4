// CUDA kernels for rollout post-processing: A_t = r_t + gamma V_{t+1} - V_t + gamma lam A_{t+1}.
//
// Each row is scanned right to left in tiles by a row group (one warp, or a whole 256-thread
// block for long rows when there are few of them). Within a tile every thread owns kItems
// contiguous tokens, composes their affine maps (gae.h), and the group does an exclusive reverse
// scan of those maps with warp shuffles; the state entering the tile from the right is carried
// between tiles. Rewards (KL penalty + score at the last unmasked token) are computed in the same
// pass. Whitening needs global moments: the scan writes per-row (n, mean, M2) and a second
// launch merges them in a fixed order (deterministic) and whitens. Whole post-processing:
// two launches, three with reward whitening; no host synchronisation.
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/gae.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ppo_fast {
namespace gae {
namespace {

using namespace ppo_fast::cuda;

constexpr int kThreads = 256;

using Map = Affine<float>;

__device__ __forceinline__ Map shfl_down(Map f, int off) {
  return {__shfl_down_sync(kFull, f.a, off), __shfl_down_sync(kFull, f.b, off)};
}

// Exclusive right-to-left scan of the threads' maps within a row group: returns the composition
// of the maps of every later thread in the tile, and the whole tile's map in `total`. `smem`
// holds ROW_WARPS maps; with ROW_WARPS > 1 the whole block is one row group.
template <int ROW_WARPS>
__device__ __forceinline__ Map group_exclusive_scan(Map f, int rt, Map* smem, Map& total) {
  const int lane = rt & 31;
  Map inc = f;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const Map later = shfl_down(inc, off);
    if (lane + off < 32) inc = compose(inc, later);
  }
  const Map next = shfl_down(inc, 1);
  const Map exc = lane == 31 ? Map{1.f, 0.f} : next;
  if constexpr (ROW_WARPS == 1) {
    total = {__shfl_sync(kFull, inc.a, 0), __shfl_sync(kFull, inc.b, 0)};
    return exc;
  } else {
    const int w = rt >> 5;
    if (lane == 0) smem[w] = inc;
    __syncthreads();
    Map right{1.f, 0.f};
    Map all{1.f, 0.f};
#pragma unroll
    for (int j = ROW_WARPS - 1; j >= 0; --j) {
      if (j > w) right = compose(smem[j], right);
      all = compose(smem[j], all);
    }
    __syncthreads();  // smem is reused by the next scan
    total = all;
    return compose(exc, right);
  }
}

template <int ROW_WARPS>
__device__ __forceinline__ int64_t group_max(int64_t x, int rt, int64_t* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const int64_t y = __shfl_xor_sync(kFull, x, off);
    x = y > x ? y : x;
  }
  if constexpr (ROW_WARPS > 1) {
    if ((rt & 31) == 0) smem[rt >> 5] = x;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ROW_WARPS; ++j) x = smem[j] > x ? smem[j] : x;
    __syncthreads();
  }
  return x;
}

__device__ __forceinline__ Moments<float> shfl_down(Moments<float> m, int off) {
  return {__shfl_down_sync(kFull, m.n, off), __shfl_down_sync(kFull, m.mean, off),
          __shfl_down_sync(kFull, m.m2, off)};
}

// Fixed-order tree merge of a warp's moments; lane 0 holds the result.
__device__ __forceinline__ Moments<float> warp_merge(Moments<float> m) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = moments_merge(m, shfl_down(m, off));
  return m;
}

// Merges parts[0..n) (each n, mean, M2 in fp32) in fp64 in a fixed order over the whole block and
// returns mean and 1 / sqrt(var + eps) to every thread. Every block that calls it gets the same bits.
__device__ void block_reduce_parts(const float* parts, int64_t n, float eps, float& mean, float& rstd) {
  __shared__ Moments<double> sm[kThreads];
  Moments<double> acc{0, 0, 0};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    acc = moments_merge(acc, Moments<double>{parts[3 * i], parts[3 * i + 1], parts[3 * i + 2]});
  }
  sm[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sm[threadIdx.x] = moments_merge(sm[threadIdx.x], sm[threadIdx.x + s]);
    __syncthreads();
  }
  double mu, var;
  moments_finalize(sm[0], mu, var);
  mean = static_cast<float>(mu);
  rstd = static_cast<float>(1.0 / sqrt(var + static_cast<double>(eps)));
}

// A warp per row: capped at 64 registers so 4 blocks (32 warps) fit per SM — B=4096 rows then run
// in one wave on 132 SMs instead of 1.3 (a mostly idle second wave), and more loads are in flight.
// vec: every row pointer of the job is aligned for kItems-wide vector accesses.
template <typename scalar_t, typename mask_t, int ROW_WARPS>
__global__ void __launch_bounds__(kThreads, ROW_WARPS == 1 ? 4 : 1)
    rows_kernel(const Job job, const mask_t* __restrict__ mask, bool vec) {
  constexpr int kRowThreads = ROW_WARPS * 32;
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  constexpr int64_t kTile = int64_t(kRowThreads) * kItems;
  __shared__ Map smem_map[ROW_WARPS];
  __shared__ int64_t smem_i64[ROW_WARPS];
  __shared__ Moments<float> smem_mom[ROW_WARPS];

  float r_mean = 0.f, r_rstd = 1.f;
  if (job.reward_parts != nullptr) {
    block_reduce_parts(as<float>(job.reward_parts), job.n_reward_parts, static_cast<float>(kWhitenEps), r_mean,
                       r_rstd);
  }

  const int rt = threadIdx.x % kRowThreads;
  const int64_t b = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  if (b >= job.B) return;  // whole row groups leave together (a block is one group when ROW_WARPS > 1)

  const int64_t T = job.T, o = b * T;
  const scalar_t* rewards_in = as<scalar_t>(job.rewards_in);
  const scalar_t* values = as<scalar_t>(job.values);
  const float kl_coef = static_cast<float>(job.kl_coef), gamma = static_cast<float>(job.gamma),
              lam = static_cast<float>(job.lam);
  const bool carry_masked = job.carry_masked;
  float* row_moments = as<float>(job.row_moments);
  const bool compute_rewards = rewards_in == nullptr;
  const bool scan = values != nullptr;
  const bool whiten_r = job.reward_parts != nullptr;
  const float score = compute_rewards ? as<float>(job.scores)[b] : 0.f;
  const mask_t* m_row = mask + o;

  int64_t row_last = -1;
  float carry_next = 0.f, carry_adv = 0.f;
  Moments<float> mom{0.f, 0.f, 0.f};

  for (int64_t k = (T + kTile - 1) / kTile - 1; k >= 0; --k) {
    const int64_t t0 = k * kTile + int64_t(rt) * kItems;
    bool m[kItems];
    float r[kItems];
    load_mask(m_row, t0, T, vec, m);

    if (compute_rewards) {
      float lp[kItems], ref[kItems];
      load_items(as<scalar_t>(job.logprobs) + o, t0, T, vec, lp, 0.f);
      load_items(as<scalar_t>(job.ref_logprobs) + o, t0, T, vec, ref, 0.f);
      int64_t my_last = -1;
      float kl[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        kl[i] = kl_penalty<float>(lp[i], ref[i], job.kl_mode);
        r[i] = -kl_coef * kl[i];
        if (m[i]) my_last = t0 + i;
      }
      // Tiles go right to left, so the first tile with an unmasked token holds the row's last one.
      const int64_t tile_last = group_max<ROW_WARPS>(my_last, rt, smem_i64);
      if (row_last < 0) row_last = tile_last;
      if (job.kl_out) store_items(as<scalar_t>(job.kl_out) + o, t0, T, vec, kl);
      if (job.non_score_out) store_items(as<scalar_t>(job.non_score_out) + o, t0, T, vec, r);
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (t0 + i == row_last) r[i] += score;
      if (job.rewards_out) store_items(as<scalar_t>(job.rewards_out) + o, t0, T, vec, r);
    } else {
      load_items(rewards_in + o, t0, T, vec, r, 0.f);
    }

    float tracked[kItems];  // the quantity whose moments are kept
    if (scan) {
      float v[kItems];
      load_items(values + o, t0, T, vec, v, 0.f);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        v[i] = masked(v[i], m[i]);
        r[i] = whiten_r ? whiten_reward(r[i], m[i], r_mean, r_rstd) : masked(r[i], m[i]);
      }
      // Scan 1: the value seen from each token (next token's, or next unmasked token's).
      Map f{1.f, 0.f};
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) f = compose(next_value_map(v[i], m[i], carry_masked), f);
      Map total;
      Map later = group_exclusive_scan<ROW_WARPS>(f, rt, smem_map, total);
      float state = apply(later, carry_next);
      carry_next = apply(total, carry_next);
      float v_next[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        v_next[i] = state;
        state = apply(next_value_map(v[i], m[i], carry_masked), state);
      }
      // Scan 2: advantages.
      f = Map{1.f, 0.f};
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i)
        f = compose(advantage_map(r[i], v[i], v_next[i], m[i], carry_masked, gamma, lam), f);
      later = group_exclusive_scan<ROW_WARPS>(f, rt, smem_map, total);
      state = apply(later, carry_adv);
      carry_adv = apply(total, carry_adv);
      float ret[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        state = apply(advantage_map(r[i], v[i], v_next[i], m[i], carry_masked, gamma, lam), state);
        tracked[i] = state;
        ret[i] = state + v[i];
      }
      if (job.adv_out) store_items(as<scalar_t>(job.adv_out) + o, t0, T, vec, tracked);
      if (job.adv_acc) store_items(as<float>(job.adv_acc) + o, t0, T, vec, tracked);
      store_items(as<scalar_t>(job.returns_out) + o, t0, T, vec, ret);
    } else {
      // Moments of the rewards as stored (rounded to scalar_t): the scan that whitens them reads
      // them back from memory, and whitening amplifies any mismatch by 1/std.
#pragma unroll
      for (int i = 0; i < kItems; ++i) tracked[i] = masked(to_float(static_cast<scalar_t>(r[i])), m[i]);
    }

    if (row_moments) {
      // This thread's tokens of the tile: exact local mean, then merged (Chan) into the running moments.
      float n = 0.f, sum = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        n += m[i] ? 1.f : 0.f;
        sum += m[i] ? tracked[i] : 0.f;
      }
      if (n > 0.f) {
        const float mu = sum / n;
        float m2 = 0.f;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const float d = tracked[i] - mu;
          m2 += m[i] ? d * d : 0.f;
        }
        mom = moments_merge(mom, Moments<float>{n, mu, m2});
      }
    }
  }

  if (row_moments) {
    mom = warp_merge(mom);
    if constexpr (ROW_WARPS > 1) {
      if ((rt & 31) == 0) smem_mom[rt >> 5] = mom;
      __syncthreads();
      if (rt == 0) {
        mom = smem_mom[0];
#pragma unroll
        for (int j = 1; j < ROW_WARPS; ++j) mom = moments_merge(mom, smem_mom[j]);
      }
    }
    if (rt == 0) {
      row_moments[3 * b] = mom.n;
      row_moments[3 * b + 1] = mom.mean;
      row_moments[3 * b + 2] = mom.m2;
    }
  }
}

// Moments of x over mask != 0, one partial per fixed chunk of kMomentChunk elements.
template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads) moments_kernel(const scalar_t* __restrict__ x,
                                                           const mask_t* __restrict__ mask, int64_t N,
                                                           float* __restrict__ parts) {
  __shared__ Moments<float> sm[kThreads / 32];
  const int64_t lo = int64_t(blockIdx.x) * kMomentChunk, hi = min(N, lo + kMomentChunk);
  Moments<float> mom{0.f, 0.f, 0.f};
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    if (is_set(mask[i])) {  // Welford, one sample at a time
      const float xi = to_float(x[i]);
      mom.n += 1.f;
      const float d = xi - mom.mean;
      mom.mean += d / mom.n;
      mom.m2 += d * (xi - mom.mean);
    }
  }
  mom = warp_merge(mom);
  if ((threadIdx.x & 31) == 0) sm[threadIdx.x >> 5] = mom;
  __syncthreads();
  if (threadIdx.x == 0) {
    mom = sm[0];
#pragma unroll
    for (int j = 1; j < kThreads / 32; ++j) mom = moments_merge(mom, sm[j]);
    parts[3 * blockIdx.x] = mom.n;
    parts[3 * blockIdx.x + 1] = mom.mean;
    parts[3 * blockIdx.x + 2] = mom.m2;
  }
}

// out = whiten(x) with the moments merged from parts; out may alias x.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) whiten_kernel(const in_t* x, out_t* out, int64_t N,
                                                          const float* __restrict__ parts, int64_t n_parts,
                                                          bool shift_mean, float eps, bool vec) {
  float mean, rstd;
  block_reduce_parts(parts, n_parts, eps, mean, rstd);
  const int64_t stride = int64_t(gridDim.x) * kThreads * kItems;
  for (int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kItems; i0 < N; i0 += stride) {
    float v[kItems];
    load_items(x, i0, N, vec, v, 0.f);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = whiten(v[i], mean, rstd, shift_mean);
    store_items(out, i0, N, vec, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the passes of a job (gae.h), launched on the current stream of its device.

int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

template <typename scalar_t, typename mask_t>
void launch_rows(const Job& job) {
  const mask_t* mask = as<mask_t>(job.mask);
  const size_t w = sizeof(scalar_t) * kItems;
  const bool vec = job.T % kItems == 0 && aligned(mask, sizeof(mask_t) * kItems) && aligned(job.rewards_in, w) &&
                   aligned(job.logprobs, w) && aligned(job.ref_logprobs, w) && aligned(job.rewards_out, w) &&
                   aligned(job.non_score_out, w) && aligned(job.kl_out, w) && aligned(job.values, w) &&
                   aligned(job.adv_out, w) && aligned(job.adv_acc, sizeof(float) * kItems) &&
                   aligned(job.returns_out, w);
  auto stream = at::cuda::getCurrentCUDAStream();
  // Long rows and too few of them to fill the GPU one warp per row: a block per row.
  const bool block_rows = job.T > 4 * 32 * kItems && job.B < int64_t(num_sms()) * 16;
  if (block_rows) {
    rows_kernel<scalar_t, mask_t, kThreads / 32><<<job.B, kThreads, 0, stream>>>(job, mask, vec);
  } else {
    constexpr int rows_per_block = kThreads / 32;
    const int64_t blocks = (job.B + rows_per_block - 1) / rows_per_block;
    rows_kernel<scalar_t, mask_t, 1><<<blocks, kThreads, 0, stream>>>(job, mask, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rows_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) { launch_rows<decltype(s), decltype(mk)>(job); });
}

void moments_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, job.mask_bool, [&](auto s, auto mk) {
    moments_kernel<<<num_chunks(job.N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        as<decltype(s)>(job.moments_in), as<decltype(mk)>(job.mask), job.N, as<float>(job.moments_out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename in_t, typename out_t>
void launch_whiten(const Job& job) {
  const in_t* x = as<in_t>(job.whiten_in);
  out_t* out = as<out_t>(job.whiten_out);
  const int64_t N = job.N;
  const bool vec = aligned(x, sizeof(in_t) * kItems) && aligned(out, sizeof(out_t) * kItems);
  const int64_t work = (N + int64_t(kThreads) * kItems - 1) / (int64_t(kThreads) * kItems);
  // Each block first merges all the parts: keep the grid near the number of resident blocks.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(work, int64_t(num_sms()) * 4));
  whiten_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x, out, N, as<float>(job.whiten_parts), job.n_whiten_parts, job.shift_mean, static_cast<float>(job.eps), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void whiten_pass(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    if (job.whiten_in_acc) {
      launch_whiten<float, scalar_t>(job);
    } else {
      launch_whiten<scalar_t, scalar_t>(job);
    }
  });
}

constexpr Kernels kCuda{at::kFloat, &rows_pass, &moments_pass, &whiten_pass};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("compute_rewards", bound<&compute_rewards, kCuda>);
  m.impl("gae", bound<&gae, kCuda>);
  m.impl("masked_whiten", bound<&masked_whiten, kCuda>);
  m.impl("compute_advantages", bound<&compute_advantages, kCuda>);
  m.impl("rollout_advantages", bound<&rollout_advantages, kCuda>);
}

}  // namespace gae
}  // namespace ppo_fast
