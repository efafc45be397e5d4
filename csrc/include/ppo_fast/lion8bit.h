// Lion with 8-bit blockwise momentum, per element, written once for CPU and CUDA:
//   p *= 1 - lr wd;  c = b1 m + (1 - b1) g;  p -= lr sign(c);  m = b2 m + (1 - b2) g
// (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; decoupled weight decay and
// update order as bitsandbytes). The 8-bit momentum is one uint8 code per element under the signed
// dynamic (exponent + fraction) map of Dettmers et al. 2022 (bitsandbytes' create_dynamic_map(
// signed=True)) times an fp32 absmax per block of 256 elements; tensors kept in fp32 skip the codes.
//
// Non-finite gradients: an element whose gradient is NaN or +-inf keeps its parameter and its
// momentum for that step (no weight decay either), and a block's absmax is the max over its finite
// momentum values only. Without this one NaN gradient would make its block's absmax NaN, every code
// of the block 0 and every later dequantised momentum NaN: 256 parameters frozen for good. A
// non-finite parameter is stepped like any other (it stays visible).
//
// Every fp32 operation here is a separately rounded multiply or add, in the order of the eager
// reference (ppo_fast/reference.py: lion8bit_step_), so the kernels match it bit for bit: on the
// GPU __fmul_rn/__fadd_rn stop nvcc from contracting them into fused multiply-adds.
#pragma once

#include <ppo_fast/common.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ppo_fast {
namespace lion8bit {

constexpr int kBlock = 256;  // elements per absmax
constexpr int kMags = 128;   // positive code magnitudes: 127 exponent-fraction means, then 1
constexpr int kZero = 127;   // code of 0; positive codes are 128 + k, negative ones 126 - k

// Positive magnitudes of the dynamic map, ascending (code[128 + k] = kMag[k]; code[126 - k] =
// -kMag[k] for k < 127; code[127] = 0). Exactly bitsandbytes' create_dynamic_map(signed=True).
constexpr float kMag[kMags] = {
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, 0x1.6f0068p-15f, 0x1.15df66p-14f,
    0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f, 0x1.e353f8p-10f, 0x1.3b645ap-9f,
    0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f, 0x1.19999ap-7f, 0x1.2c083p-7f,
    0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, 0x1.2ccccep-5f, 0x1.43d70ap-5f,
    0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f, 0x1.20a3d6p-4f, 0x1.2c28f6p-4f,
    0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f, 0x1.fp-4f, 0x1.14ccccp-3f,
    0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, 0x1.28ccccp-2f, 0x1.373334p-2f,
    0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f, 0x1.d59998p-2f, 0x1.e4p-2f,
    0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, 0x1.413334p-1f, 0x1.486668p-1f,
    0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f, 0x1.97999ap-1f, 0x1.9eccccp-1f,
    0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f, 0x1.eep-1f, 0x1.f53334p-1f,
    0x1.fc6666p-1f, 0x1.0p+0f,
};

// Nearest-magnitude lookup. thr[k] = (kMag[k] + kMag[k + 1]) / 2 in fp32; the magnitude index of
// |x| is the number of thresholds below it (ties go down, as torch.searchsorted(side="left")).
// Instead of a binary search, |x| is bucketed by its top 16 float bits (exponent and 7 mantissa
// bits): adjacent thresholds are >= 1.07% apart and a bucket is < 0.79% wide, so a bucket holds at
// most one threshold, and index = lo[bucket] + (thr_in[bucket] < |x|). A threshold inside a bucket
// shares its top 16 bits with every |x| of the bucket, so only its low 16 bits are compared: one
// uint32 per bucket, (lo << 16) | low16(thr_in) (0xFFFF when the bucket holds none). Buckets run
// from the one holding thr[0] to the one starting at 1.0 (|x| <= 1 after dividing by the absmax, up
// to an ulp); |x| is clamped into that range first, which gives the same index.
constexpr uint32_t kKeyLo = 0x35FF;  // float bits of thr[0] >> 16 (checked when the table is built)
constexpr uint32_t kKeyHi = 0x3F80;  // bits of 1.0f >> 16
constexpr int kBuckets = int(kKeyHi - kKeyLo + 1);

C10_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

C10_HOST_DEVICE inline float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Separately rounded fp32 multiply and add (never contracted into an FMA).
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The step's scalars in fp32, rounded from the doubles the way torch rounds a Python float that
// multiplies an fp32 tensor; 1 - b and 1 - lr wd are formed in double first, as Python does.
struct Consts {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
};

inline Consts make_consts(double lr, double beta1, double beta2, double weight_decay) {
  return {static_cast<float>(lr),    static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2), static_cast<float>(1.0 - beta2)};
}

// |x| as its float bits. For non-negative floats the integer order is the float order (inf is
// 0x7F800000, NaN above it), and an integer max vectorises where a float max does not.
C10_HOST_DEVICE inline uint32_t abs_bits(float x) {
  return float_bits(x) & 0x7FFFFFFFu;
}

constexpr uint32_t kInfBits = 0x7F800000u;

// |x| as its float bits when x is finite, else 0: the integer max of these is the block's absmax
// over its finite values (a non-finite momentum, which only an fp32 overflow or a corrupt state
// can make, then requantises to +-absmax for +-inf and to 0 for NaN instead of poisoning the block).
C10_HOST_DEVICE inline uint32_t finite_abs_bits(float x) {
  const uint32_t a = abs_bits(x);
  return a & (0u - static_cast<uint32_t>(a < kInfBits));  // a mask, not a ternary: the max loop vectorises
}

// One element: decoupled weight decay, the sign update, then the momentum (fp32 throughout). A
// non-finite gradient leaves p and m as they were. The choice is a bit mask, not `finite ? new : old`:
// GCC turned that ternary on the momentum in memory into a conditional store, which stopped the CPU
// loop vectorising (13x slower, measured); and/andnot/or vectorise on the CPU and are plain ALU ops on
// the GPU.
C10_HOST_DEVICE inline void lion_update(float& p, float& m, float g, const Consts& c) {
  const uint32_t keep = 0u - static_cast<uint32_t>(abs_bits(g) >= kInfBits);  // all ones: keep p and m
  const float decayed = mul_rn(p, c.decay);
  const float u = add_rn(mul_rn(m, c.beta1), mul_rn(g, c.one_minus_beta1));
  // torch.sign (NaN gives 0, as there), without a branch: the signs are random, a branch mispredicts.
  const float s = static_cast<float>(u > 0.f) - static_cast<float>(u < 0.f);
  const float p_new = add_rn(decayed, -mul_rn(c.lr, s));
  const float m_new = add_rn(mul_rn(m, c.beta2), mul_rn(g, c.one_minus_beta2));
  p = bits_float((float_bits(p_new) & ~keep) | (float_bits(p) & keep));
  m = bits_float((float_bits(m_new) & ~keep) | (float_bits(m) & keep));
}

C10_HOST_DEVICE inline float dequantize(uint8_t q, float absmax, const float* code) {
  return mul_rn(code[q], absmax);
}

// Quantisation multiplies by 1 / absmax (taken once per block, as bitsandbytes does); an all-zero
// block (or a non-finite absmax, which the kernels never write) scales by 0: every entry takes the
// zero code.
C10_HOST_DEVICE inline float quant_scale(float absmax) {
  return absmax > 0.f ? 1.0f / absmax : 0.f;
}

// Sign-preserving nearest code of s = m / absmax (as its float bits): a nonzero momentum never lands
// on 0 or on the other sign (Lion steps by the sign of b1 m + (1 - b1) g; a flipped or zeroed sign
// would step the wrong way), so values below the smallest magnitude take the smallest code of their
// sign. 0 and NaN take the zero code. With k the magnitude index: 128 + k if s > 0 and
// 126 - min(k, 126) if s < 0 (1.0 has no negative twin). Integer-only and branch-free: the signs
// are random (a branch would mispredict half the time) and the CPU loop vectorises.
C10_HOST_DEVICE inline uint8_t quant_code(uint32_t s_bits, const uint32_t* table) {
  uint32_t a = s_bits & 0x7FFFFFFFu;
  const uint32_t valid = static_cast<uint32_t>(a != 0u) & static_cast<uint32_t>(a <= 0x7F800000u);
  a = a < (kKeyLo << 16) ? (kKeyLo << 16) : a;
  a = a > ((kKeyHi << 16) | 0xFFFFu) ? ((kKeyHi << 16) | 0xFFFFu) : a;
  const uint32_t e = table[(a >> 16) - kKeyLo];
  const uint32_t k = (e >> 16) + static_cast<uint32_t>((e & 0xFFFFu) < (a & 0xFFFFu));
  const uint32_t neg = s_bits >> 31;
  const uint32_t d = k + 1u - (neg & ((k + 1u) >> 7));  // k + 1, or min(k, 126) + 1 when negative
  const uint32_t sd = (d ^ (0u - neg)) + neg;           // -d when negative (two's complement)
  return static_cast<uint8_t>(static_cast<uint32_t>(kZero) + (sd & (0u - valid)));
}

C10_HOST_DEVICE inline uint8_t quantize(float m, float scale, const uint32_t* table) {
  return quant_code(float_bits(mul_rn(m, scale)), table);
}

// Stochastic rounding of fp32 to bf16 (keeps small Lion steps on bf16 weights in expectation): add
// 16 random bits below the bf16 mantissa, then truncate. The random bits are a hash of (seed,
// tensor, element), so CPU, GPU and the reference draw the same ones and a run is reproducible.
C10_HOST_DEVICE inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

C10_HOST_DEVICE inline uint32_t sr_hash(uint32_t seed, uint32_t tensor, int64_t index) {
  const uint64_t u = static_cast<uint64_t>(index);
  uint32_t h = static_cast<uint32_t>(u) * 0x9E3779B1u;
  h ^= static_cast<uint32_t>(u >> 32) * 0x85EBCA77u;
  h ^= tensor * 0xC2B2AE3Du;
  h ^= seed;
  return fmix32(h);
}

C10_HOST_DEVICE inline float stochastic_round_bf16(float x, uint32_t random) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) return x;  // inf and NaN pass through
  return bits_float((u + (random & 0xFFFFu)) & 0xFFFF0000u);
}

// ---------------------------------------------------------------------------------------------
// The lookup tables (built once on the host, csrc/host/lion8bit.cpp) and the job, filled by the
// host entry point and run by a backend's kernel.

struct HostTables {
  float code[256];
  uint32_t bucket[kBuckets];
};

const HostTables& host_tables();

C10_HOST_DEVICE inline int64_t num_blocks(int64_t n) {
  return (n + kBlock - 1) / kBlock;
}

// One non-empty tensor of the list: params p and grads g (contiguous, of dtype), momentum m (uint8
// codes with absmax [num_blocks(numel)], or fp32 with a null absmax).
struct TensorJob {
  void* p;
  const void* g;
  void* m;
  float* absmax;
  int64_t numel;
  at::ScalarType dtype;
  bool quantized;
  uint32_t index;  // position in the op's lists (seeds the stochastic rounding)
};

struct Job {
  const char* op;
  c10::DeviceIndex device;
  const TensorJob* tensors;
  int n_tensors;
  const int64_t* first;  // [n_tensors + 1]: each tensor's first block in the list's blocks; then their number
  Consts c;
  bool stochastic_rounding;
  uint32_t seed;
};

struct Kernels {
  void (*step)(const Job&);
};

// The entry point (csrc/host/lion8bit.cpp).
void lion8bit_step_(const Kernels& k, at::TensorList params, at::TensorList grads, at::TensorList momentum,
                    at::TensorList absmax, double lr, double beta1, double beta2, double weight_decay,
                    bool stochastic_rounding, int64_t seed);

}  // namespace lion8bit
}  // namespace ppo_fast
