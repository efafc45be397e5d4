"""One whole ``PPOTrainer.step``: the fused ops (``use_fused_kernels=True``) against the same trainer on
the eager reference (``use_fused_kernels=False``, TRL's math: log_softmax + gather, entropy from the
softmax, the Python GAE loop's twin, eager loss).

Bar (issue 8): CPU, B=64, response length 256 (query 16), vocabulary 32000, a 4-layer Llama-style
model (hidden 128): fused at least 1.3x faster than the reference, with lower peak memory
(``extra_info["peak_rss_mb"]``: the process's peak resident memory during the timed step above what
it held before, from Linux's VmHWM, reset before each measurement). One PPO epoch over minibatches of
16, so a round stays in seconds; every epoch costs the same, so the ratio holds for more.

Bar (issue 18): ``fused_head`` (log-probs straight from the hidden states, ``PPOConfig(fused_lm_head=True)``)
at V=32000 with at least 2x lower peak memory than ``fused`` (the fused ops on the logits).

    pytest benchmarks/bench_step.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from _common import reset_peak_rss, run_benchmark, shape_table, status_mb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "trainer"))
from trainer_utils import make_tokenizer  # noqa: E402

from ppo_fast import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

# name: (batch, query length, response length, vocabulary, layers, hidden, minibatch, rounds)
SHAPES = shape_table(
    {
        "B64xR256xV32000": (64, 16, 256, 32000, 4, 128, 16, 3),
        "B16xR64xV32000": (16, 16, 64, 32000, 4, 128, 8, 3),
        "B4xR16xV1000": (4, 4, 16, 1000, 2, 32, 2, 3),
    },
    smoke=["B4xR16xV1000"],
)


# impl: (use_fused_kernels, fused_lm_head). "fused" is the fused ops on the logits; "fused_head" also takes the
# log-probs straight from the hidden states (the [B, T, V] logits never built).
IMPLS = {"reference": (False, False), "fused": (True, False), "fused_head": (True, True)}


def _trainer(impl: str, spec, device: str) -> PPOTrainer:
    import transformers as tf

    _, _, _, vocab, layers, hidden, minibatch, _ = spec
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLMWithValueHead(tf.LlamaForCausalLM(config)).to(device)
    fused, fused_head = IMPLS[impl]
    ppo = PPOConfig(
        batch_size=spec[0], mini_batch_size=minibatch, ppo_epochs=1, use_fused_kernels=fused, fused_lm_head=fused_head
    )
    return PPOTrainer(ppo, model, None, make_tokenizer())


def _batch(spec):
    batch, q_len, r_len, vocab = spec[:4]
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(3, vocab, (q_len,), generator=g) for _ in range(batch)]
    responses = [torch.randint(3, vocab, (r_len,), generator=g) for _ in range(batch)]
    scores = [torch.randn((), generator=g) for _ in range(batch)]
    return queries, responses, scores


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step(benchmark, impl, shape, device):
    spec = SHAPES[shape]
    trainer = _trainer(impl, spec, device)
    batch = _batch(spec)
    info = {"impl": impl, "shape": shape}
    # The first step is the warm-up (allocator, first-call setup) and, on CPU, the peak-memory measurement.
    base = status_mb("VmRSS") if device == "cpu" else None
    measured = base is not None and reset_peak_rss()
    trainer.step(*batch)
    if measured:
        info["peak_rss_mb"] = status_mb("VmHWM") - base
    run_benchmark(benchmark, trainer.step, batch, device, rounds=spec[-1], warmup=0, **info)
