"""Log-probs and entropy straight from the LM head's inputs: eager (``log_softmax(h @ W.T)`` + gather +
entropy on the whole [N, V] logits, as TRL computes them from a model's output), ``torch.compile`` of
it, a chunk loop in Python (each chunk's head and log-softmax under ``torch.utils.checkpoint``, so
its logits are recomputed in the backward, as the fused op does) and the fused op
(``functional.linear_logprobs``); forward and forward+backward.

``extra_info``: peak memory above what the process held before the call (CPU: ``peak_rss_mb``, the
resident set's high-water mark, VmHWM, reset before the call; CUDA: ``peak_extra_mem_mb`` from
``torch.cuda.max_memory_allocated``) and as a share of the fp32 logits (``peak_pct_of_fp32_logits``);
the GEMM rate achieved, counting the GEMMs the implementation runs (forward 2NVH; forward+backward
6NVH, plus 2NVH for the recomputing ones: ``GFLOP/s``), the useful 2NVH / 6NVH alone
(``useful_GFLOP/s``), and the rate of one plain [N, H] x [H, V] GEMM on the same device
(``mm_GFLOP/s``): the physical bound.

Bars: CPU, N = 8192, H = 256, V = 32000 fp32: forward+backward extra peak memory below 25% of the fp32
logits (1.05 GB), and forward+backward no slower than eager in process CPU time
(``test_cpu_time_ratio``: the two alternate, ``extra_info["cpu_time_ratio"]`` = fused / eager).

    pytest benchmarks/bench_linear_logprobs.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch
from _common import DEVICES, reset_peak_rss, run_benchmark, shape_table, status_mb
from torch.utils.checkpoint import checkpoint

from ppo_fast import functional as F

# name: (B, T, H, V, dtype, device); N = B * T token rows
SHAPES = shape_table(
    {
        "N256xH64xV1000": (2, 128, 64, 1000, torch.float32, "cpu"),
        "N8192xH256xV32000": (8, 1024, 256, 32000, torch.float32, "cpu"),
        "N8192xH4096xV32000": (8, 1024, 4096, 32000, torch.bfloat16, "cuda"),
        "N8192xH4096xV128256": (8, 1024, 4096, 128256, torch.bfloat16, "cuda"),
        "N32768xH4096xV32000": (16, 2048, 4096, 32000, torch.bfloat16, "cuda"),
        "N32768xH4096xV128256": (16, 2048, 4096, 128256, torch.bfloat16, "cuda"),
    },
    smoke=["N256xH64xV1000"],
)
# Each shape belongs to one device; those of an absent device are not collected.
CASES = [name for name, spec in SHAPES.items() if spec[5] in DEVICES]
CPU_CASES = [name for name in CASES if SHAPES[name][5] == "cpu"]


def _ids(cases):  # the device in the id, so that `-k cuda` (benchmarks/gpu_check.sh) selects the GPU shapes
    return [f"{SHAPES[name][5]}-{name}" for name in cases]


CHUNK_BYTES, MIN_CHUNK_ROWS = 64 << 20, 256  # the fused op's default chunk (linear_logprobs.h)


def _head_logprobs(h, w, y):
    # TRL 0.11 on the LM head's logits: logprobs_from_logits (log_softmax + gather), entropy_from_logits.
    logits = (h @ w.T).float()
    logp = torch.log_softmax(logits, dim=-1)
    logprob = torch.gather(logp, -1, y.unsqueeze(-1)).squeeze(-1)
    pd = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)
    return logprob, entropy


def _eager(h, w, y):
    return _head_logprobs(h, w, y)


@functools.cache
def _compiled():
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_head_logprobs)


def _chunked(h, w, y):
    B, T, H = h.shape
    chunk = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (w.shape[0] * h.element_size()))
    hf, yf = h.reshape(B * T, H), y.reshape(B * T)
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    parts = [
        checkpoint(_head_logprobs, hf[i : i + chunk], w, yf[i : i + chunk], use_reentrant=False)
        if grad
        else _head_logprobs(hf[i : i + chunk], w, yf[i : i + chunk])
        for i in range(0, B * T, chunk)
    ]
    return tuple(torch.cat([p[k] for p in parts]).view(B, T) for k in range(2))


def _fused(h, w, y):
    return F.linear_logprobs(h, w, y, return_entropy=True, validate=False, use_fused=True)


IMPLS = {"eager": _eager, "compiled": lambda *a: _compiled()(*a), "chunked": _chunked, "fused": _fused}
RECOMPUTES = {"chunked", "fused"}  # their backward recomputes the logits: 2NVH more GEMM work


def _step(fn, backward: bool):
    def run(h, w, y):
        logprob, entropy = fn(h, w, y)
        if backward:
            return torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), (h, w))
        return logprob, entropy

    return run


@functools.cache
def _inputs(shape: str, backward: bool):
    B, T, H, V, dtype, device = SHAPES[shape]
    g = torch.Generator(device).manual_seed(0)
    h = torch.randn(B, T, H, generator=g, device=device).to(dtype).requires_grad_(backward)
    w = (torch.randn(V, H, generator=g, device=device) * (2.0 / H**0.5)).to(dtype).requires_grad_(backward)
    y = torch.randint(0, V, (B, T), generator=g, device=device)
    return h, w, y


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _mm_rate(shape: str) -> float:
    """GFLOP/s of one plain [N, H] x [H, V] GEMM (h @ W.T) on the shape's device: the bound."""
    B, T, H, V, _, device = SHAPES[shape]
    h, w, _ = _inputs(shape, False)
    hf = h.detach().reshape(B * T, H)
    times = []
    for i in range(4):
        _sync(device)
        t0 = time.perf_counter()
        hf @ w.detach().T
        _sync(device)
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    return 2 * B * T * H * V / statistics.median(times) / 1e9


def _peak_rss_mb(fn, args) -> float | None:
    """The process's resident-memory high-water mark during fn(*args) above its resident memory
    before (Linux: VmHWM, reset to the current RSS by writing 5 to /proc/self/clear_refs)."""
    base = status_mb("VmRSS")
    if not reset_peak_rss():
        return None
    out = fn(*args)
    peak = status_mb("VmHWM")
    del out
    return None if base is None or peak is None else peak - base


_EAGER_RESULTS: dict = {}


def _eager_result(shape: str, backward: bool, fn_args):
    key = (shape, backward)
    if key not in _EAGER_RESULTS:
        _EAGER_RESULTS[key] = [t.detach().float() for t in _step(_eager, backward)(*fn_args)]
    return _EAGER_RESULTS[key]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_linear_logprobs(benchmark, pass_, shape, impl):
    B, T, H, V, dtype, device = SHAPES[shape]
    backward = pass_ == "fwd_bwd"
    benchmark.group = f"linear_logprobs-{pass_}-{device}-{shape}"
    args = _inputs(shape, backward)
    fn = _step(IMPLS[impl], backward)
    N = B * T
    useful = 2 * N * V * H * (3 if backward else 1)
    flops = useful + (2 * N * V * H if backward and impl in RECOMPUTES else 0)
    small = N * V < 1e6
    rounds = 3 if device == "cpu" else (3 if impl == "eager" else 10)
    try:
        run_benchmark(
            benchmark, fn, args, device, rounds=rounds, warmup=3 if small else 1, op=f"linear_logprobs_{pass_}",
            impl=impl, B=B, T=T, H=H, V=V,
        )  # fmt: skip
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} needs more than the device's memory at {shape}")
    info = benchmark.extra_info
    fp32_logits = N * V * 4
    if device == "cpu":
        peak = _peak_rss_mb(fn, args)
        if peak is not None:
            info["peak_rss_mb"] = peak
            info["peak_pct_of_fp32_logits"] = 100 * peak * 2**20 / fp32_logits
    else:
        info["peak_pct_of_fp32_logits"] = 100 * info["peak_extra_mem_mb"] * 2**20 / fp32_logits
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        median = stats.stats.median
        info["gemm_flops"] = flops
        info["GFLOP/s"] = flops / median / 1e9
        info["useful_GFLOP/s"] = useful / median / 1e9
        info["mm_GFLOP/s"] = _mm_rate(shape)
    if impl != "eager":  # the timed result must be right
        try:
            want = _eager_result(shape, backward, args)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return
        tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
        for got, ref in zip(fn(*args), want, strict=True):
            torch.testing.assert_close(got.detach().float(), ref, **tol)


@pytest.mark.parametrize("shape", CPU_CASES, ids=_ids(CPU_CASES))
def test_cpu_time_ratio(benchmark, shape):
    """The CPU bar: process CPU time of fused over eager forward+backward, the two alternating (eager
    first, then fused first) so that a slow patch of a shared machine hits both."""
    B, T, H, V, _, device = SHAPES[shape]
    benchmark.group = f"linear_logprobs-cpu_time-{shape}"
    args = _inputs(shape, True)
    fns = {impl: _step(IMPLS[impl], True) for impl in ("eager", "fused")}
    for fn in fns.values():  # warm-up
        fn(*args)
    times = {impl: [] for impl in fns}
    order = list(fns)

    def pair():
        for impl in order:
            t0 = time.process_time()
            fns[impl](*args)
            times[impl].append(time.process_time() - t0)
        order.reverse()

    benchmark.pedantic(pair, rounds=3 if B * T * V > 1e7 else 5, iterations=1, warmup_rounds=0)
    eager, fused = (statistics.median(times[k]) for k in ("eager", "fused"))
    benchmark.extra_info.update(
        op="linear_logprobs_cpu_time", shape=shape, eager_cpu_s=eager, fused_cpu_s=fused, cpu_time_ratio=fused / eager,
        threads=torch.get_num_threads(),
    )  # fmt: skip
