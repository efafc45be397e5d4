// CPU binding of the fused LM-head log-prob op: logprob = log_softmax((h W^T + b) / t)[label], entropy.
// The host entry points (csrc/host/linear_logprobs.cpp) run the GEMMs through ATen (the CPU's BLAS)
// and reduce each logits block with the CPU log-prob kernels (csrc/cpu/logprobs.cpp).
#include <ppo_fast/linear_logprobs.h>

#include <torch/library.h>

namespace ppo_fast {
namespace linear_logprobs {

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("linear_logprobs", bound<&linear_logprobs, logprobs::kCpuKernels>);
  m.impl("linear_logprobs_backward", bound<&linear_logprobs_backward, logprobs::kCpuKernels>);
}

}  // namespace linear_logprobs
}  // namespace ppo_fast
