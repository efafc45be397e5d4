// CUDA kernel for the fused Lion step with 8-bit blockwise momentum, over a list of tensors:
//   p *= 1 - lr wd;  p -= lr sign(b1 m + (1 - b1) g);  m = b2 m + (1 - b2) g   (lion8bit.h)
//
// One launch for the whole list (multi-tensor apply). A small device table holds each tensor's
// pointers, size, dtype and state kind, and where its 256-element blocks start in the list's block
// space. A warp owns whole 256-element blocks (8 contiguous elements per lane, vector loads where
// aligned): it dequantises, steps the parameters, takes the new absmax (over the finite momentum
// values) as a warp max and requantises, all in registers; an element with a non-finite gradient
// keeps its parameter and momentum (lion8bit.h: lion_update). No atomics, no shared accumulators: deterministic, and bit-identical to the CPU
// kernel and the eager reference. Each warp walks a contiguous range of blocks, so it looks its
// tensor up once (binary search) and then only steps forward.
#include <ppo_fast/cuda_common.cuh>
#include <ppo_fast/lion8bit.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstddef>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace ppo_fast {
namespace lion8bit {
namespace {

using namespace ppo_fast::cuda;

static_assert(32 * kItems == kBlock, "a warp covers one quantisation block");
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Device table: kFields int64 per tensor, then the block prefix (first[t], T + 1 entries).
enum Field : int { fP = 0, fG, fM, fAbsmax, fNumel, fKind, fIndex, kFields };
enum Kind : int64_t { kDtypeMask = 3, kQuantBit = 4, kVecBit = 8 };  // dtype: 0 fp32, 1 bf16, 2 fp16

struct Args {
  const int64_t* table;
  const int64_t* first;
  int T;
  int64_t blocks;
  int64_t per_warp;  // contiguous blocks per warp
  Consts c;
  bool stochastic;
  uint32_t seed;
  const float* code;  // device lookup tables (lion8bit.h), copied to shared memory per CTA
  const uint32_t* bucket;
};

struct Smem {
  float code[256];
  uint32_t bucket[kBuckets];
};

template <typename scalar_t, bool kQuantized>
__device__ __forceinline__ void warp_block(const int64_t* row, int64_t block, const Args& a, const Smem& sm,
                                           int lane) {
  scalar_t* p = reinterpret_cast<scalar_t*>(row[fP]);
  const scalar_t* g = reinterpret_cast<const scalar_t*>(row[fG]);
  const int64_t n = row[fNumel];
  const bool vec = (row[fKind] & kVecBit) != 0;
  const int64_t t0 = block * kBlock + int64_t(lane) * kItems;
  float pv[kItems], gv[kItems], mv[kItems];
  load_items(p, t0, n, vec, pv, 0.f);
  load_items(g, t0, n, vec, gv, 0.f);
  if constexpr (kQuantized) {
    const uint8_t* q = reinterpret_cast<const uint8_t*>(row[fM]);
    uint8_t qv[kItems];
    load_items(q, t0, n, vec, qv, static_cast<uint8_t>(kZero));
    const float old_absmax = reinterpret_cast<const float*>(row[fAbsmax])[block];
#pragma unroll
    for (int i = 0; i < kItems; ++i) mv[i] = dequantize(qv[i], old_absmax, sm.code);
  } else {
    load_items(reinterpret_cast<const float*>(row[fM]), t0, n, vec, mv, 0.f);
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    lion_update(pv[i], mv[i], gv[i], a.c);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      const uint32_t tensor = static_cast<uint32_t>(row[fIndex]);
      if (a.stochastic) pv[i] = stochastic_round_bf16(pv[i], sr_hash(a.seed, tensor, t0 + i));
    }
  }
  store_items(p, t0, n, vec, pv);
  if constexpr (kQuantized) {
    // Past the end the loads filled p = g = 0 and the zero code, so mv is 0 there: no effect on the max.
    // Non-finite momentum values do not count (lion8bit.h: finite_abs_bits).
    uint32_t max_bits = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) max_bits = max(max_bits, finite_abs_bits(mv[i]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) max_bits = max(max_bits, __shfl_xor_sync(kFull, max_bits, off));
    const float absmax = bits_float(max_bits);
    const float scale = quant_scale(absmax);
    Pack<uint8_t, kItems> out;
#pragma unroll
    for (int i = 0; i < kItems; ++i) out.v[i] = quantize(mv[i], scale, sm.bucket);
    uint8_t* q = reinterpret_cast<uint8_t*>(row[fM]);
    if (vec && t0 + kItems <= n) {
      *reinterpret_cast<Pack<uint8_t, kItems>*>(q + t0) = out;
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (t0 + i < n) q[t0 + i] = out.v[i];
    }
    if (lane == 0) reinterpret_cast<float*>(row[fAbsmax])[block] = absmax;
  } else {
    store_items(reinterpret_cast<float*>(row[fM]), t0, n, vec, mv);
  }
}

__global__ void __launch_bounds__(kThreads) lion8bit_kernel(const Args a) {
  __shared__ Smem sm;
  for (int i = threadIdx.x; i < 256; i += kThreads) sm.code[i] = a.code[i];
  for (int i = threadIdx.x; i < kBuckets; i += kThreads) sm.bucket[i] = a.bucket[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t begin = warp * a.per_warp;
  const int64_t end = min(begin + a.per_warp, a.blocks);
  if (begin >= end) return;
  // Last tensor whose first block is <= begin (the table holds no empty tensors).
  int lo = 0, hi = a.T - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.first[mid] <= begin) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int t = lo;
  int64_t next = a.first[t + 1];
  for (int64_t b = begin; b < end; ++b) {
    while (b >= next) next = a.first[++t + 1];
    const int64_t* row = a.table + int64_t(t) * kFields;
    const int64_t block = b - a.first[t];
    switch (row[fKind] & (kDtypeMask | kQuantBit)) {
      case 0:
        warp_block<float, false>(row, block, a, sm, lane);
        break;
      case 1:
        warp_block<at::BFloat16, false>(row, block, a, sm, lane);
        break;
      case 2:
        warp_block<at::Half, false>(row, block, a, sm, lane);
        break;
      case kQuantBit | 0:
        warp_block<float, true>(row, block, a, sm, lane);
        break;
      case kQuantBit | 1:
        warp_block<at::BFloat16, true>(row, block, a, sm, lane);
        break;
      case kQuantBit | 2:
        warp_block<at::Half, true>(row, block, a, sm, lane);
        break;
    }
  }
}

// The lookup tables on each device, built once on the host and copied; kept for the life of the
// process (deliberately never freed: static tensors freed after the CUDA context is torn down crash at exit).
const at::Tensor& device_tables(const at::Device& device) {
  static std::mutex mu;
  static std::vector<at::Tensor*> cache;
  std::lock_guard<std::mutex> lock(mu);
  const size_t idx = static_cast<size_t>(device.index());
  if (cache.size() <= idx) cache.resize(idx + 1, nullptr);
  if (cache[idx] == nullptr) {
    const HostTables& h = host_tables();
    at::Tensor host = at::empty({static_cast<int64_t>(sizeof(HostTables))}, at::kByte);
    std::memcpy(host.data_ptr<uint8_t>(), &h, sizeof(HostTables));
    at::Tensor dev = host.to(device);
    at::cuda::getCurrentCUDAStream(device.index()).synchronize();  // ready for every stream from now on
    cache[idx] = new at::Tensor(std::move(dev));
  }
  return *cache[idx];
}

int dtype_code(at::ScalarType dt) {
  return dt == at::kBFloat16 ? 1 : (dt == at::kHalf ? 2 : 0);
}

void step(const Job& job) {
  std::vector<int64_t> rows;
  rows.reserve(size_t(job.n_tensors) * kFields);
  for (int t = 0; t < job.n_tensors; ++t) {
    const TensorJob& it = job.tensors[t];
    const size_t es = c10::elementSize(it.dtype);
    const bool vec = aligned(it.p, es * kItems) && aligned(it.g, es * kItems) &&
                     aligned(it.m, (it.quantized ? 1 : sizeof(float)) * kItems);
    const int64_t kind = dtype_code(it.dtype) | (it.quantized ? kQuantBit : 0) | (vec ? kVecBit : 0);
    const int64_t row[kFields] = {reinterpret_cast<int64_t>(it.p),
                                  reinterpret_cast<int64_t>(it.g),
                                  reinterpret_cast<int64_t>(it.m),
                                  reinterpret_cast<int64_t>(it.absmax),
                                  it.numel,
                                  kind,
                                  static_cast<int64_t>(it.index)};
    rows.insert(rows.end(), row, row + kFields);
  }
  const size_t n_first = size_t(job.n_tensors) + 1;
  const at::Device device(at::kCUDA, job.device);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor& tables = device_tables(device);
  // The table travels in one pinned, asynchronous copy on the launch stream; the caching host
  // allocator keeps the pinned block until the copy has run.
  at::Tensor host = at::empty({static_cast<int64_t>(rows.size() + n_first)},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
  std::memcpy(host.data_ptr<int64_t>() + rows.size(), job.first, n_first * sizeof(int64_t));
  const at::Tensor table = host.to(device, /*non_blocking=*/true);

  Args a{};
  a.table = table.data_ptr<int64_t>();
  a.first = a.table + rows.size();
  a.T = job.n_tensors;
  a.blocks = job.first[job.n_tensors];
  a.c = job.c;
  a.stochastic = job.stochastic_rounding;
  a.seed = job.seed;
  const uint8_t* tb = tables.data_ptr<uint8_t>();
  a.code = reinterpret_cast<const float*>(tb + offsetof(HostTables, code));
  a.bucket = reinterpret_cast<const uint32_t*>(tb + offsetof(HostTables, bucket));
  // Enough warps to fill the GPU (8 CTAs of 256 threads per SM), each on a contiguous range of blocks.
  const int64_t max_ctas = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t ctas = std::min<int64_t>(max_ctas, (a.blocks + kWarps - 1) / kWarps);
  a.per_warp = (a.blocks + ctas * kWarps - 1) / (ctas * kWarps);
  lion8bit_kernel<<<static_cast<unsigned>(ctas), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr Kernels kCuda{&step};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("lion8bit_step_", bound<&lion8bit_step_, kCuda>);
}

}  // namespace lion8bit
}  // namespace ppo_fast
