// CUDA binding of the fused LM-head log-prob op: logprob = log_softmax((h W^T + b) / t)[label], entropy.
// The host entry points (csrc/host/linear_logprobs.cpp) run the GEMMs through ATen (cuBLAS, on the
// current stream) and reduce each logits block with the CUDA log-prob kernels (csrc/cuda/logprobs.cu),
// which launch on that same stream: no kernel of its own.
#include <ppo_fast/linear_logprobs.h>

#include <torch/library.h>

namespace ppo_fast {
namespace linear_logprobs {

TORCH_LIBRARY_IMPL(ppo_fast, CUDA, m) {
  m.impl("linear_logprobs", bound<&linear_logprobs, logprobs::kCudaKernels>);
  m.impl("linear_logprobs_backward", bound<&linear_logprobs_backward, logprobs::kCudaKernels>);
}

}  // namespace linear_logprobs
}  // namespace ppo_fast
