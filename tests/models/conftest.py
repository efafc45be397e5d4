"""Fixtures for the model tests: tiny causal LMs (see tiny_models.py) and a batch of token ids."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_lm


@pytest.fixture
def make_lm():
    """``make_lm(arch, n_layer=2, seed=0, **config_overrides)``: a freshly initialised tiny transformers model."""
    return build_lm


@pytest.fixture
def tokens():
    """Token ids [2, 7] and an attention mask with the second row left-padded by 2."""
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, :2] = 0
    return input_ids, attention_mask
