"""One Lion optimizer step over a model-like list of tensors: eager fp32 Lion (``ppo_fast.optim.Lion``
with ``fused=False``: the reference's torch ops, tensor by tensor) vs ``torch.compile`` of that
update vs bitsandbytes' ``Lion8bit`` vs the fused ``ppo_fast.optim.Lion8bit`` (one op call, one CUDA
launch, for the whole list); ``fused_fp32`` is ``ppo_fast.optim.Lion`` (fp32 state, same op).

Bars (issue 5): CPU fused Lion8bit >= 2x eager fp32 Lion at 10M and 100M parameters; GPU fused
Lion8bit no slower than bitsandbytes' and >= 60% of copy bandwidth over the bytes the step must move
(read p, g and codes, write p and codes: 3 x 4 + 2 B per fp32 parameter, plus the absmax).

    pytest benchmarks/bench_lion.py --benchmark-only --benchmark-columns=median,rounds
    python benchmarks/bench_lion.py OUT/bench_lion.json   # the medians as a table (gpu_check.sh)
"""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch
from _common import run_benchmark, shape_table

from ppo_fast.optim import Lion, Lion8bit

# Model-like layouts: N matrices of 1M parameters (not a multiple of the 256-element block) and 16
# biases of 1000 (under 4096: fp32 state in Lion8bit).
SHAPES = shape_table({"1M": 1, "10M": 10, "100M": 100}, smoke=["1M"])
LR, BETAS, WD = 1e-4, (0.9, 0.99), 0.01


def _sizes(n_matrices: int) -> list[int]:
    return [1_000_000] * n_matrices + [1000] * 16


@functools.cache
def _compiled_update():
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def update(p, g, m):
        # bitsandbytes' order, decoupled weight decay; fp32 state.
        p.mul_(1 - LR * WD)
        c = m * BETAS[0] + g * (1 - BETAS[0])
        p.sub_(LR * torch.sign(c))
        m.mul_(BETAS[1]).add_(g * (1 - BETAS[1]))

    return torch.compile(update, dynamic=False)


class CompiledLion:
    """fp32 Lion whose per-tensor update is torch.compile'd (one fused kernel per tensor shape)."""

    def __init__(self, params):
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        fn = _compiled_update()
        for p, m in zip(self.params, self.m):
            fn(p, p.grad, m)


def _make(impl: str, params):
    if impl == "eager":
        return Lion(params, lr=LR, betas=BETAS, weight_decay=WD, fused=False)
    if impl == "compiled":
        return CompiledLion(params)
    if impl == "bnb":
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.Lion8bit(params, lr=LR, betas=BETAS, weight_decay=WD, min_8bit_size=4096)
    if impl == "fused_fp32":
        return Lion(params, lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    return Lion8bit(params, lr=LR, betas=BETAS, weight_decay=WD, fused=True)


IMPLS = ["eager", "compiled", "bnb", "fused", "fused_fp32"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lion_step(benchmark, shape, impl, device):
    sizes = _sizes(SHAPES[shape])
    benchmark.group = f"lion_step-{device}-{shape}"
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(device)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt = _make(impl, params)
    n = sum(sizes)
    big = sum(s for s in sizes if s >= 4096)
    eight_bit = impl in ("bnb", "fused")
    # Minimum traffic: read p and g, write p; momentum read + written (1 B codes + absmax, or 4 B).
    state_rw = 2 * (big + 4 * -(-big // 256) + 4 * (n - big)) if eight_bit else 8 * n
    bytes_moved = 12 * n + state_rw
    rounds = 2 if device == "cpu" and SHAPES[shape] >= 100 else (5 if device == "cpu" else 30)
    run_benchmark(
        benchmark,
        opt.step,
        (),
        device,
        rounds=rounds,
        bytes_moved=bytes_moved,
        op="lion_step",
        impl=impl,
        shape=shape,
        params=n,
    )
    state = getattr(opt, "state", {})
    held = sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))
    if impl == "compiled":
        held = sum(m.numel() * m.element_size() for m in opt.m)
    benchmark.extra_info["state_bytes_per_param"] = held / n
    benchmark.extra_info["state_bytes_per_param_8bit_tensors"] = (
        sum(
            v.numel() * v.element_size()
            for p, s in state.items()
            if p.numel() >= 4096
            for v in s.values()
            if torch.is_tensor(v)
        )
        / big
        if state
        else None
    )


def _table(path: str) -> None:
    """Medians per device and shape for every impl, with the fused speed-ups."""
    rows: dict = {}
    for b in json.load(open(path))["benchmarks"]:
        info = b["extra_info"]
        rows.setdefault(b["group"], {})[info["impl"]] = (b["stats"]["median"], info)
    print(f"{'group':<26}" + "".join(f"{i + ' ms':>14}" for i in IMPLS) + f"{'x eager':>9}{'x bnb':>7}{'GB/s':>8}")
    for group, impls in rows.items():
        med = {k: v[0] for k, v in impls.items()}
        line = f"{group:<26}" + "".join(f"{med[i] * 1e3:>14.3f}" if i in med else f"{'-':>14}" for i in IMPLS)
        f = med.get("fused")
        line += f"{med['eager'] / f:>9.2f}" if f and "eager" in med else f"{'-':>9}"
        line += f"{med['bnb'] / f:>7.2f}" if f and "bnb" in med else f"{'-':>7}"
        gbps = impls.get("fused", (0, {}))[1].get("GB/s")
        line += f"{gbps:>8.0f}" if gbps else f"{'-':>8}"
        print(line)


if __name__ == "__main__":
    _table(sys.argv[1])
