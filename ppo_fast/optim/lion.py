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

Non-finite gradients: an element whose gradient is NaN or +-inf leaves its parameter and its momentum
untouched for that step (no weight decay either), and a block's absmax is the max over its finite
momentum values only, so the other elements of the block step normally and nothing is poisoned (in
8 bits one NaN would otherwise make its block's absmax NaN and freeze all 256 of its parameters for
good). Both optimizers, fused and eager, follow this rule; nothing is counted and nothing synchronises
the host. A NaN or inf parameter is stepped like any other, so it stays visible.

``step()`` checks every group (hyperparameters, gradients, state) before any group steps, and
``load_state_dict`` checks the whole state it is given (keys, shapes, dtypes, finite values) before
anything changes: a bad one raises and leaves the optimizer as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ppo_fast import functional, reference
from ppo_fast._checks import check_lion8bit_step

__all__ = ["Lion", "Lion8bit"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_M32 = 0xFFFFFFFF
_GROUP_KEYS = ("lr", "betas", "weight_decay", "stochastic_rounding", "seed")  # what step() reads from a group


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

    An element whose gradient is NaN or +-inf keeps its parameter and momentum for that step (no
    weight decay either); the rest of the tensor steps normally.
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
        self.fused = functional.resolve_fused(fused, type(self).__name__, "fused")
        super().__init__(params, defaults)
        self._empty: dict[torch.device, torch.Tensor] = {}

    # -- state -----------------------------------------------------------------------------------

    def _extra_defaults(self) -> dict:
        return {}

    def _quantized(self, p: torch.Tensor, group: dict) -> bool:
        return False

    def _new_state(self, p: torch.Tensor, group: dict) -> dict:
        """The state of a parameter's first step (not yet in ``self.state``)."""
        n = p.numel()
        if self._quantized(p, group):
            return {
                "momentum": torch.full((n,), reference.LION8BIT_ZERO_CODE, dtype=torch.uint8, device=p.device),
                "absmax": torch.zeros(-(-n // reference.LION8BIT_BLOCK), dtype=torch.float32, device=p.device),
                "step": 0,
            }
        return {"momentum": torch.zeros(p.shape, dtype=torch.float32, device=p.device), "step": 0}

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
        parameter's device, so a checkpoint saved on one device loads onto another.

        Everything is checked before anything changes: the groups (sizes, hyperparameters) and, per
        parameter, exactly the keys ``momentum`` and ``step`` (plus ``absmax`` for 8-bit state), the
        momentum's dtype and shape (uint8 [numel] for 8-bit state, fp32 of the parameter's shape
        otherwise), an fp32 absmax with one entry per 256 elements, finite and >= 0 (0 is an
        all-zero block), a finite fp32 momentum and an int step >= 0. A bad state raises a
        ValueError naming the parameter's index and the key, and the optimizer keeps its state.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{where}: the state dict has {len(saved_groups)} parameter groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        id_map, group_of = {}, {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{where}: param_groups[{i}] has {len(saved['params'])} parameters in the state dict, "
                    f"{len(group['params'])} in the optimizer"
                )
            merged = {**saved, "params": group["params"]}  # what Optimizer.load_state_dict installs
            missing = [k for k in (*_GROUP_KEYS, *self._extra_defaults()) if k not in merged]
            if missing:
                raise ValueError(f"{where}: param_groups[{i}] lacks {', '.join(map(repr, missing))}")
            self._check_group(f"{where}: param_groups[{i}]", merged)
            for key, p in zip(saved["params"], group["params"]):
                id_map[key], group_of[key] = p, merged
        loaded = {}
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"{where}: state for parameter {key!r}, which no parameter group holds")
            p = id_map[key]
            self._check_saved_state(f"{where}: parameter {key}", p, group_of[key], saved)
            loaded[p] = {
                k: v.to(device=p.device, copy=True).contiguous() if torch.is_tensor(v) else v for k, v in saved.items()
            }
        super().load_state_dict(state_dict)
        for p, state in loaded.items():
            self.state[p] = state

    def _check_group(self, where: str, group: dict) -> None:
        _hyper(where, group)

    def _check_saved_state(self, where: str, p: torch.Tensor, group: dict, saved: Any) -> None:
        """Raises a ValueError (``where`` names the parameter) unless ``saved`` is a state this
        optimizer could have written for ``p`` under ``group``."""
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: the state must be a dict, got {type(saved).__name__}")
        n = p.numel()
        quantized = self._quantized(p, group)
        want = {"momentum", "step", "absmax"} if quantized else {"momentum", "step"}
        for k in sorted(want - saved.keys()):
            raise ValueError(f"{where}: {k!r} is missing ({'8-bit' if quantized else 'fp32'} state)")
        for k in sorted(saved.keys() - want, key=str):
            raise ValueError(f"{where}: unexpected key {k!r} ({'8-bit' if quantized else 'fp32'} state)")
        step = saved["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: 'step' must be an int >= 0, got {step!r}")
        m = saved["momentum"]
        m_dtype, m_shape = (torch.uint8, (n,)) if quantized else (torch.float32, tuple(p.shape))
        if not torch.is_tensor(m) or m.dtype != m_dtype or tuple(m.shape) != m_shape:
            got = f"{m.dtype} {list(m.shape)}" if torch.is_tensor(m) else type(m).__name__
            raise ValueError(f"{where}: 'momentum' must be {m_dtype} of shape {list(m_shape)}, got {got}")
        if not quantized and not bool(torch.isfinite(m).all()):
            raise ValueError(f"{where}: 'momentum' has non-finite values")
        if quantized:
            a, nb = saved["absmax"], -(-n // reference.LION8BIT_BLOCK)
            if not torch.is_tensor(a) or a.dtype != torch.float32 or tuple(a.shape) != (nb,):
                got = f"{a.dtype} {list(a.shape)}" if torch.is_tensor(a) else type(a).__name__
                raise ValueError(
                    f"{where}: 'absmax' must be torch.float32 of shape [{nb}] (one per 256 of {n} elements), got {got}"
                )
            # 0 is what the quantiser writes for an all-zero block (and the initial state).
            if not bool((torch.isfinite(a) & (a >= 0)).all()):
                raise ValueError(f"{where}: 'absmax' must be finite and >= 0")

    # -- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One Lion step for every parameter with a gradient (``grad=None`` is skipped). Every group
        is checked (hyperparameters, gradients, state, devices) before any parameter or state
        changes, so a bad group raises without leaving an earlier one stepped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        plans = []
        for group in self.param_groups:
            hyper = _hyper(name, group)
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if p.dtype not in _DTYPES:
                    raise TypeError(f"{name}: parameters must be float32, bfloat16 or float16, got {p.dtype}")
                if p.grad.numel() != p.numel():
                    raise RuntimeError(f"{name}: a gradient has {p.grad.numel()} elements, its parameter {p.numel()}")
                by_device.setdefault(p.device, []).append(p)
            plans += [self._plan(group, ps, hyper) for ps in by_device.values()]
        for plan in plans:
            self._run(plan)
        return loss

    def _plan(self, group, ps, hyper) -> tuple:
        """One (group, device) call, prepared and checked; nothing is written yet."""
        states = [self.state.get(p) or self._new_state(p, group) for p in ps]
        # Non-contiguous parameters (rare: a transposed view registered as a parameter) step through
        # a contiguous copy that is written back.
        work = [p if p.is_contiguous() else p.contiguous() for p in ps]
        grads = [p.grad.detach() if p.grad.dtype == p.dtype else p.grad.detach().to(p.dtype) for p in ps]
        grads = [g.reshape(w.shape) if g.shape != w.shape else g for g, w in zip(grads, work)]
        momentum = [s["momentum"] for s in states]
        absmax = [s["absmax"] if "absmax" in s else self._no_absmax(ps[0].device) for s in states]
        check_lion8bit_step(work, grads, momentum, absmax, *hyper)  # every group, before any steps
        step = states[0]["step"] + 1
        # A new seed per step and group: the kernels mix in each tensor's index and element index.
        seed = ((int(group["seed"]) & _M32) * 0x9E3779B1 + step * 0x85EBCA77) & _M32
        return ps, states, work, grads, momentum, absmax, hyper, bool(group["stochastic_rounding"]), seed

    def _run(self, plan) -> None:
        ps, states, work, grads, momentum, absmax, (lr, beta1, beta2, weight_decay), stochastic, seed = plan
        # Checked in _plan: the op itself, not functional.lion8bit_step_, which would check the lists again.
        step_ = functional.backend(self.fused).lion8bit_step_
        step_(work, grads, momentum, absmax, lr, beta1, beta2, weight_decay, stochastic, seed)
        for p, w, s in zip(ps, work, states):
            if w is not p:
                p.copy_(w)
            s["step"] += 1
            self.state[p] = s


class Lion8bit(Lion):
    """Lion with 8-bit blockwise momentum (bitsandbytes-compatible update and code).

    State per parameter with at least ``min_8bit_size`` elements: ``momentum`` uint8 [numel] (codes
    of the signed dynamic map), ``absmax`` fp32 [ceil(numel / 256)], ``step``: 1.016 bytes per
    parameter. Smaller parameters keep fp32 ``momentum`` (as ``Lion``). Arguments as ``Lion``, plus
    ``min_8bit_size`` (per group).

    An element whose gradient is NaN or +-inf keeps its parameter and momentum for that step (no
    weight decay either), and each block's absmax is taken over its finite momentum values: the
    other 255 elements of the block step normally.
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

    def _check_group(self, where: str, group: dict) -> None:
        super()._check_group(where, group)
        size = group["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got {size!r}")


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
