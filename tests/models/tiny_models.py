"""Tiny causal LMs built from configs (no downloads): GPT-2 (tied embeddings), Llama and GPT-NeoX (untied)."""

from __future__ import annotations

import torch

VOCAB = 96
ARCHS = ("gpt2", "llama", "gpt_neox")


def build_lm(arch: str, n_layer: int = 2, seed: int = 0, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_positions=64, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg = tf.LlamaConfig(
            num_hidden_layers=n_layer,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
        cls = tf.LlamaForCausalLM
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            num_hidden_layers=n_layer,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            **common,
        )
        cls = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return cls(cfg)
