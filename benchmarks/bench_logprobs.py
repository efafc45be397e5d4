"""Log-probs and entropy from logits: TRL's log_softmax + gather and entropy_from_logits (eager),
torch.compile of them, and the fused one-pass op; forward and forward+backward.

Bars (issue 6): CPU, B=8, T=512, V=32000 fp32: fused forward >= 2x faster than eager and peak
extra memory below 5% of the logits' size (``extra_info["alloc_pct_of_logits"]``: every byte the
call allocates, from the profiler, an upper bound on its peak). GPU, B=16, T=2048, V=128000 bf16:
forward+backward >= 4x eager and no slower than torch.compile, peak extra memory under 10% of the
logits (``extra_info["peak_extra_mem_mb"]``; the gradient itself is logits-sized and counts).

    pytest benchmarks/bench_logprobs.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch
from _common import DEVICES, run_benchmark, shape_table

from ppo_fast import functional as F

SHAPES = shape_table(
    {
        "B2xT64xV32000": (2, 64, 32000, torch.float32, "cpu"),
        "B8xT512xV32000": (8, 512, 32000, torch.float32, "cpu"),
        "B4xT256xV152064": (4, 256, 152064, torch.float32, "cpu"),
        "B16xT2048xV128000": (16, 2048, 128000, torch.bfloat16, "cuda"),
        "B8xT1024xV32000": (8, 1024, 32000, torch.bfloat16, "cuda"),
    },
    smoke=["B2xT64xV32000"],
)
# Each shape belongs to one device (the bars' shapes); those of an absent device are not collected.
CASES = [name for name, spec in SHAPES.items() if spec[4] in DEVICES]


def _eager(logits, labels):
    # TRL 0.11: logprobs_from_logits (log_softmax + gather) and entropy_from_logits.
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprob = torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(2)
    pd = torch.softmax(logits.float(), dim=-1)
    entropy = torch.logsumexp(logits.float(), dim=-1) - torch.sum(pd * logits.float(), dim=-1)
    return logprob, entropy


@functools.cache
def _compiled():
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_eager)


def _fused(logits, labels):
    return F.logprobs_from_logits(logits, labels, return_entropy=True, validate=False, use_fused=True)


IMPLS = {"eager": _eager, "compiled": lambda *a: _compiled()(*a), "fused": _fused}


def _step(fn, backward: bool):
    def run(logits, labels):
        logprob, entropy = fn(logits, labels)
        if backward:
            return torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)
        return logprob, entropy

    return run


def _alloc_bytes(fn, args) -> int:
    """Every byte allocated during one call (CPU), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_logprobs(benchmark, pass_, shape, impl):
    B, T, V, dtype, device = SHAPES[shape]
    benchmark.group = f"logprobs-{pass_}-{device}-{shape}"
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(device, dtype).requires_grad_(pass_ == "fwd_bwd")
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    fn = _step(IMPLS[impl], pass_ == "fwd_bwd")
    rounds = 3 if device == "cpu" else (3 if impl == "eager" else 10)
    bytes_moved = logits.numel() * logits.element_size() * (3 if pass_ == "fwd_bwd" else 1)
    run_benchmark(
        benchmark, fn, (logits, labels), device, rounds=rounds, bytes_moved=bytes_moved, op=f"logprobs_{pass_}",
        impl=impl, B=B, T=T,
    )  # fmt: skip
    logits_bytes = logits.numel() * logits.element_size()
    if device == "cpu":
        alloc = _alloc_bytes(fn, (logits, labels))
        benchmark.extra_info["alloc_MB"] = alloc / 2**20
        benchmark.extra_info["alloc_pct_of_logits"] = 100 * alloc / logits_bytes
    else:
        benchmark.extra_info["peak_pct_of_logits"] = (
            100 * benchmark.extra_info["peak_extra_mem_mb"] * 2**20 / logits_bytes
        )
    if impl != "eager":  # the timed result must be right
        for got, want in zip(fn(logits, labels), _step(_eager, pass_ == "fwd_bwd")(logits, labels)):
            torch.testing.assert_close(
                got.float(), want.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3
            )
