"""Rollout post-processing: TRL's eager reversed loop vs torch.compile vs the fused op.

Two ops: ``gae`` (raw advantages and returns, one pass) and ``compute_advantages`` (TRL's whole
call: GAE, returns, masked whitening). ``compiled`` is ``torch.compile`` of the reference written
as a log-depth scan (``reference.gae_scan``): compiling TRL's loop itself unrolls it T times.

Bars (issue 2): CPU fused >= 20x the eager loop at B=64, T=1024; CUDA fused >= 100x the eager
loop at B=256, T=1024, and at B=4096, T=4096 at least half the card's copy bandwidth counting
the bytes the op must move (read values, rewards, mask; write advantages, returns).

    pytest benchmarks/bench_gae.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch
from _common import run_benchmark, shape_table

from ppo_fast import functional as F
from ppo_fast import reference

SHAPES = shape_table(
    {
        f"B{b}xT{t}": (b, t)
        for b, t in [(16, 128), (16, 1024), (16, 4096), (64, 1024), (256, 128), (256, 1024), (256, 4096)]
        + [(4096, 128), (4096, 1024), (4096, 4096)]
    },
    smoke=["B16xT128", "B64xT1024"],
)
GAMMA, LAM = 1.0, 0.95


def _inputs(B: int, T: int, device: str, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(B * 100003 + T)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    rewards = torch.randn(B, T, generator=g, dtype=dtype) * 0.1
    # right-padded responses of random length, at least one token each
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return values.to(device), rewards.to(device), mask.to(device)


def _compute_advantages_scan(values, rewards, mask):
    adv, ret = reference.gae_scan(values, rewards, mask, GAMMA, LAM)
    return reference.masked_whiten(adv, mask), ret


@functools.cache
def _compiled(op: str):
    fn = (lambda v, r, m: reference.gae_scan(v, r, m, GAMMA, LAM)) if op == "gae" else _compute_advantages_scan
    # Automatic dynamic shapes: one graph serves many B; the scan's depth still specialises on T.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn)


def _impl(op: str, impl: str):
    if impl == "eager":
        if op == "gae":
            return lambda v, r, m: reference.gae(v, r, m, GAMMA, LAM)
        return lambda v, r, m: reference.compute_advantages(v, r, m, GAMMA, LAM)
    if impl == "compiled":
        return _compiled(op)
    if op == "gae":
        return lambda v, r, m: F.gae(v, r, m, GAMMA, LAM, use_fused=True)
    return lambda v, r, m: F.compute_advantages(v, r, m, GAMMA, LAM, use_fused=True)


@pytest.mark.parametrize("impl", ["eager", "compiled", "fused"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["gae", "compute_advantages"])
def test_gae(benchmark, op, shape, impl, device):
    B, T = SHAPES[shape]
    benchmark.group = f"{op}-{device}-{shape}"
    v, r, m = _inputs(B, T, device)
    fn = _impl(op, impl)
    # The eager loop launches ~10 ops per token: few rounds keep the large shapes affordable.
    rounds = 3 if impl == "eager" else (50 if device == "cuda" else 10)
    # The minimum traffic: read values, rewards, mask; write advantages and returns.
    bytes_moved = B * T * (4 * v.element_size() + m.element_size())
    run_benchmark(benchmark, fn, (v, r, m), device, rounds=rounds, bytes_moved=bytes_moved, op=op, impl=impl, B=B, T=T)
    # The timed result must be right: compare with the eager loop once.
    if impl != "eager":
        want = _impl(op, "eager")(v, r, m)
        got = fn(v, r, m)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)
