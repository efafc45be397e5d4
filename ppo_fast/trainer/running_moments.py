"""Running moments of rewards for score scaling, normalisation and clipping (TRL's
``RunningMoments``, done properly).

State lives on the device as one float64 buffer ``(count, mean, M2, rejected)``, so it follows
``.to(device)`` and saves and loads with ``state_dict``. Batches merge with Chan's parallel formula
(no cancellation for scores far from zero). Across processes each update gathers every rank's batch
moments once and merges them in rank order, so all ranks hold bit-identical state. The running std
is Bessel-corrected, and 1 until two samples were seen (TRL's is infinite then) or while it is at
most ``eps`` (equal scores: TRL divides them by eps, 8.4e6 x for float32), and a batch holding
NaN or inf is either refused with an error naming its positions (``validate=True``, one host
synchronisation) or, without validation, skipped on the device and counted in ``rejected``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ppo_fast import functional as F
from ppo_fast._checks import check_moments_normalize, check_moments_x
from ppo_fast.reference import MOMENTS_EPS, running_var

__all__ = ["RunningMoments"]


class RunningMoments(nn.Module):
    """Running mean and std of everything passed to ``update``, for all processes together.

    Args:
        accelerator: an ``accelerate.Accelerator``; with several processes, batch moments are
            gathered through it. Or pass ``process_group`` (a ``torch.distributed`` group) instead.
        process_group: the group to gather over when no accelerator is given (default: the world,
            when ``torch.distributed`` is initialised).
        eps: added to the std before dividing (float32 machine epsilon, as TRL for fp32 scores); a
            std at most eps is taken as 1.
        device: where the state lives (moved later with ``.to``).
    """

    def __init__(self, accelerator=None, process_group=None, eps: float = MOMENTS_EPS, device=None):
        super().__init__()
        if not (eps >= 0 and eps < float("inf")):
            raise ValueError(f"RunningMoments: eps must be finite and >= 0, got {eps}")
        self.register_buffer("state", torch.zeros(4, dtype=torch.float64, device=device))
        self.accelerator = accelerator
        self.process_group = process_group
        self.eps = float(eps)

    # -- the state, as 0-d device tensors (no synchronisation) --------------------------------
    @property
    def count(self) -> torch.Tensor:
        return self.state[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.state[1]

    @property
    def var(self) -> torch.Tensor:
        """Bessel-corrected running variance; 1 below two samples or when the std is at most eps."""
        return running_var(self.state, self.eps)

    @property
    def std(self) -> torch.Tensor:
        """The running std that ``normalize`` divides by (plus eps); 1 below two samples or when at most eps."""
        return running_var(self.state, self.eps).sqrt()

    @property
    def rejected(self) -> torch.Tensor:
        """How many updates were skipped because their batch held NaN or inf."""
        return self.state[3]

    # -- updates ---------------------------------------------------------------------------------
    def _world_size(self) -> int:
        if self.accelerator is not None:
            return self.accelerator.num_processes
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _gather(self, batch: torch.Tensor) -> torch.Tensor:
        """[W, 4]: every rank's batch moments, in rank order (one collective)."""
        if self.accelerator is not None:
            return self.accelerator.gather(batch[None])
        out = [torch.empty_like(batch) for _ in range(self._world_size())]
        dist.all_gather(out, batch, group=self.process_group)
        return torch.stack(out)

    def _apply(self, fn, recurse=True):
        # Module-wide casts (.half(), .to(torch.bfloat16), a parent's .float()) must not touch the
        # fp64 state: keep its bits and follow only the device move.
        state = self._buffers["state"]
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float64, device=state.device)).device
        self._buffers["state"] = state.to(device)
        return self

    def _check(
        self, x: torch.Tensor, mask: torch.Tensor | None, validate: bool, name: str, op: str, clip: float | None = None
    ) -> None:
        """Every check of a call, before anything runs: the ops are then called unchecked
        (``functional.backend``; their C++ checks stay as the last line)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RunningMoments.{name}: x must be a tensor, got {type(x).__name__}")
        check_moments_x(op, x, mask)  # shapes first: validation below indexes with the mask
        if op != "moments":
            check_moments_normalize(op, None if clip is None else float(clip), self.eps)
        if x.device != self.state.device:
            raise ValueError(
                f"RunningMoments.{name}: x is on {x.device} but the state is on {self.state.device}; "
                "move the module with .to(device)"
            )
        if validate:
            bad = ~torch.isfinite(x.detach())
            if mask is not None:
                bad &= mask != 0
            if bad.any():
                where = bad.nonzero().tolist()
                shown = ", ".join(str(tuple(p) if len(p) > 1 else p[0]) for p in where[:8])
                more = f" and {len(where) - 8} more" if len(where) > 8 else ""
                raise ValueError(
                    f"RunningMoments.{name}: x holds NaN or inf at {shown}{more}; the running moments were not updated"
                )

    @staticmethod
    def _mean_std(batch: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (``reference.running_var``'s rule: 1 below two samples or at most eps), fp32."""
        return batch[1].float(), running_var(batch, eps).sqrt().float()

    @staticmethod
    def _combine(batches: torch.Tensor) -> torch.Tensor:
        """All ranks' batches as one (for the returned batch mean and std)."""
        total = torch.zeros(4, dtype=torch.float64, device=batches.device)
        finite_only = batches.clone()
        finite_only[:, 3] = 0  # merge regardless; the non-finite count is carried over below
        F.backend().moments_merge_(total, finite_only)
        total[3] = batches[:, 3].sum()
        return total

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, validate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge ``x`` (any shape; ``mask`` selects entries) into the running moments. Returns the
        batch's mean and Bessel-corrected std over all processes, as 0-d fp32 tensors (TRL returns
        Python floats, which cost a synchronisation each)."""
        self._check(x, mask, validate, "update", "moments")
        ops = F.backend()
        batch = ops.moments(x.detach(), mask)
        batches = self._gather(batch) if self._world_size() > 1 else batch[None]
        ops.moments_merge_(self.state, batches)
        return self._mean_std(self._combine(batches) if len(batches) > 1 else batch, self.eps)

    @torch.no_grad()
    def normalize(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        scale: bool = True,
        center: bool = False,
        clip: float | None = None,
    ) -> torch.Tensor:
        """``x / (std + eps)`` (``scale``), centred on the running mean first (``center``), then
        clipped to ``[-clip, clip]``; entries where ``mask`` is zero pass through. x's dtype."""
        self._check(x, mask, False, "normalize", "moments_normalize", clip)
        return self._normalize(x, mask, scale, center, clip)

    def _normalize(self, x, mask, scale, center, clip) -> torch.Tensor:
        clip = None if clip is None else float(clip)
        return F.backend().moments_normalize(x.detach(), mask, self.state, bool(scale), bool(center), clip, self.eps)

    @torch.no_grad()
    def update_normalize(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        scale: bool = True,
        center: bool = False,
        clip: float | None = None,
        validate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` then ``normalize``: score scaling, normalisation and clipping in one call (one
        process on CUDA: two launches, and no synchronisation with ``validate=False``). Returns
        ``(normalised x, batch moments)``: the batch's float64 ``(count, mean, M2, non-finite)``,
        over all processes; ``batch_mean_std`` turns it into TRL's batch mean and std when they are
        logged (computing them here would cost launches on every step)."""
        self._check(x, mask, validate, "update_normalize", "moments_update_normalize_", clip)
        ops = F.backend()
        if self._world_size() > 1:
            batch = ops.moments(x.detach(), mask)
            batches = self._gather(batch)
            ops.moments_merge_(self.state, batches)
            return self._normalize(x, mask, scale, center, clip), self._combine(batches)
        clip = None if clip is None else float(clip)
        return ops.moments_update_normalize_(self.state, x.detach(), mask, bool(scale), bool(center), clip, self.eps)

    @staticmethod
    def batch_mean_std(batch: torch.Tensor, eps: float = MOMENTS_EPS) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's batch mean and Bessel-corrected std from batch moments, as 0-d fp32 tensors; the std
        is 1 below two samples or when at most ``eps`` (pass the module's ``eps`` if not the default),
        as the running std is."""
        return RunningMoments._mean_std(batch, eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
