// Log-probabilities and entropy straight from the LM head's inputs (a fused linear + log-softmax):
//   z = (hidden @ weight^T + bias) / temperature;  logprob = z[label] - lse(z);  entropy = lse - sum softmax(z) z
// Backward: dz from logprobs.h (from the saved lse and entropy), then d hidden = dz W, d W = dz^T h, d bias = sum dz.
//
// The N = B * T token rows go through in chunks of c rows: each chunk's logits block [c, V] is one
// ATen GEMM (cuBLAS on CUDA), reduced by the backend's log-prob kernels (logprobs.h, Kernels) as a
// [1, c, V] job, and overwritten by the next chunk, so only one block of logits ever exists. The
// backward recomputes each block, lets the log-prob backward kernel turn it into d logits in place,
// and feeds it to the gradient GEMMs; d weight (and d bias) accumulate across chunks in fp32 (fp64 for
// fp64), the weight's own gradient when it is fp32, a separate accumulator cast once at the end
// otherwise. Nothing here is device-specific: each backend binds these entry points to its own
// log-prob kernels (csrc/cpu/linear_logprobs.cpp, csrc/cuda/linear_logprobs.cu).
#pragma once

#include <ppo_fast/logprobs.h>

#include <array>
#include <optional>
#include <tuple>

namespace ppo_fast {
namespace linear_logprobs {

// Default chunk: rows whose logits block takes about kChunkBytes in the hidden states' dtype, at least
// kMinChunkRows (GEMMs of fewer rows run far below the machine's rate) and at most N.
constexpr int64_t kChunkBytes = int64_t(64) << 20;
constexpr int64_t kMinChunkRows = 256;

int64_t default_chunk_size(int64_t N, int64_t V, int64_t element_size);

// Returns (logprob, entropy, lse), [B, T] in fp32 (fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs(const logprobs::Kernels& k, const at::Tensor& hidden,
                                                               const at::Tensor& weight, const at::Tensor& labels,
                                                               const std::optional<at::Tensor>& bias,
                                                               double temperature, std::optional<int64_t> chunk_size);

// Returns (grad_hidden [B, T, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtypes; an output
// that output_mask (hidden, weight, bias) leaves out, and grad_bias without a bias, is empty ([0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const logprobs::Kernels& k, const at::Tensor& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    std::optional<int64_t> chunk_size, std::array<bool, 3> output_mask);

}  // namespace linear_logprobs
}  // namespace ppo_fast
