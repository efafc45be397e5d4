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
constexpr int64_t kMomentChunk = 8192;  // elements per partial in moments_kernel (fixed: deterministic)

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

template <typename scalar_t>
struct RowArgs {
  int64_t B, T;
  bool vec;  // every row pointer below is aligned for kItems-wide vector accesses
  // Reward inputs: rewards_in, or (scores, logprobs, ref_logprobs) with kl_coef / kl_mode.
  const scalar_t* rewards_in;
  const float* scores;
  const scalar_t* logprobs;
  const scalar_t* ref_logprobs;
  float kl_coef;
  int kl_mode;
  scalar_t* rewards_out;
  scalar_t* non_score_out;
  scalar_t* kl_out;
  // GAE (runs when values is set).
  const scalar_t* values;
  float gamma, lam;
  bool carry_masked;
  const float* reward_parts;  // moments of the masked rewards: whiten them before the scan
  int64_t n_reward_parts;
  scalar_t* adv_out;  // advantages in the input dtype
  float* adv_acc;     // or raw advantages in fp32, for the whitening pass
  scalar_t* returns_out;
  float* row_moments;  // [B, 3]: moments over unmasked positions of the advantages (or rewards)
};

// A warp per row: capped at 64 registers so 4 blocks (32 warps) fit per SM — B=4096 rows then run
// in one wave on 132 SMs instead of 1.3 (a mostly idle second wave), and more loads are in flight.
template <typename scalar_t, typename mask_t, int ROW_WARPS>
__global__ void __launch_bounds__(kThreads, ROW_WARPS == 1 ? 4 : 1) rows_kernel(const RowArgs<scalar_t> args, const mask_t* __restrict__ mask) {
  constexpr int kRowThreads = ROW_WARPS * 32;
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  constexpr int64_t kTile = int64_t(kRowThreads) * kItems;
  __shared__ Map smem_map[ROW_WARPS];
  __shared__ int64_t smem_i64[ROW_WARPS];
  __shared__ Moments<float> smem_mom[ROW_WARPS];

  float r_mean = 0.f, r_rstd = 1.f;
  if (args.reward_parts != nullptr) {
    block_reduce_parts(args.reward_parts, args.n_reward_parts, 1e-8f, r_mean, r_rstd);
  }

  const int rt = threadIdx.x % kRowThreads;
  const int64_t b = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  if (b >= args.B) return;  // whole row groups leave together (a block is one group when ROW_WARPS > 1)

  const int64_t T = args.T, o = b * T;
  const bool vec = args.vec;
  const bool compute_rewards = args.rewards_in == nullptr;
  const bool scan = args.values != nullptr;
  const bool whiten_r = args.reward_parts != nullptr;
  const float score = compute_rewards ? args.scores[b] : 0.f;
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
      load_items(args.logprobs + o, t0, T, vec, lp, 0.f);
      load_items(args.ref_logprobs + o, t0, T, vec, ref, 0.f);
      int64_t my_last = -1;
      float kl[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        kl[i] = kl_penalty<float>(lp[i], ref[i], args.kl_mode);
        r[i] = -args.kl_coef * kl[i];
        if (m[i]) my_last = t0 + i;
      }
      // Tiles go right to left, so the first tile with an unmasked token holds the row's last one.
      const int64_t tile_last = group_max<ROW_WARPS>(my_last, rt, smem_i64);
      if (row_last < 0) row_last = tile_last;
      if (args.kl_out) store_items(args.kl_out + o, t0, T, vec, kl);
      if (args.non_score_out) store_items(args.non_score_out + o, t0, T, vec, r);
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (t0 + i == row_last) r[i] += score;
      if (args.rewards_out) store_items(args.rewards_out + o, t0, T, vec, r);
    } else {
      load_items(args.rewards_in + o, t0, T, vec, r, 0.f);
    }

    float tracked[kItems];  // the quantity whose moments are kept
    if (scan) {
      float v[kItems];
      load_items(args.values + o, t0, T, vec, v, 0.f);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        v[i] = masked(v[i], m[i]);
        r[i] = whiten_r ? whiten_reward(r[i], m[i], r_mean, r_rstd) : masked(r[i], m[i]);
      }
      // Scan 1: the value seen from each token (next token's, or next unmasked token's).
      Map f{1.f, 0.f};
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) f = compose(next_value_map(v[i], m[i], args.carry_masked), f);
      Map total;
      Map later = group_exclusive_scan<ROW_WARPS>(f, rt, smem_map, total);
      float state = apply(later, carry_next);
      carry_next = apply(total, carry_next);
      float v_next[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        v_next[i] = state;
        state = apply(next_value_map(v[i], m[i], args.carry_masked), state);
      }
      // Scan 2: advantages.
      f = Map{1.f, 0.f};
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i)
        f = compose(advantage_map(r[i], v[i], v_next[i], m[i], args.carry_masked, args.gamma, args.lam), f);
      later = group_exclusive_scan<ROW_WARPS>(f, rt, smem_map, total);
      state = apply(later, carry_adv);
      carry_adv = apply(total, carry_adv);
      float ret[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        state = apply(advantage_map(r[i], v[i], v_next[i], m[i], args.carry_masked, args.gamma, args.lam), state);
        tracked[i] = state;
        ret[i] = state + v[i];
      }
      if (args.adv_out) store_items(args.adv_out + o, t0, T, vec, tracked);
      if (args.adv_acc) store_items(args.adv_acc + o, t0, T, vec, tracked);
      store_items(args.returns_out + o, t0, T, vec, ret);
    } else {
      // Moments of the rewards as stored (rounded to scalar_t): the scan that whitens them reads
      // them back from memory, and whitening amplifies any mismatch by 1/std.
#pragma unroll
      for (int i = 0; i < kItems; ++i) tracked[i] = masked(to_float(static_cast<scalar_t>(r[i])), m[i]);
    }

    if (args.row_moments) {
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

  if (args.row_moments) {
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
      args.row_moments[3 * b] = mom.n;
      args.row_moments[3 * b + 1] = mom.mean;
      args.row_moments[3 * b + 2] = mom.m2;
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
// Host side.

int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

template <typename scalar_t, typename mask_t>
void launch_rows(RowArgs<scalar_t> args, const mask_t* mask) {
  const bool vec_ok = args.T % kItems == 0;
  const size_t w = sizeof(scalar_t) * kItems;
  args.vec = vec_ok && aligned(mask, sizeof(mask_t) * kItems) && aligned(args.rewards_in, w) &&
             aligned(args.logprobs, w) && aligned(args.ref_logprobs, w) && aligned(args.rewards_out, w) &&
             aligned(args.non_score_out, w) && aligned(args.kl_out, w) && aligned(args.values, w) &&
             aligned(args.adv_out, w) && aligned(args.adv_acc, sizeof(float) * kItems) &&
             aligned(args.returns_out, w);
  auto stream = at::cuda::getCurrentCUDAStream();
  // Long rows and too few of them to fill the GPU one warp per row: a block per row.
  const bool block_rows = args.T > 4 * 32 * kItems && args.B < int64_t(num_sms()) * 16;
  if (block_rows) {
    rows_kernel<scalar_t, mask_t, kThreads / 32><<<args.B, kThreads, 0, stream>>>(args, mask);
  } else {
    constexpr int rows_per_block = kThreads / 32;
    const int64_t blocks = (args.B + rows_per_block - 1) / rows_per_block;
    rows_kernel<scalar_t, mask_t, 1><<<blocks, kThreads, 0, stream>>>(args, mask);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mask_t>
void launch_moments(const scalar_t* x, const mask_t* mask, int64_t N, float* parts) {
  const int64_t blocks = (N + kMomentChunk - 1) / kMomentChunk;
  moments_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(x, mask, N, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t, typename out_t>
void launch_whiten(const in_t* x, out_t* out, int64_t N, const float* parts, int64_t n_parts, bool shift_mean,
                   double eps) {
  const bool vec = aligned(x, sizeof(in_t) * kItems) && aligned(out, sizeof(out_t) * kItems);
  const int64_t work = (N + int64_t(kThreads) * kItems - 1) / (int64_t(kThreads) * kItems);
  // Each block first merges all the parts: keep the grid near the number of resident blocks.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(work, int64_t(num_sms()) * 4));
  whiten_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(x, out, N, parts, n_parts, shift_mean,
                                                                            static_cast<float>(eps), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor parts_buffer(int64_t n, const at::Tensor& like) {
  return at::empty({n, 3}, like.options().dtype(at::kFloat));
}

// Raw advantages in fp32 (the output itself when the input is fp32), per-row moments, then one
// whitening pass into the output.
template <typename scalar_t, typename mask_t>
void advantages_and_whiten(RowArgs<scalar_t>& args, const mask_t* mask, at::Tensor& adv) {
  at::Tensor raw = std::is_same_v<scalar_t, float> ? adv : at::empty(adv.sizes(), adv.options().dtype(at::kFloat));
  at::Tensor rows = parts_buffer(args.B, adv);
  args.adv_out = nullptr;
  args.adv_acc = raw.data_ptr<float>();
  args.row_moments = rows.data_ptr<float>();
  launch_rows<scalar_t, mask_t>(args, mask);
  launch_whiten(raw.data_ptr<float>(), adv.data_ptr<scalar_t>(), adv.numel(), rows.data_ptr<float>(), args.B,
                /*shift_mean=*/true, 1e-8);
}

template <typename scalar_t>
RowArgs<scalar_t> make_args(const at::Tensor& like) {
  RowArgs<scalar_t> a{};
  a.B = like.size(0);
  a.T = like.size(1);
  a.gamma = 1.f;
  a.lam = 1.f;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compute_rewards_cuda(const at::Tensor& scores,
                                                                    const at::Tensor& logprobs,
                                                                    const at::Tensor& ref_logprobs,
                                                                    const at::Tensor& mask_in, double kl_coef,
                                                                    c10::string_view kl_penalty_name) {
  const char* op = "compute_rewards";
  const int mode = parse_kl_penalty(op, std::string(kl_penalty_name));
  check::finite(op, "kl_coef", kl_coef);
  const at::Tensor mask = check_bt(op, logprobs, "logprobs", {{"ref_logprobs", &ref_logprobs}}, mask_in);
  check_scores(op, scores, logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous();
  const at::Tensor sc = scores.to(at::kFloat).contiguous();
  at::Tensor rewards = at::empty_like(lp), nsr = at::empty_like(lp), kl = at::empty_like(lp);
  dispatch(op, lp, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    auto a = make_args<scalar_t>(lp);
    a.scores = sc.data_ptr<float>();
    a.logprobs = lp.data_ptr<scalar_t>();
    a.ref_logprobs = ref.data_ptr<scalar_t>();
    a.kl_coef = static_cast<float>(kl_coef);
    a.kl_mode = mode;
    a.rewards_out = rewards.data_ptr<scalar_t>();
    a.non_score_out = nsr.data_ptr<scalar_t>();
    a.kl_out = kl.data_ptr<scalar_t>();
    launch_rows<scalar_t, mask_t>(a, mask.data_ptr<mask_t>());
  });
  return {rewards, nsr, kl};
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& values, const at::Tensor& rewards,
                                            const at::Tensor& mask_in, double gamma, double lam, bool carry_masked) {
  const char* op = "gae";
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask = check_bt(op, values, "values", {{"rewards", &rewards}}, mask_in);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), r = rewards.contiguous();
  at::Tensor adv = at::empty_like(v), ret = at::empty_like(v);
  dispatch(op, v, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    auto a = make_args<scalar_t>(v);
    a.rewards_in = r.data_ptr<scalar_t>();
    a.values = v.data_ptr<scalar_t>();
    a.gamma = static_cast<float>(gamma);
    a.lam = static_cast<float>(lam);
    a.carry_masked = carry_masked;
    a.adv_out = adv.data_ptr<scalar_t>();
    a.returns_out = ret.data_ptr<scalar_t>();
    launch_rows<scalar_t, mask_t>(a, mask.data_ptr<mask_t>());
  });
  return {adv, ret};
}

at::Tensor masked_whiten_cuda(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean, double eps) {
  const char* op = "masked_whiten";
  check::floating(op, "x", x_in);
  check::nonempty(op, "x", x_in);
  check::finite(op, "eps", eps);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor mask = check::mask(op, mask_in, "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  dispatch(op, x, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    const int64_t n_parts = (x.numel() + kMomentChunk - 1) / kMomentChunk;
    at::Tensor parts = parts_buffer(n_parts, x);
    launch_moments(x.data_ptr<scalar_t>(), mask.data_ptr<mask_t>(), x.numel(), parts.data_ptr<float>());
    launch_whiten(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), parts.data_ptr<float>(), n_parts,
                  shift_mean, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> compute_advantages_cuda(const at::Tensor& values, const at::Tensor& rewards,
                                                           const at::Tensor& mask_in, double gamma, double lam,
                                                           bool whiten_rewards, bool carry_masked) {
  const char* op = "compute_advantages";
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask = check_bt(op, values, "values", {{"rewards", &rewards}}, mask_in);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), r = rewards.contiguous();
  at::Tensor adv = at::empty_like(v), ret = at::empty_like(v);
  dispatch(op, v, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    auto a = make_args<scalar_t>(v);
    a.rewards_in = r.data_ptr<scalar_t>();
    a.values = v.data_ptr<scalar_t>();
    a.gamma = static_cast<float>(gamma);
    a.lam = static_cast<float>(lam);
    a.carry_masked = carry_masked;
    a.returns_out = ret.data_ptr<scalar_t>();
    at::Tensor parts;
    if (whiten_rewards) {
      const int64_t n_parts = (r.numel() + kMomentChunk - 1) / kMomentChunk;
      parts = parts_buffer(n_parts, v);
      launch_moments(a.rewards_in, mask.data_ptr<mask_t>(), r.numel(), parts.data_ptr<float>());
      a.reward_parts = parts.data_ptr<float>();
      a.n_reward_parts = n_parts;
    }
    advantages_and_whiten(a, mask.data_ptr<mask_t>(), adv);
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rollout_advantages_cuda(
    const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& values,
    const at::Tensor& mask_in, double kl_coef, c10::string_view kl_penalty_name, double gamma, double lam,
    bool whiten_rewards, bool carry_masked) {
  const char* op = "rollout_advantages";
  const int mode = parse_kl_penalty(op, std::string(kl_penalty_name));
  check::finite(op, "kl_coef", kl_coef);
  check_gae_scalars(op, gamma, lam);
  const at::Tensor mask =
      check_bt(op, logprobs, "logprobs", {{"ref_logprobs", &ref_logprobs}, {"values", &values}}, mask_in);
  check_scores(op, scores, logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous(), v = values.contiguous();
  const at::Tensor sc = scores.to(at::kFloat).contiguous();
  at::Tensor rewards = at::empty_like(lp), nsr = at::empty_like(lp), kl = at::empty_like(lp);
  at::Tensor adv = at::empty_like(lp), ret = at::empty_like(lp);
  dispatch(op, lp, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    const mask_t* m = mask.data_ptr<mask_t>();
    auto a = make_args<scalar_t>(lp);
    a.scores = sc.data_ptr<float>();
    a.logprobs = lp.data_ptr<scalar_t>();
    a.ref_logprobs = ref.data_ptr<scalar_t>();
    a.kl_coef = static_cast<float>(kl_coef);
    a.kl_mode = mode;
    a.rewards_out = rewards.data_ptr<scalar_t>();
    a.non_score_out = nsr.data_ptr<scalar_t>();
    a.kl_out = kl.data_ptr<scalar_t>();
    at::Tensor reward_rows;
    if (whiten_rewards) {
      // Launch 1 computes the rewards and their per-row moments; the scan reads them back.
      reward_rows = parts_buffer(a.B, lp);
      a.row_moments = reward_rows.data_ptr<float>();
      launch_rows<scalar_t, mask_t>(a, m);
      auto scan = make_args<scalar_t>(lp);
      scan.rewards_in = rewards.data_ptr<scalar_t>();
      scan.reward_parts = reward_rows.data_ptr<float>();
      scan.n_reward_parts = a.B;
      a = scan;
    }
    a.values = v.data_ptr<scalar_t>();
    a.gamma = static_cast<float>(gamma);
    a.lam = static_cast<float>(lam);
    a.carry_masked = carry_masked;
    a.returns_out = ret.data_ptr<scalar_t>();
    advantages_and_whiten(a, m, adv);
  });
  return {rewards, nsr, kl, adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("compute_rewards", &compute_rewards_cuda);
  m.impl("gae", &gae_cuda);
  m.impl("masked_whiten", &masked_whiten_cuda);
  m.impl("compute_advantages", &compute_advantages_cuda);
  m.impl("rollout_advantages", &rollout_advantages_cuda);
}

}  // namespace gae
}  // namespace ppo_fast
