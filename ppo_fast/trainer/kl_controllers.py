"""KL-penalty controllers (TRL's): the coefficient of the per-token KL in the reward.

The adaptive controller is Ziegler et al. 2019 (arXiv:1909.08593), eq. 2:
``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta *= 1 + e * n_steps / horizon``.
"""

from __future__ import annotations

import math

__all__ = ["AdaptiveKLController", "FixedKLController"]


class AdaptiveKLController:
    """Moves the KL coefficient so the measured KL approaches ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        """``current``: the step's mean KL (the same on every process); ``n_steps``: samples it covered."""
        current = float(current)
        if not math.isfinite(current):
            raise ValueError(f"AdaptiveKLController.update: current KL must be finite, got {current}")
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
