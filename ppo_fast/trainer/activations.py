"""Fused activations (``PPOConfig.fused_activations``): the tanh-approximate GELU as one fused op.

GPT-2 and the models that copied its MLP (GPT-J, GPT-Neo, CodeGen, ...) name ``gelu_new``, which transformers
runs as ``NewGELUActivation``: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` written as seven
tensor ops, each a pass over the MLP's [B, T, 4H] activation, and as many more in the backward, with their
intermediates saved. ``FastGELUActivation`` is the same function written another way. On a 5M GPT-2 the seven
ops were a fifth of the whole PPO step's CPU time (``benchmarks/RESULTS.md``).

The swap replaces those module instances in place, in the policy and the reference (so ``generate`` gains
too), with ``FusedGELUTanh``:

* with the fused kernels (``use_fused_kernels``), ``ppo_fast::gelu_tanh``: one pass forward and one backward,
  one exp per element (``csrc/include/ppo_fast/gelu_tanh.h``), about 3x torch's own CPU kernel;
* without them, torch's ``gelu(approximate="tanh")`` (transformers' ``gelu_pytorch_tanh``), one vectorised
  pass and one fused backward.

Either is the same function up to rounding (5e-7 absolute in fp32 on |x| <= 20; inf, -inf and NaN map alike).
The model's config is not touched, so a saved model loads as it was.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["FusedGELUTanh", "fuse_activations"]

_log = logging.getLogger(__name__)


class FusedGELUTanh(nn.Module):
    """``gelu_new`` in one op: ``ppo_fast::gelu_tanh`` when ``use_fused``, else torch's
    ``gelu(approximate="tanh")``. No parameters, no state; the input's shape and dtype."""

    def __init__(self, use_fused: bool):
        super().__init__()
        self.use_fused = bool(use_fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused:
            return torch.ops.ppo_fast.gelu_tanh(x)  # checks its argument in C++
        return nn.functional.gelu(x, approximate="tanh")

    def extra_repr(self) -> str:
        return f"use_fused={self.use_fused}"


def _replaceable() -> tuple[type, ...]:
    from transformers import activations

    return tuple(
        getattr(activations, n) for n in ("NewGELUActivation", "FastGELUActivation") if hasattr(activations, n)
    )


def fuse_activations(*models: nn.Module | None, use_fused: bool) -> int:
    """Replace every ``NewGELUActivation`` / ``FastGELUActivation`` submodule of ``models`` with a
    ``FusedGELUTanh(use_fused)``; returns how many were replaced (a module reached twice counts once)."""
    if not isinstance(use_fused, bool):
        raise TypeError(f"fuse_activations: use_fused must be a bool, got {use_fused!r}")
    old = _replaceable()
    replaced = 0
    seen: set[int] = set()
    for model in models:
        if model is None:
            continue
        for parent in model.modules():
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            for name, child in list(parent.named_children()):
                if isinstance(child, old):
                    setattr(parent, name, FusedGELUTanh(use_fused))
                    replaced += 1
    if replaced:
        _log.info(
            "PPOTrainer: %d tanh-GELU activations (gelu_new) run as %s (fused_activations=False keeps them)",
            replaced,
            "ppo_fast::gelu_tanh" if use_fused else "torch's gelu(approximate='tanh')",
        )
    return replaced
