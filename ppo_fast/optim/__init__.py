"""Optimizers: ``Lion`` (fp32 momentum) and ``Lion8bit`` (8-bit blockwise momentum), both stepped by
one fused op per parameter group and device (``ppo_fast::lion8bit_step_``)."""

from ppo_fast.optim.lion import Lion, Lion8bit

__all__ = ["Lion", "Lion8bit"]
