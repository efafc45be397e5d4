"""ppo_fast: PPO for language models with fused C++/CUDA kernels behind the classic TRL PPO API."""

from ppo_fast import functional, reference
from ppo_fast.trainer import RunningMoments

__version__ = "0.1.0"

__all__ = ["RunningMoments", "__version__", "functional", "reference"]
