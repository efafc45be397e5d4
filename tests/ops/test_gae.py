"""Tests of the "gae" op family: compute_rewards, gae, masked_whiten, compute_advantages and
rollout_advantages (csrc/include/ppo_fast/gae.h, csrc/cpu/gae.cpp, csrc/cuda/gae.cu).

Ground truth is ``ppo_fast.reference`` run in float64. fp32 outputs must match it tightly; bf16 and
fp16 outputs follow the FlashAttention rule: the fused error is at most twice the error of the
eager reference run on the same low-precision inputs (both against the fp64 reference).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
from unittest import mock

import _helpers as H
import pytest
import torch
from _cuda_checks import cuda_kernels, without_host_sync

import ppo_fast
from ppo_fast import functional as F
from ppo_fast import reference as R

ops = torch.ops.ppo_fast

OPS = ("compute_rewards", "gae", "masked_whiten", "compute_advantages", "rollout_advantages")
# T in {1, 7, 1031} x B in {1, 3}, plus a larger batch whose sizes are not a multiple of any block.
SHAPES = [(1, 1), (3, 1), (1, 7), (3, 7), (1, 1031), (3, 1031), (64, 300)]
GRID_MASKS = ("right", "left", "gaps", "masked_row")
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (whiten_rewards, carry_masked)
FLAG_IDS = ["w0c0", "w0c1", "w1c0", "w1c1"]
GAMMA, LAM = 1.0, 0.95  # TRL's defaults

FP32_TOL = 1e-5  # rtol, and atol relative to max(1, max|ref|)
FP64_TOL = 1e-10


# ------------------------------------------------------------------------------------------------
# Calling the three routes and checking against the reference.


def _functional(op: str, args, use_fused: bool):
    """ppo_fast.functional's ``op``, its trailing flags passed as keywords."""
    kw = {"use_fused": use_fused}
    if op == "gae":
        *args, kw["carry_masked"] = args
    elif op in ("compute_advantages", "rollout_advantages"):
        *args, kw["whiten_rewards"], kw["carry_masked"] = args
    out = getattr(F, op)(*args, **kw)
    return tuple(out) if isinstance(out, tuple) else out


call = H.routes(_functional)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def ref64(op: str, *args):
    """The reference on float64 copies of every floating-point tensor argument."""
    return _as_tuple(call(op, "ref", *[H.as_double(a) for a in args]))


def assert_matches(out, ref, eager=None, tol: float = FP32_TOL):
    """``out`` (fused, any dtype) against ``ref`` (float64). fp32/fp64: tight, with atol scaled by the
    outputs' magnitude; bf16/fp16: FlashAttention rule against ``eager`` (reference on the same
    low-precision inputs)."""
    out, ref = _as_tuple(out), _as_tuple(ref)
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.equal(torch.isfinite(o), torch.isfinite(r)), f"output {i}: non-finite values"
        if o.dtype in H.LOWP:
            H.assert_flash_rule(o, _as_tuple(eager)[i], r, what=f"output {i} ")
        else:
            scale = max(1.0, r.abs().max().item())
            t = FP64_TOL if o.dtype == torch.float64 else tol
            torch.testing.assert_close(o.double(), r, rtol=t, atol=t * scale, msg=lambda m, i=i: f"output {i}: {m}")


def check_op(op: str, *args, out_dtype: torch.dtype, tol: float = FP32_TOL):
    """Run ``op`` through torch.ops and functional(use_fused=True); both must be bit-identical (one
    kernel), of the expected dtype/device/shape, and match the fp64 reference. Returns the outputs."""
    out = _as_tuple(call(op, "ops", *args))
    via_fn = _as_tuple(call(op, "fused", *args))
    first = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.is_floating_point())
    for o, f in zip(out, via_fn, strict=True):
        assert torch.equal(o, f)
        assert o.dtype == out_dtype and o.device == first.device
        assert o.is_contiguous()
    # On the GPU the reference's Python loop over T is thousands of tiny launches: use its log-depth scan
    # there (test_gae_scan_equals_gae holds them equal).
    scan = mock.patch.object(R, "gae", R.gae_scan) if first.device.type == "cuda" else contextlib.nullcontext()
    with scan:
        eager = _as_tuple(call(op, "ref", *args)) if out_dtype in H.LOWP else None
        expected = ref64(op, *args)
    assert_matches(out, expected, eager, tol=tol)
    return out


# ------------------------------------------------------------------------------------------------
# compute_rewards


@pytest.mark.parametrize("kl_penalty", ["kl", "abs", "mse", "k3"])
@pytest.mark.parametrize("mask_kind", GRID_MASKS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_compute_rewards(device, rand, shape, dtype, mask_kind, kl_penalty):
    B, T = shape
    x = rand.rollout(B, T, dtype, device, mask_kind, scores_dtype=torch.float32)
    rewards, non_score, kl = check_op(
        "compute_rewards", x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.2, kl_penalty, out_dtype=dtype
    )
    # The score lands only at each row's last unmasked position; a fully masked row gets none.
    diff = (rewards.double() - non_score.double()).abs() > 0
    m = x["mask"].cpu()
    last = [int(row.nonzero()[-1]) if row.any() else None for row in m]
    for b in range(B):
        nz = diff[b].nonzero().flatten().tolist()
        assert nz in ([], [last[b]]), (b, nz, last[b])
        if last[b] is None:
            assert torch.equal(rewards[b], non_score[b])


@pytest.mark.parametrize(
    "dtype,scores_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float64),
        (torch.float16, torch.bfloat16),
    ],
    ids=H.ids,
)
def test_compute_rewards_scores_dtype(device, rand, dtype, scores_dtype):
    """scores may come in any float dtype; rewards keep the dtype of logprobs."""
    x = rand.rollout(5, 9, dtype, device, "gaps", scores_dtype=scores_dtype)
    args = (x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.1, "kl")
    check_op("compute_rewards", *args, out_dtype=dtype)
    roll = check_op(
        "rollout_advantages", *args[:3], x["values"], x["mask"], 0.1, "kl", GAMMA, LAM, False, False, out_dtype=dtype
    )
    # Same reward arithmetic inside the fused rollout.
    for a, b in zip(roll[:3], ops.compute_rewards(*args), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compute_rewards_kl_estimators(rand):
    """Each estimator's formula, computed here independently of the reference."""
    x = rand.rollout(3, 11, torch.float64)
    m = torch.ones(3, 11, dtype=torch.bool)
    d = x["logprobs"] - x["ref_logprobs"]
    expected = {"kl": d, "abs": d.abs(), "mse": 0.5 * d * d, "k3": (x["ref_logprobs"] - x["logprobs"]).exp() - 1 + d}
    for mode, want in expected.items():
        _, non_score, kl = ops.compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], m, 0.3, mode)
        torch.testing.assert_close(kl, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(non_score, -0.3 * want, rtol=1e-12, atol=1e-12)
    assert (ops.compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], m, 0.3, "k3")[2] >= 0).all()


def test_compute_rewards_k3_near_zero():
    """k3 = exp(r) - r - 1 with r = ref - logp: in fp32 the plain formula (the eager reference) cancels to 0 for
    |r| <= 1e-4; the kernel's expm1(r) - r keeps the absolute error within an ulp of r (its relative error is
    then ~eps / |r|, still far better than the plain formula's 100%)."""
    logp = torch.full((1, 6), -1.0)
    ref = logp + torch.tensor([[1e-4, -1e-4, 3e-3, 0.0, 1e-6, 0.3]])
    _, _, k3 = ops.compute_rewards(torch.zeros(1), logp, ref, torch.ones(1, 6), 1.0, "k3")
    r = (ref.double() - logp.double())[0]
    exact = torch.expm1(r) - r  # float64
    err = (k3[0].double() - exact).abs()
    assert (err <= 2 * torch.finfo(torch.float32).eps * r.abs()).all(), err
    assert k3[0, 3] == 0 and (k3[0, [0, 1, 2, 4, 5]] > 0).all()
    eager = R.kl_penalty(logp, ref, "k3")[0]
    assert (eager[[0, 1, 4]] == 0).all()  # why the kernel uses expm1


# ------------------------------------------------------------------------------------------------
# gae


@pytest.mark.parametrize("carry_masked", [False, True], ids=["plain", "carry"])
@pytest.mark.parametrize("mask_kind", GRID_MASKS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_gae(device, rand, shape, dtype, mask_kind, carry_masked):
    B, T = shape
    v, r = rand.randn(B, T, dtype=dtype, device=device), rand.randn(B, T, dtype=dtype, device=device)
    m = rand.mask(B, T, mask_kind, device=device)
    check_op("gae", v, r, m, GAMMA, LAM, carry_masked, out_dtype=dtype)


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.99, 0.95), (1.0, 1.0)])
@pytest.mark.parametrize("carry_masked", [False, True], ids=["plain", "carry"])
def test_gae_scalars(device, rand, gamma, lam, carry_masked):
    v, r = rand.randn(4, 33, device=device), rand.randn(4, 33, device=device)
    m = rand.mask(4, 33, "gaps", device=device)
    check_op("gae", v, r, m, gamma, lam, carry_masked, out_dtype=torch.float32)
    check_op("compute_advantages", v, r, m, gamma, lam, True, carry_masked, out_dtype=torch.float32)


def test_gae_closed_cases(rand):
    """Independent closed forms: gamma = 0 gives A = r - V; gamma = lam = 1 gives A_t = sum_{k>=t} r_k - V_t."""
    v, r = rand.randn(3, 20, dtype=torch.float64), rand.randn(3, 20, dtype=torch.float64)
    m = torch.ones(3, 20, dtype=torch.bool)
    adv, ret = ops.gae(v, r, m, 0.0, 0.7, False)
    torch.testing.assert_close(adv, r - v)
    torch.testing.assert_close(ret, r)
    adv, ret = ops.gae(v, r, m, 1.0, 1.0, False)
    torch.testing.assert_close(adv, r.flip(1).cumsum(1).flip(1) - v)
    torch.testing.assert_close(ret, adv + v)


def test_carry_masked_skips_masked_positions(rand):
    """carry_masked: the advantages at unmasked positions are those of the row with its masked positions
    removed, and masked positions carry the advantage of the next unmasked one. Without it, gaps matter."""
    B, T = 4, 40
    v, r = rand.randn(B, T, dtype=torch.float64), rand.randn(B, T, dtype=torch.float64)
    m = rand.mask(B, T, "gaps")
    m[:, :8] = True
    m[:, 5] = False  # a gap in the middle of every row
    adv, ret = ops.gae(v, r, m, 0.99, 0.9, True)
    plain, _ = ops.gae(v, r, m, 0.99, 0.9, False)
    for b in range(B):
        idx = m[b].nonzero().flatten()
        want, _ = ops.gae(v[b, idx][None], r[b, idx][None], torch.ones(1, len(idx), dtype=torch.bool), 0.99, 0.9, False)
        torch.testing.assert_close(adv[b, idx], want[0])
        torch.testing.assert_close(ret[b, idx], want[0] + v[b, idx])
        # a masked position carries the advantage of the next unmasked position (0 past the last one)
        for t in (~m[b]).nonzero().flatten().tolist():
            nxt = idx[idx > t]
            carried = adv[b, nxt[0]] if len(nxt) else torch.zeros((), dtype=adv.dtype)
            torch.testing.assert_close(adv[b, t], carried)
        assert not torch.allclose(adv[b, idx], plain[b, idx])


@pytest.mark.parametrize("mask_kind", ["ones", "right"])
def test_carry_masked_is_moot_without_gaps(device, rand, mask_kind):
    """With right padding only (TRL's layout) carrying through masked positions changes nothing."""
    x = rand.rollout(6, 50, device=device, mask_kind=mask_kind)
    a = ops.rollout_advantages(*x.values(), 0.1, "kl", 1.0, 0.95, True, False)
    b = ops.rollout_advantages(*x.values(), 0.1, "kl", 1.0, 0.95, True, True)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("carry_masked", [False, True], ids=["plain", "carry"])
@pytest.mark.parametrize("mask_kind", ["ones", "right", "left", "gaps", "masked_row", "random"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (3, 7), (5, 64), (2, 1031), (4, 300)], ids=H.ids)
def test_gae_scan_equals_gae(rand, shape, mask_kind, carry_masked):
    """The reference's loop-free log-depth scan is the reference's loop."""
    B, T = shape
    v, r = rand.randn(B, T, dtype=torch.float64), rand.randn(B, T, dtype=torch.float64)
    m = rand.mask(B, T, mask_kind)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        want = R.gae(v, r, m, gamma, lam, carry_masked)
        got = R.gae_scan(v, r, m, gamma, lam, carry_masked)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # fp32 in, fp32 out, close to the loop
    got32 = R.gae_scan(v.float(), r.float(), m, 1.0, 0.95, carry_masked)
    want = R.gae(v, r, m, 1.0, 0.95, carry_masked)
    assert got32[0].dtype == torch.float32
    assert_matches(got32, want)


# ------------------------------------------------------------------------------------------------
# masked_whiten


def _nd_mask(rand, shape, kind):
    n = math.prod(shape)
    if kind == "random":
        m = torch.rand(n, generator=rand.gen) < 0.6
    elif kind == "ones":
        m = torch.ones(n, dtype=torch.bool)
    elif kind == "none":
        m = torch.zeros(n, dtype=torch.bool)
    elif kind == "single":
        m = torch.zeros(n, dtype=torch.bool)
        m[int(rand.randint(0, n))] = True
    return m.reshape(shape)


@pytest.mark.parametrize("mask_kind", ["random", "ones", "none", "single"])
@pytest.mark.parametrize("shift_mean", [True, False], ids=["shift", "keep_mean"])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", [(1,), (7,), (1031,), (3, 7), (64, 300), (2, 3, 5), (4, 33, 17)], ids=H.ids)
def test_masked_whiten(device, rand, shape, dtype, shift_mean, mask_kind):
    x = rand.randn(*shape, dtype=dtype, device=device, scale=3.0) + 1.5
    m = _nd_mask(rand, shape, mask_kind).to(device)
    (out,) = check_op("masked_whiten", x, m, shift_mean, 1e-8, out_dtype=dtype)
    # Independent check of the statistics in fp64: with >= 2 unmasked positions the unmasked part of a
    # shifted output has mean 0 and Bessel variance var / (var + eps), i.e. 1.
    n = int(m.sum())
    if n >= 2 and dtype == torch.float32:
        sel = out.double()[m] if shift_mean else out.double()[m] - x.double()[m].mean()
        torch.testing.assert_close(sel.mean().item(), 0.0, atol=1e-5, rtol=0)
        torch.testing.assert_close(sel.var().item(), 1.0, atol=1e-4, rtol=0)


def test_masked_whiten_degenerate_statistics(device, rand):
    """Fewer than two unmasked positions: variance 1 (TRL raises or gives NaN); none: mean 0 too."""
    x = rand.randn(3, 7, device=device)
    none = torch.zeros(3, 7, dtype=torch.bool, device=device)
    one = none.clone()
    one[1, 4] = True
    scale = 1.0 / math.sqrt(1.0 + 1e-8)
    for shift_mean in (True, False):
        torch.testing.assert_close(ops.masked_whiten(x, none, shift_mean, 1e-8), x * scale)
        want = (x - x[1, 4]) * scale + (0 if shift_mean else x[1, 4])
        torch.testing.assert_close(ops.masked_whiten(x, one, shift_mean, 1e-8), want)


def test_masked_whiten_eps(rand):
    x = rand.randn(4, 9, dtype=torch.float64)
    m = torch.ones(4, 9, dtype=torch.bool)
    for eps in (0.0, 1e-8, 0.5, 10.0):
        want = (x - x.mean()) / torch.sqrt(x.var() + eps)
        torch.testing.assert_close(ops.masked_whiten(x, m, True, eps), want, rtol=1e-12, atol=1e-12)


def test_masked_whiten_far_from_zero(rand):
    """Two-pass/Chan moments, not sum(x^2) - n mean^2, which cancels entirely for data far from zero (1e8 + N(0, 1)
    in float64: x^2 ~ 1e16, whose ulp is 2). Crosses several 8192-element chunks."""
    x = 1e8 + rand.randn(5, 7001, dtype=torch.float64)
    m = torch.ones_like(x, dtype=torch.bool)
    want = (x - x.mean()) / x.std()  # torch's own (accurate) two-pass moments
    torch.testing.assert_close(ops.masked_whiten(x, m, True, 0.0), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# compute_advantages and rollout_advantages


@pytest.mark.parametrize("whiten_rewards,carry_masked", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("mask_kind", GRID_MASKS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_compute_advantages(device, rand, shape, dtype, mask_kind, whiten_rewards, carry_masked):
    B, T = shape
    v, r = rand.randn(B, T, dtype=dtype, device=device), rand.randn(B, T, dtype=dtype, device=device, scale=0.5) + 0.3
    m = rand.mask(B, T, mask_kind, device=device)
    check_op("compute_advantages", v, r, m, GAMMA, LAM, whiten_rewards, carry_masked, out_dtype=dtype)


@pytest.mark.parametrize("whiten_rewards,carry_masked", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("mask_kind", GRID_MASKS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_rollout_advantages(device, rand, shape, dtype, mask_kind, whiten_rewards, carry_masked):
    B, T = shape
    x = rand.rollout(B, T, dtype, device, mask_kind)
    args = (*x.values(), 0.2, "kl", GAMMA, LAM, whiten_rewards, carry_masked)
    out = check_op("rollout_advantages", *args, out_dtype=dtype)
    named = F.rollout_advantages(*args[:9], whiten_rewards=whiten_rewards, carry_masked=carry_masked)
    assert isinstance(named, F.RolloutAdvantages)
    assert torch.equal(named.advantages, out[3]) and torch.equal(named.returns, out[4])


@pytest.mark.parametrize("kl_penalty", ["kl", "abs", "mse", "k3"])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_rollout_advantages_kl_modes(device, rand, dtype, kl_penalty):
    x = rand.rollout(9, 70, dtype, device, "gaps")
    for whiten_rewards in (False, True):
        check_op("rollout_advantages", *x.values(), 0.05, kl_penalty, 0.99, 0.9, whiten_rewards, False, out_dtype=dtype)


def _whitened_scores_case(dtype):
    """T = 1 with zero KL and zero values: the returns are the scores whitened with their mean kept."""
    scores = torch.tensor([2.0, 1.81, 2.26])
    z = torch.zeros(3, 1, dtype=dtype)
    return (scores, z, z, z, torch.ones(3, 1, dtype=torch.bool), 0.1, "kl", 1.0, 0.95, True, False)


def test_rollout_whiten_rewards_returns_whitened_scores():
    scores = _whitened_scores_case(torch.float32)[0]
    returns = ops.rollout_advantages(*_whitened_scores_case(torch.float32))[4]
    torch.testing.assert_close(returns[:, 0], (scores - scores.mean()) / scores.std() + scores.mean())


def test_rollout_whiten_rewards_low_precision():
    """The same in bf16. The reward moments must be taken over the rewards as stored (rounded to bf16), which
    the scan reads back: moments of the unrounded rewards gave returns [1.921875, 1.09375, 3.09375] against
    fp64 [1.92005, 1.07899, 3.07097], 3x the eager bf16 error."""
    args = _whitened_scores_case(torch.bfloat16)
    assert_matches(ops.rollout_advantages(*args), ref64("rollout_advantages", *args), R.rollout_advantages(*args))


@pytest.mark.parametrize("whiten_rewards,carry_masked", FLAGS, ids=FLAG_IDS)
def test_rollout_is_rewards_then_advantages(device, rand, whiten_rewards, carry_masked):
    """rollout_advantages = compute_rewards followed by compute_advantages on its rewards."""
    x = rand.rollout(7, 45, device=device, mask_kind="gaps")
    out = ops.rollout_advantages(*x.values(), 0.1, "mse", 0.95, 0.9, whiten_rewards, carry_masked)
    rewards = ops.compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.1, "mse")
    adv = ops.compute_advantages(x["values"], rewards[0], x["mask"], 0.95, 0.9, whiten_rewards, carry_masked)
    for a, b in zip(out, rewards + adv, strict=True):  # moments may be reduced in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["compute_advantages", "rollout_advantages"])
@pytest.mark.parametrize("whiten_rewards", [False, True], ids=["w0", "w1"])
def test_all_masked_batch(device, rand, op, whiten_rewards):
    """Nothing unmasked anywhere: whitening uses mean 0 and variance 1; advantages and returns are 0."""
    x = rand.rollout(3, 7, device=device, mask_kind="none")
    rewards = rand.randn(3, 7, device=device)
    if op == "compute_advantages":
        args = (x["values"], rewards, x["mask"], GAMMA, LAM, whiten_rewards, False)
    else:
        args = (*x.values(), 0.2, "kl", GAMMA, LAM, whiten_rewards, False)
    out = check_op(op, *args, out_dtype=torch.float32)
    adv, ret = out[-2:]
    assert torch.equal(adv, torch.zeros_like(adv)) and torch.equal(ret, torch.zeros_like(ret))
    if op == "rollout_advantages":
        assert torch.equal(out[0], out[1])  # no row gets its score


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "eager"])
def test_functional_outputs_are_detached(rand, op, use_fused):
    """Rollout post-processing carries no gradient (TRL detaches the advantages): inputs that require grad
    give outputs that do not, on both routes."""
    m = rand.mask(3, 9, "right")
    args = [
        a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in _op_args(op, rand, 3, 9, torch.float32, "cpu", m)
    ]
    for o in _as_tuple(call(op, "fused" if use_fused else "eager", *args)):
        assert not o.requires_grad


# ------------------------------------------------------------------------------------------------
# Mask dtypes and non-contiguous inputs


def _op_args(op, rand, B, T, dtype, device, mask):
    x = rand.rollout(B, T, dtype, device, "right")
    x["mask"] = mask
    r = rand.randn(B, T, dtype=dtype, device=device)
    if op == "compute_rewards":
        return (x["scores"], x["logprobs"], x["ref_logprobs"], mask, 0.2, "k3")
    if op == "gae":
        return (x["values"], r, mask, GAMMA, LAM, True)
    if op == "masked_whiten":
        return (x["values"], mask, False, 1e-8)
    if op == "compute_advantages":
        return (x["values"], r, mask, GAMMA, LAM, True, True)
    return (*x.values(), 0.2, "kl", GAMMA, LAM, True, True)


def _with_mask(op, args, mask):
    i = {"compute_rewards": 3, "gae": 2, "masked_whiten": 1, "compute_advantages": 2, "rollout_advantages": 4}[op]
    return (*args[:i], mask, *args[i + 1 :])


@pytest.mark.parametrize(
    "dtype,mask_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.int64),
        (torch.float32, torch.uint8),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float16, torch.int32),
    ],
    ids=H.ids,
)
@pytest.mark.parametrize("op", OPS)
def test_mask_dtypes(device, rand, op, dtype, mask_dtype):
    """Any mask dtype gives exactly the result of the equivalent bool mask."""
    m = rand.mask(5, 37, "gaps", device=device)
    args = _op_args(op, rand, 5, 37, dtype, device, m)
    want = _as_tuple(call(op, "ops", *args))
    for route in ("ops", "fused"):
        got = _as_tuple(call(op, route, *_with_mask(op, args, m.to(mask_dtype))))
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), (route, op)
    eager = _as_tuple(call(op, "ref", *_with_mask(op, args, m.to(mask_dtype))))
    for e, w in zip(eager, _as_tuple(call(op, "ref", *args)), strict=True):
        assert torch.equal(e, w)


@pytest.mark.parametrize("op", OPS)
def test_mask_nonzero_counts_as_one(device, rand, op):
    """A mask entry counts where it is non-zero, whatever its value (documented in functional)."""
    m = rand.mask(4, 21, "gaps", device=device)
    args = _op_args(op, rand, 4, 21, torch.float32, device, m)
    weights = rand.randint(1, 4, (4, 21)).to(device)
    for mask in (m * weights, (m * weights).float() * 0.5):
        got = _as_tuple(call(op, "ops", *_with_mask(op, args, mask)))
        for g, w in zip(got, _as_tuple(call(op, "ops", *args)), strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous(device, rand, op, dtype, layout):
    make = H.LAYOUTS[layout]
    m = rand.mask(6, 29, "gaps", device=device)
    args = _op_args(op, rand, 6, 29, dtype, device, m)
    nc = tuple(make(a) if isinstance(a, torch.Tensor) else a for a in args)
    assert all(torch.equal(a, b) for a, b in zip(args, nc, strict=True) if isinstance(a, torch.Tensor))
    want = _as_tuple(call(op, "ops", *args))
    for route in ("ops", "fused"):
        for g, w in zip(_as_tuple(call(op, route, *nc)), want, strict=True):
            assert g.is_contiguous() and torch.equal(g, w)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_masked_whiten_3d(device, rand, layout):
    x = rand.randn(4, 6, 10, device=device)
    m = _nd_mask(rand, (4, 6, 10), "random").to(device)
    make = H.LAYOUTS[layout]
    want = ops.masked_whiten(x, m, True, 1e-8)
    assert torch.equal(ops.masked_whiten(make(x), make(m), True, 1e-8), want)
    assert torch.equal(ops.masked_whiten(x.permute(2, 0, 1).contiguous().permute(1, 2, 0), m, True, 1e-8), want)


# ------------------------------------------------------------------------------------------------
# TRL 0.11 parity, written plainly (trl/trainer/ppo_trainer.py and trl/core.py)


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = H.trl_masked_mean(values, mask), H.trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, mask, shift_mean=False)
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, mask)
    return values, advantages, returns


def trl_kl_penalty(logprob, ref_logprob, kl_penalty):
    if kl_penalty == "kl":
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    raise NotImplementedError


def trl_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef, kl_penalty):
    rewards, non_score_rewards, kls = [], [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks, strict=True):
        kl = trl_kl_penalty(logprob, ref_logprob, kl_penalty)
        kls.append(kl)
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards), torch.stack(kls)


@pytest.mark.parametrize("shape", [(1, 9), (3, 7), (8, 64), (3, 1031)], ids=H.ids)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
def test_trl_compute_advantages_parity(device, rand, shape, gamma, lam):
    B, T = shape
    v = rand.randn(B, T, device=device)
    r = rand.randn(B, T, device=device, scale=0.5) + 0.2
    m = rand.mask(B, T, "right", device=device)
    mf = m.double()
    values, trl_adv, trl_ret = trl_compute_advantages(v.double(), r.double(), mf, gamma, lam, False)
    for fused in (
        ops.compute_advantages(v, r, m, gamma, lam, False, False),
        F.compute_advantages(v, r, m.float(), gamma, lam),
    ):
        assert_matches(fused, (trl_adv, trl_ret))
    if device.type == "cpu":  # float64 kernels are CPU-only
        fused64 = ops.compute_advantages(v.double(), r.double(), mf, gamma, lam, False, False)
        assert_matches(fused64, (trl_adv, trl_ret))


@pytest.mark.parametrize("shape", [(3, 7), (8, 64)], ids=H.ids)
def test_trl_whiten_rewards_parity_without_padding(device, rand, shape):
    B, T = shape
    v, r = rand.randn(B, T, device=device), rand.randn(B, T, device=device, scale=2.0) + 0.5
    m = torch.ones(B, T, device=device)
    _, trl_adv, trl_ret = trl_compute_advantages(v.double(), r.double(), m.double(), 1.0, 0.95, True)
    assert_matches(ops.compute_advantages(v, r, m, 1.0, 0.95, True, False), (trl_adv, trl_ret))


def test_whiten_rewards_ignores_padding_unlike_trl(device, rand):
    """Deliberate deviation: TRL whitens the padded rewards without masking them again, so padding gets a
    non-zero reward, mean * (1 - rstd), that leaks into the last response tokens' advantages through the
    scan; how much depends on how much padding follows. Ours re-masks: the response tokens' outputs do
    not depend on the padding."""
    B, T = 4, 12
    v, r = rand.randn(B, T, device=device), rand.randn(B, T, device=device, scale=2.0) + 0.5
    lens = torch.tensor([12, 9, 5, 1], device=device)
    outs, trl = [], []
    for pad in (1, 6):
        vp = torch.cat([v, rand.randn(B, pad, device=device)], 1)  # garbage in the padding
        rp = torch.cat([r, rand.randn(B, pad, device=device)], 1)
        m = torch.arange(T + pad, device=device)[None, :] < lens[:, None]
        outs.append(ops.compute_advantages(vp, rp, m, 1.0, 0.95, True, False))
        trl.append(trl_compute_advantages(vp.double() * m, rp.double() * m, m.double(), 1.0, 0.95, True)[1:])
    resp = torch.arange(T, device=device)[None, :] < lens[:, None]
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a[:, :T][resp], b[:, :T][resp], rtol=1e-5, atol=1e-5)
    # TRL's returns (unwhitened) at the last response token differ by the leaked padding rewards.
    last = (torch.arange(B, device=device), lens - 1)
    trl_gap = (trl[0][1][last] - trl[1][1][last]).abs()
    assert (trl_gap > 1e-2).all(), trl_gap


@pytest.mark.parametrize("kl_penalty", ["kl", "abs", "mse"])
@pytest.mark.parametrize("mask_kind", ["ones", "right", "left", "gaps"])
def test_trl_compute_rewards_parity(device, rand, mask_kind, kl_penalty):
    x = rand.rollout(6, 23, device=device, mask_kind=mask_kind)
    want = trl_compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"].long(), 0.2, kl_penalty)
    for route in ("ops", "fused"):
        got = call("compute_rewards", route, x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.2, kl_penalty)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_compute_rewards_masked_row_deviation(rand):
    """TRL raises IndexError on a row with no response token (mask.nonzero()[-1]); ours gives it no score."""
    x = rand.rollout(3, 8, mask_kind="masked_row")
    with pytest.raises(IndexError):
        trl_compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"].long(), 0.2, "kl")
    rewards, non_score, _ = ops.compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.2, "kl")
    assert torch.equal(rewards[0], non_score[0])
    want = trl_compute_rewards(x["scores"][1:], x["logprobs"][1:], x["ref_logprobs"][1:], x["mask"][1:], 0.2, "kl")
    torch.testing.assert_close(rewards[1:], want[0])


# ------------------------------------------------------------------------------------------------
# Long rows


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.9999), (0.9999, 1.0), (0.99, 0.95)])
def test_long_rows(rand, gamma, lam):
    """T = 16384: no underflow or NaN; fp32 close to the fp64 reference. With gamma * lam near 1 the
    fp32 rounding of the coefficient itself compounds over T steps (in the eager fp32 loop as well),
    so the bound is relative to the eager fp32 error, plus an absolute 1e-3 of the scale."""
    B, T = 2, 16384
    v, r = rand.randn(B, T), rand.randn(B, T)
    m = rand.mask(B, T, "right")
    adv64, ret64 = R.gae(v.double(), r.double(), m, gamma, lam)
    eager32 = R.gae(v, r, m, gamma, lam)
    for fused, ref, eager in zip(ops.gae(v, r, m, gamma, lam, False), (adv64, ret64), eager32, strict=True):
        assert torch.isfinite(fused).all()
        scale = ref.abs().max().item()
        err = H.max_err(fused, ref)
        assert err <= H.flash_bound(H.max_err(eager, ref), scale)
        assert err <= 1e-3 * scale
    adv, ret = ops.compute_advantages(v, r, m, gamma, lam, False, False)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), R.masked_whiten(adv64, m), rtol=0, atol=1e-3)
    torch.testing.assert_close(ret, ops.gae(v, r, m, gamma, lam, False)[1], rtol=0, atol=0)


def test_closed_form_underflows_where_the_scan_does_not(rand):
    """Why the kernels scan: A_t = sum_k (gl)^(k-t) delta_k written as revcumsum((gl)^k delta_k) / (gl)^t
    divides by (gl)^t, which underflows to 0 in fp32 after a few thousand steps (0.95^2000 ~ 1e-45)."""
    B, T, gamma, lam = 2, 16384, 1.0, 0.95
    v, r = rand.randn(B, T), rand.randn(B, T)
    m = torch.ones(B, T, dtype=torch.bool)
    delta = r + gamma * torch.cat([v[:, 1:], torch.zeros(B, 1)], 1) - v
    w = (gamma * lam) ** torch.arange(T, dtype=torch.float32)
    closed = (w * delta).flip(1).cumsum(1).flip(1) / w
    assert not torch.isfinite(closed).all()
    adv, _ = ops.gae(v, r, m, gamma, lam, False)
    assert torch.isfinite(adv).all()
    assert_matches(adv, R.gae_scan(v.double(), r.double(), m, gamma, lam)[0])


# ------------------------------------------------------------------------------------------------
# float64 on CPU, determinism, thread-count independence


@pytest.mark.parametrize("op", OPS)
def test_float64_cpu(rand, op):
    m = rand.mask(5, 40, "gaps")
    check_op(op, *_op_args(op, rand, 5, 40, torch.float64, "cpu", m), out_dtype=torch.float64)


@pytest.mark.parametrize("op", OPS)
def test_deterministic(device, rand, op):
    m = rand.mask(64, 300, "gaps", device=device)
    args = _op_args(op, rand, 64, 300, torch.float32, device, m)
    first, second = _as_tuple(call(op, "ops", *args)), _as_tuple(call(op, "ops", *args))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_cpu_thread_count_independent(rand, op):
    """Reductions are per row or per fixed chunk, merged in index order: results do not depend on the
    number of threads (B*T spans several 8192-element chunks here)."""
    m = rand.mask(96, 300, "gaps")
    args = _op_args(op, rand, 96, 300, torch.float32, "cpu", m)
    one, many = H.at_thread_counts(lambda: _as_tuple(call(op, "ops", *args)))
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_cases(rand, device):
    x = rand.rollout(3, 7, device=device, mask_kind="gaps")
    xb = rand.rollout(2, 5, torch.bfloat16, device, "left", scores_dtype=torch.float32)
    y = rand.rollout(1, 1, torch.float16, device, "ones")
    r = rand.randn(3, 7, device=device)
    return {
        "compute_rewards": [
            (x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.2, "kl"),
            (xb["scores"], xb["logprobs"], xb["ref_logprobs"], xb["mask"].float(), 0.1, "k3"),
            (y["scores"], y["logprobs"], y["ref_logprobs"], y["mask"].long(), 0.0, "abs"),
        ],
        "gae": [
            (x["values"], r, x["mask"], 1.0, 0.95, False),
            (xb["values"], xb["logprobs"], xb["mask"].to(torch.bfloat16), 0.9, 0.8, True),
            (y["values"], y["logprobs"], y["mask"], 0.0, 1.0, False),
        ],
        "masked_whiten": [
            (r, x["mask"], True, 1e-8),
            (xb["values"].t(), xb["mask"].t(), False, 1e-8),
            (rand.randn(2, 3, 4, device=device), torch.ones(2, 3, 4, dtype=torch.int64, device=device), True, 0.5),
            (rand.randn(11, device=device), torch.zeros(11, dtype=torch.bool, device=device), False, 1e-8),
        ],
        "compute_advantages": [
            (x["values"], r, x["mask"], 1.0, 0.95, False, False),
            (x["values"], r, x["mask"].long(), 0.99, 0.9, True, True),
            (xb["values"], xb["logprobs"], xb["mask"], 1.0, 1.0, True, False),
        ],
        "rollout_advantages": [
            (*x.values(), 0.2, "kl", 1.0, 0.95, False, False),
            (*x.values(), 0.2, "mse", 0.99, 0.9, True, True),
            (*xb.values(), 0.1, "k3", 1.0, 0.95, True, False),
            (*y.values(), 0.3, "abs", 1.0, 1.0, False, True),
        ],
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, rand, op):
    for args in _opcheck_cases(rand, device)[op]:
        torch.library.opcheck(getattr(ops, op).default, args)


def _fn_call(op, x, r):
    """functional call of each op on rollout inputs x (float32) and rewards r."""
    if op == "compute_rewards":
        return lambda: F.compute_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], 0.2, "k3")
    if op == "gae":
        return lambda: F.gae(x["values"], r, x["mask"], 1.0, 0.95, carry_masked=True)
    if op == "masked_whiten":
        return lambda: F.masked_whiten(r, x["mask"], shift_mean=False)
    if op == "compute_advantages":
        return lambda: F.compute_advantages(x["values"], r, x["mask"], 0.99, 0.95, whiten_rewards=True)
    return lambda: F.rollout_advantages(*x.values(), 0.2, "kl", 1.0, 0.95, whiten_rewards=True)


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(device, rand, dynamo_reset, op):
    """One graph (no break) through functional, fake kernels included (aot_eager traces them)."""
    x = rand.rollout(3, 17, device=device, mask_kind="gaps")
    r = rand.randn(3, 17, device=device)
    fn = _fn_call(op, x, r)
    compiled = torch.compile(lambda: _as_tuple(fn()), fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(), _as_tuple(fn()), strict=True):
        assert torch.equal(a, b)


def test_compile_inductor(device, rand, dynamo_reset):
    """The default backend, with the op inside a graph of other ops and dynamic shapes."""

    def step(scores, logprobs, ref_logprobs, values, mask):
        out = F.rollout_advantages(scores * 0.5, logprobs, ref_logprobs, values, mask, 0.1, "kl", 1.0, 0.95)
        return out.advantages * mask, out.returns.sum(1), out.kl.mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for B, T in [(3, 7), (5, 12)]:
        x = rand.rollout(B, T, device=device, mask_kind="right")
        for a, b in zip(compiled(*x.values()), step(*x.values()), strict=True):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# Bad inputs: same message from both functional routes, op name and argument named, C++ included.


def _bad_cases():
    def rollout(**over):
        def build(rand, device):
            x = rand.rollout(3, 7, device=device)
            args = dict(x, kl_coef=0.2, kl_penalty="kl", gamma=1.0, lam=0.95, whiten_rewards=False, carry=False)
            args.update({k: (v(x, device) if callable(v) else v) for k, v in over.items()})
            return tuple(args.values())

        return build

    def cr(**over):
        def build(rand, device):
            full = rollout(**over)(rand, device)
            return (*full[:3], *full[4:7])  # scores, logprobs, ref_logprobs, mask, kl_coef, kl_penalty

        return build

    def g(op, **over):
        def build(rand, device):
            x = dict(values=rand.randn(3, 7, device=device), rewards=rand.randn(3, 7, device=device))
            x["mask"] = torch.ones(3, 7, dtype=torch.bool, device=device)
            args = dict(x, gamma=1.0, lam=0.95)
            if op == "compute_advantages":
                args["whiten_rewards"] = True
            args["carry"] = False
            args.update({k: (v(x, device) if callable(v) else v) for k, v in over.items()})
            return tuple(args.values())

        return build

    def w(**over):
        def build(rand, device):
            args = dict(x=rand.randn(3, 7, device=device), mask=torch.ones(3, 7, dtype=torch.bool, device=device))
            args.update(shift_mean=True, eps=1e-8)
            args.update({k: (v(args, device) if callable(v) else v) for k, v in over.items()})
            return tuple(args.values())

        return build

    cases = {
        # rank / shape
        "gae-values-1d": ("gae", g("gae", values=lambda x, d: x["values"][0]), r"gae: values must be 2-D \[B, T\]"),
        "gae-rewards-3d": ("gae", g("gae", rewards=lambda x, d: x["rewards"][None]), r"gae: rewards must be 2-D"),
        "gae-rewards-shape": (
            "gae",
            g("gae", rewards=lambda x, d: x["rewards"][:, :5]),
            r"gae: rewards must have the shape of values \[3, 7\], got \[3, 5\]",
        ),
        "gae-mask-shape": (
            "gae",
            g("gae", mask=lambda x, d: x["mask"][:2]),
            r"gae: mask must have the shape of values \[3, 7\], got \[2, 7\]",
        ),
        "adv-values-3d": (
            "compute_advantages",
            g("compute_advantages", values=lambda x, d: x["values"][None]),
            r"compute_advantages: values must be 2-D",
        ),
        "cr-logprobs-1d": (
            "compute_rewards",
            cr(logprobs=lambda x, d: x["logprobs"][0]),
            r"compute_rewards: logprobs must be 2-D \[B, T\], got shape \[7\]",
        ),
        "cr-ref-shape": (
            "compute_rewards",
            cr(ref_logprobs=lambda x, d: x["ref_logprobs"].t()),
            r"compute_rewards: ref_logprobs must have the shape of logprobs \[3, 7\], got \[7, 3\]",
        ),
        "roll-values-shape": (
            "rollout_advantages",
            rollout(values=lambda x, d: x["values"][:, 1:]),
            r"rollout_advantages: values must have the shape of logprobs \[3, 7\], got \[3, 6\]",
        ),
        "roll-mask-shape": (
            "rollout_advantages",
            rollout(mask=lambda x, d: x["mask"].t()),
            r"rollout_advantages: mask must have the shape of logprobs",
        ),
        "whiten-mask-shape": (
            "masked_whiten",
            w(mask=lambda a, d: a["mask"][0]),
            r"masked_whiten: mask must have the shape of x \[3, 7\], got \[7\]",
        ),
        # dtypes
        "gae-rewards-dtype": (
            "gae",
            g("gae", rewards=lambda x, d: x["rewards"].double()),
            r"gae: rewards must have the dtype of values",
        ),
        "roll-ref-dtype": (
            "rollout_advantages",
            rollout(ref_logprobs=lambda x, d: x["ref_logprobs"].half()),
            r"rollout_advantages: ref_logprobs must have the dtype of logprobs",
        ),
        "gae-values-int": (
            "gae",
            g("gae", values=lambda x, d: x["values"].long()),
            r"gae: values must be a floating-point tensor",
        ),
        "adv-rewards-int": (
            "compute_advantages",
            g("compute_advantages", rewards=lambda x, d: x["rewards"].int()),
            r"compute_advantages: rewards must be a floating-point tensor",
        ),
        "cr-logprobs-int": (
            "compute_rewards",
            cr(logprobs=lambda x, d: x["logprobs"].long(), ref_logprobs=lambda x, d: x["ref_logprobs"].long()),
            r"compute_rewards: logprobs must be a floating-point tensor",
        ),
        "whiten-x-int": (
            "masked_whiten",
            w(x=lambda a, d: a["x"].long()),
            r"masked_whiten: x must be a floating-point",
        ),
        "whiten-mask-complex": (
            "masked_whiten",
            w(mask=lambda a, d: a["mask"].to(torch.complex64)),
            r"masked_whiten: mask must be bool, integer or floating-point",
        ),
        "cr-scores-int": (
            "compute_rewards",
            cr(scores=lambda x, d: x["scores"].long()),
            r"compute_rewards: scores must be a floating-point tensor",
        ),
        # empty
        "gae-B0": (
            "gae",
            g(
                "gae",
                values=lambda x, d: x["values"][:0],
                rewards=lambda x, d: x["rewards"][:0],
                mask=lambda x, d: x["mask"][:0],
            ),
            r"gae: values is empty \(shape \[0, 7\]\)",
        ),
        "adv-T0": (
            "compute_advantages",
            g(
                "compute_advantages",
                values=lambda x, d: x["values"][:, :0],
                rewards=lambda x, d: x["rewards"][:, :0],
                mask=lambda x, d: x["mask"][:, :0],
            ),
            r"compute_advantages: values is empty \(shape \[3, 0\]\)",
        ),
        "cr-B0": (
            "compute_rewards",
            lambda rand, d: (
                torch.zeros(0, device=d),
                torch.zeros(0, 5, device=d),
                torch.zeros(0, 5, device=d),
                torch.zeros(0, 5, device=d),
                0.2,
                "kl",
            ),
            r"compute_rewards: logprobs is empty \(shape \[0, 5\]\)",
        ),
        "roll-T0": (
            "rollout_advantages",
            lambda rand, d: (
                torch.zeros(2, device=d),
                *(torch.zeros(2, 0, device=d) for _ in range(4)),
                0.2,
                "kl",
                1.0,
                0.95,
                False,
                False,
            ),
            r"rollout_advantages: logprobs is empty \(shape \[2, 0\]\)",
        ),
        "whiten-empty": (
            "masked_whiten",
            w(x=lambda a, d: a["x"][:0], mask=lambda a, d: a["mask"][:0]),
            r"masked_whiten: x is empty",
        ),
        # kl_penalty
        "cr-kl-bogus": (
            "compute_rewards",
            cr(kl_penalty="kl2"),
            r"compute_rewards: kl_penalty must be one of 'kl', 'abs', 'mse', 'k3', got 'kl2'",
        ),
        "cr-kl-full": ("compute_rewards", cr(kl_penalty="full"), r"compute_rewards: kl_penalty='full' needs the full"),
        "roll-kl-full": (
            "rollout_advantages",
            rollout(kl_penalty="full"),
            r"rollout_advantages: kl_penalty='full' needs the full vocabulary KL",
        ),
        "roll-kl-empty": (
            "rollout_advantages",
            rollout(kl_penalty=""),
            r"rollout_advantages: kl_penalty must be one of",
        ),
        # scalars
        "gae-gamma-nan": ("gae", g("gae", gamma=float("nan")), r"gae: gamma must be finite, got nan"),
        "gae-gamma-inf": ("gae", g("gae", gamma=float("inf")), r"gae: gamma must be finite, got inf"),
        "gae-gamma-big": ("gae", g("gae", gamma=1.5), r"gae: gamma must be in \[0, 1\], got 1.5"),
        "adv-gamma-neg": (
            "compute_advantages",
            g("compute_advantages", gamma=-0.5),
            r"compute_advantages: gamma must be in \[0, 1\], got -0.5",
        ),
        "adv-lam-big": ("compute_advantages", g("compute_advantages", lam=2.0), r"compute_advantages: lam must be in"),
        "roll-lam-nan": ("rollout_advantages", rollout(lam=float("nan")), r"rollout_advantages: lam must be finite"),
        "roll-gamma-big": ("rollout_advantages", rollout(gamma=1.01), r"rollout_advantages: gamma must be in \[0, 1\]"),
        "cr-kl_coef-inf": ("compute_rewards", cr(kl_coef=float("inf")), r"compute_rewards: kl_coef must be finite"),
        "whiten-eps-neg": ("masked_whiten", w(eps=-1e-3), r"masked_whiten: eps must be >= 0"),
        "whiten-eps-nan": ("masked_whiten", w(eps=float("nan")), r"masked_whiten: eps must be finite"),
        # scores
        "cr-scores-long": (
            "compute_rewards",
            cr(scores=lambda x, d: torch.zeros(4, device=d)),
            r"compute_rewards: scores must be 1-D \[B\] with B = logprobs.size\(0\) = 3, got shape \[4\]",
        ),
        "cr-scores-2d": (
            "compute_rewards",
            cr(scores=lambda x, d: x["scores"][:, None]),
            r"compute_rewards: scores must be 1-D \[B\] with B = logprobs.size\(0\) = 3, got shape \[3, 1\]",
        ),
        "roll-scores-0d": (
            "rollout_advantages",
            rollout(scores=lambda x, d: x["scores"][0]),
            r"rollout_advantages: scores must be 1-D \[B\] .*got shape \[\]",
        ),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, rand, case):
    op, build, match = BAD[case]
    args = build(rand, device)
    _, direct = H.assert_same_error(op, match, lambda route: call(op, route, *args))
    assert re.search(match, direct), direct


@pytest.mark.parametrize("op", OPS)
def test_tensors_on_different_devices(device, rand, op):
    """One argument on another device (meta on a CPU-only machine, where the op routes to its fake
    kernel, whose check is the C++ one mirrored; cuda vs cpu where a GPU is present)."""
    m = rand.mask(3, 7, "right", device=device)
    args = list(_op_args(op, rand, 3, 7, torch.float32, device, m))
    tensor_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    names = {
        "compute_rewards": ["scores", "logprobs", "ref_logprobs", "mask"],
        "gae": ["values", "rewards", "mask"],
        "masked_whiten": ["x", "mask"],
        "compute_advantages": ["values", "rewards", "mask"],
        "rollout_advantages": ["scores", "logprobs", "ref_logprobs", "values", "mask"],
    }[op]
    first = "x" if op == "masked_whiten" else "logprobs" if "logprobs" in names else "values"
    for i, name in zip(tensor_idx, names, strict=True):
        if name == first:
            continue
        moved = list(args)
        moved[i] = H.other_device(args[i])
        H.assert_device_error(op, name, first, lambda route, moved=moved: call(op, route, *moved))


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_cpu_mix_rejected_by_kernel(rand, op):
    """The CUDA kernel's own TORCH_CHECK (not the fake kernel) rejects a CPU tensor next to CUDA ones."""
    m = rand.mask(3, 7, "right", device="cuda")
    args = list(_op_args(op, rand, 3, 7, torch.float32, "cuda", m))
    i = {"compute_rewards": 2, "gae": 1, "masked_whiten": 1, "compute_advantages": 1, "rollout_advantages": 3}[op]
    args[i] = args[i].cpu()
    msg = H.error_line(call, op, "ops", *args)
    assert msg.startswith(f"{op}: ") and "is on cpu but" in msg and "cuda" in msg, msg


def test_fake_kernels_give_shapes_and_dtypes(rand):
    """On the meta device the ops run their fake kernels: right shapes and dtypes, contiguous."""
    x = {k: v.to("meta") for k, v in rand.rollout(3, 7, torch.bfloat16, mask_kind="right").items()}
    out = ops.rollout_advantages(*x.values(), 0.2, "kl", 1.0, 0.95, True, True)
    assert len(out) == 5
    for o in out:
        assert o.device.type == "meta" and o.shape == (3, 7) and o.dtype == torch.bfloat16 and o.is_contiguous()
    w = ops.masked_whiten(
        torch.empty(2, 3, 4, device="meta").transpose(0, 2), torch.ones(4, 3, 2).bool().to("meta"), True, 1e-8
    )
    assert w.shape == (4, 3, 2) and w.is_contiguous()


# ------------------------------------------------------------------------------------------------
# Extension loading flags


def _run_python(code: str, **env_over) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPO_FAST_")}
    env.update(env_over)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_disable_ext_routes_to_reference():
    code = (
        "import torch, ppo_fast\n"
        "from ppo_fast import functional as F\n"
        "print(F.fused_available())\n"
        "v = torch.randn(2, 5); m = torch.ones(2, 5)\n"
        "a = F.gae(v, v, m)\n"
        "assert all(torch.equal(p, q) for p, q in zip(a, ppo_fast.reference.gae(v, v, m)))\n"
        "try:\n"
        "    F.gae(v, v, m, use_fused=True)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    res = _run_python(code, PPO_FAST_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "False"
    assert lines[1].startswith("refused: ppo_fast: use_fused=True but the compiled extension is not available")
    assert "PPO_FAST_DISABLE_EXT" in lines[1]


def test_require_ext_loads_extension():
    res = _run_python("import ppo_fast; print(ppo_fast.functional.fused_available())", PPO_FAST_REQUIRE_EXT="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"
    assert ppo_fast.functional.fused_available()


@pytest.mark.parametrize(
    "env,message",
    [
        (dict(PPO_FAST_DISABLE_EXT="1", PPO_FAST_REQUIRE_EXT="1"), "contradict each other"),
        (dict(PPO_FAST_DISABLE_EXT="yes"), "PPO_FAST_DISABLE_EXT must be 0 or 1, got 'yes'"),
    ],
    ids=["both", "bad-value"],
)
def test_ext_flags_import_error(env, message):
    res = _run_python("import ppo_fast", **env)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and message in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------------
# CUDA only: big shapes, no host synchronisation, launch count


@pytest.fixture
def scan_reference(monkeypatch):
    """The reference with its GAE loop replaced by the log-depth scan (tested equal above), so fp64
    references at T = 16384 are quick on the GPU."""
    monkeypatch.setattr(R, "gae", R.gae_scan)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((4096, 257), torch.float32),
        ((3, 16384), torch.float32),
        ((64, 16384), torch.float32),
        ((4096, 4096), torch.float32),
        ((1024, 1031), torch.bfloat16),
        ((17, 16384), torch.float16),
    ],
    ids=H.ids,
)
@pytest.mark.parametrize("whiten_rewards,carry_masked", [(False, False), (True, True)], ids=["w0c0", "w1c1"])
def test_cuda_large(rand, scan_reference, shape, dtype, whiten_rewards, carry_masked):
    B, T = shape
    x = rand.rollout(B, T, dtype, "cuda", "gaps" if carry_masked else "right")
    args = (*x.values(), 0.1, "kl", 1.0, 0.95, whiten_rewards, carry_masked)
    out = _as_tuple(ops.rollout_advantages(*args))
    eager = _as_tuple(R.rollout_advantages(*args)) if dtype in H.LOWP else None
    # T up to 16384 at gamma * lam = 0.95: relative fp32 errors stay ~1e-6 (see test_long_rows)
    assert_matches(out, ref64("rollout_advantages", *args), eager, tol=2e-5)
    if dtype == torch.float32:  # low precision: the rollout scans the unrounded rewards
        adv = ops.compute_advantages(x["values"], out[0], x["mask"], 1.0, 0.95, whiten_rewards, carry_masked)
        for a, b in zip(adv, out[3:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def _cuda_inputs(rand, whiten_rewards):
    # bf16 model outputs, fp32 scores and a bool mask: inputs the kernels read as they are (another mask
    # dtype, or scores that are not fp32, are converted first, which is a launch of its own).
    x = rand.rollout(512, 1031, torch.bfloat16, "cuda", "gaps", scores_dtype=torch.float32)
    roll = lambda: ops.rollout_advantages(*x.values(), 0.1, "kl", 1.0, 0.95, whiten_rewards, True)
    fn_roll = lambda: F.rollout_advantages(*x.values(), 0.1, "kl", whiten_rewards=whiten_rewards)
    adv = lambda: ops.compute_advantages(x["values"], x["logprobs"], x["mask"], 1.0, 0.95, whiten_rewards, False)
    return {"rollout_advantages": roll, "functional.rollout_advantages": fn_roll, "compute_advantages": adv}


@pytest.mark.cuda
@pytest.mark.parametrize("whiten_rewards", [False, True], ids=["w0", "w1"])
def test_cuda_no_host_sync(rand, whiten_rewards):
    for name, fn in _cuda_inputs(rand, whiten_rewards).items():
        out = without_host_sync(fn)
        assert all(torch.isfinite(o).all() for o in out), name


@pytest.mark.cuda
@pytest.mark.parametrize("whiten_rewards", [False, True], ids=["w0", "w1"])
def test_cuda_launch_count(rand, whiten_rewards):
    """The whole post-processing is at most three kernel launches. Every kernel on the device in the
    profiled region counts, whatever its name (memcpy/memset are listed in the message, not counted)."""
    for name, fn in _cuda_inputs(rand, whiten_rewards).items():
        kernels, device_events = cuda_kernels(fn)
        assert 1 <= len(kernels) <= 3, (name, device_events)


# ------------------------------------------------------------------------------------------------
# Non-finite padding. Masked positions are ignored: NaN or +-inf there (padding may hold garbage)
# changes no unmasked output and no statistic (the whitening mean and variance, the scan), fused as
# eager. Outputs at masked positions follow their own inputs: compute_rewards' per-token KL and
# masked_whiten's output are garbage there as their input was; GAE's are built from zeros.

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _padding_cases(rand, B, T, device):
    mask = rand.mask(B, T, "gaps", device=device)
    scores = rand.randn(B, device=device)
    lp = -rand.uniform(B, T, low=0.1, high=3.0, device=device)
    ref = lp + rand.randn(B, T, device=device, scale=0.3)
    values, rewards = rand.randn(B, T, device=device), rand.randn(B, T, device=device)
    return {
        "compute_rewards": ((scores, lp, ref, mask, 0.1, "kl"), (1, 2)),
        "gae": ((values, rewards, mask, 1.0, 0.95, False), (0, 1)),
        "gae_carry": ((values, rewards, mask, 0.99, 0.9, True), (0, 1)),
        "masked_whiten": ((values, mask, True, 1e-8), (0,)),
        "compute_advantages": ((values, rewards, mask, 1.0, 0.95, True, False), (0, 1)),
        "rollout_advantages": ((scores, lp, ref, values, mask, 0.1, "kl", 1.0, 0.95, True, True), (1, 2, 3)),
    }


@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize(
    "case", ["compute_rewards", "gae", "gae_carry", "masked_whiten", "compute_advantages", "rollout_advantages"]
)
def test_nonfinite_padding_is_ignored(device, rand, case, value):
    args, poisoned_idx = _padding_cases(rand, 4, 17, device)[case]
    op = case.removesuffix("_carry")
    mask = next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.bool)
    unmasked = mask != 0
    assert (~unmasked).any() and unmasked.any()
    dirty = list(args)
    for i in poisoned_idx:
        dirty[i] = args[i].masked_fill(~unmasked, NONFINITE[value])
    outs = {}
    for route in ("fused", "eager"):
        clean = _as_tuple(call(op, route, *args))
        got = _as_tuple(call(op, route, *dirty))
        for c, g in zip(clean, got, strict=True):
            assert torch.isfinite(g[unmasked]).all(), f"{route}: {value} padding reached an unmasked output"
            torch.testing.assert_close(g[unmasked], c[unmasked], rtol=0, atol=0)
        outs[route] = got
    for f, e in zip(outs["fused"], outs["eager"], strict=True):
        assert torch.equal(f.isnan(), e.isnan()) and torch.equal(f.isinf(), e.isinf())
        fin = torch.isfinite(e)
        torch.testing.assert_close(f[fin], e[fin], rtol=1e-5, atol=1e-5)
