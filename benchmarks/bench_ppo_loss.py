"""Clipped PPO loss: TRL's eager formula vs torch.compile of it vs the fused op, forward and
forward+backward, with all of the minibatch statistics in every case.

Bars (issue 3): CPU fused forward+backward >= 3x eager at B=64, T=1024; CUDA fused
forward+backward >= 3x eager and no slower than torch.compile at B=256, T=2048, with peak extra
memory no more than two [B, T] fp32 buffers (``extra_info["peak_extra_BT_fp32"]``).

    pytest benchmarks/bench_ppo_loss.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch
from _common import run_benchmark, shape_table

from ppo_fast import functional as F
from ppo_fast import reference

SHAPES = shape_table(
    {f"B{b}xT{t}": (b, t) for b, t in [(16, 512), (64, 1024), (256, 2048), (1024, 1024), (4096, 512)]},
    smoke=["B16xT512", "B64xT1024"],
)
KW = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, kl_coef=0.05, kl_estimator="k3")


def _inputs(B: int, T: int, device: str, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(B * 7919 + T)
    old = -torch.rand(B, T, generator=g) * 4
    logprobs = (old + 0.05 * torch.randn(B, T, generator=g)).to(device, dtype).requires_grad_()
    old_values = torch.randn(B, T, generator=g)
    vpreds = (old_values + 0.3 * torch.randn(B, T, generator=g)).to(device, dtype).requires_grad_()
    rest = [old, old_values, torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)]
    old, old_values, advantages, returns = (x.to(device, dtype) for x in rest)
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)).to(device)
    ref = (logprobs.detach() + 0.1 * torch.randn(B, T, generator=g).to(device, dtype)).contiguous()
    return logprobs, vpreds, old, old_values, advantages, returns, mask, ref


def _eager(lp, v, old, old_v, adv, ret, mask, ref):
    loss, stats, _ = reference.ppo_loss(lp, v, old, old_v, adv, ret, mask, ref, **KW)
    return loss, stats


@functools.cache
def _compiled():
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_eager)


def _fused(lp, v, old, old_v, adv, ret, mask, ref):
    loss, stats = F.ppo_loss(lp, v, old, old_v, adv, ret, mask, ref, use_fused=True, **KW)
    return loss, stats["_vector"]


IMPLS = {"eager": _eager, "compiled": lambda *a: _compiled()(*a), "fused": _fused}


def _step(fn, backward: bool):
    def run(*args):
        loss, stats = fn(*args)
        if backward:
            return torch.autograd.grad(loss, args[:2])
        return loss, stats

    return run


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_ppo_loss(benchmark, pass_, shape, impl, device):
    B, T = SHAPES[shape]
    benchmark.group = f"ppo_loss-{pass_}-{device}-{shape}"
    args = _inputs(B, T, device)
    backward = pass_ == "fwd_bwd"
    fn = _step(IMPLS[impl], backward)
    rounds = 5 if impl == "eager" and device == "cpu" else (50 if device == "cuda" else 10)
    # Minimum traffic: read the 7 [B, T] inputs and the mask (and again in the backward), write 2 grads.
    n, es = B * T, args[0].element_size()
    bytes_moved = n * (7 * es + 1) * (2 if backward else 1) + (2 * n * es if backward else 0)
    run_benchmark(
        benchmark, fn, args, device, rounds=rounds, bytes_moved=bytes_moved, op=f"ppo_loss_{pass_}", impl=impl, B=B, T=T
    )
    if device == "cuda":
        benchmark.extra_info["peak_extra_BT_fp32"] = benchmark.extra_info["peak_extra_mem_mb"] * 2**20 / (4 * n)
    # The timed results must be right: compare with the eager formula once.
    if impl != "eager":
        for got, want in zip(fn(*args), _step(_eager, backward)(*args)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
