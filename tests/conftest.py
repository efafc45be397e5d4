"""Shared fixtures: the ``device`` fixture (cpu always, cuda when present) and seeded random inputs."""

from __future__ import annotations

import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` by hand (GPU-only tests) are skipped where no GPU is present; the cuda
    # parameters of the `device` fixture only exist where one is.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def _device_params():
    params = [pytest.param("cpu", id="cpu")]
    if HAS_CUDA:
        params.append(pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"))
    return params


@pytest.fixture(params=_device_params())
def device(request) -> torch.device:
    return torch.device(request.param)


class Rand:
    """Random inputs from one ``torch.Generator``, seeded per test (from its node id), so every test
    sees the same numbers on every run and on every device: tensors are drawn on the CPU, then moved."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def _out(self, x: torch.Tensor, dtype, device) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    def randn(self, *shape, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
        return self._out(torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale, dtype, device)

    def uniform(self, *shape, low=0.0, high=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
        x = torch.rand(*shape, generator=self.gen, dtype=torch.float64) * (high - low) + low
        return self._out(x, dtype, device)

    def randint(self, low: int, high: int, shape=()) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen)

    def lengths(self, B: int, T: int, min_len: int = 1) -> torch.Tensor:
        """Row lengths in [min_len, T]; the first row is full so the batch spans T."""
        lens = self.randint(min(min_len, T), T + 1, (B,))
        lens[0] = T
        return lens

    def mask(self, B: int, T: int, kind: str = "right", dtype=torch.bool, device="cpu") -> torch.Tensor:
        """A [B, T] response mask (1 on response tokens).

        ones: every position; right: right padding (rows of random length >= 1); left: left
        padding; gaps: right padding plus masked positions inside each response (multi-turn
        observations); masked_row: right padding with row 0 fully masked (the whole batch when
        B = 1); none: nothing unmasked; random: independent Bernoulli(0.7) positions.
        """
        pos = torch.arange(T)
        if kind == "ones":
            m = torch.ones(B, T, dtype=torch.bool)
        elif kind == "none":
            m = torch.zeros(B, T, dtype=torch.bool)
        elif kind == "random":
            m = torch.rand(B, T, generator=self.gen) < 0.7
        elif kind in ("right", "masked_row"):
            m = pos[None, :] < self.lengths(B, T)[:, None]
            if kind == "masked_row":
                m[0] = False
        elif kind == "left":
            m = pos[None, :] >= (T - self.lengths(B, T))[:, None]
        elif kind == "gaps":
            lens = self.lengths(B, T, min_len=min(3, T))
            m = pos[None, :] < lens[:, None]
            holes = torch.rand(B, T, generator=self.gen) < 0.3
            inner = (pos[None, :] > 0) & (pos[None, :] < lens[:, None] - 1)
            m &= ~(holes & inner)
        else:
            raise ValueError(kind)
        return m.to(device=device, dtype=dtype)

    def rollout(self, B: int, T: int, dtype=torch.float32, device="cpu", mask_kind: str = "right", scores_dtype=None):
        """Inputs of ``rollout_advantages``: scores [B], logprobs/ref_logprobs/values [B, T], mask [B, T]."""
        logprobs = -self.uniform(B, T, low=0.0, high=4.0, dtype=torch.float64)
        ref_logprobs = logprobs + self.randn(B, T, dtype=torch.float64, scale=0.3)
        return dict(
            scores=self.randn(B, dtype=scores_dtype or dtype, device=device, scale=2.0),
            logprobs=logprobs.to(device=device, dtype=dtype),
            ref_logprobs=ref_logprobs.to(device=device, dtype=dtype),
            values=self.randn(B, T, dtype=dtype, device=device),
            mask=self.mask(B, T, mask_kind, device=device),
        )


@pytest.fixture
def rand(request) -> Rand:
    return Rand(zlib.crc32(request.node.nodeid.encode()))
