"""Models for PPO: a causal LM with a value head, and a reference model that shares the policy's bottom layers.

``AutoModelForCausalLMWithValueHead`` and ``create_reference_model`` are TRL 0.11's API on transformers 5;
``parameter_bytes`` measures what a shared reference saves.
"""

from ppo_fast.models.reference_model import (
    LAYER_PATTERNS,
    SUPPORTED_ARCHITECTURES,
    create_reference_model,
    parameter_bytes,
)
from ppo_fast.models.value_head import AutoModelForCausalLMWithValueHead, ValueHead

__all__ = [
    "LAYER_PATTERNS",
    "SUPPORTED_ARCHITECTURES",
    "AutoModelForCausalLMWithValueHead",
    "ValueHead",
    "create_reference_model",
    "parameter_bytes",
]
