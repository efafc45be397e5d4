"""CUDA checks shared by the op tests (tests/ops) and the module tests (tests/trainer): what a call
launches on the device, and that it never waits for the host.

Imported by name (``from _cuda_checks import ...``): pytest (importmode prepend, no ``__init__.py``)
puts tests/ on ``sys.path`` for tests/conftest.py, whether it runs ``pytest tests`` or a single file.
The name differs from tests/ops/_helpers.py's, as every such module is imported at top level.
"""

from __future__ import annotations

import torch


def cuda_kernels(fn) -> tuple[list[str], list[str]]:
    """Calls ``fn`` once to warm up, then once under the profiler. Returns (kernels, events): the names
    of every event on the device in the profiled call, and of those that are kernels, whatever their
    name (memcpy/memset are events, not kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    return [n for n in events if not n.startswith(("Memcpy", "Memset"))], events


def without_host_sync(fn, check_warm_up: bool = False):
    """Calls ``fn`` twice, a warm-up (allocator, lazy init) and the checked call, each after a
    ``torch.cuda.synchronize()``; the checked call (and the warm-up too with ``check_warm_up``) runs
    in sync debug mode 'error', where any host synchronisation raises. Returns the checked call's
    result."""
    for checked in (check_warm_up, True):
        torch.cuda.synchronize()
        if checked:
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out
