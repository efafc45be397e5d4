"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with fp32 or 8-bit momentum.

Update (decoupled weight decay, bitsandbytes' order), per element, in fp32:

    p *= 1 - lr * weight_decay
    p -= lr * sign(beta1 * m + (1 - beta1) * g)
    m  = beta2 * m + (1 - beta2) * g

``Lion8bit`` stores the momentum of every tensor with at least ``min_8bit_size`` (4096) elements as one
uint8 code per element (the signed dynamic map of bitsandbytes' ``create_dynamic_map(signed=True)``)
plus an fp32 absmax per 256 elements: 1.016 bytes per parameter instead of 4. Smaller tensors keep
fp32 momentum. Requantisation keeps the momentum's sign. Each parameter group on each device is one
call of the fused op ``ppo_fast::lion8bit_step_`` (one CUDA launch for all its tensors), which
dequantises, steps the parameters and requantises in one pass; without the compiled extension (or
with ``fused=False``) the eager reference in ``ppo_fast.reference`` does the same arithmetic.

Parameters may be fp32, bf16 or fp16 of any shape (flat ZeRO partitions included), and tensors of
several dtypes may share a group. ``stochastic_rounding=True`` rounds bf16 parameters stochastically,
so that steps smaller than half a bf16 ulp still move them on average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from ppo_fast import _ops, reference
from ppo_fast import functional as F

__all__ = ["Lion", "Lion8bit"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_M32 = 0xFFFFFFFF


class Lion(torch.optim.Optimizer):
    """Lion with fp32 momentum (state: ``momentum`` fp32 of the parameter's shape, ``step``).

    Args:
        params: parameters or parameter groups (dicts); each group may override ``lr``, ``betas``,
            ``weight_decay``, ``stochastic_rounding`` and ``seed``.
        lr: learning rate (Lion wants one 3-10x smaller than AdamW's).
        betas: ``(beta1, beta2)``: interpolation for the update's sign, and the momentum's decay.
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``).
        stochastic_rounding: round bf16 parameters stochastically (seeded from ``seed`` and the step).
        seed: seed of the stochastic rounding.
        fused: use the compiled op (None: when the extension is built; False: the eager reference).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        stochastic_rounding: bool = False,
        seed: int = 0,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding, seed=seed
        )
        defaults.update(self._extra_defaults())
        _hyper(type(self).__name__, defaults)
        if fused and not _ops.HAS_EXT:
            raise RuntimeError(
                f"{type(self).__name__}: fused=True but the compiled extension is not available ({_ops.EXT_ERROR})"
            )
        self.fused = _ops.HAS_EXT if fused is None else bool(fused)
        super().__init__(params, defaults)
        self._empty: dict[torch.device, torch.Tensor] = {}

    # -- state -----------------------------------------------------------------------------------

    def _extra_defaults(self) -> dict:
        return {}

    def _quantized(self, p: torch.Tensor, group: dict) -> bool:
        return False

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        n = p.numel()
        if self._quantized(p, group):
            state["momentum"] = torch.full((n,), reference.LION8BIT_ZERO_CODE, dtype=torch.uint8, device=p.device)
            state["absmax"] = torch.zeros(-(-n // reference.LION8BIT_BLOCK), dtype=torch.float32, device=p.device)
        else:
            state["momentum"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["step"] = 0
        return state

    def _no_absmax(self, device: torch.device) -> torch.Tensor:
        if device not in self._empty:
            self._empty[device] = torch.empty(0, dtype=torch.float32, device=device)
        return self._empty[device]

    def state_bytes(self) -> int:
        """Bytes of optimizer state (momentum and absmax) currently held."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the state keeps its own dtypes (fp32
        momentum and absmax, uint8 codes) instead of taking the parameter's; tensors move to each
        parameter's device, so a checkpoint saved on one device loads onto another."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                continue
            p = id_map[key]
            self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved.items()}

    # -- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One Lion step for every parameter with a gradient (``grad=None`` is skipped). Every group
        is checked before any parameter or state changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        plans = []
        for group in self.param_groups:
            hyper = _hyper(name, group)
            params = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if p.dtype not in _DTYPES:
                    raise TypeError(f"{name}: parameters must be float32, bfloat16 or float16, got {p.dtype}")
                params.append(p)
            plans.append((group, hyper, params))
        for group, (lr, beta1, beta2, weight_decay), params in plans:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in params:
                by_device.setdefault(p.device, []).append(p)
            for device, ps in by_device.items():
                self._step_device(group, device, ps, lr, beta1, beta2, weight_decay)
        return loss

    def _step_device(self, group, device, ps, lr, beta1, beta2, weight_decay) -> None:
        states = [self.state[p] or self._init_state(p, group) for p in ps]
        # Non-contiguous parameters (rare: a transposed view registered as a parameter) step through
        # a contiguous copy that is written back.
        work = [p if p.is_contiguous() else p.contiguous() for p in ps]
        grads = [p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype) for p in ps]
        grads = [g.reshape(w.shape) if g.shape != w.shape else g for g, w in zip(grads, work)]
        momentum = [s["momentum"] for s in states]
        absmax = [s["absmax"] if "absmax" in s else self._no_absmax(device) for s in states]
        step = states[0]["step"] + 1
        # A new seed per step and group: the kernels mix in each tensor's index and element index.
        seed = ((int(group["seed"]) & _M32) * 0x9E3779B1 + step * 0x85EBCA77) & _M32
        F.lion8bit_step_(
            work,
            grads,
            momentum,
            absmax,
            lr,
            beta1,
            beta2,
            weight_decay,
            stochastic_rounding=bool(group["stochastic_rounding"]),
            seed=seed,
            use_fused=self.fused,
        )
        for p, w, s in zip(ps, work, states):
            if w is not p:
                p.copy_(w)
            s["step"] += 1


class Lion8bit(Lion):
    """Lion with 8-bit blockwise momentum (bitsandbytes-compatible update and code).

    State per parameter with at least ``min_8bit_size`` elements: ``momentum`` uint8 [numel] (codes
    of the signed dynamic map), ``absmax`` fp32 [ceil(numel / 256)], ``step``: 1.016 bytes per
    parameter. Smaller parameters keep fp32 ``momentum`` (as ``Lion``). Arguments as ``Lion``, plus
    ``min_8bit_size`` (per group).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        min_8bit_size: int = reference.LION8BIT_MIN_SIZE,
        stochastic_rounding: bool = False,
        seed: int = 0,
        fused: bool | None = None,
    ):
        if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
            raise ValueError(f"Lion8bit: min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self._min_8bit_size = min_8bit_size
        super().__init__(
            params, lr, betas, weight_decay, stochastic_rounding=stochastic_rounding, seed=seed, fused=fused
        )

    def _extra_defaults(self) -> dict:
        return {"min_8bit_size": self._min_8bit_size}

    def _quantized(self, p: torch.Tensor, group: dict) -> bool:
        return p.numel() >= group["min_8bit_size"]


def _hyper(name: str, group: dict) -> tuple[float, float, float, float]:
    """The group's (lr, beta1, beta2, weight_decay) as floats, or a ValueError naming the bad one."""
    lr = group["lr"]
    lr = float(lr.item() if torch.is_tensor(lr) else lr)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{name}: lr must be finite and >= 0, got {group['lr']}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (float(b) for b in betas)
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"{name}: betas[{i}] must be in [0, 1], got {b}")
    weight_decay = float(group["weight_decay"])
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{name}: weight_decay must be finite and >= 0, got {weight_decay}")
    return lr, beta1, beta2, weight_decay
