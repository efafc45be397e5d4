// CUDA kernels of the tanh-GELU: out = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), and its
// backward grad * (s + x s (1 - s) 2u'), gelu_tanh.h's math per element in fp32 (bf16/fp16 are
// loaded, computed in fp32 and stored back).
//
// A grid-stride loop over packs of kItems contiguous elements (one 16- or 32-byte access per operand
// when the pointers are aligned, guarded scalar accesses for the last pack), int64 indexing, a grid
// of a few CTAs per SM. No fast math: exp is the accurate expf, as on the CPU.
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/gelu_tanh.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace ppo_fast {
namespace gelu_tanh {
namespace {

using namespace ppo_fast::cuda;

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, bool vec) {
  const int64_t packs = (n + kItems - 1) / kItems;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < packs; p += stride) {
    const int64_t i0 = p * kItems;
    float v[kItems];
    load_items(x, i0, n, vec, v, 0.f);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = forward<float>(v[i]);
    store_items(out, i0, n, vec, v);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                    int64_t n, bool vec) {
  const int64_t packs = (n + kItems - 1) / kItems;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < packs; p += stride) {
    const int64_t i0 = p * kItems;
    float g[kItems], v[kItems];
    load_items(grad, i0, n, vec, g, 0.f);
    load_items(x, i0, n, vec, v, 0.f);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = backward<float>(g[i], v[i]);
    store_items(out, i0, n, vec, v);
  }
}

int64_t grid_of(int64_t n) {
  const int64_t packs = (n + kItems - 1) / kItems;
  const int64_t max_ctas = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return std::max<int64_t>(1, std::min<int64_t>((packs + kThreads - 1) / kThreads, max_ctas));
}

void forward_job(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    const bool vec = aligned(job.x, sizeof(scalar_t) * kItems) && aligned(job.out, sizeof(scalar_t) * kItems);
    forward_kernel<scalar_t><<<grid_of(job.n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        as<scalar_t>(job.x), as<scalar_t>(job.out), job.n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_job(const Job& job) {
  const c10::cuda::CUDAGuard guard(job.device);
  dispatch(job.op, job.dtype, [&](auto s) {
    using scalar_t = decltype(s);
    const size_t bytes = sizeof(scalar_t) * kItems;
    const bool vec = aligned(job.grad, bytes) && aligned(job.x, bytes) && aligned(job.out, bytes);
    backward_kernel<scalar_t><<<grid_of(job.n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        as<scalar_t>(job.grad), as<scalar_t>(job.x), as<scalar_t>(job.out), job.n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr Kernels kCuda{&forward_job, &backward_job};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("gelu_tanh", bound<&gelu_tanh, kCuda>);
  m.impl("gelu_tanh_backward", bound<&gelu_tanh_backward, kCuda>);
}

}  // namespace gelu_tanh
}  // namespace ppo_fast
