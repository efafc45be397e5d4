"""The trainer: running moments now; PPOConfig, PPOTrainer and the KL controllers build on it."""

from ppo_fast.trainer.running_moments import RunningMoments

__all__ = ["RunningMoments"]
