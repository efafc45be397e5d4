// The one TORCH_LIBRARY(ppo_fast, m): every op's schema. Backends only m.impl() under their
// dispatch key (csrc/cpu/*.cpp, csrc/cuda/*.cu), so routing by device is the dispatcher's job.
// Fake (meta) kernels and autograd live in ppo_fast/_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import ppo_fast._C` runs this file's static initialisers, which register the ops. The module
// itself is empty: no pybind11 objects, and the stable ABI, so one build serves many Pythons.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ppo_fast, m) {
  // gae: rollout rewards, GAE, returns, whitening (csrc/include/ppo_fast/gae.h).
  m.def(
      "compute_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, float kl_coef, "
      "str kl_penalty) -> (Tensor rewards, Tensor non_score_rewards, Tensor kl)");
  m.def(
      "gae(Tensor values, Tensor rewards, Tensor mask, float gamma, float lam, bool carry_masked) "
      "-> (Tensor advantages, Tensor returns)");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, float eps) -> Tensor");
  m.def(
      "compute_advantages(Tensor values, Tensor rewards, Tensor mask, float gamma, float lam, bool whiten_rewards, "
      "bool carry_masked) -> (Tensor advantages, Tensor returns)");
  m.def(
      "rollout_advantages(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor mask, "
      "float kl_coef, str kl_penalty, float gamma, float lam, bool whiten_rewards, bool carry_masked) "
      "-> (Tensor rewards, Tensor non_score_rewards, Tensor kl, Tensor advantages, Tensor returns)");

  // ppo_loss: clipped PPO loss with value clipping and KL penalty (csrc/include/ppo_fast/ppo_loss.h).
  // row_scale [B] is d loss / d token term for each row (0 when ratio_threshold skipped the batch);
  // the forward saves it for the backward, which is then elementwise. cliprange_high (last, so that
  // positional calls written before it keep their meaning): the ratio's upper clip 1 + cliprange_high,
  // None for 1 + cliprange.
  m.def(
      "ppo_loss(Tensor logprobs, Tensor vpreds, Tensor old_logprobs, Tensor old_values, Tensor advantages, "
      "Tensor returns, Tensor mask, Tensor? ref_logprobs, float cliprange, float cliprange_value, float vf_coef, "
      "float kl_coef, str kl_estimator, float? dual_clip, float? log_ratio_clamp, str aggregation, "
      "float ratio_threshold, float? cliprange_high=None) -> (Tensor loss, Tensor stats, Tensor row_scale)");
  m.def(
      "ppo_loss_backward(Tensor grad_loss, Tensor row_scale, Tensor logprobs, Tensor vpreds, Tensor old_logprobs, "
      "Tensor old_values, Tensor advantages, Tensor returns, Tensor mask, Tensor? ref_logprobs, float cliprange, "
      "float cliprange_value, float vf_coef, float kl_coef, str kl_estimator, float? dual_clip, "
      "float? log_ratio_clamp, float? cliprange_high=None) -> (Tensor grad_logprobs, Tensor grad_vpreds)");

  // moments: running reward moments, normalisation and clipping (csrc/include/ppo_fast/moments.h).
  // Batch moments and states are float64 [4]: (count, mean, M2, non-finite) / (count, mean, M2, rejected).
  m.def("moments(Tensor x, Tensor? mask) -> Tensor");
  m.def("moments_merge_(Tensor(a!) state, Tensor batches) -> ()");
  m.def(
      "moments_normalize(Tensor x, Tensor? mask, Tensor state, bool scale, bool center, float? clip, float eps) "
      "-> Tensor");
  m.def(
      "moments_update_normalize_(Tensor(a!) state, Tensor x, Tensor? mask, bool scale, bool center, float? clip, "
      "float eps) -> (Tensor out, Tensor batch)");

  // group_advantages: value-free per-sample advantages from scores in groups of group_size consecutive
  // samples (csrc/include/ppo_fast/group_advantages.h). fp32 [N] out (fp64 for fp64 scores).
  m.def("group_advantages(Tensor scores, int group_size, str estimator, float eps) -> Tensor");

  // gelu_tanh: the tanh-approximate GELU x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), and its backward
  // grad * d gelu / dx (csrc/include/ppo_fast/gelu_tanh.h). Any shape; out in x's shape and dtype.
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor");

  // logprobs: log-probs and entropy from logits in one pass over the vocabulary
  // (csrc/include/ppo_fast/logprobs.h). Outputs are fp32 [B, T]; lse is saved for the backward.
  m.def("logprobs(Tensor logits, Tensor labels, float temperature) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  m.def(
      "logprobs_backward(Tensor grad_logprob, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature) -> Tensor");
  m.def(
      "logprobs_backward_(Tensor(a!) logits, Tensor grad_logprob, Tensor? grad_entropy, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature) -> ()");
  m.def("full_kl(Tensor logits, Tensor ref_logits, float temperature) -> Tensor");

  // linear_logprobs: the same log-probs and entropy straight from the LM head's inputs, chunk by chunk
  // over the tokens, never the whole [B, T, V] logits (csrc/include/ppo_fast/linear_logprobs.h).
  // chunk_size None: the default (linear_logprobs.h). The backward's output_mask says which of
  // (hidden, weight, bias) need a gradient; the others, and grad_bias without a bias, come back empty.
  m.def(
      "linear_logprobs(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, float temperature, "
      "int? chunk_size) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  m.def(
      "linear_logprobs_backward(Tensor grad_logprob, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor labels, Tensor? bias, Tensor lse, Tensor entropy, float temperature, int? chunk_size, "
      "bool[3] output_mask) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // lion8bit: one fused Lion step over a list of tensors (csrc/include/ppo_fast/lion8bit.h). momentum[i] is
  // uint8 codes with absmax[i] fp32 [ceil(n / 256)] (8-bit state), or fp32 with an empty absmax[i].
  m.def(
      "lion8bit_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, Tensor(c!)[] absmax, float lr, "
      "float beta1, float beta2, float weight_decay, bool stochastic_rounding, int seed) -> ()");
}
