"""Fused activations (``PPOConfig.fused_activations``): the tanh-approximate GELU as torch's one kernel.

GPT-2 and the models that copied its MLP (GPT-J, GPT-Neo, CodeGen, ...) name ``gelu_new``, which transformers
runs as ``NewGELUActivation``: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` written as seven
tensor ops, each a pass over the MLP's [B, T, 4H] activation, and as many more in the backward, with their
intermediates saved. ``FastGELUActivation`` is the same function written another way. transformers' own
``gelu_pytorch_tanh`` (``torch.nn.functional.gelu(x, approximate="tanh")``) computes the same function in one
vectorised pass and one fused backward; transformers documents it as equivalent up to rounding. On a 5M GPT-2
the seven ops were a fifth of the whole PPO step's CPU time (``benchmarks/RESULTS.md``).

The swap replaces those module instances in place, in the policy and the reference (so ``generate`` gains
too); the model's config is not touched, so a saved model loads as it was. The outputs differ by rounding only
(at most 1 ulp-scale differences, 5e-7 absolute in fp32 on |x| <= 20; inf, -inf and NaN map alike).
"""

from __future__ import annotations

import logging

from torch import nn

__all__ = ["fuse_activations"]

_log = logging.getLogger(__name__)


def _replaceable() -> tuple[type, ...]:
    from transformers import activations

    return tuple(
        getattr(activations, n) for n in ("NewGELUActivation", "FastGELUActivation") if hasattr(activations, n)
    )


def _fused_gelu_tanh() -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN["gelu_pytorch_tanh"]


def fuse_activations(*models: nn.Module | None) -> int:
    """Replace every ``NewGELUActivation`` / ``FastGELUActivation`` submodule of ``models`` with transformers'
    ``gelu_pytorch_tanh`` module; returns how many were replaced (a module shared by two models counts once)."""
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
                    setattr(parent, name, _fused_gelu_tanh())
                    replaced += 1
    if replaced:
        _log.info(
            "PPOTrainer: %d tanh-GELU activations (gelu_new) run as torch's fused gelu(approximate='tanh') "
            "(fused_activations=False keeps them)",
            replaced,
        )
    return replaced
