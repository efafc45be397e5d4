"""Tests of ``ppo_fast.RunningMoments`` (ppo_fast/trainer/running_moments.py): score scaling,
normalisation and clipping with running moments, TRL 0.11 semantics (DESIGN.md 2.3).

Ground truth: numpy's mean and var(ddof=1) over the concatenation of every batch seen, an
independent float64 transcription of TRL 0.11's ``RunningMoments.update``, and the formulas of
``PPOTrainer.compute_rewards``' score scaling. The ops underneath are tested in tests/ops/test_moments.py.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _cuda_checks import cuda_kernels, without_host_sync

import ppo_fast
from ppo_fast import RunningMoments

EPS32 = float(np.finfo(np.float32).eps)


def _np(t: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """The counted entries of t (mask non-zero), flattened, as float64."""
    t = t.detach().cpu().double()
    if mask is not None:
        t = t[mask.cpu() != 0]
    return t.numpy().ravel()


def _batch_sizes(rand, k: int, high: int = 120) -> list[int]:
    """k batch sizes in [1, high), a quarter of them exactly 1."""
    sizes = rand.randint(1, high, (k,))
    sizes[rand.randint(0, 4, (k,)) == 0] = 1
    return sizes.tolist()


def assert_state(rm: RunningMoments, data: np.ndarray, mean_rtol=1e-13, var_rtol=1e-10, rejected=0):
    """count, mean, var, std of the module equal numpy's over ``data``."""
    assert rm.state.dtype == torch.float64 and rm.state.shape == (4,)
    assert rm.count.item() == len(data)
    assert rm.rejected.item() == rejected
    scale = max(1.0, float(np.abs(data).max()))
    np.testing.assert_allclose(rm.mean.item(), data.mean(), rtol=mean_rtol, atol=mean_rtol * scale)
    if len(data) > 1:
        np.testing.assert_allclose(rm.var.item(), data.var(ddof=1), rtol=var_rtol)
        np.testing.assert_allclose(rm.std.item(), data.std(ddof=1), rtol=var_rtol)
    else:
        assert rm.var.item() == 1.0 and rm.std.item() == 1.0


class TRLRunningMoments:
    """TRL 0.11's ``trl.core.RunningMoments.update`` (single process), transcribed with float64 in
    place of its float32 so that it is a fair reference (the fp32 original cancels near 1e6)."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        xs = xs.double()
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).sqrt().item()
        self.var = new_var.item()
        self.count = tot_count
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).sqrt().item()


def trl_scale(scores: torch.Tensor, mean: float, std: float, norm: bool, clip: float | None) -> torch.Tensor:
    """TRL 0.11 PPOTrainer.step's score scaling / normalisation / clipping (fp32 scores)."""
    factor = torch.tensor(std, dtype=scores.dtype) + torch.finfo(scores.dtype).eps
    if norm:
        scores = (scores - torch.tensor(mean, dtype=scores.dtype)) / factor
    else:
        scores = scores / factor
    if clip is not None:
        scores = torch.clip(scores.float(), -clip, clip).to(scores.dtype)
    return scores


# ------------------------------------------------------------------------------------------------
# Running moments against numpy and TRL


@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (-3.0, 40.0), (1e6, 3.0)], ids=["unit", "wide", "1e6"])
def test_many_updates_vs_numpy(rand, offset, spread):
    """Thousands of updates of mixed sizes (a quarter of them batches of 1): the running count, mean,
    var and std equal numpy's over everything concatenated; every returned batch mean and std equal
    numpy's for that batch (std Bessel-corrected, 1 for a batch of 1). Near 1e6 an fp32 sum of
    squares (TRL's update) loses every digit of the variance."""
    rm = RunningMoments()
    sizes = _batch_sizes(rand, 3000)
    xs = [rand.randn(n, scale=spread) + offset for n in sizes]
    means, stds = [], []
    for x in xs:
        mean, std = rm.update(x)
        assert mean.dtype == torch.float32 and std.dtype == torch.float32 and mean.dim() == 0
        means.append(mean.item())
        stds.append(std.item())
    data = np.concatenate([_np(x) for x in xs])
    assert_state(rm, data)
    want_mean = [_np(x).mean() for x in xs]
    want_std = [_np(x).std(ddof=1) if len(x) > 1 else 1.0 for x in xs]
    np.testing.assert_allclose(means, want_mean, rtol=1e-6, atol=1e-6 * spread)
    np.testing.assert_allclose(stds, want_std, rtol=1e-5, atol=1e-6 * spread)


def test_matches_trl_update(rand):
    """A float64 transcription of TRL 0.11's update: same running mean and std once two samples were
    seen, same returned batch mean/std for batches of two or more. Where TRL is degenerate the module
    gives 1: the running std below two samples (TRL: inf) and the std of a batch of 1 (TRL: NaN)."""
    rm, trl = RunningMoments(), TRLRunningMoments()
    sizes = [1, 1, 5, 1, 64, 2, 300, 1, 17]
    for n in sizes * 4:
        x = rand.randn(n, scale=2.0) + 0.7
        seen_before = rm.count.item()
        mean, std = rm.update(x)
        t_mean, t_std = trl.update(x)
        np.testing.assert_allclose(mean.item(), t_mean, rtol=1e-6, atol=1e-6)
        if n > 1:
            np.testing.assert_allclose(std.item(), t_std, rtol=1e-6)
        else:
            assert std.item() == 1.0 and math.isnan(t_std)
        np.testing.assert_allclose(rm.mean.item(), trl.mean, rtol=1e-10, atol=1e-12)
        if seen_before + n > 1:
            np.testing.assert_allclose(rm.std.item(), trl.std, rtol=1e-10)
        else:
            assert rm.std.item() == 1.0 and trl.std == math.inf


def test_fewer_than_two_samples():
    rm = RunningMoments()
    assert rm.count.item() == 0 and rm.mean.item() == 0 and rm.std.item() == 1 and rm.var.item() == 1
    mean, std = rm.update(torch.tensor([3.0]))
    assert mean.item() == 3.0 and std.item() == 1.0  # a batch of 1: std 1 (TRL: NaN)
    assert rm.count.item() == 1 and rm.mean.item() == 3.0 and rm.std.item() == 1.0  # TRL: inf
    # scaling with std 1 divides by 1 + eps (TRL divides by inf: every score becomes 0)
    x = torch.tensor([2.0, -4.0])
    torch.testing.assert_close(rm.normalize(x), x / (1 + EPS32), rtol=0, atol=0)
    mean, std = rm.update(torch.tensor([5.0]))
    assert rm.count.item() == 2 and rm.mean.item() == 4.0 and rm.var.item() == 2.0
    np.testing.assert_allclose(rm.std.item(), math.sqrt(2.0), rtol=1e-15)


def test_std_at_most_eps_is_reported_as_1(rand):
    """Equal scores (std 0) and nearly equal ones (std eps / 2) give a running and a batch std of 1, as
    fewer than two samples do, and scale by 1 / (1 + eps) instead of 1 / eps; a spread just above eps
    keeps its std; the module's own eps decides; a varied batch afterwards gives numpy's std."""
    d = 1.1 * EPS32 * math.sqrt(3) / 2
    cases = [
        (torch.full((4,), 2.5), 1.0),
        (torch.tensor([1.0, 1.0, 1.0, 1.0 + EPS32]), 1.0),
        (torch.tensor([-d, d, -d, d]), None),  # None: its own std
    ]
    for x, want_std in cases:
        data = _np(x)
        real = data.std(ddof=1)
        want = real if want_std is None else want_std
        for one_call in (True, False):
            rm = RunningMoments()
            y, batch = rm.update_normalize(x, clip=None)
            if not one_call:
                rm = RunningMoments()
                mean_u, std_u = rm.update(x)
                y = rm.normalize(x)
                np.testing.assert_allclose(std_u.item(), want, rtol=1e-6)
            mean_b, std_b = RunningMoments.batch_mean_std(batch)
            np.testing.assert_allclose(std_b.item(), want, rtol=1e-6)
            np.testing.assert_allclose(mean_b.item(), data.mean(), rtol=1e-7)
            np.testing.assert_allclose(rm.std.item(), want, rtol=1e-12)
            np.testing.assert_allclose(rm.var.item(), want**2, rtol=1e-12)
            torch.testing.assert_close(y.double(), x.double() / (want + EPS32), rtol=1e-6, atol=0)
            centred = rm.normalize(x, center=True, clip=0.5)
            truth = ((x.double() - data.mean()) / (want + EPS32)).clamp(-0.5, 0.5)
            torch.testing.assert_close(centred.double(), truth, rtol=1e-6, atol=1e-6)
            # a varied batch afterwards: the ordinary running std of everything seen
            x2 = rand.randn(30, scale=2.0) + 1.0
            y2, _ = rm.update_normalize(x2, center=True)
            assert_state(rm, np.concatenate([data, _np(x2)]))
            truth2 = (x2.double() - rm.mean.item()) / (rm.std.item() + EPS32)
            torch.testing.assert_close(y2.double(), truth2, rtol=1e-6, atol=1e-6)
    # the rule uses the module's eps: std 0.42 is at most eps = 0.5
    rm = RunningMoments(eps=0.5)
    x = torch.tensor([0.0, 0.6])  # std 0.6 / sqrt(2) = 0.42
    y, batch = rm.update_normalize(x)
    assert rm.std.item() == 1.0 and rm.var.item() == 1.0
    assert RunningMoments.batch_mean_std(batch, eps=0.5)[1].item() == 1.0
    torch.testing.assert_close(y, x / 1.5)


def test_trainer_equal_scores_keep_the_value_loss_small():
    """PPOTrainer with use_score_scaling and a first batch of four equal scores: the scores scale by
    1 / (1 + eps), so the value loss stays O(1) (dividing by eps gave scores of 2e7 and a loss of 1e14)."""
    from trainer_utils import make_batch, make_policy, make_tokenizer

    from ppo_fast import PPOConfig, PPOTrainer

    config = PPOConfig(use_score_scaling=True, batch_size=4, mini_batch_size=4, ppo_epochs=1, seed=0)
    trainer = PPOTrainer(config, make_policy(), None, make_tokenizer())
    queries, responses, _ = make_batch(4, seed=0)
    stats = trainer.step(queries, responses, [torch.tensor(2.5)] * 4)
    assert 0 < stats["ppo/loss/value"] < 50, stats["ppo/loss/value"]
    assert trainer.running.std.item() == 1.0
    assert abs(stats["ppo/mean_scores"] - 2.5) < 1e-5, stats["ppo/mean_scores"]


def test_eps_is_float32_machine_eps():
    assert RunningMoments().eps == EPS32 == torch.finfo(torch.float32).eps
    assert RunningMoments(eps=0.5).eps == 0.5
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"RunningMoments: eps must be finite and >= 0"):
            RunningMoments(eps=bad)


@pytest.mark.parametrize(
    "center,clip",
    [(False, None), (True, None), (False, 0.5), (True, 0.5), (True, 3.0)],
    ids=["s", "n", "sc", "nc", "nc3"],
)
def test_normalize_is_trl_scaling(rand, center, clip):
    """normalize == TRL's ``scores / (std + eps)`` (use_score_scaling), ``(scores - mean) / (std + eps)``
    (use_score_norm), then ``clip(-c, c)`` (score_clip), with the running mean and std."""
    rm, trl = RunningMoments(), TRLRunningMoments()
    for n in (7, 1, 64, 13):
        x = rand.randn(n, scale=3.0) + 2.0
        rm.update(x)
        trl.update(x)
        out = rm.normalize(x, center=center, clip=clip)
        want = trl_scale(x, trl.mean, trl.std, center, clip)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
        truth = x.double()
        if center:
            truth = truth - rm.mean.item()
        truth = truth / (rm.std.item() + EPS32)
        if clip is not None:
            truth = truth.clamp(-clip, clip)
            assert out.abs().max().item() <= clip
        torch.testing.assert_close(out.double(), truth, rtol=1e-6, atol=1e-6)
    # scale=False leaves the scale alone: centring only, or nothing
    torch.testing.assert_close(rm.normalize(x, scale=False, center=True), x - rm.mean.float())
    assert torch.equal(rm.normalize(x, scale=False), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_update_normalize_is_update_then_normalize(rand, dtype):
    """The fused path gives what update then normalize give, state and batch mean/std included."""
    a, b = RunningMoments(), RunningMoments()
    for n in (1, 9, 300, 2):
        x = rand.randn(n, 3, dtype=dtype) * 2 - 1
        mask = torch.rand(n, 3, generator=rand.gen) < 0.8
        y, _batch = a.update_normalize(x, mask, center=True, clip=1.5)

        mean, std = RunningMoments.batch_mean_std(_batch)
        mean_b, std_b = b.update(x, mask)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(a.state, b.state)
        assert torch.equal(mean, mean_b) and torch.equal(std, std_b)
        assert torch.equal(y, b.normalize(x, mask, center=True, clip=1.5))


def test_per_token_rewards(rand):
    """[B, T] rewards with a response mask: the moments are those of the unmasked tokens only, and
    normalisation leaves the padding untouched."""
    rm = RunningMoments()
    seen = []
    for _ in range(30):
        B, T = int(rand.randint(1, 9)), int(rand.randint(1, 60))
        r = rand.randn(B, T, scale=0.5) + 0.2
        lens = rand.randint(0, T + 1, (B,))
        mask = torch.arange(T)[None, :] < lens[:, None]
        r[~mask] = 1e9  # padding: would wreck the moments if counted
        y, _batch = rm.update_normalize(r, mask, center=True, clip=4.0)

        mean, std = RunningMoments.batch_mean_std(_batch)
        seen.append(_np(r, mask))
        batch = seen[-1]
        if len(batch):
            np.testing.assert_allclose(mean.item(), batch.mean(), rtol=1e-6, atol=1e-6)
        if len(batch) > 1:
            np.testing.assert_allclose(std.item(), batch.std(ddof=1), rtol=1e-5)
        assert torch.equal(y[~mask], r[~mask])
        want = ((r.double() - rm.mean.item()) / (rm.std.item() + EPS32)).clamp(-4, 4)
        torch.testing.assert_close(y[mask].double(), want[mask], rtol=1e-6, atol=1e-6)
    assert_state(rm, np.concatenate(seen))
    # float, int64 and bool masks are the same mask
    x, m = rand.randn(4, 11), torch.rand(4, 11, generator=rand.gen) < 0.5
    states = []
    for mask in (m, m.float(), m.long()):
        r2 = RunningMoments()
        r2.update(x, mask)
        states.append(r2.state)
    assert all(torch.equal(s, states[0]) for s in states)


def test_all_masked_update_changes_nothing(rand):
    rm = RunningMoments()
    rm.update(rand.randn(10))
    before = rm.state.clone()
    mean, std = rm.update(rand.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(rm.state, before)
    assert mean.item() == 0.0 and std.item() == 1.0


# ------------------------------------------------------------------------------------------------
# NaN and inf


@pytest.mark.parametrize("method", ["update", "update_normalize"])
def test_non_finite_raises_naming_positions(rand, method):
    rm = RunningMoments()
    rm.update(rand.randn(20))
    before = rm.state.clone()
    call = getattr(rm, method)
    x = rand.randn(10)
    x[3], x[7] = float("nan"), float("inf")
    with pytest.raises(ValueError) as info:
        call(x)
    assert str(info.value) == (
        f"RunningMoments.{method}: x holds NaN or inf at 3, 7; the running moments were not updated"
    )
    assert torch.equal(rm.state, before)
    r = rand.randn(2, 5)
    r[0, 1], r[1, 0] = -float("inf"), float("nan")
    with pytest.raises(ValueError, match=re.escape("x holds NaN or inf at (0, 1), (1, 0); the running")):
        call(r)
    assert torch.equal(rm.state, before)
    many = torch.full((3, 4), float("nan"))
    with pytest.raises(
        ValueError, match=re.escape("at (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3) and 4 more;")
    ):
        call(many)
    assert torch.equal(rm.state, before)


def test_non_finite_at_masked_positions_is_fine(rand):
    rm = RunningMoments()
    x = rand.randn(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    x[1, 4], x[1, 5] = float("nan"), float("inf")
    y, _ = rm.update_normalize(x, mask)
    assert rm.count.item() == 10 and rm.rejected.item() == 0
    assert math.isnan(y[1, 4]) and y[1, 5].item() == math.inf  # passed through
    assert_state(rm, _np(x, mask))


def test_validate_false_skips_on_device(rand):
    """Without validation a batch holding NaN/inf is skipped (no error, no host sync) and counted in
    ``rejected``; later updates continue as if it had never come."""
    rm, clean = RunningMoments(), RunningMoments()
    good = [rand.randn(n) for n in (5, 1, 30)]
    for x in good:
        rm.update(x)
        clean.update(x)
    bad = rand.randn(4, 4)
    bad[2, 1] = float("nan")
    before = rm.state.clone()
    rm.update(bad, validate=False)
    assert torch.equal(rm.state[:3], before[:3]) and rm.rejected.item() == 1
    y, _ = rm.update_normalize(bad.flatten().flip(0), validate=False, center=True)
    assert torch.equal(rm.state[:3], before[:3]) and rm.rejected.item() == 2
    finite = torch.isfinite(y)
    torch.testing.assert_close(y[finite], clean.normalize(bad.flatten().flip(0), center=True)[finite])
    for x in good:
        rm.update(x)
        clean.update(x)
    assert torch.equal(rm.state[:3], clean.state[:3]) and rm.rejected.item() == 2 and clean.rejected.item() == 0


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs(rand):
    rm = RunningMoments()
    with pytest.raises(TypeError, match=r"RunningMoments.update: x must be a tensor, got list"):
        rm.update([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"^moments: x must be a floating-point tensor .* got torch.int64$"):
        rm.update(torch.arange(5))
    with pytest.raises(RuntimeError, match=r"^moments: x is empty \(shape \[0\]\)"):
        rm.update(torch.zeros(0))
    with pytest.raises(RuntimeError, match=r"^moments_normalize: clip must be > 0 \(or None\), got 0.0$"):
        rm.normalize(rand.randn(3), clip=0.0)
    with pytest.raises(RuntimeError, match=r"^moments_update_normalize_: clip must be > 0 \(or None\), got -1.0$"):
        rm.update_normalize(rand.randn(3), clip=-1.0)
    assert rm.count.item() == 0


@pytest.mark.parametrize("method", ["update", "update_normalize", "normalize"])
def test_wrong_mask_shape_names_the_mask(rand, method):
    """A mask of the wrong shape is refused with the ops' message naming the mask and both shapes,
    whether or not it happens to broadcast against x (validation must not run first and fail on the
    broadcast with an unrelated message)."""
    rm = RunningMoments()
    call = getattr(rm, method)
    op = (
        "moments"
        if method == "update"
        else "moments_normalize"
        if method == "normalize"
        else "moments_update_normalize_"
    )
    cases = [
        (rand.randn(3), torch.ones(4, dtype=torch.bool), r"\[3\], got \[4\]"),
        (rand.randn(3, 4), torch.ones(2, 3, 4, dtype=torch.bool), r"\[3, 4\], got \[2, 3, 4\]"),
        (rand.randn(3, 4), torch.ones(4, dtype=torch.bool), r"\[3, 4\], got \[4\]"),
    ]
    for x, mask, shapes in cases:
        with pytest.raises(RuntimeError, match=rf"^{op}: mask must have the shape of x {shapes}$"):
            call(x, mask)
    assert rm.count.item() == 0


# ------------------------------------------------------------------------------------------------
# state_dict, devices


def test_state_dict_round_trip(rand):
    """Save after some updates, load into a fresh module, continue: bit-identical to an uninterrupted
    run (state, returned batch statistics, normalised outputs)."""
    batches = [(rand.randn(int(n)) * 3 + 1, None) for n in _batch_sizes(rand, 60, 50)]
    batches += [(rand.randn(4, 9), torch.rand(4, 9, generator=rand.gen) < 0.6) for _ in range(5)]
    straight = RunningMoments()
    first = RunningMoments()
    for x, m in batches[:30]:
        straight.update(x, m)
        first.update(x, m)
    sd = first.state_dict()
    assert list(sd) == ["state"] and sd["state"].dtype == torch.float64
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    resumed = RunningMoments()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(resumed.state, straight.state)
    for x, m in batches[30:]:
        a, b = (
            straight.update_normalize(x, m, center=True, clip=2.0),
            resumed.update_normalize(x, m, center=True, clip=2.0),
        )
        for p, q in zip(a, b, strict=True):
            assert torch.equal(p, q)
    assert torch.equal(resumed.state, straight.state)
    assert straight.count.item() == sum(int(x.numel() if m is None else m.sum()) for x, m in batches)
    # loading is a copy into the module's buffer: the saved dict does not alias the live state
    sd2 = straight.state_dict()
    saved = sd2["state"].clone()
    straight.update(rand.randn(5))
    assert not torch.equal(straight.state, saved)
    assert torch.equal(resumed.state, saved)


def test_state_dict_nested_in_a_model(rand):
    """As a submodule (the trainer's way of saving it), the state travels with the model's state_dict."""
    model = torch.nn.Module()
    model.running = RunningMoments()
    model.running.update(rand.randn(50))
    sd = model.state_dict()
    assert "running.state" in sd
    other = torch.nn.Module()
    other.running = RunningMoments()
    other.load_state_dict(sd)
    assert torch.equal(other.running.state, model.running.state)


def test_to_moves_the_state_and_device_mismatch_is_refused(rand):
    rm = RunningMoments()
    rm.update(rand.randn(8))
    rm.to("meta")
    assert rm.state.device.type == "meta" and rm.state.dtype == torch.float64
    for method in ("update", "normalize", "update_normalize"):
        with pytest.raises(ValueError) as info:
            getattr(rm, method)(torch.randn(4))
        assert str(info.value) == (
            f"RunningMoments.{method}: x is on cpu but the state is on meta; move the module with .to(device)"
        )
    moved = RunningMoments(device="meta")
    assert moved.state.device.type == "meta"


@pytest.mark.parametrize("cast", ["float", "half", "bfloat16", "to-fp32", "to-bf16"])
def test_dtype_casts_keep_the_fp64_state(rand, cast):
    """The state is float64 by contract (the ops refuse anything else). Casting a model that holds the
    module (``model.half()``, ``model.to(torch.bfloat16)``, as done to policies) must not cast it:
    a bf16 count loses integers above 256 and the next update fails."""
    rm = RunningMoments()
    rm.update(rand.randn(1001))
    before = rm.state.clone()
    model = torch.nn.Module()
    model.running = rm
    if cast.startswith("to-"):
        model.to({"to-fp32": torch.float32, "to-bf16": torch.bfloat16}[cast])
    else:
        getattr(model, cast)()
    assert rm.state.dtype == torch.float64
    assert torch.equal(rm.state, before)
    rm.update(rand.randn(10))
    assert rm.count.item() == 1011


def test_update_normalize_dispatches_one_fused_op(rand):
    """CPU proxy of the CUDA launch bar (test_cuda_update_normalize_launch_count): one process's
    update + normalise + clip with validate=False runs the one fused op and no other computing op
    (each would be a kernel launch on the GPU); only views are allowed around it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {
        "aten.detach.default",
        "aten.select.int",
        "aten.unsqueeze.default",
        "aten.alias.default",
        "aten.view.default",
    }

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    rm = RunningMoments()
    x = rand.randn(512)
    rm.update_normalize(x, center=True, clip=0.5, validate=False)
    with Log() as log:
        rm.update_normalize(x, center=True, clip=0.5, validate=False)
    computing = [op for op in log.ops if op not in views]
    assert computing == ["ppo_fast.moments_update_normalize_.default"], log.ops


def test_accelerator_gather_path(rand):
    """With an accelerator of several processes the batch moments go through ``accelerator.gather``
    once per update and are merged in rank order; the returned mean/std are the global ones. (A stub
    accelerator whose other rank holds fixed data.)"""
    other = [rand.randn(n) * 2 + 5 for n in (3, 1, 40)]

    class StubAccelerator:
        num_processes = 2

        def __init__(self):
            self.calls = 0

        def gather(self, t):
            assert t.shape == (1, 4) and t.dtype == torch.float64
            theirs = ppo_fast.functional.moments(other[self.calls])
            self.calls += 1
            return torch.cat([t, theirs[None]])

    acc = StubAccelerator()
    rm, single = RunningMoments(accelerator=acc), RunningMoments()
    for mine, theirs in zip([rand.randn(n) for n in (7, 2, 1)], other, strict=True):
        mean, std = rm.update(mine)
        s_mean, s_std = single.update(torch.cat([mine, theirs]))
        torch.testing.assert_close(rm.state, single.state, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((mean, std), (s_mean, s_std), rtol=1e-6, atol=1e-6)
    assert acc.calls == 3


# ------------------------------------------------------------------------------------------------
# Two processes (gloo): every rank ends with identical state, equal to one process on the union.

WORKER = r"""
import datetime, sys
import torch
import torch.distributed as dist

torch.set_num_threads(1)
rank, world, port, data_path, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
    timeout=datetime.timedelta(seconds=30),
)
try:
    from ppo_fast import RunningMoments

    rm = RunningMoments(process_group=None)
    results = []
    for step in torch.load(data_path, weights_only=True):
        x, mask = step["x"][rank], step["mask"][rank]
        if step["clip"] is None:
            mean, std = rm.update(x, mask, validate=False)
            y = None
        else:
            y, _batch = rm.update_normalize(x, mask, center=True, clip=step["clip"], validate=False)

            mean, std = RunningMoments.batch_mean_std(_batch)
        results.append({"mean": mean, "std": std, "y": y, "state": rm.state.clone()})
    dist.barrier()
    torch.save(results, out_path)
finally:
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_data(rand):
    """Per update, each rank's x and mask: different sizes per rank, batches of 1, 2-D rewards with a
    mask, a rank whose batch is all masked, and a rank whose batch holds a NaN (validate=False:
    every rank rejects the update)."""
    steps = []

    def step(x0, x1, m0=None, m1=None, clip=None):
        steps.append({"x": [x0, x1], "mask": [m0, m1], "clip": clip})

    step(rand.randn(5) + 1e6, rand.randn(300) * 3 + 1e6)
    step(rand.randn(1) + 1e6, rand.randn(2) + 1e6)
    step(rand.randn(1), rand.randn(1))
    for n0, n1 in [(17, 4), (64, 1), (1, 90), (33, 33)]:
        step(rand.randn(n0) * 2, rand.randn(n1) - 1, clip=1.0 if n0 == 64 else None)
    r0, r1 = rand.randn(4, 9), rand.randn(3, 20)
    step(r0, r1, rand.mask(4, 9, "right"), rand.mask(3, 20, "gaps"), clip=0.5)
    step(rand.randn(6), rand.randn(2, 3), None, torch.zeros(2, 3, dtype=torch.bool))  # rank 1: nothing counted
    bad = rand.randn(8)
    bad[5] = float("nan")
    step(rand.randn(12), bad)  # rank 1: NaN -> every rank rejects
    step(rand.randn(50), rand.randn(7), clip=2.0)
    return steps


def _run_ranks(tmp_path, data_path, world=2, timeout=60.0):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["OMP_NUM_THREADS"] = "1"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    for attempt in range(3):
        port = str(_free_port())
        outs = [tmp_path / f"rank{r}-{attempt}.pt" for r in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(r), str(world), port, str(data_path), str(outs[r])],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(world)
        ]
        deadline = time.monotonic() + timeout
        logs = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                logs.append((p.returncode, out + err))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            for p in procs:
                p.communicate()
            pytest.fail(f"the {world} ranks did not finish within {timeout} s")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if all(rc == 0 for rc, _ in logs):
            return [torch.load(o, weights_only=True) for o in outs]
        text = "\n".join(f"--- rank {r} (exit {rc}) ---\n{log[-4000:]}" for r, (rc, log) in enumerate(logs))
        if "address already in use" not in text.lower():
            pytest.fail(f"a rank failed:\n{text}")
    pytest.fail(f"no free port after 3 attempts:\n{text}")


def test_two_processes_gloo(rand, tmp_path):
    steps = _two_rank_data(rand)
    data_path = tmp_path / "data.pt"
    torch.save(steps, data_path)
    ranks = _run_ranks(tmp_path, data_path)
    assert len(ranks[0]) == len(ranks[1]) == len(steps)
    single = RunningMoments()
    for i, (step, r0, r1) in enumerate(zip(steps, *ranks, strict=True)):
        # every rank holds bit-identical state and returns the same batch statistics
        assert torch.equal(r0["state"], r1["state"]), i
        assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["std"], r1["std"]), i
        # one process, the union of the ranks' counted entries in rank order
        union = torch.cat(
            [x.flatten() if m is None else x[m != 0] for x, m in zip(step["x"], step["mask"], strict=True)]
        )
        s_mean, s_std = single.update(union, validate=False)
        torch.testing.assert_close(r0["state"], single.state, rtol=1e-12, atol=1e-12, msg=f"update {i}")
        torch.testing.assert_close(r0["mean"], s_mean, rtol=1e-6, atol=1e-6, msg=f"update {i}")
        torch.testing.assert_close(r0["std"], s_std, rtol=1e-5, atol=1e-6, msg=f"update {i}")
        if step["clip"] is not None:
            for rank, res in enumerate((r0, r1)):
                x, m = step["x"][rank], step["mask"][rank]
                want = single.normalize(x, m, center=True, clip=step["clip"])
                torch.testing.assert_close(res["y"], want, rtol=1e-6, atol=1e-6, msg=f"update {i}, rank {rank}")
    assert single.rejected.item() == 1 and ranks[0][-1]["state"][3].item() == 1
    total = sum(int(x.numel() if m is None else (m != 0).sum()) for s in steps for x, m in zip(s["x"], s["mask"]))
    rejected = sum(s["x"][0].numel() + s["x"][1].numel() for s in steps[-2:-1])
    assert ranks[0][-1]["state"][0].item() == total - rejected


# ------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
def test_cuda_module_matches_cpu(rand):
    cpu, gpu = RunningMoments(), RunningMoments().to("cuda")
    assert gpu.state.device.type == "cuda"
    for n in (1, 7, 1000, 1, 50_000):
        x = rand.randn(n, scale=2.0) + 1e3
        y_c, _batch = cpu.update_normalize(x, center=True, clip=2.0)

        m_c, s_c = RunningMoments.batch_mean_std(_batch)
        y_g, _batch = gpu.update_normalize(x.cuda(), center=True, clip=2.0)
        m_g, s_g = RunningMoments.batch_mean_std(_batch)
        torch.testing.assert_close(gpu.state.cpu(), cpu.state, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close((m_g.cpu(), s_g.cpu()), (m_c, s_c), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y_g.cpu(), y_c, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"x is on cpu but the state is on cuda:0"):
        gpu.update(torch.randn(3))


def _cuda_module_steps(rand):
    rm = RunningMoments(device="cuda")
    scores = rand.randn(512, device="cuda")
    rewards = rand.randn(64, 1031, dtype=torch.bfloat16, device="cuda")
    mask = rand.mask(64, 1031, "gaps", device="cuda")
    return {
        "scores": lambda: rm.update_normalize(scores, center=True, clip=0.5, validate=False),
        "rewards": lambda: rm.update_normalize(rewards, mask, clip=1.0, validate=False),
    }


@pytest.mark.cuda
def test_cuda_update_normalize_no_host_sync(rand):
    for name, fn in _cuda_module_steps(rand).items():
        y, mean, std = without_host_sync(fn)
        assert torch.isfinite(y).all() and torch.isfinite(mean) and std.item() > 0, name


@pytest.mark.cuda
def test_cuda_update_normalize_launch_count(rand):
    """RunningMoments.update_normalize (one process, validate=False) is at most two kernel launches,
    as its docstring says; memcpy/memset are listed, not counted."""
    for name, fn in _cuda_module_steps(rand).items():
        kernels, events = cuda_kernels(fn)
        assert 1 <= len(kernels) <= 2, (name, events)
