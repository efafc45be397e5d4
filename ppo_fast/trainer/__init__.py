"""The trainer: ``PPOConfig``, ``PPOTrainer``, the KL controllers, running moments and the
distributed launch helpers. ``PPOConfig``, the controllers and ``RunningMoments`` import light;
``PPOTrainer`` and the distributed helpers load transformers and accelerate on first use."""

from ppo_fast.trainer.config import PPOConfig
from ppo_fast.trainer.kl_controllers import AdaptiveKLController, FixedKLController
from ppo_fast.trainer.running_moments import RunningMoments

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PPOConfig",
    "PPOTrainer",
    "RunningMoments",
    "build_accelerator",
    "check_launch",
    "zero3_init_disabled",
]

_LAZY = {
    "PPOTrainer": "ppo_fast.trainer.ppo_trainer",
    "build_accelerator": "ppo_fast.trainer.distributed",
    "check_launch": "ppo_fast.trainer.distributed",
    "zero3_init_disabled": "ppo_fast.trainer.distributed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ppo_fast.trainer' has no attribute {name!r}")
