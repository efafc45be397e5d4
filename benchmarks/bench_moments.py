"""Score scaling + normalisation + clipping with running moments: TRL 0.11's code path (its
RunningMoments.update with four .item() calls, then scale, centre and clip) vs torch.compile of the
reference vs the fused ops through ``ppo_fast.RunningMoments.update_normalize``.

Bars (issue 4): on CPU the fused path at least 3x faster than TRL's at B=512; on the GPU one
update + normalise + clip is at most 2 kernel launches and never syncs the host (asserted in
tests/ops/test_moments.py, not here).

    pytest benchmarks/bench_moments.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch
from _common import run_benchmark, shape_table

from ppo_fast import RunningMoments, reference

SHAPES = shape_table(
    {"B64": (64,), "B512": (512,), "B4096": (4096,), "B256xT1024": (256, 1024)},
    smoke=["B64", "B256xT1024"],
)
CLIP = 0.5


class TRLRunningMoments:
    """TRL 0.11's RunningMoments, as written there (float state, .item() per update)."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).float().sqrt().item()


def _trl_path(scores: torch.Tensor, running: TRLRunningMoments) -> torch.Tensor:
    # PPOTrainer.step with use_score_scaling, use_score_norm and score_clip (the float .to() that
    # crashes TRL 0.10/0.11 replaced by a tensor).
    running.update(scores)
    kw = dict(dtype=scores.dtype, device=scores.device)
    factor = torch.tensor(running.std, **kw) + torch.finfo(scores.dtype).eps
    scores = (scores - torch.tensor(running.mean, **kw)) / factor
    return torch.clip(scores.float(), -CLIP, CLIP).to(scores.dtype)


def _reference_path(scores: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return reference.moments_update_normalize_(state, scores, None, True, True, CLIP)[0]


@functools.cache
def _compiled():
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_reference_path)


def _impl(impl: str, device: str):
    if impl == "eager":
        running = TRLRunningMoments()
        return lambda x: _trl_path(x, running)
    if impl == "compiled":
        state = torch.zeros(4, dtype=torch.float64, device=device)
        return lambda x: _compiled()(x, state)
    running = RunningMoments(device=device)
    return lambda x: running.update_normalize(x, center=True, clip=CLIP, validate=False)[0]


@pytest.mark.parametrize("impl", ["eager", "compiled", "fused"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moments(benchmark, shape, impl, device):
    benchmark.group = f"moments-{device}-{shape}"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPES[shape], generator=g) * 3 + 1).to(device)
    fn = _impl(impl, device)
    n = x.numel()
    run_benchmark(
        benchmark, fn, (x,), device, rounds=50, bytes_moved=n * 2 * x.element_size(), op="moments_update_normalize",
        impl=impl, B=SHAPES[shape][0], T=SHAPES[shape][1] if len(SHAPES[shape]) > 1 else 1,
    )  # fmt: skip
    # Same statistics as TRL's path after the same updates (its fp32 state vs our fp64 one).
    want = _impl("eager", device)
    for _ in range(3):
        expected = want(x)
    got_fn = _impl(impl, device)
    for _ in range(3):
        got = got_fn(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
