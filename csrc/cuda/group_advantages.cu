// CUDA kernel for value-free group advantages: per group of n consecutive scores, fp64 sum, mean and
// (grpo) M2, then group_advantages.h's advantage(estimator, s, group) for each member.
//
// One launch, no host synchronisation, deterministic: each group is owned by a tile of `lanes`
// lanes of one warp (lanes = 32 for groups of 32 or more, else the next power of two >= n, so small
// groups share a warp). A tile sums its lanes with an xor butterfly, which leaves the same bits in
// every lane (each step adds the same two numbers in either order), then the M2 pass, then writes.
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/group_advantages.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace ppo_fast {
namespace group_advantages {
namespace {

using namespace ppo_fast::cuda;

constexpr int kThreads = 256;

// Sum over the tile of `lanes` (a power of two <= 32) aligned lanes; every lane gets it. All 32
// lanes of the warp must call it (the shuffles take the full mask).
__device__ __forceinline__ double tile_sum(double v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    group_kernel(const scalar_t* __restrict__ scores, float* __restrict__ out, int64_t groups, int64_t n, int lanes,
                 int estimator, double eps) {
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t g = tid / lanes;
  const int lane = int(tid % lanes);
  const bool active = g < groups;  // tiles past the last group still take part in the shuffles
  const scalar_t* s = scores + (active ? g * n : 0);
  double sum = 0;
  if (active) {
    for (int64_t i = lane; i < n; i += lanes) sum += static_cast<double>(to_float(s[i]));
  }
  sum = tile_sum(sum, lanes);
  Group grp = group_of(double(n), sum);
  if (needs_m2(estimator)) {
    double m2 = 0;
    if (active) {
      for (int64_t i = lane; i < n; i += lanes) {
        const double d = static_cast<double>(to_float(s[i])) - grp.mean;
        m2 += d * d;
      }
    }
    set_spread(grp, tile_sum(m2, lanes), eps);
  }
  if (!active) return;
  for (int64_t i = lane; i < n; i += lanes) {
    out[g * n + i] = static_cast<float>(advantage(estimator, static_cast<double>(to_float(s[i])), grp));
  }
}

void run(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  const int64_t groups = job.N / job.group_size;
  int lanes = 1;
  while (lanes < 32 && lanes < job.group_size) lanes <<= 1;
  const int64_t blocks = (groups * lanes + kThreads - 1) / kThreads;
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    group_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        as<scalar_t>(job.scores), as<float>(job.out), groups, job.group_size, lanes, job.estimator, job.eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr Kernels kCuda{&run};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("group_advantages", bound<&group_advantages, kCuda>);
}

}  // namespace group_advantages
}  // namespace ppo_fast
