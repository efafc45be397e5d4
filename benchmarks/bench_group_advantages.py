"""Value-free group advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++ baseline): the eager reference vs
torch.compile of it vs the fused op, at N = 1k and 64k scores in groups of 8 (and 64k in groups of 64).

On CUDA the fused op is one launch with no host synchronisation (asserted in
tests/ops/test_group_advantages.py, not here); at these sizes it is launch-bound, and the eager
reference's half-dozen small kernels are what it saves.

    pytest benchmarks/bench_group_advantages.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch
from _common import run_benchmark, shape_table

from ppo_fast import functional as F
from ppo_fast import reference

SHAPES = shape_table({"N1k-G8": (1024, 8), "N64k-G8": (65536, 8), "N64k-G64": (65536, 64)}, smoke=["N1k-G8"])
ESTIMATORS = ("grpo", "rloo")


@functools.cache
def _compiled():
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(reference.group_advantages)


def _impl(impl: str, n: int, estimator: str):
    if impl == "eager":
        return lambda s: reference.group_advantages(s, n, estimator)
    if impl == "compiled":
        return lambda s: _compiled()(s, n, estimator)
    return lambda s: F.group_advantages(s, n, estimator, validate=False, use_fused=True)


@pytest.mark.parametrize("impl", ["eager", "compiled", "fused"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_advantages(benchmark, estimator, shape, impl, device):
    N, n = SHAPES[shape]
    benchmark.group = f"group_advantages-{estimator}-{device}-{shape}"
    g = torch.Generator().manual_seed(N + n)
    scores = (torch.randn(N, generator=g) * 2 + 0.5).to(device)
    fn = _impl(impl, n, estimator)
    rounds = 50 if device == "cuda" else 20
    # Read the scores, write fp32 advantages.
    run_benchmark(
        benchmark, fn, (scores,), device, rounds=rounds, bytes_moved=N * (scores.element_size() + 4),
        op="group_advantages", impl=impl, N=N, group_size=n, estimator=estimator,
    )  # fmt: skip
    torch.testing.assert_close(fn(scores), reference.group_advantages(scores, n, estimator), rtol=1e-5, atol=1e-5)
