"""Tests of the clipped PPO loss: ppo_fast::ppo_loss and ppo_fast::ppo_loss_backward
(csrc/include/ppo_fast/ppo_loss.h, csrc/cpu/ppo_loss.cpp, csrc/cuda/ppo_loss.cu), through
``ppo_fast.functional.ppo_loss`` and ``torch.ops.ppo_fast``.

Ground truth is ``ppo_fast.reference.ppo_loss`` run in float64, gradients by autograd. fp32 results
(loss, every statistic, the gradients w.r.t. logprobs and vpreds) must match it tightly; bf16 and
fp16 follow the FlashAttention rule: the fused error is at most twice the error of the eager
reference run on the same low-precision inputs (both against the fp64 reference), plus a small floor.
An independent transcription of TRL 0.11's ``PPOTrainer.loss`` checks the reference's semantics.
"""

from __future__ import annotations

import math

import _helpers as H
import pytest
import torch
from _cuda_checks import cuda_kernels, without_host_sync

from ppo_fast import functional as F
from ppo_fast import reference as R

ops = torch.ops.ppo_fast

AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
# T in {1, 7, 1031} x B in {1, 3}, plus a larger batch whose sizes are not a multiple of any block.
SHAPES = [(1, 1), (3, 1), (1, 7), (3, 7), (1, 1031), (3, 1031), (64, 300)]
GRID_MASKS = ("right", "gaps", "masked_row", "random")
STATS = R.PPO_LOSS_STATS
IDX = {name: i for i, name in enumerate(STATS)}

# Schema order of ppo_fast::ppo_loss; the first eight are tensors (ref_logprobs may be None).
ARGS = (
    "logprobs",
    "vpreds",
    "old_logprobs",
    "old_values",
    "advantages",
    "returns",
    "mask",
    "ref_logprobs",
    "cliprange",
    "cliprange_value",
    "vf_coef",
    "kl_coef",
    "kl_estimator",
    "dual_clip",
    "log_ratio_clamp",
    "aggregation",
    "ratio_threshold",
    "cliprange_high",
)
TENSORS = ARGS[:8]
DEFAULTS = dict(
    cliprange=0.2,
    cliprange_value=0.2,
    vf_coef=0.1,
    kl_coef=0.0,
    kl_estimator="k1",
    dual_clip=None,
    log_ratio_clamp=None,
    aggregation="token_mean",
    ratio_threshold=10.0,
    cliprange_high=None,
)

FP32_TOL = 1e-5  # rtol; atol relative to max(1, |ref|) (loss, stats) or max|ref| (gradients)
FP64_TOL = 1e-10


# ------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(rand, B, T, dtype=torch.float32, device="cpu", mask_kind="gaps", lr_scale=0.3, ref=True):
    """A minibatch: log-ratios ~ N(0, lr_scale) (so some ratios fall outside 1 +- 0.2 on both sides),
    new values ~ old values + N(0, 0.3) (some outside the value clip range), advantages of both signs.
    Drawn in float64 on the CPU, then cast and moved."""
    f64 = torch.float64
    old = -rand.uniform(B, T, low=0.05, high=4.0, dtype=f64)
    logp = old + rand.randn(B, T, dtype=f64, scale=lr_scale)
    old_v = rand.randn(B, T, dtype=f64)
    v = old_v + rand.randn(B, T, dtype=f64, scale=0.3)
    ret = old_v + rand.randn(B, T, dtype=f64, scale=0.5)
    adv = rand.randn(B, T, dtype=f64)
    ref_lp = logp + rand.randn(B, T, dtype=f64, scale=0.3)
    mask = rand.mask(B, T, mask_kind, device=device)

    def cast(t):
        return t.to(device=device, dtype=dtype)

    return dict(
        logprobs=cast(logp),
        vpreds=cast(v),
        old_logprobs=cast(old),
        old_values=cast(old_v),
        advantages=cast(adv),
        returns=cast(ret),
        mask=mask,
        ref_logprobs=cast(ref_lp) if ref else None,
    )


def with_args(x, **scalars):
    a = dict(x)
    a.update(DEFAULTS)
    a.update(scalars)
    return a


# ------------------------------------------------------------------------------------------------
# Calling the routes


def call(route: str, a: dict):
    """One forward through ``route``: 'ops' (torch.ops.ppo_fast.ppo_loss), 'fused' / 'eager'
    (ppo_fast.functional.ppo_loss with use_fused True / False) or 'ref' (ppo_fast.reference.ppo_loss).
    Returns (loss, stats vector)."""
    if route == "ops":
        loss, stats, _ = ops.ppo_loss(*[a[k] for k in ARGS])
        return loss, stats
    if route == "ref":
        loss, stats, _ = R.ppo_loss(**a)
        return loss, stats
    loss, named = F.ppo_loss(
        *[a[k] for k in TENSORS], **{k: a[k] for k in ARGS[8:]}, use_fused={"fused": True, "eager": False}[route]
    )
    return loss, named["_vector"]


def forward_backward(route: str, a: dict, grad_scale: float | None = None, fresh: bool = True):
    """Forward through ``route`` ('ref64' is the reference on float64 copies), then backward of the loss
    (times ``grad_scale``) into fresh leaves for logprobs and vpreds. Returns
    (loss, stats, d_logprobs, d_vpreds), detached."""
    a = dict(a)
    if route == "ref64":
        a = {k: H.as_double(v) for k, v in a.items()}
        route = "ref"
    lp, v = a["logprobs"], a["vpreds"]
    if fresh:
        lp, v = lp.detach().clone(), v.detach().clone()
    else:
        lp.grad = v.grad = None
    lp.requires_grad_()
    v.requires_grad_()
    a.update(logprobs=lp, vpreds=v)
    loss, stats = call(route, a)
    (loss if grad_scale is None else loss * grad_scale).backward()
    return loss.detach(), stats.detach(), lp.grad, v.grad


def _err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x.double() - ref.double()).abs()


def near_kinks(a: dict, rel: float = 1e-5) -> torch.Tensor:
    """[B, T] bool: tokens within ``rel`` (relative), but not exactly on, a kink of the loss, where
    float32 and float64 may legitimately take different sides of a clip (and the token's gradient
    jumps): the log-ratio clamp, the ratio clip boundaries, the dual-clip bound, the value clip
    boundaries and, with the value outside its range, equal squared errors. Exact ties (frequent with
    bf16/fp16 inputs, whose differences are exact in float32) are seen alike by every precision."""
    x = {k: H.as_double(a[k]) for k in TENSORS if a[k] is not None}

    def close(p, q, scale):
        d = (p - q).abs()
        return (d > 0) & (d <= rel * scale)

    lr = x["logprobs"] - x["old_logprobs"]
    near = torch.zeros_like(lr, dtype=torch.bool)
    if a["log_ratio_clamp"] is not None:
        c = a["log_ratio_clamp"]
        near |= close(lr.abs(), c, max(1.0, c))
        lr = lr.clamp(-c, c)
    ratio, eps, adv = lr.exp(), a["cliprange"], x["advantages"]
    eps_high = eps if a.get("cliprange_high") is None else a["cliprange_high"]
    near |= close(ratio, 1 + eps_high, ratio) | close(ratio, 1 - eps, ratio)
    if a["dual_clip"] is not None:
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps_high))
        bound = -adv * a["dual_clip"]
        near |= (adv < 0) & close(pg, bound, bound.abs())
    v, ov, ret, cv = x["vpreds"], x["old_values"], x["returns"], a["cliprange_value"]
    vscale = (ov.abs() + cv).clamp(min=1.0)
    near |= close(v, ov + cv, vscale) | close(v, ov - cv, vscale)
    vclip = torch.minimum(torch.maximum(v, ov - cv), ov + cv)
    e1, e2 = (v - ret) ** 2, (vclip - ret) ** 2
    near |= (v != vclip) & close(e1, e2, torch.maximum(e1, e2))
    return near


def assert_matches(out, ref, eager=None, tol: float = FP32_TOL, what: str = "", near=None):
    """``out`` = (loss, stats, d_logprobs, d_vpreds) of the fused op against the float64 ``ref``. For
    fp32/fp64 inputs: tight. For bf16/fp16 inputs: the FlashAttention rule against ``eager`` (the
    reference on the same low-precision inputs), for the loss, each statistic, and each gradient.
    Gradients at the ``near`` positions (tokens next to a kink, see near_kinks) are not compared."""
    if near is not None and near.any():
        n_near = int(near.sum())
        assert n_near <= max(3, 1e-3 * near.numel()), f"{n_near} tokens next to a kink: too many to be chance"

        def drop(o):
            return (*o[:2], *(g.masked_fill(near, 0) for g in o[2:]))

        out, ref, eager = drop(out), drop(ref), drop(eager) if eager is not None else None
    loss, stats, d_lp, d_v = out
    lowp = d_lp.dtype in H.LOWP
    assert len(stats) == len(STATS)
    for name, o, r, e in zip(
        ("loss", "stats", "d_logprobs", "d_vpreds"), out, ref, eager if lowp else (None,) * 4, strict=True
    ):
        assert o.shape == r.shape, f"{what}{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(o).all() and torch.isfinite(r).all(), f"{what}{name}: non-finite values"
        elementwise = name in ("loss", "stats")  # statistics have unrelated scales: one at a time
        scale = r.abs().clamp(min=1.0) if elementwise else r.abs().max().clamp(min=1e-30)
        if lowp:
            fused_err, eager_err = _err(o, r), _err(e, r)
            if not elementwise:
                fused_err, eager_err = fused_err.max(), eager_err.max()
            bad = fused_err > H.flash_bound(eager_err, scale)
            if bad.any():
                labels = STATS if name == "stats" else [name]
                which = [labels[i] for i in bad.flatten().nonzero().flatten().tolist()] if elementwise else [name]
                raise AssertionError(
                    f"{what}{name} ({o.dtype} inputs) {which}: fused error {fused_err[bad].tolist()} > "
                    f"2 x eager error {eager_err[bad].tolist()} + floor"
                )
        else:
            t = FP64_TOL if d_lp.dtype == torch.float64 else tol
            bad = _err(o, r) > t * scale + t * r.double().abs()
            if bad.any():
                if name == "stats":
                    rows = [f"{STATS[i]}: {o[i].item():.9g} vs {r[i].item():.9g}" for i in bad.nonzero().flatten()]
                    raise AssertionError(f"{what}stats differ: " + "; ".join(rows))
                raise AssertionError(f"{what}{name}: max error {_err(o, r).max().item():.3g}, scale {scale.max():.3g}")


def check_fused(a: dict, tol: float = FP32_TOL):
    """Forward and backward through the fused op (functional and torch.ops: bit-identical, one kernel),
    against the float64 reference. Returns (fused, ref64) outputs."""
    fused = forward_backward("fused", a)
    direct = forward_backward("ops", a)
    for f, d in zip(fused, direct, strict=True):
        assert torch.equal(f, d)
    dtype, device = a["logprobs"].dtype, a["logprobs"].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss, stats, d_lp, d_v = fused
    assert loss.dtype == acc and loss.shape == () and loss.device == device
    assert stats.dtype == acc and stats.shape == (len(STATS),) and stats.device == device
    assert d_lp.dtype == dtype and d_v.dtype == dtype and d_lp.device == device and d_v.device == device
    ref = forward_backward("ref64", a)
    eager = forward_backward("eager", a) if dtype in H.LOWP else None
    near = near_kinks(a) if dtype != torch.float64 else None
    assert_matches(fused, ref, eager, tol=tol, near=near)
    return fused, ref


def stat(stats: torch.Tensor, name: str) -> float:
    return stats[IDX[name]].item()


# ------------------------------------------------------------------------------------------------
# Against the reference: shapes, dtypes, masks, aggregations, options


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("mask_kind", GRID_MASKS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_against_reference(device, rand, shape, dtype, mask_kind, aggregation):
    B, T = shape
    x = make_inputs(rand, B, T, dtype, device, mask_kind)
    (_, stats, d_lp, d_v), _ = check_fused(with_args(x, aggregation=aggregation))
    m = x["mask"]
    assert stat(stats, "ppo/tokens") == m.sum().item()
    assert stat(stats, "ppo/rows") == m.any(1).sum().item()
    # masked positions (all-masked rows included) get exactly zero gradient
    assert (d_lp[~m] == 0).all() and (d_v[~m] == 0).all()


@pytest.mark.parametrize("log_ratio_clamp", [None, 1.5], ids=["lrc0", "lrc"])
@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["dual0", "dual"])
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3"], ids=["kl0", "k1", "k2", "k3"])
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_options(device, rand, dtype, aggregation, kl, dual_clip, log_ratio_clamp):
    """Every aggregation x KL estimator (kl_coef 0 and > 0) x dual clip x log-ratio clamp. Log-ratios
    ~ N(0, 0.8) so ratios beyond the dual clip constant (and beyond the clamp) occur."""
    x = make_inputs(rand, 6, 37, dtype, device, "gaps", lr_scale=0.8)
    # plant two tokens past the dual clip constant (ratio e^1.3 = 3.7 > 3, inside the clamp e^1.5) with A < 0
    x["mask"][0, :2] = True
    x["logprobs"][0, :2] = x["old_logprobs"][0, :2] + 1.3
    x["advantages"][0, :2] = -1.0
    a = with_args(
        x,
        aggregation=aggregation,
        kl_coef=0.0 if kl is None else 0.05,
        kl_estimator=kl or "k2",  # with kl_coef = 0 the estimator is irrelevant
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
    )
    (_, stats, _, _), (_, ref_stats, _, _) = check_fused(a)
    # every branch is exercised
    assert 0 < stat(stats, "policy/clipfrac") < 1
    assert 0 < stat(stats, "val/clipfrac") < 1
    if dual_clip is None:
        assert stat(stats, "policy/dual_clipfrac") == 0
    else:
        assert stat(stats, "policy/dual_clipfrac") > 0
    if log_ratio_clamp is not None:
        lr = (x["logprobs"].double() - x["old_logprobs"].double())[x["mask"]]
        assert (lr.abs() > log_ratio_clamp).any()
        assert stat(stats, "policy/ratio_mean") <= math.exp(log_ratio_clamp) + 1e-6
    if kl is None:
        assert stat(stats, "loss/kl") == 0
    else:
        assert stat(stats, "loss/kl") != 0
    # the total is the sum of its parts
    total = (
        stat(ref_stats, "loss/policy") + 0.1 * stat(ref_stats, "loss/value") + a["kl_coef"] * stat(ref_stats, "loss/kl")
    )
    assert stat(stats, "loss/total") == pytest.approx(total, rel=1e-5 if dtype == torch.float32 else 1e-3, abs=1e-6)


@pytest.mark.parametrize(
    "cliprange,cliprange_value,vf_coef",
    [(0.2, 0.2, 0.1), (0.0, 0.0, 1.0), (0.1, 0.5, 0.5), (0.3, 10.0, 0.0), (0.05, 0.05, 2.0), (1.5, 0.2, 0.1)],
)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_clipranges(device, rand, dtype, cliprange, cliprange_value, vf_coef):
    x = make_inputs(rand, 5, 41, dtype, device, "gaps", lr_scale=0.5)
    a = with_args(x, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef, kl_coef=0.1)
    (_, stats, _, d_v), _ = check_fused(a)
    if vf_coef == 0:
        assert (d_v == 0).all()
    if cliprange_value >= 10:  # the value clip never binds
        assert stat(stats, "val/clipfrac") == 0


@pytest.mark.parametrize("cliprange,cliprange_high", [(0.2, 0.28), (0.1, 0.5), (0.2, 0.0), (0.0, 0.3)])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("aggregation", AGGS)
def test_cliprange_high(device, rand, dtype, cliprange, cliprange_high, aggregation):
    """DAPO's clip-higher: the ratio clipped to [1 - cliprange, 1 + cliprange_high], forward and
    backward against the reference, and the clip fraction against the formula written here."""
    x = make_inputs(rand, 5, 41, dtype, device, "gaps", lr_scale=0.5)
    a = with_args(x, cliprange=cliprange, cliprange_high=cliprange_high, dual_clip=3.0, aggregation=aggregation)
    (_, stats, _, _), _ = check_fused(a)
    x64 = {k: H.as_double(v) for k, v in x.items() if v is not None}
    m = x64["mask"].double()
    ratio, adv = torch.exp(x64["logprobs"] - x64["old_logprobs"]), x64["advantages"]
    clipped = (-adv * ratio.clamp(1 - cliprange, 1 + cliprange_high)) > (-adv * ratio)
    frac = (clipped.double() * m).sum() / m.sum()
    assert abs(stat(stats, "policy/clipfrac") - frac.item()) <= (1e-6 if dtype == torch.float32 else 0.05)


def test_cliprange_high_none_is_cliprange(device, rand):
    x = make_inputs(rand, 3, 33, torch.float32, device, "gaps", lr_scale=0.5)
    same = forward_backward("fused", with_args(x, cliprange=0.15, cliprange_high=0.15))
    default = forward_backward("fused", with_args(x, cliprange=0.15))
    for p, q in zip(same, default, strict=True):
        assert torch.equal(p, q)
    wider = forward_backward("fused", with_args(x, cliprange=0.15, cliprange_high=0.4))
    assert not torch.equal(wider[0], default[0])  # the upper clip moved: the loss changed


def test_cliprange_high_gradient_at_boundaries():
    """The ratio exactly on 1 + cliprange_high and on 1 - cliprange, with the two clip ranges
    different (both exp(+-0.25) - 1 apart from 1, binary-exact): torch.clamp passes the gradient on
    its closed boundaries, so the full -A r / n flows on both, in the fused op and the reference; a
    ratio between 1 + cliprange and 1 + cliprange_high is unclipped (A > 0 gets its gradient)."""
    hi = torch.exp(torch.tensor(0.25, dtype=torch.float64)).item()
    lo = torch.exp(torch.tensor(-0.25, dtype=torch.float64)).item()
    n = 4
    for lr, kw in (
        (0.25, dict(cliprange=0.1, cliprange_high=hi - 1.0)),
        (-0.25, dict(cliprange=1.0 - lo, cliprange_high=0.05)),
    ):
        x = _tie_case([-1.0 + lr] * n, [-1.0] * n, [0.5, -0.5, 2.0, -2.0], [0.0] * n, [0.0] * n, [0.0] * n)
        _, stats, d_lp, _ = _compare_tie(with_args(x, **kw))
        r = torch.exp(x["logprobs"] - x["old_logprobs"])
        assert r.eq(hi if lr > 0 else lo).all()
        torch.testing.assert_close(d_lp, -x["advantages"] * r / n, rtol=1e-15, atol=0)
        assert stat(stats, "policy/clipfrac") == 0.0
    # ratio exp(0.25) with cliprange 0.1 < 0.284 < cliprange_high 0.3: inside the range for A > 0
    x = _tie_case([-0.75] * n, [-1.0] * n, [1.0, 2.0, -1.0, -2.0], [0.0] * n, [0.0] * n, [0.0] * n)
    _, stats, d_lp, _ = _compare_tie(with_args(x, cliprange=0.1, cliprange_high=0.3))
    torch.testing.assert_close(d_lp, -x["advantages"] * hi / n, rtol=1e-15, atol=0)
    assert stat(stats, "policy/clipfrac") == 0.0
    # the same with the symmetric 0.1: A > 0 is clipped (no gradient), A < 0 is not
    _, stats, d_lp, _ = _compare_tie(with_args(x, cliprange=0.1))
    want = torch.tensor([[0.0, 0.0, 1.0 * hi / n, 2.0 * hi / n]], dtype=torch.float64)
    torch.testing.assert_close(d_lp, want, rtol=1e-15, atol=0)
    assert stat(stats, "policy/clipfrac") == 0.5


@pytest.mark.parametrize("aggregation", AGGS)
def test_gradcheck_cliprange_high(rand, aggregation):
    # 1 - 0.15 (log -0.16) and 1 + 0.5 (log 0.41) are clear of smooth_inputs' log-ratio bands; the band
    # (0.25, 0.35) is inside [1 - 0.15, 1 + 0.5] but beyond 1 + 0.15: clip-higher is what keeps it unclipped.
    x = smooth_inputs(rand, 3, 8)
    a = with_args(x, cliprange=0.15, cliprange_high=0.5, dual_clip=1.75, aggregation=aggregation)

    def fn(lp, v):
        return call("fused", dict(a, logprobs=lp, vpreds=v))[0]

    lp, v = x["logprobs"].clone().requires_grad_(), x["vpreds"].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (lp, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float64_cpu(rand):
    for aggregation in AGGS:
        x = make_inputs(rand, 7, 33, torch.float64, "cpu", "gaps", lr_scale=0.6)
        a = with_args(x, aggregation=aggregation, kl_coef=0.2, kl_estimator="k3", dual_clip=2.5, log_ratio_clamp=0.7)
        check_fused(a)


def test_grad_scale(device, rand):
    """The upstream gradient of the loss scales both gradients (negative and zero included)."""
    x = make_inputs(rand, 4, 19, torch.float32, device, "gaps")
    a = with_args(x, kl_coef=0.1, kl_estimator="k2", aggregation="seq_mean_token_mean")
    _, _, g_lp, g_v = forward_backward("fused", a)
    for s in (2.5, -1.0, 0.0):
        _, _, lp_s, v_s = forward_backward("fused", a, grad_scale=s)
        torch.testing.assert_close(lp_s, g_lp * s, rtol=1e-6, atol=0)
        torch.testing.assert_close(v_s, g_v * s, rtol=1e-6, atol=0)


def test_only_vpreds_require_grad(device, rand):
    """A frozen policy (logprobs without grad): the value gradient is unchanged."""
    x = make_inputs(rand, 3, 11, torch.float32, device, "right")
    a = with_args(x)
    _, _, _, want = forward_backward("fused", a)
    v = x["vpreds"].clone().requires_grad_()
    loss, _ = call("fused", dict(a, vpreds=v))
    loss.backward()
    assert torch.equal(v.grad, want)


# ------------------------------------------------------------------------------------------------
# Independent closed forms (not through the reference)


def test_aggregation_closed_forms(rand):
    """Without clipping (cliprange huge), KL and value terms, the loss is agg(-A ratio), computed here."""
    B, T = 5, 13
    x = make_inputs(rand, B, T, torch.float64, "cpu", "gaps")
    x["mask"][2] = False  # an empty row counts for nothing
    m = x["mask"].double()
    term = -x["advantages"] * torch.exp(x["logprobs"] - x["old_logprobs"])
    row_n, row_sum = m.sum(1), (term * m).sum(1)
    nonempty = row_n > 0
    want = {
        "token_mean": (term * m).sum() / m.sum(),
        "seq_mean_token_mean": (row_sum[nonempty] / row_n[nonempty]).mean(),
        "seq_mean_token_sum": row_sum[nonempty].mean(),
    }
    for aggregation, value in want.items():
        loss, stats = call("fused", with_args(x, cliprange=1e6, vf_coef=0.0, aggregation=aggregation))
        torch.testing.assert_close(loss, value, rtol=1e-12, atol=1e-12)
        assert stat(stats, "loss/policy") == pytest.approx(value.item(), rel=1e-12)
        assert stat(stats, "ppo/rows") == B - 1


def test_kl_estimators_closed_form(rand):
    """Only the KL term (A = 0, vf_coef = 0, kl_coef = 1): k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 with
    d = logp - ref; gradients 1, d, 1 - exp(-d), over the token count."""
    x = make_inputs(rand, 3, 17, torch.float64, "cpu", "ones")
    x["advantages"] = torch.zeros_like(x["advantages"])
    n = x["mask"].sum().item()
    d = x["logprobs"] - x["ref_logprobs"]
    cases = {
        "k1": (d, torch.ones_like(d)),
        "k2": (0.5 * d * d, d),
        "k3": (torch.exp(-d) + d - 1, 1 - torch.exp(-d)),
    }
    for est, (value, grad) in cases.items():
        loss, stats, d_lp, d_v = forward_backward("fused", with_args(x, vf_coef=0.0, kl_coef=1.0, kl_estimator=est))
        torch.testing.assert_close(loss, value.mean(), rtol=1e-12, atol=1e-12)
        assert stat(stats, "loss/kl") == pytest.approx(value.mean().item(), rel=1e-12)
        torch.testing.assert_close(d_lp, grad / n, rtol=1e-12, atol=1e-15)
        assert (d_v == 0).all()
    assert (cases["k3"][0] >= 0).all()


# ------------------------------------------------------------------------------------------------
# TRL 0.11 parity, written plainly (trl/trainer/ppo_trainer.py PPOTrainer.loss and trl/core.py)


def trl_clip_by_value(x, tensor_min, tensor_max):
    return torch.max(torch.min(x, tensor_max), tensor_min)


def trl_loss(old_logprobs, values, vpreds, logprobs, mask, advantages, returns, cliprange, cliprange_value, vf_coef,
             ratio_threshold):  # fmt: skip
    """PPOTrainer.loss without the entropy (it needs logits), with TRL's flattened stat names."""
    vpredclipped = trl_clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * H.trl_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = H.trl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = H.trl_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = H.trl_masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)

    loss = pg_loss + vf_coef * vf_loss

    avg_ratio = H.trl_masked_mean(ratio, mask).item()
    if avg_ratio > ratio_threshold:
        pg_loss = pg_loss * 0.0
        vf_loss = vf_loss * 0.0
        loss = loss * 0.0

    approxkl = 0.5 * H.trl_masked_mean((logprobs - old_logprobs) ** 2, mask)
    policykl = H.trl_masked_mean(old_logprobs - logprobs, mask)
    return_mean, return_var = H.trl_masked_mean(returns, mask), H.trl_masked_var(returns, mask)
    value_mean, value_var = H.trl_masked_mean(values, mask), H.trl_masked_var(values, mask)
    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/total": loss.detach(),
        "policy/approxkl": approxkl.detach(),
        "policy/policykl": policykl.detach(),
        "policy/clipfrac": pg_clipfrac.detach(),
        "policy/advantages_mean": H.trl_masked_mean(advantages, mask).detach(),
        "returns/mean": return_mean.detach(),
        "returns/var": return_var.detach(),
        "val/vpred": H.trl_masked_mean(vpreds, mask).detach(),
        "val/error": H.trl_masked_mean((vpreds - returns) ** 2, mask).detach(),
        "val/clipfrac": vf_clipfrac.detach(),
        "val/mean": value_mean.detach(),
        "val/var": value_var.detach(),
        # the ratio tensor TRL logs, reduced the way ours is
        "policy/ratio_mean": H.trl_masked_mean(ratio, mask).detach(),
        "policy/ratio_var": H.trl_masked_var(ratio, mask).detach(),
    }
    return loss, stats


# TRL's clip fractions are float32 (.float()), and so is its Bessel factor mask_sum / (mask_sum - 1) with a
# long mask (true division of integer tensors gives the default dtype): these agree to float32 precision.
TRL_FP32_STATS = ("policy/clipfrac", "val/clipfrac", "returns/var", "val/var", "policy/ratio_var")


def _trl_run(x, cliprange, cliprange_value, vf_coef, ratio_threshold):
    lp = x["logprobs"].double().requires_grad_()
    v = x["vpreds"].double().requires_grad_()
    loss, stats = trl_loss(
        x["old_logprobs"].double(),
        x["old_values"].double(),
        v,
        lp,
        x["mask"].long(),
        x["advantages"].double(),
        x["returns"].double(),
        cliprange,
        cliprange_value,
        vf_coef,
        ratio_threshold,
    )
    loss.backward()
    return loss.detach(), stats, lp.grad, v.grad


@pytest.mark.parametrize("mask_kind", ["ones", "right", "gaps"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=H.ids)
@pytest.mark.parametrize(
    "cliprange,cliprange_value,vf_coef", [(0.2, 0.2, 0.1), (0.1, 0.05, 1.0), (0.3, 0.3, 0.5)], ids=["trl", "b", "c"]
)
def test_trl_loss_parity(device, rand, dtype, mask_kind, cliprange, cliprange_value, vf_coef):
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 kernels are CPU-only")
    x = make_inputs(rand, 6, 45, dtype, device, mask_kind, lr_scale=0.4, ref=False)
    want_loss, want_stats, want_lp, want_v = _trl_run(x, cliprange, cliprange_value, vf_coef, 10.0)
    a = with_args(x, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef)
    loss, stats, d_lp, d_v = forward_backward("fused", a)
    assert 0 < want_stats["policy/clipfrac"] < 1 and 0 < want_stats["val/clipfrac"] < 1
    t = FP64_TOL if dtype == torch.float64 else FP32_TOL
    torch.testing.assert_close(loss.double(), want_loss, rtol=t, atol=t)
    for name, want in want_stats.items():
        tol = max(t, 1e-6) if name in TRL_FP32_STATS else t
        assert stat(stats, name) == pytest.approx(want.item(), rel=tol, abs=tol), name
    scale = max(want_lp.abs().max().item(), want_v.abs().max().item())
    torch.testing.assert_close(d_lp.double(), want_lp, rtol=t, atol=t * scale)
    torch.testing.assert_close(d_v.double(), want_v, rtol=t, atol=t * scale)
    assert stat(stats, "ppo/skipped") == 0 and stat(stats, "loss/kl") == 0


def test_trl_parity_skipped_batch(rand):
    """TRL multiplies pg_loss, vf_loss and loss by 0 when the mean ratio exceeds ratio_threshold; the
    other statistics are still reported."""
    x = make_inputs(rand, 4, 23, torch.float64, "cpu", "gaps", ref=False)
    x["logprobs"] = x["old_logprobs"] + 0.02 + x["logprobs"].sub(x["old_logprobs"]).abs()
    want_loss, want_stats, want_lp, want_v = _trl_run(x, 0.2, 0.2, 0.1, 1.0001)
    assert want_stats["policy/ratio_mean"] > 1.0001
    loss, stats, d_lp, d_v = forward_backward("fused", with_args(x, ratio_threshold=1.0001))
    assert loss.item() == want_loss.item() == 0.0
    for name, want in want_stats.items():
        tol = 1e-6 if name in TRL_FP32_STATS else 1e-10
        assert stat(stats, name) == pytest.approx(want.item(), rel=tol, abs=tol), name
    assert torch.equal(d_lp, want_lp) and torch.equal(d_v, want_v)  # all zeros


# ------------------------------------------------------------------------------------------------
# ratio_threshold


def _above_threshold(x):
    """logprobs > old_logprobs everywhere: the mean ratio is > 1 + 0.01."""
    x = dict(x)
    lr = (x["logprobs"].double() - x["old_logprobs"].double()).abs() + 0.01
    x["logprobs"] = (x["old_logprobs"].double() + lr).to(x["logprobs"].dtype)
    return x


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_ratio_threshold_skips(device, rand, dtype, aggregation):
    x = _above_threshold(make_inputs(rand, 5, 29, dtype, device, "gaps"))
    a = with_args(x, ratio_threshold=1.0001, kl_coef=0.1, kl_estimator="k3", aggregation=aggregation)
    (loss, stats, d_lp, d_v), _ = check_fused(a)  # the other statistics still match the reference
    assert stat(stats, "policy/ratio_mean") > 1.0001
    assert loss.item() == 0.0
    for name in ("loss/total", "loss/policy", "loss/value"):
        assert stat(stats, name) == 0.0, name
    assert stat(stats, "ppo/skipped") == 1.0
    assert stat(stats, "loss/kl") != 0  # reported, not applied
    assert torch.count_nonzero(d_lp) == 0 and torch.count_nonzero(d_v) == 0
    # below the threshold (and at inf, which disables it) the same batch is a normal loss
    for threshold in (50.0, math.inf):
        (loss, stats, d_lp, _), _ = check_fused(dict(a, ratio_threshold=threshold))
        assert stat(stats, "ppo/skipped") == 0.0 and loss.item() != 0.0 and torch.count_nonzero(d_lp) > 0


def test_ratio_threshold_is_strict(device, rand):
    """The batch is skipped only when the mean ratio exceeds the threshold: ratio exactly 1 (logprobs ==
    old_logprobs) at threshold 1 is a normal loss."""
    x = make_inputs(rand, 3, 9, torch.float32, device, "right")
    x["logprobs"] = x["old_logprobs"].clone()
    (loss, stats, d_lp, _), _ = check_fused(with_args(x, ratio_threshold=1.0))
    assert stat(stats, "policy/ratio_mean") == 1.0
    assert stat(stats, "ppo/skipped") == 0.0 and torch.count_nonzero(d_lp) > 0
    (_, stats, d_lp, _), _ = check_fused(with_args(x, ratio_threshold=0.9999))
    assert stat(stats, "ppo/skipped") == 1.0 and torch.count_nonzero(d_lp) == 0


# ------------------------------------------------------------------------------------------------
# gradcheck in fp64, away from the kinks


def smooth_inputs(rand, B, T):
    """float64 inputs with every kink at least 0.05 away: log-ratios in one of four bands, inside
    (-0.1, 0.1) or outside the clip range 1 +- 0.2 (log 1.2 = 0.18, log 0.8 = -0.22), clear of the
    dual clip constant 1.55 (log = 0.44) and the log-ratio clamp 0.5; |A| >= 0.2; new values either
    within 0.1 of the old ones or 0.3 to 0.6 away (value clip 0.2), with returns placed so the two
    squared errors differ clearly."""
    f64 = torch.float64
    bands = torch.tensor([[-0.1, 0.1], [0.25, 0.35], [0.6, 0.7], [-0.45, -0.3]], dtype=f64)
    pick = bands[rand.randint(0, 4, (B, T))]
    lr = pick[..., 0] + rand.uniform(B, T, dtype=f64) * (pick[..., 1] - pick[..., 0])
    old = -rand.uniform(B, T, low=0.1, high=3.0, dtype=f64)
    sign = torch.where(rand.uniform(B, T, dtype=f64) < 0.5, -1.0, 1.0).to(f64)
    adv = sign * rand.uniform(B, T, low=0.2, high=1.5, dtype=f64)
    vbands = torch.tensor([[-0.1, 0.1], [0.3, 0.6], [-0.6, -0.3]], dtype=f64)
    vpick = vbands[rand.randint(0, 3, (B, T))]
    dv = vpick[..., 0] + rand.uniform(B, T, dtype=f64) * (vpick[..., 1] - vpick[..., 0])
    old_v = rand.randn(B, T, dtype=f64)
    v = old_v + dv
    ret = old_v + rand.randn(B, T, dtype=f64, scale=0.5)
    vclip = torch.clamp(v, old_v - 0.2, old_v + 0.2)
    near = (dv.abs() > 0.2) & (((v - ret) ** 2 - (vclip - ret) ** 2).abs() < 0.02)
    ret = torch.where(near, old_v - 1.5 * torch.sign(dv), ret)
    # two tokens that surely exercise the branches: ratio past the dual clip with A < 0 and a clipped
    # value error; and a clipped ratio with A > 0 (pg2 > pg1)
    lr[0, :2], adv[0, :2] = torch.tensor([0.65, 0.3], dtype=f64), torch.tensor([-1.0, 1.0], dtype=f64)
    v[0, :2], ret[0, :2] = old_v[0, :2] + 0.45, old_v[0, :2] + 1.5
    mask = rand.mask(B, T, "gaps")
    mask[0, :2] = True
    return dict(
        logprobs=old + lr,
        vpreds=v,
        old_logprobs=old,
        old_values=old_v,
        advantages=adv,
        returns=ret,
        mask=mask,
        ref_logprobs=old + lr + rand.randn(B, T, dtype=f64, scale=0.3),
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(kl_coef=0.3, kl_estimator="k1"),
        dict(kl_coef=0.3, kl_estimator="k2"),
        dict(kl_coef=0.3, kl_estimator="k3"),
        dict(dual_clip=1.55),
        dict(log_ratio_clamp=0.5),
        dict(kl_coef=0.2, kl_estimator="k3", dual_clip=1.55, log_ratio_clamp=0.5, vf_coef=0.7),
    ],
    ids=["plain", "k1", "k2", "k3", "dual", "lrc", "all"],
)
@pytest.mark.parametrize("aggregation", AGGS)
def test_gradcheck(rand, aggregation, options):
    x = smooth_inputs(rand, 3, 8)
    a = with_args(x, aggregation=aggregation, **options)
    _, stats = call("fused", a)
    assert 0 < stat(stats, "policy/clipfrac") < 1 and 0 < stat(stats, "val/clipfrac") < 1
    if "dual_clip" in options:
        assert stat(stats, "policy/dual_clipfrac") > 0

    def fn(lp, v):
        return call("fused", dict(a, logprobs=lp, vpreds=v))[0]

    lp, v = x["logprobs"].clone().requires_grad_(), x["vpreds"].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (lp, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Ties and clip boundaries follow autograd of the eager formula


def _tie_case(logprobs, old, adv, v, old_v, ret):
    def t(vals):
        return torch.tensor([vals], dtype=torch.float64)

    n = len(logprobs)
    return dict(
        logprobs=t(logprobs),
        vpreds=t(v),
        old_logprobs=t(old),
        old_values=t(old_v),
        advantages=t(adv),
        returns=t(ret),
        mask=torch.ones(1, n, dtype=torch.bool),
        ref_logprobs=t(logprobs) - 0.125,
    )


def _compare_tie(a):
    fused = forward_backward("fused", a)
    ref = forward_backward("ref64", a)
    for f, r in zip(fused, ref, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-14)
    return fused


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum"])
def test_ties_and_boundaries(aggregation):
    """Exact ties, built from binary-exact numbers, against the reference's autograd gradient in fp64:
    torch.maximum / minimum send half the gradient to each side of a tie; torch.clamp passes it on
    both closed boundaries. The expected factors are also checked by hand."""
    agg = dict(aggregation=aggregation)
    n = 4
    w = 1.0 / n if aggregation == "token_mean" else 1.0  # one row: token_sum weight 1

    # 1. cliprange 0 and ratio exactly 1: ratio sits on both clamp boundaries and pg1 == pg2.
    x = _tie_case([-1.0, -2.0, -0.5, -1.5], [-1.0, -2.0, -0.5, -1.5], [0.5, -0.75, 1.0, 0.0], [0.0] * 4, [0.0] * 4,
                  [0.0] * 4)  # fmt: skip
    _, stats, d_lp, _ = _compare_tie(with_args(x, cliprange=0.0, **agg))
    assert stat(stats, "policy/ratio_mean") == 1.0
    torch.testing.assert_close(d_lp, -x["advantages"] * w, rtol=0, atol=0)  # full gradient (closed boundaries)

    # 2. ratio exactly on 1 + cliprange and on 1 - cliprange (cliprange = exp(+-0.25) -+ 1, exact).
    hi, lo = (
        torch.exp(torch.tensor(0.25, dtype=torch.float64)).item(),
        torch.exp(torch.tensor(-0.25, dtype=torch.float64)).item(),
    )
    for lr, eps in ((0.25, hi - 1.0), (-0.25, 1.0 - lo)):
        x = _tie_case([-1.0 + lr] * 4, [-1.0] * 4, [0.5, -0.5, 2.0, -2.0], [0.0] * 4, [0.0] * 4, [0.0] * 4)
        a = with_args(x, cliprange=eps, **agg)
        _, stats, d_lp, _ = _compare_tie(a)
        r = stat(stats, "policy/ratio_mean")
        assert r == (1.0 + eps if lr > 0 else 1.0 - eps)  # the kernel's ratio is on the boundary
        assert torch.exp(x["logprobs"] - x["old_logprobs"]).eq(r).all()  # and so is the reference's
        torch.testing.assert_close(d_lp, -x["advantages"] * r * w, rtol=1e-15, atol=0)
        assert stat(stats, "policy/clipfrac") == 0.0

    # 3. vpreds exactly on old_values +- cliprange_value (0.25), and a tie of the two squared errors
    #    with vpreds outside the range (v = 0.75, clipped 0.25, return 0.5 halfway).
    x = _tie_case([-1.0] * 4, [-1.0] * 4, [1.0] * 4, [0.75, 0.25, 0.75, -0.75], [0.5, 0.5, 0.0, 0.0],
                  [0.0, 1.0, 0.5, -0.5])  # fmt: skip
    _, stats, _, d_v = _compare_tie(with_args(x, cliprange_value=0.25, vf_coef=1.0, **agg))
    # on the boundary: vclip == v, full gradient (v - R); at the tie outside: half of (v - R)
    want = torch.tensor([[0.75, -0.75, 0.125, -0.125]], dtype=torch.float64) * w
    torch.testing.assert_close(d_v, want, rtol=0, atol=0)
    assert stat(stats, "val/clipfrac") == 0.0

    # 4. log-ratio exactly on the clamp (+-0.25), ratio then outside the clip range (so only the
    #    unclipped branch, A < 0 for lr > 0 and A > 0 for lr < 0, carries gradient).
    x = _tie_case([-0.75, -1.25, -0.75, -1.25], [-1.0] * 4, [-1.0, 1.0, 1.0, -1.0], [0.0] * 4, [0.0] * 4, [0.0] * 4)
    _, _, d_lp, _ = _compare_tie(with_args(x, log_ratio_clamp=0.25, **agg))
    r = torch.exp(x["logprobs"] - x["old_logprobs"])
    want = torch.where(torch.tensor([[True, True, False, False]]), -x["advantages"] * r * w, 0.0)
    torch.testing.assert_close(d_lp, want, rtol=1e-15, atol=0)

    # 5. dual clip bound tie: ratio exactly the dual-clip constant, A < 0 -> half the gradient.
    c = torch.exp(torch.tensor(0.5, dtype=torch.float64)).item()
    x = _tie_case([-0.5, -1.5, -0.5, -0.5], [-1.0, -2.0, -1.0, -1.0], [-1.0, -0.5, 1.0, 0.0], [0.0] * 4, [0.0] * 4,
                  [0.0] * 4)  # fmt: skip
    _, stats, d_lp, _ = _compare_tie(with_args(x, dual_clip=c, **agg))
    assert torch.exp(x["logprobs"] - x["old_logprobs"]).eq(c).all()
    want = torch.tensor([[0.5 * c, 0.25 * c, 0.0, 0.0]], dtype=torch.float64) * w  # A > 0: clipped at 1.2
    torch.testing.assert_close(d_lp, want, rtol=1e-15, atol=0)
    assert stat(stats, "policy/dual_clipfrac") == 0.0  # a tie is not "the bound was taken"


def test_zero_advantages_and_equal_values(rand):
    """A = 0 (pg1 == pg2 == -0 whatever the ratio) and v == R: no NaN, and the reference's gradient."""
    x = make_inputs(rand, 2, 9, torch.float64, "cpu", "ones", lr_scale=1.0)
    x["advantages"] = torch.zeros_like(x["advantages"])
    x["returns"] = x["vpreds"].clone()
    x["old_values"] = x["vpreds"].clone()
    _, _, d_lp, d_v = _compare_tie(with_args(x, dual_clip=2.0, log_ratio_clamp=1.0))
    assert (d_lp == 0).all() and (d_v == 0).all()


# ------------------------------------------------------------------------------------------------
# Masks: all-masked rows and batches, one token, dtypes, non-contiguous inputs


@pytest.mark.parametrize("aggregation", AGGS)
def test_all_masked_batch(device, rand, aggregation):
    """Nothing unmasked: loss 0, statistics finite (zero), gradients zero."""
    x = make_inputs(rand, 3, 7, torch.float32, device, "none")
    a = with_args(x, aggregation=aggregation, kl_coef=0.1, kl_estimator="k3", dual_clip=2.0)
    (loss, stats, d_lp, d_v), _ = check_fused(a)
    assert loss.item() == 0.0
    assert torch.isfinite(stats).all()
    assert stat(stats, "ppo/tokens") == 0 and stat(stats, "ppo/rows") == 0 and stat(stats, "ppo/skipped") == 0
    assert torch.count_nonzero(d_lp) == 0 and torch.count_nonzero(d_v) == 0


@pytest.mark.parametrize("aggregation", AGGS)
def test_all_masked_rows_count_for_nothing(device, rand, aggregation):
    """Inserting fully masked rows of large (finite) values changes nothing: not the loss, not the
    statistics (row count included), not the other rows' gradients; theirs are zero."""
    x = make_inputs(rand, 3, 11, torch.float32, device, "gaps")
    a = with_args(x, aggregation=aggregation, kl_coef=0.1, kl_estimator="k2")
    want = forward_backward("fused", a)
    junk = make_inputs(rand, 2, 11, torch.float32, device, "none")
    bigger = {}
    for k in TENSORS:
        j = junk[k] * 10 if k != "mask" else junk[k]
        bigger[k] = torch.cat([j[:1], x[k][:2], j[1:], x[k][2:]])
    got = forward_backward("fused", with_args(bigger, aggregation=aggregation, kl_coef=0.1, kl_estimator="k2"))
    keep = torch.tensor([1, 2, 4], device=device)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    for g, w in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(g[keep], w, rtol=1e-6, atol=1e-9)
        assert (g[[0, 3]] == 0).all()


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_single_token(device, rand, dtype):
    x = make_inputs(rand, 1, 1, dtype, device, "ones")
    for aggregation in AGGS:
        (_, stats, d_lp, d_v), _ = check_fused(with_args(x, aggregation=aggregation, kl_coef=0.5, kl_estimator="k3"))
        assert stat(stats, "ppo/tokens") == 1 and stat(stats, "ppo/rows") == 1
        for name in ("policy/ratio_var", "returns/var", "val/vpred_var", "val/var"):
            assert stat(stats, name) == 0.0, name  # one sample: no spread (TRL gives NaN here)
        assert d_lp.item() != 0  # the KL term always pulls


@pytest.mark.parametrize(
    "dtype,mask_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.int64),
        (torch.float32, torch.uint8),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.int64),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
    ],
    ids=H.ids,
)
def test_mask_dtypes(device, rand, dtype, mask_dtype):
    """Any mask dtype gives exactly the result of the equivalent bool mask, on every route."""
    x = make_inputs(rand, 5, 37, dtype, device, "gaps")
    a = with_args(x, kl_coef=0.1, aggregation="seq_mean_token_mean")
    b = dict(a, mask=x["mask"].to(mask_dtype))
    for route in ("fused", "ops", "eager"):
        for g, w in zip(forward_backward(route, b), forward_backward(route, a), strict=True):
            assert torch.equal(g, w), (route, mask_dtype)


def test_mask_nonzero_counts_as_one(device, rand):
    x = make_inputs(rand, 4, 21, torch.float32, device, "gaps")
    a = with_args(x, aggregation="seq_mean_token_sum")
    want = forward_backward("fused", a)
    weights = rand.randint(1, 4, (4, 21)).to(device)
    for mask in (x["mask"] * weights, (x["mask"] * weights).float() * 0.5, -(x["mask"].float())):
        for g, w in zip(forward_backward("fused", dict(a, mask=mask)), want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
def test_non_contiguous(device, rand, dtype, layout):
    make = H.LAYOUTS[layout]
    x = make_inputs(rand, 6, 29, dtype, device, "gaps")
    a = with_args(x, kl_coef=0.1, kl_estimator="k3", dual_clip=3.0, aggregation="seq_mean_token_mean")
    nc = dict(a, **{k: make(x[k]) for k in TENSORS})
    assert all(not nc[k].is_contiguous() for k in TENSORS)
    want = forward_backward("fused", a)
    for route in ("fused", "ops"):
        got = forward_backward(route, nc, fresh=False)  # the non-contiguous views themselves are the leaves
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), route
    assert torch.equal(nc["logprobs"].grad, want[2])


# ------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("aggregation", AGGS)
def test_deterministic(device, rand, aggregation):
    x = make_inputs(rand, 64, 300, torch.float32, device, "gaps")
    a = with_args(x, aggregation=aggregation, kl_coef=0.1, kl_estimator="k3")
    first = forward_backward("fused", a)
    for _ in range(2):
        for p, q in zip(forward_backward("fused", a), first, strict=True):
            assert torch.equal(p, q)


def test_cpu_thread_count_independent(rand):
    """Per-row partials merged in row order: the bits do not depend on the number of threads."""
    x = make_inputs(rand, 96, 300, torch.float32, "cpu", "gaps")
    for aggregation in AGGS:
        a = with_args(x, aggregation=aggregation, kl_coef=0.1, kl_estimator="k2")
        one, many = H.at_thread_counts(lambda a=a: forward_backward("fused", a))
        for p, q in zip(one, many, strict=True):
            assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------
# Statistics


def test_stats_are_device_tensors(device, rand):
    for dtype in [torch.float32, torch.bfloat16] + ([torch.float64] if device.type == "cpu" else []):
        x = make_inputs(rand, 3, 10, dtype, device, "gaps")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for use_fused in (True, False):
            loss, named = F.ppo_loss(*[x[k] for k in TENSORS], kl_coef=0.1, use_fused=use_fused)
            assert list(named) == [*STATS, "_vector"]
            vec = named["_vector"]
            assert isinstance(vec, torch.Tensor) and vec.shape == (len(STATS),)
            assert vec.device == device and vec.dtype == acc
            for i, name in enumerate(STATS):
                s = named[name]
                assert isinstance(s, torch.Tensor), name
                assert s.shape == () and s.device == device and s.dtype == acc, name
                assert torch.equal(s, vec[i]), name
            assert torch.equal(named["loss/total"], loss.detach())


def test_stats_carry_no_gradient(rand):
    """The statistics are not differentiable: on the eager route they are detached; on the fused route
    they must be too, or a backward from a statistic (say loss/policy) silently yields zero gradients."""
    x = make_inputs(rand, 3, 10, torch.float32, "cpu", "gaps")
    for use_fused in (False, True):
        lp, v = x["logprobs"].clone().requires_grad_(), x["vpreds"].clone().requires_grad_()
        loss, named = F.ppo_loss(lp, v, *[x[k] for k in TENSORS[2:]], use_fused=use_fused)
        assert loss.requires_grad
        bad = [name for name, s in named.items() if s.requires_grad]
        assert not bad, f"use_fused={use_fused}: statistics require grad: {bad}"


def test_stats_match_independent_formulas(rand):
    """The statistics straight from their definitions over the unmasked tokens (fp64)."""
    x = make_inputs(rand, 4, 25, torch.float64, "cpu", "gaps", lr_scale=0.7)
    m = x["mask"]
    lr = (x["logprobs"] - x["old_logprobs"])[m]
    ratio = lr.exp()
    adv, ret, v, ov = (x[k][m] for k in ("advantages", "returns", "vpreds", "old_values"))
    _, stats = call("fused", with_args(x, dual_clip=2.0))
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(0.8, 1.2)
    pg = torch.maximum(pg1, pg2)
    vclip = torch.clamp(v, ov - 0.2, ov + 0.2)
    want = {
        "policy/clipfrac": (pg2 > pg1).double().mean(),
        "policy/dual_clipfrac": ((adv < 0) & (-adv * 2.0 < pg)).double().mean(),
        "policy/approxkl": 0.5 * (lr**2).mean(),
        "policy/policykl": (-lr).mean(),
        "policy/ratio_mean": ratio.mean(),
        "policy/ratio_var": ratio.var(),
        "policy/advantages_mean": adv.mean(),
        "returns/mean": ret.mean(),
        "returns/var": ret.var(),
        "val/vpred": v.mean(),
        "val/vpred_var": v.var(),
        "val/error": ((v - ret) ** 2).mean(),
        "val/clipfrac": ((vclip - ret) ** 2 > (v - ret) ** 2).double().mean(),
        "val/mean": ov.mean(),
        "val/var": ov.var(),
        "ppo/tokens": torch.tensor(float(m.sum())),
        "ppo/rows": torch.tensor(float(m.any(1).sum())),
    }
    assert want["policy/dual_clipfrac"] > 0
    for name, value in want.items():
        assert stat(stats, name) == pytest.approx(value.item(), rel=1e-12, abs=1e-14), name


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_cases(rand, device):
    x = make_inputs(rand, 3, 7, torch.float32, device, "gaps")
    xb = make_inputs(rand, 2, 5, torch.bfloat16, device, "right", lr_scale=0.8)
    y = make_inputs(rand, 1, 1, torch.float16, device, "ones", ref=False)
    return [
        with_args(x),
        with_args(x, ref_logprobs=None, dual_clip=2.0, aggregation="seq_mean_token_mean"),
        with_args(x, kl_coef=0.1, kl_estimator="k3", log_ratio_clamp=0.5, aggregation="seq_mean_token_sum"),
        with_args(dict(x, mask=x["mask"].long()), ratio_threshold=1.0001),
        with_args(xb, kl_coef=0.05, kl_estimator="k2", dual_clip=3.0, mask=xb["mask"].to(torch.bfloat16)),
        with_args(y, cliprange=0.0, cliprange_value=0.0, vf_coef=1.0),
        with_args(x, cliprange=0.1, cliprange_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3"),
    ]


def test_opcheck_forward(device, rand):
    for a in _opcheck_cases(rand, device):
        args = [a[k] for k in ARGS]
        torch.library.opcheck(ops.ppo_loss.default, args)
        # with gradients: the autograd registration and the backward under aot_dispatch
        args[0] = args[0].clone().requires_grad_()
        args[1] = args[1].clone().requires_grad_()
        torch.library.opcheck(ops.ppo_loss.default, args)


def test_opcheck_backward(device, rand):
    for a in _opcheck_cases(rand, device):
        args = [a[k] for k in ARGS]
        _, _, row_scale = ops.ppo_loss(*args)
        grad = torch.tensor(1.5, device=device)
        bwd = [grad, row_scale, *args[:15], a["cliprange_high"]]  # no aggregation / ratio_threshold: row_scale has them
        torch.library.opcheck(ops.ppo_loss_backward.default, bwd)


def _train_step(scale, shift, x, **kw):
    """A differentiable computation around the op: logprobs and values from 'parameters'."""
    lp = x["logprobs"] * scale
    v = x["vpreds"] + shift
    loss, stats = F.ppo_loss(lp, v, *[x[k] for k in TENSORS[2:]], **kw)
    return loss * 2.0 + 0.01 * (v * x["mask"]).square().mean(), stats["_vector"], stats["policy/clipfrac"]


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(kl_coef=0.1, kl_estimator="k3", dual_clip=3.0, aggregation="seq_mean_token_mean")],
    ids=["default", "options"],
)
def test_compile_fullgraph(device, rand, dynamo_reset, kw):
    """One graph (no break) through functional with backward, fake kernels included (aot_eager traces them)."""
    x = make_inputs(rand, 3, 17, torch.float32, device, "gaps")
    compiled = torch.compile(_train_step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, _train_step):
        scale = torch.tensor(1.05, device=device, requires_grad=True)
        shift = torch.tensor(0.1, device=device, requires_grad=True)
        loss, vec, clipfrac = fn(scale, shift, x, use_fused=True, **kw)
        loss.backward()
        results.append((loss.detach(), vec.detach(), clipfrac.detach(), scale.grad, shift.grad))
    for c, e in zip(*results, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    assert results[0][3] != 0 and results[0][4] != 0


def test_compile_inductor(rand, dynamo_reset):
    """The default backend on a small CPU input, forward and backward."""
    x = make_inputs(rand, 3, 9, torch.float32, "cpu", "gaps")
    compiled = torch.compile(_train_step, fullgraph=True)
    results = []
    for fn in (compiled, _train_step):
        scale = torch.tensor(0.97, requires_grad=True)
        shift = torch.tensor(-0.05, requires_grad=True)
        loss, vec, _ = fn(scale, shift, x, use_fused=True, kl_coef=0.1, kl_estimator="k2")
        loss.backward()
        results.append((loss.detach(), vec.detach(), scale.grad, shift.grad))
    for c, e in zip(*results, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad inputs: the op and the argument named, one message from every route (C++ included)


def _bad_cases():
    def over(**changes):
        """Base args (3 x 7 fp32 with ref_logprobs), with changes: values, or callables of (x, device)."""

        def build(rand, device):
            x = make_inputs(rand, 3, 7, torch.float32, device, "right")
            a = with_args(x)
            a.update({k: (v(x, device) if callable(v) else v) for k, v in changes.items()})
            return a

        return build

    def each(fn):
        return {k: fn for k in TENSORS}

    cases = {}
    for name in TENSORS[1:6] + ("ref_logprobs",):
        cases[f"shape-{name}"] = (
            over(**{name: lambda x, d, n=name: x[n][:, :5]}),
            rf"ppo_loss: {name} must have the shape of logprobs \[3, 7\], got \[3, 5\]",
        )
        cases[f"dtype-{name}"] = (
            over(**{name: lambda x, d, n=name: x[n].double()}),
            rf"ppo_loss: {name} must have the dtype of logprobs \(torch.float32\), got torch.float64",
        )
    cases.update(
        {
            "shape-logprobs": (
                over(logprobs=lambda x, d: x["logprobs"][:2]),
                r"ppo_loss: vpreds must have the shape of logprobs \[2, 7\], got \[3, 7\]",
            ),
            "dtype-ref-half": (
                over(ref_logprobs=lambda x, d: x["ref_logprobs"].half()),
                r"ppo_loss: ref_logprobs must have the dtype of logprobs \(torch.float32\), got torch.float16",
            ),
            "dtype-logprobs-bf16": (
                over(logprobs=lambda x, d: x["logprobs"].bfloat16()),
                r"ppo_loss: vpreds must have the dtype of logprobs \(torch.bfloat16\), got torch.float32",
            ),
            "int-logprobs": (
                over(**{k: (lambda x, d, k=k: x[k].long()) for k in TENSORS if k != "mask"}),
                r"ppo_loss: logprobs must be a floating-point tensor \(float32, bfloat16, float16 or float64\), "
                r"got torch.int64",
            ),
            "int-advantages": (
                over(advantages=lambda x, d: x["advantages"].int()),
                r"ppo_loss: advantages must be a floating-point tensor",
            ),
            "mask-shape-rows": (
                over(mask=lambda x, d: x["mask"][:2]),
                r"ppo_loss: mask must have the shape of logprobs \[3, 7\], got \[2, 7\]",
            ),
            "mask-shape-transposed": (
                over(mask=lambda x, d: x["mask"].t()),
                r"ppo_loss: mask must have the shape of logprobs \[3, 7\], got \[7, 3\]",
            ),
            "mask-1d": (
                over(mask=lambda x, d: x["mask"][0]),
                r"ppo_loss: mask must have the shape of logprobs \[3, 7\], got \[7\]",
            ),
            "mask-complex": (
                over(mask=lambda x, d: x["mask"].to(torch.complex64)),
                r"ppo_loss: mask must be bool, integer or floating-point, got torch.complex64",
            ),
            "1d-inputs": (
                over(**{k: (lambda x, d, k=k: x[k][0]) for k in TENSORS}),
                r"ppo_loss: logprobs must be 2-D \[B, T\], got shape \[7\]",
            ),
            "3d-vpreds": (
                over(vpreds=lambda x, d: x["vpreds"][None]),
                r"ppo_loss: vpreds must be 2-D \[B, T\], got shape \[1, 3, 7\]",
            ),
            "empty-B": (
                over(**{k: (lambda x, d, k=k: x[k][:0]) for k in TENSORS}),
                r"ppo_loss: logprobs is empty \(shape \[0, 7\]\); an empty batch has nothing to do",
            ),
            "empty-T": (
                over(**{k: (lambda x, d, k=k: x[k][:, :0]) for k in TENSORS}),
                r"ppo_loss: logprobs is empty \(shape \[3, 0\]\)",
            ),
            "kl-without-ref": (
                over(ref_logprobs=None, kl_coef=0.1),
                r"ppo_loss: kl_coef is 0.1 but ref_logprobs is None; pass the reference log-probs or set kl_coef=0",
            ),
            # Both wrong: every route must report the same (first) problem.
            "kl-without-ref-and-mask-shape": (
                over(ref_logprobs=None, kl_coef=0.1, mask=lambda x, d: x["mask"][:2]),
                r"ppo_loss: (kl_coef is 0.1 but ref_logprobs is None|mask must have the shape of logprobs)",
            ),
            "kl-estimator": (
                over(kl_estimator="kl"),
                r"ppo_loss: kl_estimator must be one of 'k1', 'k2', 'k3', got 'kl'",
            ),
            "kl-estimator-case": (over(kl_estimator="K1"), r"ppo_loss: kl_estimator must be one of .*got 'K1'"),
            "aggregation": (
                over(aggregation="mean"),
                r"ppo_loss: aggregation must be one of 'token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum', "
                r"got 'mean'",
            ),
            "aggregation-sum": (over(aggregation="token_sum"), r"ppo_loss: aggregation must be one of .*'token_sum'"),
            "dual-clip-1": (over(dual_clip=1.0), r"ppo_loss: dual_clip must be > 1 \(or None\), got 1"),
            "dual-clip-small": (over(dual_clip=0.5), r"ppo_loss: dual_clip must be > 1 \(or None\), got 0.5"),
            "dual-clip-nan": (over(dual_clip=float("nan")), r"ppo_loss: dual_clip must be > 1 \(or None\), got nan"),
            "dual-clip-inf": (over(dual_clip=float("inf")), r"ppo_loss: dual_clip must be > 1 \(or None\), got inf"),
            "lrc-0": (over(log_ratio_clamp=0.0), r"ppo_loss: log_ratio_clamp must be > 0 \(or None\), got 0"),
            "lrc-neg": (over(log_ratio_clamp=-0.5), r"ppo_loss: log_ratio_clamp must be > 0 \(or None\), got -0.5"),
            "lrc-nan": (over(log_ratio_clamp=float("nan")), r"ppo_loss: log_ratio_clamp must be > 0 .*got nan"),
            "cliprange-neg": (over(cliprange=-0.1), r"ppo_loss: cliprange must be >= 0, got -0.1"),
            "cliprange-nan": (over(cliprange=float("nan")), r"ppo_loss: cliprange must be finite, got nan"),
            "cliprange_value-neg": (over(cliprange_value=-0.5), r"ppo_loss: cliprange_value must be >= 0, got -0.5"),
            "cliprange_value-inf": (
                over(cliprange_value=float("inf")),
                r"ppo_loss: cliprange_value must be finite, got inf",
            ),
            "cliprange_high-neg": (
                over(cliprange_high=-0.1),
                r"ppo_loss: cliprange_high must be finite and >= 0 \(or None\), got -0.1",
            ),
            "cliprange_high-inf": (
                over(cliprange_high=float("inf")),
                r"ppo_loss: cliprange_high must be finite and >= 0 \(or None\), got inf",
            ),
            "cliprange_high-nan": (over(cliprange_high=float("nan")), r"ppo_loss: cliprange_high must be finite .*nan"),
            "vf_coef-nan": (over(vf_coef=float("nan")), r"ppo_loss: vf_coef must be finite, got nan"),
            "kl_coef-nan": (over(kl_coef=float("nan")), r"ppo_loss: kl_coef must be finite, got nan"),
            "kl_coef-inf": (over(kl_coef=float("-inf")), r"ppo_loss: kl_coef must be finite, got -inf"),
            "ratio_threshold-0": (
                over(ratio_threshold=0.0),
                r"ppo_loss: ratio_threshold must be > 0 \(inf disables it\), got 0",
            ),
            "ratio_threshold-neg": (over(ratio_threshold=-1.0), r"ppo_loss: ratio_threshold must be > 0 .*got -1"),
            "ratio_threshold-nan": (
                over(ratio_threshold=float("nan")),
                r"ppo_loss: ratio_threshold must be > 0 .*got nan",
            ),
        }
    )
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, rand, case):
    build, match = BAD[case]
    a = build(rand, device)
    H.assert_same_error("ppo_loss", match, lambda route: call(route, a))


def test_tensors_on_different_devices(device, rand):
    """One tensor on another device (meta on a CPU-only machine, where the op routes to its fake
    kernel; cuda vs cpu where a GPU is present): the op, the tensor and both devices are named."""
    x = make_inputs(rand, 3, 7, torch.float32, device, "right")
    for name in TENSORS[1:]:
        a = with_args(dict(x, **{name: H.other_device(x[name])}), kl_coef=0.1)
        H.assert_device_error("ppo_loss", name, "logprobs", lambda route, a=a: call(route, a))


def test_bad_call_changes_nothing(rand):
    """A rejected call populates no .grad, leaves its inputs as they were, and the next good call works."""
    x = make_inputs(rand, 3, 7, torch.float32, "cpu", "right")
    lp, v = x["logprobs"].clone().requires_grad_(), x["vpreds"].clone().requires_grad_()
    before = {k: x[k].clone() for k in TENSORS}
    bad_calls = [
        dict(kl_coef=0.1, ref_logprobs=None),
        dict(dual_clip=1.0),
        dict(mask=x["mask"][:2]),
        dict(returns=x["returns"].double()),
    ]
    for use_fused in (True, False):
        for bad in bad_calls:
            a = with_args(dict(x, logprobs=lp, vpreds=v), **bad)
            with pytest.raises(RuntimeError, match="^ppo_loss: "):
                call("fused" if use_fused else "eager", a)
            assert lp.grad is None and v.grad is None
    for k in TENSORS:
        assert torch.equal(x[k], before[k]), k
    assert torch.equal(lp.detach(), before["logprobs"]) and torch.equal(v.detach(), before["vpreds"])
    loss, _ = call("fused", with_args(dict(x, logprobs=lp, vpreds=v)))
    loss.backward()
    assert lp.grad is not None and torch.isfinite(lp.grad).all()


@pytest.mark.cuda
def test_cuda_float64_rejected(rand):
    x = make_inputs(rand, 3, 7, torch.float64, "cuda", "right")
    a = with_args(x)
    fused, eager = H.error_line(call, "fused", a), H.error_line(call, "eager", a)
    assert fused == eager
    assert fused.startswith("ppo_loss: CUDA tensors must be float32, bfloat16 or float16"), fused
    with pytest.raises(RuntimeError, match="ppo_loss"):
        call("ops", a)


# ------------------------------------------------------------------------------------------------
# CUDA only: large shapes, determinism, no host synchronisation, launch count


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape,dtype",
    [((256, 2048), torch.float32), ((256, 2048), torch.bfloat16), ((4096, 512), torch.float32)],
    ids=H.ids,
)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(kl_coef=0.05, kl_estimator="k3", dual_clip=3.0, aggregation="seq_mean_token_mean")],
    ids=["default", "options"],
)
def test_cuda_large(rand, shape, dtype, options):
    B, T = shape
    x = make_inputs(rand, B, T, dtype, "cuda", "right", lr_scale=0.5)
    a = with_args(x, **options)
    fused = forward_backward("fused", a)
    ref = forward_backward("ref64", a)
    eager = forward_backward("eager", a) if dtype in H.LOWP else None
    assert_matches(fused, ref, eager, near=near_kinks(a))
    assert stat(fused[1], "ppo/tokens") == x["mask"].sum().item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
def test_cuda_deterministic(rand, dtype):
    x = make_inputs(rand, 256, 2048, dtype, "cuda", "gaps")
    for aggregation in AGGS:
        a = with_args(x, aggregation=aggregation, kl_coef=0.1, kl_estimator="k3")
        first = forward_backward("fused", a)
        for _ in range(3):
            for p, q in zip(forward_backward("fused", a), first, strict=True):
                assert torch.equal(p, q), aggregation


def _cuda_case(rand, skip: bool):
    x = make_inputs(rand, 512, 1031, torch.bfloat16, "cuda", "gaps")
    if skip:
        x = _above_threshold(x)
    return with_args(x, kl_coef=0.05, kl_estimator="k3", ratio_threshold=1.0001 if skip else 10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("skip", [False, True], ids=["normal", "skipped"])
def test_cuda_no_host_sync(rand, skip):
    """Forward and backward, the ratio_threshold decision included, never wait for the host."""
    a = _cuda_case(rand, skip)
    lp, v = a["logprobs"].clone().requires_grad_(), a["vpreds"].clone().requires_grad_()
    b = dict(a, logprobs=lp, vpreds=v)

    def step():
        lp.grad = v.grad = None
        loss, named = F.ppo_loss(*[b[k] for k in TENSORS], **{k: b[k] for k in ARGS[8:]}, use_fused=True)
        loss.backward()
        return named["ppo/skipped"] * 1.0  # statistics stay on the device

    skipped = without_host_sync(step, check_warm_up=True)
    assert skipped.item() == (1.0 if skip else 0.0)
    assert (torch.count_nonzero(lp.grad) == 0) == skip


@pytest.mark.cuda
def test_cuda_launch_count(rand):
    """The forward is at most two kernel launches, the backward one. Every kernel on the device in the
    profiled region counts, whatever its name (memcpy/memset are listed in the message, not counted)."""
    for skip in (False, True):
        a = _cuda_case(rand, skip)
        args = [a[k] for k in ARGS]
        fwd, events = cuda_kernels(lambda args=args: ops.ppo_loss(*args))
        assert 1 <= len(fwd) <= 2, ("forward", events)
        fwd_fn, events = cuda_kernels(lambda a=a: call("fused", a))
        assert 1 <= len(fwd_fn) <= 2, ("functional forward", events)
        _, _, row_scale = ops.ppo_loss(*args)
        grad = torch.ones((), device="cuda")
        bwd, events = cuda_kernels(lambda args=args, rs=row_scale, g=grad: ops.ppo_loss_backward(g, rs, *args[:15]))
        assert len(bwd) == 1, ("backward", events)


# ------------------------------------------------------------------------------------------------
# Non-finite inputs. Masked positions are ignored: NaN or +-inf there (padding may hold garbage)
# reaches no loss, statistic or gradient, and the masked gradients are 0. At an unmasked position a
# NaN stays visible in the loss and in everything it feeds, fused as eager.

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
OPTION_SETS = {
    "plain": {},
    "kl_k3_dual_clamp": dict(kl_coef=0.1, kl_estimator="k3", dual_clip=3.0, log_ratio_clamp=2.0),
    "seq_mean_token_mean": dict(aggregation="seq_mean_token_mean", kl_coef=0.1),
    "seq_mean_token_sum": dict(aggregation="seq_mean_token_sum", kl_coef=0.1, kl_estimator="k2"),
}


def _poison_masked(a: dict, value: float) -> dict:
    out = dict(a)
    masked = a["mask"] == 0
    for k in TENSORS:
        if k != "mask" and a[k] is not None:
            out[k] = a[k].masked_fill(masked, value)
    return out


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_masked_nonfinite_is_ignored(device, rand, dtype, value, options):
    """NaN / +-inf at every masked position of every input: loss, statistics and gradients equal
    those of the same batch with finite padding, on both paths, and the masked gradients are 0."""
    a = with_args(make_inputs(rand, 4, 13, dtype, device, mask_kind="gaps"), **OPTION_SETS[options])
    poisoned = _poison_masked(a, NONFINITE[value])
    masked = a["mask"] == 0
    assert masked.any() and (~masked).any()
    for route in ("fused", "eager"):
        clean = forward_backward(route, a)
        dirty = forward_backward(route, poisoned)
        for name, c, d in zip(("loss", "stats", "d_logprobs", "d_vpreds"), clean, dirty, strict=True):
            assert torch.isfinite(d).all(), f"{route}: {name} not finite with {value} padding"
            torch.testing.assert_close(d, c, rtol=0, atol=0, msg=f"{route}: {name} changed by {value} padding")
        assert (dirty[2][masked] == 0).all() and (dirty[3][masked] == 0).all()
    check_fused(poisoned, tol=FP32_TOL if dtype == torch.float32 else 1e-2)


def _nan_patterns(out):
    loss, stats, g_lp, g_v = out
    return [t.isnan() for t in (loss, stats, g_lp, g_v)] + [t.isinf() for t in (loss, stats, g_lp, g_v)]


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("key", [k for k in TENSORS if k != "mask"])
def test_unmasked_nonfinite_agrees(device, rand, key, value, options):
    """One NaN / +-inf at an unmasked position of one input: fused and eager give NaN and inf in
    the same places (loss, every statistic, both gradients) and the same finite values elsewhere; a
    NaN that feeds the loss makes it NaN."""
    a = with_args(make_inputs(rand, 3, 9, torch.float32, device, mask_kind="right"), **OPTION_SETS[options])
    b, t = 1, 0  # unmasked in every "right" mask (rows have length >= 1)
    assert a["mask"][b, t]
    clean = {route: forward_backward(route, a) for route in ("fused", "eager")}
    x = a[key].clone()
    x[b, t] = NONFINITE[value]
    a[key] = x
    fused, eager = forward_backward("fused", a), forward_backward("eager", a)
    if key == "ref_logprobs" and a["kl_coef"] == 0.0:  # without a KL term the reference is not read
        for route, out in (("fused", fused), ("eager", eager)):
            for c, d in zip(clean[route], out, strict=True):
                torch.testing.assert_close(d, c, rtol=0, atol=0)
        return
    for name, pf, pe in zip(["nan"] * 4 + ["inf"] * 4, _nan_patterns(fused), _nan_patterns(eager), strict=True):
        assert torch.equal(pf, pe), (
            f"{key}={value}: {name} pattern differs (fused {pf.nonzero().tolist()}, eager {pe.nonzero().tolist()})"
        )
    for f, e in zip(fused, eager, strict=True):
        fin = torch.isfinite(e)
        torch.testing.assert_close(f[fin], e[fin], rtol=1e-4, atol=1e-5)
    if value == "nan":
        assert fused[0].isnan(), f"a NaN in {key} vanished from the loss"
