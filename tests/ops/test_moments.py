"""Tests of the running reward moments ops: ppo_fast::moments, moments_merge_, moments_normalize and
moments_update_normalize_ (csrc/include/ppo_fast/moments.h, csrc/cpu/moments.cpp, csrc/cuda/moments.cu),
through ``torch.ops.ppo_fast`` and ``ppo_fast.functional`` (fused and eager routes).

Ground truth is computed here in float64 with numpy (batch moments of the selected finite entries,
Chan merges checked against the moments of the concatenated data, the normalisation formula of
DESIGN.md 2.3), independently of ``ppo_fast.reference``, which is also checked against it. fp32
outputs must match tightly; bf16 and fp16 outputs follow the FlashAttention rule: the fused error is
at most twice the error of the eager reference run on the same low-precision inputs (both against
the fp64 truth). The module on top (``ppo_fast.RunningMoments``) is tested in
tests/trainer/test_running_moments.py.
"""

from __future__ import annotations

import math
import re

import _helpers as H
import numpy as np
import pytest
import torch
from _cuda_checks import cuda_kernels, without_host_sync

from ppo_fast import functional as F
from ppo_fast import reference as R

ops = torch.ops.ppo_fast

OPS = ("moments", "moments_merge_", "moments_normalize", "moments_update_normalize_")
EPS = float(np.finfo(np.float32).eps)
# 1-D score vectors, [B, T] token rewards and a 3-D tensor; sizes not a multiple of any block, and
# some spanning several of the kernels' 8192-element chunks.
SHAPES = [(1,), (7,), (1031,), (3, 7), (1, 1031), (64, 300), (2, 3, 5), (3, 5, 1031)]
MASKS = ("none", "bool", "same", "int64", "float32")
# (scale, center, clip)
FLAGS = [
    (True, False, None),
    (True, True, None),
    (True, True, 0.5),
    (True, False, 1.0),
    (False, True, None),
    (False, True, 0.25),
    (False, False, 2.0),
    (False, False, None),
]
FLAG_IDS = ["s", "sc", "sc-clip", "s-clip", "c", "c-clip", "clip", "identity"]

FP32_TOL = 1e-5  # rtol; atol relative to max(1, max|truth|)


# ------------------------------------------------------------------------------------------------
# Routes: the ops' schema order, mapped onto functional's signatures.


def _functional(op: str, args, use_fused: bool):
    """ppo_fast.functional's ``op``, the schema's positional arguments mapped onto its signature."""
    kw = {"use_fused": use_fused}
    if op == "moments":
        return F.moments(*args, **kw)
    if op == "moments_merge_":
        return F.moments_merge_(*args, **kw)
    if op == "moments_normalize":
        x, mask, state, scale, center, clip, eps = args
        return F.moments_normalize(x, mask, state, scale=scale, center=center, clip=clip, eps=eps, **kw)
    state, x, mask, scale, center, clip, eps = args
    return F.moments_update_normalize_(state, x, mask, scale=scale, center=center, clip=clip, eps=eps, **kw)


call = H.routes(_functional)


# ------------------------------------------------------------------------------------------------
# fp64 truth (numpy), independent of ppo_fast.reference.


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().ravel()


def moments64(x: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """(count, mean, M2, non-finite) over the entries where mask is non-zero."""
    v = _np(x)
    sel = np.ones(v.shape, bool) if mask is None else _np(mask) != 0
    fin = np.isfinite(v)
    u = v[sel & fin]
    mean = u.mean() if len(u) else 0.0
    return np.array([len(u), mean, ((u - mean) ** 2).sum(), (sel & ~fin).sum()], dtype=np.float64)


def std64(state, eps=EPS) -> float:
    """Bessel-corrected std; 1 below two samples and wherever it is at most eps (equal scores)."""
    n, m2 = float(state[0]), float(state[2])
    std = math.sqrt(m2 / (n - 1)) if n > 1 else 1.0
    return 1.0 if std <= eps else std


def normalize64(x, mask, state, scale, center, clip, eps=EPS) -> torch.Tensor:
    """DESIGN.md 2.3 in float64: (x - mean?) / (std + eps)?, clipped; masked entries pass through."""
    xs = x.detach().cpu().double()
    y = xs.clone()
    if center:
        y = y - float(state[1])
    if scale:
        y = y / (std64(state, eps) + eps)
    if clip is not None:
        y = y.clamp(-clip, clip)
    if mask is not None:
        y = torch.where(mask.cpu() != 0, y, xs)
    return y


def assert_moments(got: torch.Tensor, want: np.ndarray, scale: float, rtol: float = 1e-11):
    """Batch moments or state: count and the 4th slot exact, mean and M2 to fp64 accuracy."""
    got = got.detach().cpu().numpy()
    assert got.shape == (4,)
    assert got[0] == want[0], (got, want)
    assert got[3] == want[3], (got, want)
    n = max(want[0], 1.0)
    assert abs(got[1] - want[1]) <= rtol * max(1.0, scale) + rtol * abs(want[1]), (got, want)
    assert abs(got[2] - want[2]) <= rtol * abs(want[2]) + rtol * n * max(1.0, scale) ** 2, (got, want)


def assert_normalized(out, truth, eager=None, tol=FP32_TOL):
    """fp32/fp64: tight against the fp64 truth; bf16/fp16: the FlashAttention rule against ``eager``."""
    assert out.shape == truth.shape
    if out.dtype in H.LOWP:
        H.assert_flash_rule(out, eager, truth)
    else:
        scale = max(1.0, truth.abs().max().item())
        torch.testing.assert_close(out.detach().cpu().double(), truth, rtol=tol, atol=tol * scale)


# ------------------------------------------------------------------------------------------------
# Inputs


def make_mask(rand, shape, kind: str, x_dtype, device, p: float = 0.7):
    """none (None), bool, same (x's dtype: read directly), int64 / float32 (converted); random positions."""
    if kind == "none":
        return None
    m = torch.rand(shape, generator=rand.gen) < p
    m.view(-1)[0] = True  # at least one counted entry
    dtype = {"bool": torch.bool, "same": x_dtype, "int64": torch.int64, "float32": torch.float32}[kind]
    return m.to(device=device, dtype=dtype)


def make_state(rand, device, n: int = 100, offset: float = 0.5, scale: float = 2.0, rejected: float = 3.0):
    """A running state of n samples of offset + scale * N(0, 1), with ``rejected`` earlier rejections."""
    data = rand.randn(n, dtype=torch.float64, scale=scale) + offset
    s = torch.tensor(moments64(data), dtype=torch.float64)
    s[3] = rejected
    return s.to(device)


# ------------------------------------------------------------------------------------------------
# moments


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_moments(device, rand, shape, dtype, mask_kind):
    x = rand.randn(*shape, dtype=dtype, device=device, scale=3.0) + 1.5
    mask = make_mask(rand, shape, mask_kind, dtype, device)
    out = ops.moments(x, mask)
    assert out.dtype == torch.float64 and out.shape == (4,) and out.device == x.device
    assert torch.equal(out, F.moments(x, mask, use_fused=True))
    scale = x.abs().max().item()
    assert_moments(out, moments64(x, mask), scale)
    assert_moments(F.moments(x, mask, use_fused=False), moments64(x, mask), scale)
    assert_moments(R.moments(x, mask), moments64(x, mask), scale)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "same"])
def test_moments_float64_cpu(rand, mask_kind):
    x = rand.randn(5, 2000, dtype=torch.float64) * 1e-3 + 1e6  # far from zero, tiny spread
    mask = make_mask(rand, x.shape, mask_kind, torch.float64, "cpu")
    want = moments64(x, mask)
    assert_moments(ops.moments(x, mask), want, 1e6, rtol=1e-12)
    # M2 relative to itself: the spread is 1e-9 of the values, a sum of squares would have no correct
    # digit (the chunks' plain first-pass sums leave ~1e-8: Chan's cross terms see their rounding)
    np.testing.assert_allclose(ops.moments(x, mask)[2].item(), want[2], rtol=1e-7)


def test_moments_all_masked(device, rand):
    """Nothing selected: count 0, mean 0, M2 0 (no NaN), non-finite entries at masked positions ignored."""
    x = rand.randn(3, 7, device=device)
    x[1, 2] = float("nan")
    for m in (torch.zeros(3, 7, dtype=torch.bool, device=device), torch.zeros(3, 7, device=device)):
        for route in ("ops", "fused", "eager"):
            out = call("moments", route, x, m)
            assert out.tolist() == [0.0, 0.0, 0.0, 0.0], route


@pytest.mark.parametrize("mask_kind", ["none", "bool", "same"])
def test_moments_non_finite_counted_apart(device, rand, mask_kind):
    """NaN/inf at counted positions are counted in slot 3 and left out of (count, mean, M2); at
    masked-out positions they are ignored."""
    x = rand.randn(4, 9, device=device)
    mask = make_mask(rand, (4, 9), mask_kind, torch.float32, device)
    if mask is not None:
        mask[0, :4] = 1
        mask[3, 5:] = 0
    x[0, 1], x[0, 3], x[0, 2] = float("nan"), float("inf"), -float("inf")
    x[3, 6], x[3, 8] = float("nan"), float("inf")  # masked out when there is a mask
    want = moments64(x, mask)
    assert want[3] == (3 if mask is not None else 5)
    for route in ("ops", "fused", "eager"):
        got = call("moments", route, x, mask)
        assert_moments(got, want, 5.0)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
def test_moments_non_contiguous(device, rand, dtype, layout):
    make = H.LAYOUTS[layout]
    x = rand.randn(6, 29, 3, dtype=dtype, device=device)
    m = make_mask(rand, x.shape, "bool", dtype, device)
    for mask in (None, m, m.to(dtype)):
        want = ops.moments(x, mask)
        xn, mn = make(x), None if mask is None else make(mask)
        for route in ("ops", "fused"):
            assert torch.equal(call("moments", route, xn, mn), want)
        assert_moments(want, moments64(x, mask), 5.0)
    # an expanded (stride-0) view counts every repeated element
    e = x[:1, :1, :1].expand(4, 5, 6)
    assert ops.moments(e, None).tolist()[0] == 120.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=H.ids)
def test_mask_values_and_dtypes(device, rand, dtype):
    """A mask counts where it is non-zero, whatever its dtype or value."""
    x = rand.randn(5, 37, dtype=dtype, device=device)
    m = make_mask(rand, x.shape, "bool", dtype, device)
    want = ops.moments(x, m)
    state = make_state(rand, device)
    norm = ops.moments_normalize(x, m, state, True, True, 0.7, EPS)
    weights = rand.randint(1, 4, x.shape).to(device)
    for mask in (m.to(dtype), m.long(), m.to(torch.uint8), m.double(), m * weights, (m * weights).float() * -0.5):
        assert torch.equal(ops.moments(x, mask), want), mask.dtype
        assert torch.equal(ops.moments_normalize(x, mask, state, True, True, 0.7, EPS), norm), mask.dtype


# ------------------------------------------------------------------------------------------------
# moments_merge_


def _batches_of(rand, device, sizes, offset=0.0, scale=1.0):
    """Data chunks of the given sizes and their moments [K, 4] (from the op)."""
    chunks = [rand.randn(n, dtype=torch.float64, scale=scale) + offset for n in sizes]
    batches = torch.stack([torch.tensor(moments64(c)) for c in chunks]).to(device)
    return chunks, batches


@pytest.mark.parametrize("sizes", [[5], [1, 1], [3, 0, 17, 1], [1] * 9 + [1000], [2, 40, 7, 0, 0, 128, 1, 33]])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_merge(device, rand, sizes, offset):
    """K batches merged in order into a state equal the moments of all the data concatenated."""
    init = rand.randn(11, dtype=torch.float64) + offset
    chunks, batches = _batches_of(rand, device, sizes, offset)
    state0 = torch.tensor(moments64(init), dtype=torch.float64, device=device)
    state0[3] = 2.0  # earlier rejections are kept
    want = moments64(torch.cat([init, *chunks]))
    want[3] = 2.0
    results = {}
    for route in ("ops", "fused", "eager", "ref"):
        state = state0.clone()
        ret = call("moments_merge_", route, state, batches)
        if route in ("fused", "eager"):
            assert ret is state
        assert_moments(state, want, offset + 5, rtol=1e-11)
        results[route] = state
    assert torch.equal(results["ops"], results["fused"])
    torch.testing.assert_close(results["ops"], results["ref"], rtol=1e-13, atol=1e-13 * (1 + offset))


def test_merge_in_order_matches_sequential(device, rand):
    """Merging [K, 4] at once is merging the rows one at a time, bit for bit."""
    _, batches = _batches_of(rand, device, [4, 1, 0, 9, 2, 300])
    a = make_state(rand, device)
    b = a.clone()
    ops.moments_merge_(a, batches)
    for row in batches:
        ops.moments_merge_(b, row[None])
    assert torch.equal(a, b)


def test_merge_into_empty_state(device, rand):
    """From zeros: zero-count batches leave it at zeros (no NaN); one batch makes the state that batch."""
    zero = torch.zeros(4, dtype=torch.float64, device=device)
    for route in ("ops", "fused", "eager"):
        s = zero.clone()
        call("moments_merge_", route, s, torch.zeros(3, 4, dtype=torch.float64, device=device))
        assert torch.equal(s, zero), route
        _, batches = _batches_of(rand, device, [0, 6, 0])
        call("moments_merge_", route, s, batches)
        assert torch.equal(s, batches[1]), route
    s = zero.clone()
    ops.moments_merge_(s, torch.zeros(0, 4, dtype=torch.float64, device=device))  # K = 0: nothing to merge
    assert torch.equal(s, zero)


@pytest.mark.parametrize("bad_at", [0, 2, 4])
def test_merge_rejects_non_finite_batches(device, rand, bad_at):
    """If any batch reports non-finite values, nothing is merged (count, mean, M2 keep their bits) and
    ``rejected`` grows by exactly one, however many batches are bad; otherwise rejected is untouched."""
    _, batches = _batches_of(rand, device, [3, 8, 1, 5, 2])
    for route in ("ops", "fused", "eager", "ref"):
        state0 = make_state(rand, device)
        s = state0.clone()
        bad = batches.clone()
        bad[bad_at, 3] = 2.0
        call("moments_merge_", route, s, bad)
        assert torch.equal(s[:3], state0[:3]), route
        assert s[3].item() == state0[3].item() + 1, route
        bad[(bad_at + 1) % 5, 3] = 1.0  # two bad batches: still one rejected update
        call("moments_merge_", route, s, bad)
        assert torch.equal(s[:3], state0[:3]) and s[3].item() == state0[3].item() + 2, route
        call("moments_merge_", route, s, batches)  # a clean update afterwards merges normally
        assert s[0].item() == state0[0].item() + 19 and s[3].item() == state0[3].item() + 2, route


# ------------------------------------------------------------------------------------------------
# moments_normalize


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int64"])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", [(1,), (512,), (3, 1031), (2, 3, 5)], ids=H.ids)
def test_normalize(device, rand, shape, dtype, mask_kind, flags):
    scale, center, clip = flags
    x = rand.randn(*shape, dtype=dtype, device=device, scale=2.5) + 0.5
    mask = make_mask(rand, shape, mask_kind, dtype, device)
    state = make_state(rand, device)
    args = (x, mask, state, scale, center, clip, EPS)
    state0 = state.clone()
    out = ops.moments_normalize(*args)
    assert torch.equal(state, state0)  # read only
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device and out.is_contiguous()
    assert torch.equal(out, call("moments_normalize", "fused", *args))
    truth = normalize64(x, mask, state.cpu(), scale, center, clip)
    eager = call("moments_normalize", "eager", *args)
    assert_normalized(out, truth, eager)
    assert_normalized(R.moments_normalize(*args), truth, eager)  # the reference obeys the same bar
    if mask is not None:
        off = mask == 0
        assert torch.equal(out[off], x[off])  # masked entries pass through unchanged
    if clip is not None:
        counted = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
        assert out[counted].abs().max().item() <= clip
    if not (scale or center or clip):
        assert torch.equal(out, x)


@pytest.mark.parametrize("n", [0, 1])
def test_normalize_below_two_samples_uses_std_1(device, rand, n):
    """With fewer than two samples seen the running std is 1 (TRL: infinity, zeroing every score)."""
    x = rand.randn(17, device=device, scale=3.0)
    state = torch.tensor([float(n), 0.75 * n, 0.0, 0.0], dtype=torch.float64, device=device)
    for route in ("ops", "fused", "eager"):
        out = call("moments_normalize", route, x, None, state, True, True, None, EPS)
        torch.testing.assert_close(out, (x - 0.75 * n) / (1 + EPS), rtol=1e-6, atol=1e-6)


def test_normalize_eps(device, rand):
    """eps is added to the std (0 allowed); a constant state (M2 = 0) has std 0 <= eps, taken as 1,
    so it divides by 1 + eps (not by eps alone, nor by 0 when eps is 0)."""
    x = rand.randn(33, device=device)
    state = make_state(rand, device)
    for eps in (0.0, 1e-3, 2.0):
        out = ops.moments_normalize(x, None, state, True, False, None, eps)
        assert_normalized(out, normalize64(x, None, state.cpu(), True, False, None, eps))
    flat = torch.tensor([10.0, 4.0, 0.0, 0.0], dtype=torch.float64, device=device)
    for eps in (0.5, 0.0):
        for route in ("ops", "fused", "eager"):
            out = call("moments_normalize", route, x, None, flat, True, True, None, eps)
            assert_normalized(out, (x.double().cpu() - 4.0) / (1.0 + eps))


def _equal_scores(device, dtype=torch.float32) -> torch.Tensor:
    return torch.full((4,), 0.25, dtype=dtype, device=device)  # below the clip of 0.5 once scaled by 1 / (1 + eps)


def _nearly_equal_scores(device) -> torch.Tensor:
    """1, 1, 1 and the next float32 after 1: std = ulp(1) / 2 = eps / 2."""
    return torch.tensor([1.0, 1.0, 1.0, 1.0 + EPS], dtype=torch.float32, device=device)


def _spread_just_above_eps(device) -> torch.Tensor:
    """+-d around 0 with std = 2 d / sqrt(3) = 1.1 eps."""
    d = 1.1 * EPS * math.sqrt(3) / 2
    return torch.tensor([-d, d, -d, d], dtype=torch.float32, device=device)


STD_FLAGS = [(True, False, None), (True, True, None), (True, False, 0.5), (True, True, 0.5)]


@pytest.mark.parametrize("flags", STD_FLAGS, ids=["s", "sc", "s-clip", "sc-clip"])
def test_std_at_most_eps_is_1(device, rand, flags):
    """A first batch of equal scores (std 0), or of nearly equal ones (std eps / 2), normalises with
    std 1 as fewer than two samples do: x / (1 + eps), not x / eps (8.4e6 x for float32 eps). A spread
    just above eps keeps its own std. A varied batch afterwards normalises with the merged moments."""
    scale, center, clip = flags
    cases = [
        ("equal", _equal_scores(device), False),
        ("nearly equal", _nearly_equal_scores(device), False),
        ("just above eps", _spread_just_above_eps(device), True),
    ]
    for name, x, own_std in cases:
        v = _np(x)
        std = v.std(ddof=1)
        assert (std > 1.05 * EPS) if own_std else (std < 0.55 * EPS), (name, std)  # the inputs are what they claim
        divisor = (std if own_std else 1.0) + EPS
        truth = torch.tensor(((v - v.mean()) if center else v) / divisor)
        if clip is not None:
            truth = truth.clamp(-clip, clip)
        second = rand.randn(50, device=device, scale=2.0) + 1.0
        outs = {}
        for route in ("ops", "fused", "eager"):
            state = torch.zeros(4, dtype=torch.float64, device=device)
            out, batch = call("moments_update_normalize_", route, state, x, None, scale, center, clip, EPS)
            assert_moments(batch, moments64(x), 3.0)
            assert_moments(state, moments64(x), 3.0)
            assert_normalized(out, truth)
            # the state alone (moments_normalize) gives the same
            again = call("moments_normalize", route, x, None, state, scale, center, clip, EPS)
            assert_normalized(again, truth)
            # a varied batch afterwards: ordinary std of everything seen
            out2, _ = call("moments_update_normalize_", route, state, second, None, scale, center, clip, EPS)
            both = torch.cat([x.cpu(), second.cpu()])
            assert_moments(state, moments64(both), 3.0)
            assert std64(state.cpu()) > 1.0  # not the 1 of the rule
            want2 = normalize64(second, None, moments64(both), scale, center, clip)
            assert_normalized(out2, want2)
            outs[route] = (out, out2)
        for route in ("fused", "eager"):  # fused == reference on both batches
            for got, want in zip(outs[route], outs["ops"]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_std_exactly_eps_is_1(device, rand):
    """The rule is ``std <= eps``: a state whose std is exactly eps (two samples, M2 = eps^2, all exact
    in fp64) divides by 1 + eps; one ulp-scale step above it divides by std + eps, on every route."""
    x = rand.randn(9, device=device)
    above = EPS * (1 + 2.0**-20)
    for std, divisor in ((EPS, 1.0 + EPS), (above, above + EPS)):
        state = torch.tensor([2.0, 0.0, std * std, 0.0], dtype=torch.float64, device=device)
        assert math.sqrt(std * std) == std
        for route in ("ops", "fused", "eager"):
            out = call("moments_normalize", route, x, None, state, True, False, None, EPS)
            assert_normalized(out, x.double().cpu() / divisor)


@pytest.mark.parametrize("dtype", H.LOWP, ids=H.ids)
def test_equal_scores_low_precision(device, dtype):
    """Equal bf16/fp16 scores: std 1, so x / (1 + eps) rounds back to x (x / eps would overflow fp16)."""
    x = _equal_scores(device, dtype)
    for route in ("ops", "fused", "eager"):
        for center in (False, True):
            state = torch.zeros(4, dtype=torch.float64, device=device)
            out, _ = call("moments_update_normalize_", route, state, x, None, True, center, None, EPS)
            want = torch.zeros_like(x) if center else x
            assert torch.equal(out, want), (route, center, out)


def test_normalize_clip_inf_is_no_clip(device, rand):
    x = rand.randn(100, device=device, scale=10.0)
    state = make_state(rand, device)
    assert torch.equal(
        ops.moments_normalize(x, None, state, True, True, math.inf, EPS),
        ops.moments_normalize(x, None, state, True, True, None, EPS),
    )


def test_normalize_non_finite_entries(device, rand):
    """NaN stays NaN, inf is clipped to +-clip; masked-out NaN/inf pass through unchanged."""
    x = rand.randn(2, 6, device=device)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), float("inf"), -float("inf")
    x[1, 0], x[1, 1] = float("nan"), float("inf")
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1, :2] = False
    state = make_state(rand, device)
    out = ops.moments_normalize(x, mask, state, True, True, 1.5, EPS).cpu()
    assert math.isnan(out[0, 0]) and out[0, 1].item() == 1.5 and out[0, 2].item() == -1.5
    assert math.isnan(out[1, 0]) and out[1, 1].item() == math.inf
    eager = F.moments_normalize(x, mask, state, center=True, clip=1.5, use_fused=False).cpu()
    torch.testing.assert_close(out, eager, equal_nan=True)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
def test_normalize_non_contiguous(device, rand, dtype, layout):
    make = H.LAYOUTS[layout]
    x = rand.randn(6, 29, dtype=dtype, device=device)
    m = make_mask(rand, x.shape, "bool", dtype, device)
    state = make_state(rand, device)
    for mask in (None, m, m.to(dtype)):
        want = ops.moments_normalize(x, mask, state, True, True, 1.0, EPS)
        mn = None if mask is None else make(mask)
        for route in ("ops", "fused"):
            got = call("moments_normalize", route, make(x), mn, state, True, True, 1.0, EPS)
            assert got.is_contiguous() and torch.equal(got, want)


def test_normalize_far_from_zero(rand):
    """Scores near 1e6, centred: the mean is applied in fp32 as TRL does (scores - mean.to(fp32)), so
    fp32 scores meet the FlashAttention bar against the fp32 eager reference, not an fp32-tight one."""
    x = rand.randn(4096, scale=3.0) + 1e6
    state = torch.zeros(4, dtype=torch.float64)
    ops.moments_merge_(state, ops.moments(x, None)[None])
    truth = normalize64(x, None, state, True, True, None)
    out = ops.moments_normalize(x, None, state, True, True, None, EPS)
    eager = R.moments_normalize(x, None, state, True, True, None, EPS)
    fused_err, eager_err = H.max_err(out, truth), H.max_err(eager, truth)
    assert fused_err <= H.flash_bound(eager_err, 1.0)
    assert fused_err < 0.05  # the fp32 rounding of a mean near 1e6 (ulp 0.0625) over std ~3


def test_float64_cpu(rand):
    """float64 inputs on the CPU: batch moments exact to fp64 and, as for every other op (reference.py:
    "fp64 stays fp64"; TRL computes in the scores' dtype), the normalisation in fp64 too."""
    x = rand.randn(1000, dtype=torch.float64, scale=3.0) + 1.0
    state = torch.zeros(4, dtype=torch.float64)
    out, batch = ops.moments_update_normalize_(state, x, None, True, True, None, EPS)
    assert out.dtype == torch.float64
    assert_moments(batch, moments64(x), 10.0, rtol=1e-12)
    truth = normalize64(x, None, state, True, True, None)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# moments_update_normalize_


@pytest.mark.parametrize("flags", [(True, False, None), (True, True, 0.5), (False, True, 1.0)], ids=["s", "sc", "c"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "same", "int64"])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", [(1,), (512,), (3, 1031), (40, 700)], ids=H.ids)
def test_update_normalize_is_moments_merge_normalize(device, rand, shape, dtype, mask_kind, flags):
    scale, center, clip = flags
    x = rand.randn(*shape, dtype=dtype, device=device, scale=2.0) - 0.3
    mask = make_mask(rand, shape, mask_kind, dtype, device)
    state0 = make_state(rand, device)
    fused_state = state0.clone()
    out, batch = ops.moments_update_normalize_(fused_state, x, mask, scale, center, clip, EPS)
    assert out.dtype == dtype and out.shape == x.shape and batch.dtype == torch.float64 and batch.shape == (4,)
    # the three ops one after another
    parts_state = state0.clone()
    parts_batch = ops.moments(x, mask)
    ops.moments_merge_(parts_state, parts_batch[None])
    parts_out = ops.moments_normalize(x, mask, parts_state, scale, center, clip, EPS)
    if device.type == "cpu":
        assert torch.equal(batch, parts_batch) and torch.equal(fused_state, parts_state)
        assert torch.equal(out, parts_out)
    else:
        torch.testing.assert_close(batch, parts_batch, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(fused_state, parts_state, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out, parts_out)
    # against the fp64 truth: state = old state + batch, output normalised with the new state
    assert_moments(batch, moments64(x, mask), 3.0)
    want = np.array(state0.tolist())
    b = moments64(x, mask)
    n = want[0] + b[0]
    delta = b[1] - want[1]
    want = np.array([n, want[1] + delta * b[0] / n, want[2] + b[2] + delta**2 * want[0] * b[0] / n, want[3]])
    assert_moments(fused_state, want, 3.0)
    eager_state = state0.clone()
    eager_out, eager_batch = call("moments_update_normalize_", "eager", eager_state, x, mask, scale, center, clip, EPS)
    torch.testing.assert_close(eager_state, fused_state, rtol=1e-12, atol=1e-12)
    truth = normalize64(x, mask, fused_state.cpu(), scale, center, clip)
    assert_normalized(out, truth, eager_out)
    # functional(use_fused=True) is the same kernel
    s = state0.clone()
    fn_out, fn_batch = call("moments_update_normalize_", "fused", s, x, mask, scale, center, clip, EPS)
    assert torch.equal(fn_out, out) and torch.equal(fn_batch, batch) and torch.equal(s, fused_state)


@pytest.mark.parametrize("route", ["ops", "fused", "eager"])
def test_update_normalize_never_merges_non_finite(device, rand, route):
    """A batch with NaN/inf at a counted position is not merged (rejected + 1) and x is normalised with
    the old state; NaN/inf at masked-out positions do not count and the batch merges."""
    x = rand.randn(3, 8, device=device, scale=2.0)
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[2, 5:] = False
    state0 = make_state(rand, device)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[1, 3] = bad
        state = state0.clone()
        out, batch = call("moments_update_normalize_", route, state, xb, mask, True, True, None, EPS)
        assert batch[3].item() == 1.0
        assert torch.equal(state[:3], state0[:3]) and state[3].item() == state0[3].item() + 1
        finite = torch.isfinite(xb)
        want = ops.moments_normalize(xb, mask, state0, True, True, None, EPS)
        assert torch.equal(out[finite], want[finite])
        assert not torch.isfinite(out[1, 3])
    xm = x.clone()
    xm[2, 6], xm[2, 7] = float("nan"), float("inf")  # masked out
    state = state0.clone()
    out, batch = call("moments_update_normalize_", route, state, xm, mask, True, True, None, EPS)
    assert batch[3].item() == 0.0 and state[0].item() == state0[0].item() + 21 and state[3] == state0[3]
    assert math.isnan(out[2, 6]) and out[2, 7].item() == math.inf  # passed through


def test_update_normalize_all_masked_keeps_state(device, rand):
    x = rand.randn(3, 5, device=device)
    state0 = make_state(rand, device)
    for route in ("ops", "fused", "eager"):
        state = state0.clone()
        out, batch = call(
            "moments_update_normalize_", route, state, x, torch.zeros_like(x, dtype=torch.bool), True, True, 1.0, EPS
        )
        assert torch.equal(state, state0) and batch.tolist() == [0.0, 0.0, 0.0, 0.0], route
        assert torch.equal(out, x), route


@pytest.mark.parametrize(
    "dtype,offset,spread,var_rtol",
    [(torch.float32, 0.0, 2.0, 1e-10), (torch.float32, 1e6, 3.0, 1e-10), (torch.float64, 1e6, 1e-3, 1e-7)],
)
def test_many_updates_vs_numpy(rand, dtype, offset, spread, var_rtol):
    """Thousands of updates of mixed sizes (a quarter of batches of 1) through the fused op: the running
    (count, mean, var) equal numpy's mean and var(ddof=1) over everything concatenated. Near 1e6 the
    spread is tiny relative to the values (1e-9 for the fp64 case): a sum-of-squares variance cancels
    completely (TRL's fp32 update: 100% error); a mean near 1e6 carries ~1e-10 absolute rounding, so
    the fp64 case's variance is good to ~1e-8 relative."""
    K = 2000
    sizes = rand.randint(1, 120, (K,))
    sizes[rand.randint(0, 4, (K,)) == 0] = 1
    xs = [rand.randn(int(n), dtype=dtype, scale=spread) + offset for n in sizes]
    state = torch.zeros(4, dtype=torch.float64)
    eager = state.clone()
    for x in xs:
        F.moments_update_normalize_(state, x, scale=True, center=True, clip=5.0)
    for x in xs[:300]:
        F.moments_update_normalize_(eager, x, scale=True, center=True, clip=5.0, use_fused=False)
    allx = np.concatenate([_np(x) for x in xs])
    assert state[0].item() == len(allx) and state[3].item() == 0
    np.testing.assert_allclose(state[1].item(), allx.mean(), rtol=1e-13, atol=1e-13 * spread)
    np.testing.assert_allclose(state[2].item() / (len(allx) - 1), allx.var(ddof=1), rtol=var_rtol)
    head = np.concatenate([_np(x) for x in xs[:300]])
    np.testing.assert_allclose(eager[1].item(), head.mean(), rtol=1e-13, atol=1e-13 * spread)
    np.testing.assert_allclose(eager[2].item() / (len(head) - 1), head.var(ddof=1), rtol=var_rtol)


# ------------------------------------------------------------------------------------------------
# Determinism


def _det_cases(rand, device):
    x = rand.randn(40, 3001, device=device) + 2.0  # 120k elements: 15 chunks of 8192
    m = make_mask(rand, x.shape, "bool", torch.float32, device)
    state = make_state(rand, device)
    batches = torch.stack([ops.moments(x[i], m[i]) for i in range(5)])

    def merge():
        s = state.clone()
        ops.moments_merge_(s, batches)
        return (s,)

    def update_normalize():
        s = state.clone()
        return (*ops.moments_update_normalize_(s, x, m, True, True, 0.8, EPS), s)

    return {
        "moments": lambda: (ops.moments(x, m),),
        "moments_merge_": merge,
        "moments_normalize": lambda: (ops.moments_normalize(x, m, state, True, True, 0.8, EPS),),
        "moments_update_normalize_": update_normalize,
    }


@pytest.mark.parametrize("op", OPS)
def test_deterministic(device, rand, op):
    fn = _det_cases(rand, device)[op]
    first, second = fn(), fn()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_cpu_thread_count_independent(rand, op):
    """Batch moments are taken per fixed 8192-element chunk and merged in index order: the bits do not
    depend on the number of threads."""
    fn = _det_cases(rand, "cpu")[op]
    one, many = H.at_thread_counts(fn, many=4)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_cases(rand, device):
    x = rand.randn(3, 7, device=device)
    xb = rand.randn(2, 5, dtype=torch.bfloat16, device=device)
    xh = rand.randn(1, dtype=torch.float16, device=device)
    big = rand.randn(9000, device=device)
    m = make_mask(rand, (3, 7), "bool", torch.float32, device)
    mb = make_mask(rand, (2, 5), "same", torch.bfloat16, device)
    state = make_state(rand, device)
    _, batches = _batches_of(rand, device, [4, 1, 0, 30])
    bad = batches.clone()
    bad[1, 3] = 1.0
    return {
        "moments": [(x, m), (xb, mb), (xh, None), (big, None), (x.t(), m.t().long())],
        "moments_merge_": [(state.clone(), batches), (state.clone(), bad), (state.clone(), batches[:1])],
        "moments_normalize": [
            (x, m, state, True, False, None, EPS),
            (xb, mb, state, True, True, 0.5, 1e-3),
            (xh, None, state, False, True, 2.0, 0.0),
            (big, None, state, True, True, None, EPS),
        ],
        "moments_update_normalize_": [
            (state.clone(), x, m, True, False, None, EPS),
            (state.clone(), xb, mb.float(), True, True, 0.5, 1e-3),
            (state.clone(), xh, None, False, False, 1.0, EPS),
            (state.clone(), big, None, True, True, 3.0, EPS),
        ],
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, rand, op):
    for args in _opcheck_cases(rand, device)[op]:
        torch.library.opcheck(getattr(ops, op).default, args)


def test_compile_update_normalize(device, rand, dynamo_reset):
    """A step calling functional.moments_update_normalize_ compiles to one graph (fake kernel included,
    the state mutation functionalised) and matches eager over several updates, state included."""

    def step(state, scores, rewards, mask):
        y, batch = F.moments_update_normalize_(state, scores * 2.0, scale=True, center=True, clip=3.0)
        r, _ = F.moments_update_normalize_(state, rewards, mask, scale=True, clip=2.0)
        return y + 1.0, batch[1], (r * mask).sum(1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s_c = torch.zeros(4, dtype=torch.float64, device=device)
    s_e = s_c.clone()
    count = 0
    for _ in range(3):
        scores, rewards = rand.randn(16, device=device), rand.randn(4, 9, device=device)
        mask = make_mask(rand, (4, 9), "same", torch.float32, device)
        count += 16 + int(mask.sum().item())
        for a, b in zip(compiled(s_c, scores, rewards, mask), step(s_e, scores, rewards, mask), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(s_c, s_e)
    assert s_c[0].item() == count  # the compiled step did update the state


@pytest.mark.parametrize("op", ["moments", "moments_merge_", "moments_normalize"])
def test_compile_fullgraph(device, rand, dynamo_reset, op):
    x = rand.randn(3, 17, device=device)
    m = make_mask(rand, (3, 17), "bool", torch.float32, device)
    state = make_state(rand, device)
    _, batches = _batches_of(rand, device, [3, 5])
    fns = {
        "moments": lambda s: (F.moments(x * 3.0, m),),
        "moments_merge_": lambda s: (F.moments_merge_(s, batches) + 0.0,),
        "moments_normalize": lambda s: (F.moments_normalize(x - 1.0, m, s, center=True, clip=1.0),),
    }
    fn = fns[op]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s_c, s_e = state.clone(), state.clone()
    for a, b in zip(compiled(s_c), fn(s_e), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(s_c, s_e)


# ------------------------------------------------------------------------------------------------
# Bad inputs: same message from both functional routes and from the C++ op (op and argument named).


def _bad_cases():
    def f64(*shape):
        return lambda d: torch.zeros(shape, dtype=torch.float64, device=d)

    def x_(*shape, dtype=torch.float32):
        return lambda d: torch.ones(shape, dtype=dtype, device=d)

    good_state, good_x = f64(4), x_(3, 5)
    norm = ("moments_normalize", "moments_update_normalize_")

    def args_of(op, x=good_x, mask=None, state=good_state, clip=None, eps=EPS, batches=None):
        def build(d):
            xx, mm, ss = x(d), None if mask is None else mask(d), state(d)
            if op == "moments":
                return (xx, mm)
            if op == "moments_merge_":
                return (ss, batches(d) if batches else f64(2, 4)(d))
            if op == "moments_normalize":
                return (xx, mm, ss, True, True, clip, eps)
            return (ss, xx, mm, True, True, clip, eps)

        return build

    cases = {}
    for op in ("moments", *norm):
        p = op
        cases[f"{op}-int-x"] = (
            op,
            args_of(op, x=x_(3, 5, dtype=torch.int64)),
            rf"^{p}: x must be a floating-point tensor \(float32, bfloat16, float16 or float64\), got (torch\.)?"
            r"(int64|Long)$",
        )
        cases[f"{op}-bool-x"] = (op, args_of(op, x=x_(4, dtype=torch.bool)), rf"^{p}: x must be a floating-point")
        cases[f"{op}-empty-x"] = (
            op,
            args_of(op, x=x_(0, 5)),
            rf"^{p}: x is empty \(shape \[0, 5\]\); an empty batch has nothing to do$",
        )
        cases[f"{op}-mask-shape"] = (
            op,
            args_of(op, mask=lambda d: torch.ones(5, 3, dtype=torch.bool, device=d)),
            rf"^{p}: mask must have the shape of x \[3, 5\], got \[5, 3\]$",
        )
        cases[f"{op}-mask-broadcastable"] = (
            op,
            args_of(op, mask=lambda d: torch.ones(5, dtype=torch.bool, device=d)),
            rf"^{p}: mask must have the shape of x \[3, 5\], got \[5\]$",
        )
        cases[f"{op}-mask-complex"] = (
            op,
            args_of(op, mask=lambda d: torch.ones(3, 5, dtype=torch.complex64, device=d)),
            rf"^{p}: mask must be bool, integer or floating-point, got (torch\.)?(complex64|ComplexFloat)$",
        )
    state_msg = r": state must be float64 \[4\] \(count, mean, M2, rejected\), got "
    for op in (*norm, "moments_merge_"):
        cases[f"{op}-state-fp32"] = (
            op,
            args_of(op, state=lambda d: torch.zeros(4, device=d)),
            rf"^{op}{state_msg}(torch\.float32|Float) \[4\]$",
        )
        cases[f"{op}-state-5"] = (op, args_of(op, state=f64(5)), rf"^{op}{state_msg}(torch\.float64|Double) \[5\]$")
        cases[f"{op}-state-2d"] = (
            op,
            args_of(op, state=f64(1, 4)),
            rf"^{op}{state_msg}(torch\.float64|Double) \[1, 4\]$",
        )
        cases[f"{op}-state-0d"] = (op, args_of(op, state=f64()), rf"^{op}{state_msg}(torch\.float64|Double) \[\]$")
        cases[f"{op}-state-strided"] = (
            op,
            args_of(op, state=lambda d: torch.zeros(8, dtype=torch.float64, device=d)[::2]),
            rf"^{op}: state must be contiguous$",
        )
    batches_msg = r"^moments_merge_: batches must be float64 \[K, 4\] \(count, mean, M2, non-finite per batch\), got "
    for name, make, shown in [
        ("fp32", lambda d: torch.zeros(2, 4, device=d), r"(torch\.float32|Float) \[2, 4\]"),
        ("1d", f64(4), r"(torch\.float64|Double) \[4\]"),
        ("3-slots", f64(2, 3), r"(torch\.float64|Double) \[2, 3\]"),
        ("3d", f64(1, 2, 4), r"(torch\.float64|Double) \[1, 2, 4\]"),
    ]:
        cases[f"merge-batches-{name}"] = (
            "moments_merge_",
            args_of("moments_merge_", batches=make),
            batches_msg + shown + "$",
        )
    for op in norm:
        for name, eps, shown in [("neg", -1.0, "-1"), ("nan", math.nan, "nan"), ("inf", math.inf, "inf")]:
            cases[f"{op}-eps-{name}"] = (
                op,
                args_of(op, eps=eps),
                rf"^{op}: eps must be finite and >= 0, got {shown}(\.0)?$",
            )
        for name, clip, shown in [("zero", 0.0, "0"), ("neg", -0.5, "-0.5"), ("nan", math.nan, "nan")]:
            cases[f"{op}-clip-{name}"] = (
                op,
                args_of(op, clip=clip),
                rf"^{op}: clip must be > 0 \(or None\), got {re.escape(shown)}(\.0)?$",
            )
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, case):
    op, build, match = BAD[case]
    args = build(device)
    snapshot = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    _, direct = H.assert_same_error(op, match, lambda route: call(op, route, *args))
    assert re.search(match, direct), direct
    for a, b in zip(args, snapshot, strict=True):  # nothing was written before the check
        if isinstance(a, torch.Tensor) and a.numel():
            assert torch.equal(a, b)


def test_tensors_on_different_devices(device, rand):
    """One argument on another device (meta on a CPU-only machine, where the op routes to its fake
    kernel, whose check mirrors the C++ one; cuda vs cpu where a GPU is present)."""
    x = rand.randn(3, 5, device=device)
    m = make_mask(rand, (3, 5), "bool", torch.float32, device)
    s = make_state(rand, device)
    _, b = _batches_of(rand, device, [2, 3])
    cases = [
        ("moments", (x, H.other_device(m)), "mask", "x"),
        ("moments_merge_", (s, H.other_device(b)), "batches", "state"),
        ("moments_normalize", (x, H.other_device(m), s, True, True, None, EPS), "mask", "x"),
        ("moments_normalize", (x, m, H.other_device(s), True, True, None, EPS), "state", "x"),
        ("moments_update_normalize_", (H.other_device(s), x, m, True, True, None, EPS), "state", "x"),
        ("moments_update_normalize_", (s, x, H.other_device(m), True, True, None, EPS), "mask", "x"),
    ]
    for op, args, name, ref in cases:
        H.assert_device_error(op, name, ref, lambda route, op=op, args=args: call(op, route, *args))


def test_fake_kernels_give_shapes_and_dtypes(rand):
    x = torch.empty(3, 7, dtype=torch.bfloat16, device="meta").t()
    s = torch.empty(4, dtype=torch.float64, device="meta")
    assert ops.moments(x, None).shape == (4,) and ops.moments(x, None).dtype == torch.float64
    y = ops.moments_normalize(x, None, s, True, True, 1.0, EPS)
    assert y.shape == (7, 3) and y.dtype == torch.bfloat16 and y.is_contiguous()
    y, b = ops.moments_update_normalize_(
        s, x, torch.ones(7, 3, dtype=torch.bool, device="meta"), True, False, None, EPS
    )
    assert y.shape == (7, 3) and y.dtype == torch.bfloat16 and b.shape == (4,) and b.dtype == torch.float64


def test_functional_outputs_are_detached(rand):
    x = rand.randn(3, 9).requires_grad_()
    s = make_state(rand, "cpu")
    for use_fused in (True, False):
        assert not F.moments(x, use_fused=use_fused).requires_grad
        assert not F.moments_normalize(x, None, s, use_fused=use_fused).requires_grad
        out, batch = F.moments_update_normalize_(s.clone(), x, use_fused=use_fused)
        assert not out.requires_grad and not batch.requires_grad


# ------------------------------------------------------------------------------------------------
# CUDA only: large inputs, bit-identical repeats, no host synchronisation, launch count


@pytest.mark.cuda
@pytest.mark.parametrize(
    "n,dtype,mask_kind",
    [
        (1 << 20, torch.float32, "none"),
        ((1 << 20) + 4099, torch.float32, "bool"),
        (1 << 20, torch.bfloat16, "same"),
        (3_000_001, torch.float16, "int64"),
    ],
    ids=["1M-fp32", "1M+-fp32-mask", "1M-bf16", "3M-fp16"],
)
def test_cuda_large(rand, n, dtype, mask_kind):
    x = rand.randn(n, dtype=dtype, device="cuda", scale=2.0) + 1e3
    mask = make_mask(rand, (n,), mask_kind, dtype, "cuda")
    state0 = make_state(rand, "cuda", offset=1e3)
    batch = ops.moments(x, mask)
    assert_moments(batch, moments64(x, mask), 1e3 + 20, rtol=1e-11)
    state = state0.clone()
    out, b2 = ops.moments_update_normalize_(state, x, mask, True, True, 3.0, EPS)
    torch.testing.assert_close(b2, batch, rtol=1e-13, atol=1e-13)
    eager_state = state0.clone()
    eager, _ = R.moments_update_normalize_(eager_state, x, mask, True, True, 3.0, EPS)
    torch.testing.assert_close(state, eager_state, rtol=1e-11, atol=1e-9)
    truth = normalize64(x, mask, state.cpu(), True, True, 3.0)
    assert_normalized(out, truth, eager)
    cpu_state = state0.cpu()
    cpu_mask = None if mask is None else mask.cpu()
    cpu_out, _ = ops.moments_update_normalize_(cpu_state, x.cpu(), cpu_mask, True, True, 3.0, EPS)
    torch.testing.assert_close(state.cpu(), cpu_state, rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=0, atol=2 * torch.finfo(dtype).eps * 3.0)


@pytest.mark.cuda
def test_cuda_repeat_bit_identical(rand):
    x = rand.randn(4096, 517, device="cuda") * 3 + 1
    m = make_mask(rand, x.shape, "bool", torch.float32, "cuda")
    state0 = make_state(rand, "cuda")
    runs = []
    for _ in range(3):
        s = state0.clone()
        out, batch = ops.moments_update_normalize_(s, x, m, True, True, 0.5, EPS)
        runs.append((out, batch, s, ops.moments(x, m), ops.moments_normalize(x, m, s, True, False, None, EPS)))
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_cpu_mix_rejected_by_kernel(rand):
    """The CUDA kernel's own TORCH_CHECK rejects a CPU state next to a CUDA x."""
    x = rand.randn(3, 5, device="cuda")
    for op, args in [
        ("moments_normalize", (x, None, make_state(rand, "cpu"), True, True, None, EPS)),
        ("moments_update_normalize_", (make_state(rand, "cpu"), x, None, True, True, None, EPS)),
        ("moments_merge_", (make_state(rand, "cuda"), torch.zeros(1, 4, dtype=torch.float64))),
    ]:
        msg = H.error_line(call, op, "ops", *args)
        assert msg.startswith(f"{op}: ") and "is on cpu but" in msg and "cuda" in msg, msg


def _cuda_steps(rand):
    """Score vectors and token rewards, fp32 and bf16, bool masks: inputs the kernels read as they are."""
    scores = rand.randn(512, device="cuda", scale=2.0)
    rewards = rand.randn(64, 1031, dtype=torch.bfloat16, device="cuda")
    mask = make_mask(rand, (64, 1031), "bool", torch.bfloat16, "cuda")
    state = make_state(rand, "cuda")
    return {
        "op.scores": lambda: ops.moments_update_normalize_(state, scores, None, True, True, 0.5, EPS),
        "functional.scores": lambda: F.moments_update_normalize_(state, scores, scale=True, center=True, clip=0.5),
        "functional.rewards": lambda: F.moments_update_normalize_(state, rewards, mask, clip=1.0),
    }


@pytest.mark.cuda
def test_cuda_launch_count(rand):
    """update + normalise + clip is at most two kernel launches: every kernel on the device in the
    profiled region counts, whatever its name (memcpy/memset listed in the message, not counted)."""
    for name, fn in _cuda_steps(rand).items():
        kernels, events = cuda_kernels(fn)
        assert 1 <= len(kernels) <= 2, (name, events)


@pytest.mark.cuda
def test_cuda_no_host_sync(rand):
    for name, fn in _cuda_steps(rand).items():
        out, batch = without_host_sync(fn)
        assert torch.isfinite(out).all() and batch[0].item() > 0, name
