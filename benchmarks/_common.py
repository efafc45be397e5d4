"""Shared benchmark helpers: devices, the shape table in use, and timing that is honest on CUDA.

``PPO_FAST_BENCH_SHAPES=full`` (the default) runs each op's whole shape table; ``smoke`` runs two
small shapes, which is what CI does (with ``--benchmark-disable``) to prove the benchmarks run.
"""

from __future__ import annotations

import os

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def shape_table(full: dict, smoke: list[str]) -> dict:
    mode = os.environ.get("PPO_FAST_BENCH_SHAPES", "full")
    if mode not in ("full", "smoke"):
        raise ValueError(f"PPO_FAST_BENCH_SHAPES must be 'full' or 'smoke', got {mode!r}")
    return full if mode == "full" else {k: full[k] for k in smoke}


def synced(fn, device: str):
    """CUDA work is asynchronous: each timed call ends with a synchronise."""
    if device != "cuda":
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def run_benchmark(
    benchmark, fn, args, device: str, *, rounds: int, bytes_moved: int | None = None, warmup: int = 3, **info
):
    """Times ``fn(*args)`` with pytest-benchmark (``warmup`` untimed calls first, which also trigger
    compilation), and records achieved GB/s and peak device memory in ``extra_info``."""
    fn = synced(fn, device)
    for _ in range(warmup):  # compile (and any background autotuning), allocator, caches
        fn(*args)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    result = benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(info)
    if device == "cuda":
        benchmark.extra_info["peak_extra_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    stats = getattr(benchmark, "stats", None)
    if stats is not None and bytes_moved is not None:
        median = stats.stats.median
        benchmark.extra_info["bytes_moved"] = bytes_moved
        benchmark.extra_info["GB/s"] = bytes_moved / median / 1e9 if median > 0 else float("nan")
    return result


def status_mb(key: str) -> float | None:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
