// What the CUDA kernels share: vectorised loads and stores of kItems contiguous elements, mask
// reads, and the host-side dtype dispatch of a job (fp32, bf16, fp16; bool or same-dtype mask).
#pragma once

#include <ppo_fast/common.h>

#include <ATen/ATen.h>

#include <cstdint>

namespace ppo_fast {
namespace cuda {

constexpr int kItems = 8;  // contiguous elements per thread per access: 16 B (bf16) or 2 x 16 B (fp32)
constexpr unsigned kFull = 0xffffffffu;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename mask_t>
__device__ __forceinline__ bool is_set(mask_t x) {
  return static_cast<float>(x) != 0.f;
}
template <>
__device__ __forceinline__ bool is_set<bool>(bool x) {
  return x;
}

// Loads kItems elements at row[t0...]: one vector access when the whole pack is in range and
// aligned, guarded scalar loads (fill past the end) otherwise.
template <typename T, typename U>
__device__ __forceinline__ void load_items(const T* row, int64_t t0, int64_t len, bool vec, U (&out)[kItems],
                                           U fill) {
  if (vec && t0 + kItems <= len) {
    const Pack<T, kItems> p = *reinterpret_cast<const Pack<T, kItems>*>(row + t0);
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = static_cast<U>(p.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = t0 + i < len ? static_cast<U>(row[t0 + i]) : fill;
  }
}

template <typename T>
__device__ __forceinline__ void store_items(T* row, int64_t t0, int64_t len, bool vec, const float (&x)[kItems]) {
  if (vec && t0 + kItems <= len) {
    Pack<T, kItems> p;
#pragma unroll
    for (int i = 0; i < kItems; ++i) p.v[i] = static_cast<T>(x[i]);
    *reinterpret_cast<Pack<T, kItems>*>(row + t0) = p;
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (t0 + i < len) row[t0 + i] = static_cast<T>(x[i]);
  }
}

template <typename mask_t>
__device__ __forceinline__ void load_mask(const mask_t* row, int64_t t0, int64_t len, bool vec,
                                          bool (&m)[kItems]) {
  mask_t raw[kItems];
  load_items(row, t0, len, vec, raw, mask_t(0));
#pragma unroll
  for (int i = 0; i < kItems; ++i) m[i] = is_set(raw[i]);
}

// ---------------------------------------------------------------------------------------------
// Host side.

inline bool aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Calls f(scalar_t{}) for a job's dtype. Float64 is a CPU-only dtype (gradcheck); it is not
// compiled for the GPU.
template <typename F>
void dispatch(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    case at::kHalf:
      return f(at::Half{});
    default:
      TORCH_CHECK(false, op, ": CUDA tensors must be float32, bfloat16 or float16 (float64 runs on the CPU), got ",
                  dtype);
  }
}

// Calls f(scalar_t{}, mask_t{}) with the mask read as bool or as the values' dtype.
template <typename F>
void dispatch(const char* op, at::ScalarType dtype, bool mask_bool, F&& f) {
  dispatch(op, dtype, [&](auto s) {
    if (mask_bool) {
      f(s, bool{});
    } else {
      f(s, s);
    }
  });
}

}  // namespace cuda
}  // namespace ppo_fast
