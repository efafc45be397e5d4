"""Helpers shared by the op tests (tests/ops/test_<op>.py): test ids, the routes to an op, CPU
thread counts, the FlashAttention error rule, non-contiguous views, another device, the checks that
a bad input gets one message from every route, and TRL 0.11's masked statistics.

The test files ``import _helpers as H``: pytest (importmode prepend, no ``__init__.py``) puts
tests/ops on ``sys.path``, whether it runs ``pytest tests`` or a single file. The
``dynamo_reset`` fixture is in tests/ops/conftest.py; the CUDA launch-count and host-sync checks,
which tests/trainer shares, are in tests/_cuda_checks.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from ppo_fast import reference as R

LOWP = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUTES = ("fused", "eager", "ops")  # functional(use_fused=True), functional(use_fused=False), torch.ops
FLOOR = 1e-5  # the FlashAttention rule's allowance, relative to the reference's scale


def ids(x):
    """Readable parametrize ids: float32 for torch.float32, 3x7 for the shape (3, 7); pytest's own id
    for anything else."""
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, tuple) and all(isinstance(i, int) for i in x):
        return "x".join(map(str, x))
    return None


def as_double(a):
    """A float64 copy of a floating-point tensor; anything else as it is."""
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def at_thread_counts(fn, many: int = 2):
    """(fn() on one CPU thread, fn() on max(many, the current count) threads); the count is restored
    after. For the tests that the bits of a CPU kernel do not depend on the number of threads."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(max(many, threads))
        return one, fn()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Routes


def routes(functional):
    """The ``call(op, route, *args)`` of an op family: ``op`` (its torch.ops.ppo_fast name) with its
    schema's positional arguments through ``route``: 'ops' (torch.ops.ppo_fast), 'ref'
    (ppo_fast.reference, whose positional signatures are the schemas'), 'fused' / 'eager'
    (``functional(op, args, use_fused)``, which maps the schema's arguments onto ppo_fast.functional's
    signature, with use_fused True / False)."""

    def call(op: str, route: str, *args):
        if route == "ops":
            return getattr(torch.ops.ppo_fast, op)(*args)
        if route == "ref":
            return getattr(R, op)(*args)
        assert route in ("fused", "eager"), route
        return functional(op, args, use_fused=route == "fused")

    return call


# ------------------------------------------------------------------------------------------------
# The FlashAttention rule: for bf16/fp16 inputs the fused error is at most twice the error of the
# eager reference run on the same low-precision inputs, both against a float64 reference, plus a
# floor of FLOOR x scale.


def flash_bound(eager_err, scale):
    """The largest fused error the rule allows (floats or tensors, elementwise)."""
    return 2 * eager_err + FLOOR * scale


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in float64, on ref's device."""
    return (x.detach().to(device=ref.device, dtype=torch.float64) - ref).abs().max().item()


def assert_flash_rule(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """The rule for one low-precision output, its maximum error against the float64 ``ref``, with the
    scale max(1, max |ref|)."""
    assert eager is not None and eager.dtype == out.dtype, f"{what}eager output of dtype {out.dtype} needed"
    scale = max(1.0, ref.abs().max().item())
    fused_err, eager_err = max_err(out, ref), max_err(eager, ref)
    assert fused_err <= flash_bound(eager_err, scale), (
        f"{what}({out.dtype}): fused error {fused_err:.3g} > 2 x eager error {eager_err:.3g} + {FLOOR * scale:.1g}"
    )


# ------------------------------------------------------------------------------------------------
# Non-contiguous inputs


def strided(x: torch.Tensor) -> torch.Tensor:
    """A view of x (same values) taking every other element of a wider last dimension; the skipped
    elements are NaN (True for bool, 7 for integers) so a kernel that reads them is caught."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide.fill_(True if x.dtype == torch.bool else float("nan") if x.is_floating_point() else 7)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() or view.numel() <= 1
    return view


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x (same values) with its first and last dimensions in memory order swapped; a 1-D x is strided."""
    if x.dim() < 2:
        return strided(x)
    return x.transpose(0, -1).contiguous().transpose(0, -1)


LAYOUTS = {"strided": strided, "transposed": transposed}


# ------------------------------------------------------------------------------------------------
# Bad inputs: the op and the argument named, one message from every route (C++ included)


def other_device(t: torch.Tensor) -> torch.Tensor:
    """t on another device: meta on a CPU-only machine (where the op routes to its fake kernel, whose
    checks mirror the C++ ones), cuda for a CPU tensor where a GPU is present, meta for a CUDA one."""
    return t.to("meta") if t.device.type == "cuda" or not torch.cuda.is_available() else t.cuda()


_CPP_DTYPE = {
    "float32": "Float",
    "float64": "Double",
    "float16": "Half",
    "bfloat16": "BFloat16",
    "int64": "Long",
    "int32": "Int",
    "int8": "Char",
    "uint8": "Byte",
    "bool": "Bool",
    "complex64": "ComplexFloat",
}


def as_cpp_message(msg: str) -> str:
    """The Python checks print torch.float32 and 2.0 where the C++ ones print Float and 2."""
    msg = re.sub(r"torch\.(\w+)", lambda g: _CPP_DTYPE[g.group(1)], msg)
    return re.sub(r"(?<![\w.])(\d+)\.0\b", r"\1", msg)


def error_line(fn, *args) -> str:
    """The first line of the RuntimeError that ``fn(*args)`` must raise."""
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return str(info.value).splitlines()[0]


def assert_same_error(op: str, match: str, run, mirrored: bool = True) -> tuple[str, str]:
    """One bad call, ``run(route)``, through every route of ROUTES. Each raises a RuntimeError whose
    message starts with the op's name; functional's fused and eager routes say the same, matching the
    regex ``match``, and torch.ops (the C++ TORCH_CHECK, or the fake kernel for meta tensors) says it
    too, up to how dtypes and floats print. ``mirrored=False``: torch.ops only has to refuse the call
    (the dispatcher itself refuses it, before the op's checks). Returns the (fused, ops) messages."""
    fused, eager, direct = (error_line(run, route) for route in ROUTES)
    assert fused.startswith(f"{op}: "), fused
    assert fused == eager, (fused, eager)
    assert re.search(match, fused), fused
    if mirrored:
        assert direct.startswith(f"{op}: "), direct
        # the Python checks mirror the C++ ones message for message
        assert as_cpp_message(fused) == direct, (fused, direct)
    return fused, direct


def assert_device_error(op: str, name: str, ref_name: str, run) -> list[str]:
    """``run(route)`` has tensor ``name`` on another device than ``ref_name``: every route of ROUTES
    refuses it, naming the op, both tensors and both devices. Returns the messages."""
    msgs = [error_line(run, route) for route in ROUTES]
    for route, msg in zip(ROUTES, msgs, strict=True):
        assert msg.startswith(f"{op}: {name} is on ") and f"but {ref_name} is on " in msg, (route, msg)
        assert msg.endswith("; all tensors must be on one device"), (route, msg)
    return msgs


# ------------------------------------------------------------------------------------------------
# TRL 0.11's masked statistics, written plainly (trl/core.py)


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance
