"""Tiny policies, a tokenizer that needs no download, and seeded PPO batches for the trainer tests."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from tiny_models import VOCAB, build_lm  # noqa: E402

__all__ = ["VOCAB", "build_lm", "make_batch", "make_policy", "make_tokenizer"]


def make_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: ids 0/1/2 are pad/bos/eos."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def make_policy(arch: str = "gpt2", n_layer: int = 2, seed: int = 0, **kwargs):
    from ppo_fast import AutoModelForCausalLMWithValueHead

    torch.manual_seed(seed)
    return AutoModelForCausalLMWithValueHead(build_lm(arch, n_layer=n_layer, seed=seed), **kwargs)


def make_batch(batch_size: int, seed: int, q_len=(2, 6), r_len=(1, 7)):
    """``batch_size`` random (query, response, score) triples of ragged lengths, from their own generator."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)

    queries = [ids(*q_len) for _ in range(batch_size)]
    responses = [ids(*r_len) for _ in range(batch_size)]
    scores = [torch.randn((), generator=g) for _ in range(batch_size)]
    return queries, responses, scores
