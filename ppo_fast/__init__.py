"""ppo_fast: PPO for language models with fused C++/CUDA kernels behind the classic TRL PPO API."""

from ppo_fast import functional, reference

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "reference"]
