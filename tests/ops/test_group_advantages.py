"""Tests of ppo_fast::group_advantages (csrc/include/ppo_fast/group_advantages.h,
csrc/cpu/group_advantages.cpp, csrc/cuda/group_advantages.cu) through ``torch.ops.ppo_fast`` and
``ppo_fast.functional`` (fused and eager routes).

Ground truth is written here in float64 from the formulas (each group's mean, its Bessel-corrected
std, and RLOO's baseline as the explicit mean of the other samples), independently of
``ppo_fast.reference``, which is checked against it too. Low-precision scores are rounded first and
the truth is computed from the rounded values: the output is fp32 whatever the input, so every
route must match the truth to 1e-5.
"""

from __future__ import annotations

import math
import re

import _helpers as H
import pytest
import torch
from _cuda_checks import cuda_kernels, without_host_sync

from ppo_fast import functional as F
from ppo_fast import reference as R
from ppo_fast._modes import GROUP_ESTIMATORS

ops = torch.ops.ppo_fast

EPS = 1e-6
GROUP_SIZES = [1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 64]
TOL = 1e-5  # rtol, and atol relative to max(1, max|truth|)


def truth(scores: torch.Tensor, n: int, estimator: str, eps: float = EPS) -> torch.Tensor:
    """The estimator's formula, group by group, in float64 Python arithmetic."""
    s = [float(v) for v in scores.double().cpu()]
    out = []
    for g in range(0, len(s), n):
        group = s[g : g + n]
        mean = sum(group) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in group) / (n - 1)) if n > 1 else float("nan")
        for i, v in enumerate(group):
            if estimator == "grpo":
                out.append(0.0 if n == 1 or v == mean else (v - mean) / (std + eps))
            elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
                out.append(v - mean)
            elif estimator == "rloo":
                others = group[:i] + group[i + 1 :]
                out.append(v - sum(others) / len(others) if others else 0.0)
            else:
                out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def call(route: str, scores, n, estimator, eps=EPS):
    if route == "ops":
        return ops.group_advantages(scores, n, estimator, eps)
    if route == "ref":
        return R.group_advantages(scores, n, estimator, eps)
    return F.group_advantages(scores, n, estimator, eps=eps, use_fused=route == "fused")


def assert_truth(out: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(out.double().cpu(), want, rtol=TOL, atol=TOL * scale, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
@pytest.mark.parametrize("n", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
def test_against_formula(device, rand, estimator, n, dtype):
    groups = 5
    scores = rand.randn(groups * n, dtype=dtype, device=device, scale=2.0) + 0.5
    want = truth(scores, n, estimator)
    for route in ("fused", "eager", "ops", "ref"):
        out = call(route, scores, n, estimator)
        assert out.dtype == torch.float32 and out.shape == (groups * n,) and out.device == scores.device
        assert_truth(out, want, f"{route} {estimator} n={n}")


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_float16_and_float64_cpu(rand, estimator):
    half = rand.randn(48, dtype=torch.float16) * 3
    assert_truth(call("fused", half, 6, estimator), truth(half, 6, estimator))
    x = rand.randn(48, dtype=torch.float64) * 3
    out = call("fused", x, 6, estimator)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth(x, 6, estimator), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(call("eager", x, 6, estimator), out, rtol=1e-12, atol=1e-12)


def test_hand_computed(device):
    """Group [1, 2, 3, 6]: mean 3, Bessel std sqrt((4 + 1 + 0 + 9) / 3), sum 12."""
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0], device=device)
    std = math.sqrt(14 / 3)
    want = {
        "grpo": [-2 / (std + EPS), -1 / (std + EPS), 0.0, 3 / (std + EPS)],
        "dr_grpo": [-2.0, -1.0, 0.0, 3.0],
        "rloo": [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3],
        "reinforce_pp_baseline": [-2.0, -1.0, 0.0, 3.0],
        "reinforce_pp": [1.0, 2.0, 3.0, 6.0],
    }
    for estimator, w in want.items():
        out = call("fused", scores, 4, estimator).cpu().double()
        torch.testing.assert_close(out, torch.tensor(w, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_of_one(device, rand, estimator):
    scores = rand.randn(9, device=device, scale=3.0)
    out = call("fused", scores, 1, estimator).cpu()
    if estimator == "reinforce_pp":
        assert torch.equal(out, scores.cpu())
    else:
        assert torch.equal(out, torch.zeros(9))  # no baseline without other samples: no signal


@pytest.mark.parametrize("eps", [0.0, EPS, 0.5])
def test_grpo_equal_scores_is_zero(device, eps):
    scores = torch.tensor([0.3] * 8 + [-2.0] * 8, device=device)
    for route in ("fused", "eager"):
        assert torch.equal(call(route, scores, 8, "grpo", eps).cpu(), torch.zeros(16))


def test_grpo_eps(device, rand):
    scores = rand.randn(12, device=device)
    for eps in (0.0, 0.1, 10.0):
        assert_truth(call("fused", scores, 4, "grpo", eps), truth(scores, 4, "grpo", eps))


def test_far_from_zero(device, rand):
    """fp64 group moments: scores near 1e4 with a spread of 1e-2 keep their normalised deviations."""
    scores = rand.randn(64, device=device, scale=1e-2) + 1e4
    assert_truth(call("fused", scores, 16, "grpo"), truth(scores, 16, "grpo"))


@pytest.mark.parametrize("layout", list(H.LAYOUTS))
def test_non_contiguous(device, rand, layout):
    scores = rand.randn(40, device=device)
    view = H.LAYOUTS[layout](scores)
    for estimator in GROUP_ESTIMATORS:
        assert torch.equal(call("fused", view, 8, estimator), call("fused", scores, 8, estimator))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_non_finite_spreads_in_its_group(device, estimator):
    """NaN and inf (validate=False, and the op itself): fused and eager give the same values, NaN and
    inf included, and only the group holding one is touched."""
    base = torch.arange(16, dtype=torch.float32, device=device) * 0.25
    for bad in (math.nan, math.inf, -math.inf):
        scores = base.clone()
        scores[5] = bad
        fused = F.group_advantages(scores, 4, estimator, validate=False, use_fused=True)
        eager = F.group_advantages(scores, 4, estimator, validate=False, use_fused=False)
        torch.testing.assert_close(fused, eager, equal_nan=True)
        torch.testing.assert_close(ops.group_advantages(scores, 4, estimator, EPS), fused, equal_nan=True)
        clean = torch.cat([fused[:4], fused[8:]]).cpu().double()
        torch.testing.assert_close(clean, torch.cat([truth(base, 4, estimator)[:4], truth(base, 4, estimator)[8:]]))
        if estimator != "reinforce_pp":
            assert not torch.isfinite(fused[4:8]).any()


def test_validate_raises_naming_positions(device):
    scores = torch.zeros(8, device=device)
    scores[2], scores[7] = math.nan, math.inf
    for use_fused in (True, False):
        with pytest.raises(RuntimeError, match=r"^group_advantages: scores must be finite; NaN or inf at 2, 7$"):
            F.group_advantages(scores, 4, use_fused=use_fused)


def test_deterministic_and_thread_count_independent(rand):
    scores = rand.randn(64 * 1024, scale=3.0)
    for estimator in GROUP_ESTIMATORS:
        one, many = H.at_thread_counts(lambda e=estimator: ops.group_advantages(scores, 8, e, EPS))
        assert torch.equal(one, many)


def test_outputs_are_detached(rand):
    scores = rand.randn(12).requires_grad_()
    for use_fused in (True, False):
        assert not F.group_advantages(scores, 3, use_fused=use_fused).requires_grad


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def test_opcheck(device, rand):
    cases = [
        (rand.randn(12, device=device), 4, "grpo", EPS),
        (rand.randn(12, dtype=torch.bfloat16, device=device), 3, "rloo", 0.0),
        (rand.randn(7, dtype=torch.float16, device=device), 1, "dr_grpo", EPS),
        (rand.randn(64 * 3, device=device)[::3], 32, "reinforce_pp_baseline", EPS),
        (rand.randn(5, device=device), 5, "reinforce_pp", EPS),
    ]
    for args in cases:
        torch.library.opcheck(ops.group_advantages.default, args)


def test_compile_fullgraph(device, rand, dynamo_reset):
    def fn(scores, mask):
        adv = F.group_advantages(scores * 2.0, 4, "grpo", validate=False)
        return adv[:, None] * mask

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    scores, mask = rand.randn(16, device=device), (rand.randn(16, 5, device=device) > 0).float()
    assert torch.equal(compiled(scores, mask), fn(scores, mask))


def test_fake_kernel_shapes_and_dtypes():
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        out = ops.group_advantages(torch.empty(12, dtype=dtype, device="meta"), 4, "grpo", EPS)
        assert out.shape == (12,) and out.dtype == want


# ------------------------------------------------------------------------------------------------
# Bad inputs: the same message from both functional routes and from the C++ op.

ESTIMATORS_MSG = "'grpo', 'dr_grpo', 'rloo', 'reinforce_pp_baseline', 'reinforce_pp'"
BAD = {
    "estimator": (lambda d: (torch.ones(4, device=d), 2, "ppo", EPS), rf"estimator must be one of {ESTIMATORS_MSG}"),
    "eps-neg": (lambda d: (torch.ones(4, device=d), 2, "grpo", -1.0), r"eps must be finite and >= 0, got -1"),
    "eps-nan": (lambda d: (torch.ones(4, device=d), 2, "grpo", math.nan), r"eps must be finite and >= 0, got nan"),
    "group-0": (lambda d: (torch.ones(4, device=d), 0, "grpo", EPS), r"group_size must be >= 1, got 0$"),
    "group-neg": (lambda d: (torch.ones(4, device=d), -2, "rloo", EPS), r"group_size must be >= 1, got -2$"),
    "not-multiple": (
        lambda d: (torch.ones(10, device=d), 4, "grpo", EPS),
        r"scores has 10 entries, not a multiple of group_size 4 \(each group is group_size consecutive samples\)$",
    ),
    "2d": (lambda d: (torch.ones(2, 4, device=d), 2, "grpo", EPS), r"scores must be 1-D \[N\], got shape \[2, 4\]$"),
    "int": (
        lambda d: (torch.ones(4, dtype=torch.int64, device=d), 2, "grpo", EPS),
        r"scores must be a floating-point tensor",
    ),
    "empty": (lambda d: (torch.ones(0, device=d), 2, "grpo", EPS), r"scores is empty \(shape \[0\]\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, case):
    build, match = BAD[case]
    args = build(device)

    def run(route):
        return call(route, *args)

    H.assert_same_error("group_advantages", "^group_advantages: " + match, run)


@pytest.mark.parametrize("group_size", [2.0, True, "4"])
def test_group_size_must_be_int(group_size):
    with pytest.raises(RuntimeError, match=r"^group_advantages: group_size must be an int, got "):
        F.group_advantages(torch.ones(4), group_size)


# ------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 3, 8, 31, 32, 64, 1000])
def test_cuda_matches_cpu(rand, n):
    scores = rand.randn(n * 301, scale=2.0)
    for estimator in GROUP_ESTIMATORS:
        gpu = ops.group_advantages(scores.cuda(), n, estimator, EPS).cpu()
        cpu = ops.group_advantages(scores, n, estimator, EPS)
        torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_cuda_one_launch_no_host_sync(rand):
    scores = rand.randn(65536, device="cuda")
    for estimator in GROUP_ESTIMATORS:
        kernels, events = cuda_kernels(lambda e=estimator: ops.group_advantages(scores, 16, e, EPS))
        assert len(kernels) == 1, events
        out = without_host_sync(lambda e=estimator: F.group_advantages(scores, 16, e, validate=False))
        assert torch.equal(out, ops.group_advantages(scores, 16, estimator, EPS))


@pytest.mark.cuda
def test_cuda_fp64_refused(rand):
    scores = rand.randn(8, dtype=torch.float64, device="cuda")
    msg = H.error_line(call, "ops", scores, 4, "grpo")
    assert re.match(r"^group_advantages: CUDA tensors must be float32, bfloat16 or float16", msg), msg
