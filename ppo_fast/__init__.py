"""ppo_fast: PPO for language models with fused C++/CUDA kernels behind the classic TRL PPO API."""

from ppo_fast import functional, optim, reference
from ppo_fast.trainer import AdaptiveKLController, FixedKLController, PPOConfig, RunningMoments

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "AutoModelForCausalLMWithValueHead",
    "FixedKLController",
    "PPOConfig",
    "PPOTrainer",
    "RunningMoments",
    "__version__",
    "create_reference_model",
    "functional",
    "optim",
    "reference",
    "zero3_init_disabled",
]

# The models and the trainer import transformers (seconds), so they load on first use and `import ppo_fast` stays light.
_LAZY = {
    "AutoModelForCausalLMWithValueHead": "ppo_fast.models",
    "create_reference_model": "ppo_fast.models",
    "PPOTrainer": "ppo_fast.trainer.ppo_trainer",
    "zero3_init_disabled": "ppo_fast.trainer.distributed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ppo_fast' has no attribute {name!r}")
