"""Eager PyTorch twins of every fused op: same signatures, TRL 0.11's math written plainly.

They are the ground truth the kernels are tested against, the fallback when the extension is not
built (or ``PPO_FAST_DISABLE_EXT=1``), and the "eager" side of the benchmarks. Low-precision
inputs are computed in fp32 (fp64 stays fp64) and results are returned in the input dtype.
"""

from __future__ import annotations

import math

import torch

from ppo_fast._modes import AGGREGATIONS, GROUP_ESTIMATORS, KL_ESTIMATORS, KL_PENALTIES, one_of

__all__ = [
    "bessel_var",
    "compute_advantages",
    "compute_rewards",
    "dequantize_blockwise",
    "dynamic_code",
    "full_kl",
    "gae",
    "gae_scan",
    "gelu_tanh",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "lion8bit_step_",
    "logprobs",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "moments",
    "moments_merge_",
    "moments_normalize",
    "moments_update_normalize_",
    "ppo_loss",
    "quantize_blockwise",
    "rollout_advantages",
    "running_std",
    "running_var",
    "stochastic_round_bf16",
]

WHITEN_EPS = 1e-8  # TRL's masked_whiten


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


# Per-token KL estimators of d = logprobs - ref_logprobs, by both of their names: TRL's kl_penalty
# modes (kl, abs, mse, k3) and the loss's kl_estimator (Schulman's k1, k2, k3; k1 = kl, k2 = mse).
_KL_FORMS = {
    "kl": lambda d: d,
    "k1": lambda d: d,
    "abs": lambda d: d.abs(),
    "mse": lambda d: 0.5 * d.square(),
    "k2": lambda d: 0.5 * d.square(),
    "k3": lambda d: torch.exp(-d) + d - 1,
}


def _kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mode: str, arg: str, modes: tuple[str, ...]):
    if mode not in modes:
        raise ValueError(f"{arg} must be one of {one_of(modes)}, got {mode!r}")
    return _KL_FORMS[mode](logprobs - ref_logprobs)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mode: str = "kl") -> torch.Tensor:
    """Per-token KL estimate (TRL's ``_kl_penalty``; ``k3`` is Schulman's unbiased low-variance one)."""
    return _kl(logprobs, ref_logprobs, mode, "kl_penalty", KL_PENALTIES)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_penalty: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rewards = -kl_coef * kl`` plus each row's score at its last unmasked position.

    [B, T] inputs, ``scores`` [B]. A row with no unmasked position gets no score (TRL raises).
    Returns ``(rewards, non_score_rewards, kl)``, each [B, T] in the dtype of ``logprobs``.
    """
    dtype = logprobs.dtype
    kl = _kl(_acc(logprobs), _acc(ref_logprobs), kl_penalty, "kl_penalty", KL_PENALTIES)
    non_score = -kl_coef * kl
    m = mask != 0
    T = m.shape[1]
    last = T - 1 - m.flip(1).int().argmax(dim=1)  # last unmasked position of each row
    score = torch.where(m.any(dim=1), scores.to(non_score.dtype), 0.0)
    rewards = non_score.scatter_add(1, last[:, None], score[:, None])
    return rewards.to(dtype), non_score.to(dtype), kl.to(dtype)


def _keep(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is non-zero, else 0. Not ``x * mask``: padding may hold NaN or inf, and
    0 * NaN would carry it into every masked sum (the kernels skip masked positions)."""
    return torch.where(mask != 0, x, 0.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked positions (0 when there are none); masked values are never read."""
    return _keep(values, mask).sum() / mask.sum().clamp(min=1)


def bessel_var(m2: torch.Tensor, n: torch.Tensor, below_two: float) -> torch.Tensor:
    """``m2 / (n - 1)``, the Bessel-corrected variance from a sum of squared deviations ``m2`` over
    ``n`` samples; ``below_two`` where n < 2 (no spread can be measured). Every variance of ppo_fast
    is this one: whitening and the running moments take 1 there, the loss statistics 0."""
    return torch.where(n > 1, m2 / (n - 1).clamp(min=1), torch.full_like(m2, below_two))


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected masked variance; 1 when fewer than two positions are unmasked (TRL raises for
    none and returns NaN for one)."""
    centered = values - masked_mean(values, mask)
    return bessel_var(_keep(centered.square(), mask).sum(), mask.sum(), 1.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the unmasked positions, applied everywhere; the mean is
    added back when ``shift_mean`` is False. Any shape; ``mask`` has the shape of ``x``."""
    dtype = x.dtype
    xa = _acc(x)
    m = (mask != 0).to(xa.dtype)
    mean = masked_mean(xa, m)
    out = (xa - mean) * torch.rsqrt(masked_var(xa, m) + eps)
    if not shift_mean:
        out = out + mean
    return out.to(dtype)


def _gae_inputs(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor):
    """The scan's inputs in the accumulation dtype: the mask as 0/1, values and rewards 0 where masked."""
    m = (mask != 0).to(_acc(values).dtype)
    return m, _keep(_acc(values), m), _keep(_acc(rewards), m)


def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    carry_masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GAE advantages and returns, TRL's reversed loop: values and rewards are multiplied by the
    mask and the value past the end is 0. With ``carry_masked``, masked positions are skipped: the
    advantage and the next value are carried through them unchanged. [B, T] in, [B, T] out."""
    dtype = values.dtype
    m, v, r = _gae_inputs(values, rewards, mask)
    T = v.shape[1]
    last_gae = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    advantages = []
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        new_gae = delta + gamma * lam * last_gae
        if carry_masked:
            last_gae = torch.where(m[:, t] > 0, new_gae, last_gae)
            next_value = torch.where(m[:, t] > 0, v[:, t], next_value)
        else:
            last_gae = new_gae
            next_value = v[:, t]
        advantages.append(last_gae)
    adv = torch.stack(advantages[::-1], dim=1)
    return adv.to(dtype), (adv + v).to(dtype)


def gae_scan(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    carry_masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gae`` as a loop-free log-depth reverse affine scan (Hillis-Steele doubling over the maps
    ``x -> a x + b``). Same results as ``gae``; this form is what ``torch.compile`` can take at
    large T, where the Python loop would unroll T times."""
    dtype = values.dtype
    m, v, r = _gae_inputs(values, rewards, mask)
    ones, zeros = torch.ones_like(v), torch.zeros_like(v)
    take = m if carry_masked else ones
    # next value: N_t = take_t ? v_t : N_{t+1}; the value seen from t is N_{t+1}.
    n_a, n_b = _reverse_affine_scan(1 - take, take * v)
    v_next = torch.cat([n_b[:, 1:], zeros[:, :1]], dim=1)
    delta = r + gamma * v_next - v
    active = m if carry_masked else ones
    a = active * (gamma * lam) + (1 - active)
    _, adv = _reverse_affine_scan(a, active * delta)
    return adv.to(dtype), (adv + v).to(dtype)


def _reverse_affine_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive right-to-left composition of ``x_t = a_t x_{t+1} + b_t`` with ``x_T = 0``."""
    T = a.shape[1]
    step = 1
    while step < T:
        # compose each position with the maps `step` positions to its right (identity past the end)
        a_r = torch.cat([a[:, step:], torch.ones_like(a[:, :step])], dim=1)
        b_r = torch.cat([b[:, step:], torch.zeros_like(b[:, :step])], dim=1)
        a, b = a * a_r, a * b_r + b
        step *= 2
    return a, b


def compute_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    carry_masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``compute_advantages``: optional reward whitening (mean kept), GAE, returns, and advantages
    whitened over the mask. Whitened rewards are masked again, so padding never leaks into the scan
    (TRL's whitened padding is non-zero). Returns ``(advantages, returns)`` in the dtype of ``values``."""
    if whiten_rewards:
        m = mask != 0
        rewards = _keep(masked_whiten(_keep(_acc(rewards), m), m, shift_mean=False), m)
    adv, ret = gae(_acc(values), _acc(rewards), mask, gamma, lam, carry_masked)
    adv = masked_whiten(adv, mask)
    return adv.to(values.dtype), ret.to(values.dtype)


def rollout_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_penalty: str = "kl",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    carry_masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole post-processing of a rollout: ``compute_rewards`` then ``compute_advantages``.
    Returns ``(rewards, non_score_rewards, kl, advantages, returns)``."""
    rewards, non_score, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_penalty)
    adv, ret = compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards, carry_masked)
    return rewards, non_score, kl, adv, ret


# ------------------------------------------------------------------------------------------------
# The tanh-approximate GELU, transformers' NewGELUActivation (GPT-2's gelu_new), as the model
# computed it before PPOConfig.fused_activations swapped in a fused activation.


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` in torch ops (NewGELUActivation's formula),
    any shape, in x's dtype (bf16/fp16 computed in fp32); differentiable by autograd. Its values and
    gradients at inf, NaN and overflowing x^3 are the behaviour ``ppo_fast::gelu_tanh`` reproduces."""
    a = _acc(x)
    return (0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * torch.pow(a, 3.0))))).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Value-free advantages from groups of scores (GRPO, Dr. GRPO, RLOO, REINFORCE++), verl's
# compute_*_outcome_advantage with a group as consecutive samples.

GROUP_EPS = 1e-6  # verl's epsilon in GRPO's (s - mean) / (std + eps)


def group_advantages(
    scores: torch.Tensor, group_size: int, estimator: str = "grpo", eps: float = GROUP_EPS
) -> torch.Tensor:
    """Per-sample advantages [N] from ``scores`` [N] in groups of ``group_size`` consecutive samples,
    fp32 (fp64 for fp64 scores), group moments in fp64: ``grpo`` (s - mean) / (std + eps) with the
    Bessel-corrected std, 0 for a group of one or a zero deviation; ``dr_grpo`` and
    ``reinforce_pp_baseline`` s - mean; ``rloo`` s - (sum - s) / (n - 1), 0 for a group of one;
    ``reinforce_pp`` s. NaN or inf in a group spreads to the group's advantages by the arithmetic."""
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator must be one of {one_of(GROUP_ESTIMATORS)}, got {estimator!r}")
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    n = group_size
    s = scores.double().reshape(-1, n)
    total = s.sum(1, keepdim=True)
    mean = total / n
    zero = torch.zeros_like(s)
    if estimator == "grpo":
        d = s - mean
        std = (d.square().sum(1, keepdim=True) / max(n - 1, 1)).sqrt()
        adv = zero if n < 2 else torch.where(d == 0, zero, d / (std + eps))
    elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
        adv = s - mean
    elif estimator == "rloo":
        adv = zero if n < 2 else s - (total - s) / (n - 1)
    else:
        adv = s
    return adv.reshape(-1).to(out_dtype)


# ------------------------------------------------------------------------------------------------
# Clipped PPO loss (TRL 0.11's PPOTrainer.loss, plus a KL-to-reference term, dual clip, log-ratio
# clamp and loss aggregation modes).

PPO_LOSS_STATS = (
    "loss/total",
    "loss/policy",
    "loss/value",
    "loss/kl",
    "policy/clipfrac",
    "policy/dual_clipfrac",
    "policy/approxkl",
    "policy/policykl",
    "policy/ratio_mean",
    "policy/ratio_var",
    "policy/advantages_mean",
    "returns/mean",
    "returns/var",
    "val/vpred",
    "val/vpred_var",
    "val/error",
    "val/clipfrac",
    "val/mean",
    "val/var",
    "ppo/skipped",
    "ppo/tokens",
    "ppo/rows",
)


def _token_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _keep(x, m).sum() / m.sum().clamp(min=1)


def _stat_var(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected masked variance; 0 with fewer than two tokens."""
    return bessel_var(_keep((x - _token_mean(x, m)).square(), m).sum(), m.sum(), 0.0)


def _aggregate(x: torch.Tensor, m: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "token_mean":
        return _token_mean(x, m)
    row_n, row_sum = m.sum(-1), _keep(x, m).sum(-1)
    rows = (row_n > 0).sum().clamp(min=1)
    if aggregation == "seq_mean_token_mean":
        return (row_sum / row_n.clamp(min=1)).sum() / rows
    if aggregation == "seq_mean_token_sum":
        return row_sum.sum() / rows
    raise ValueError(f"aggregation must be one of {one_of(AGGREGATIONS)}, got {aggregation!r}")


def ppo_loss(
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = None,
    aggregation: str = "token_mean",
    ratio_threshold: float = 10.0,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's clipped PPO loss. [B, T] inputs; gradients flow to ``logprobs`` and ``vpreds``. The ratio
    is clipped to ``[1 - cliprange, 1 + cliprange_high]`` (DAPO's clip-higher; None: ``cliprange``).

    Returns ``(loss, stats, row_scale)``: the scalar loss, the statistics in the order of
    ``PPO_LOSS_STATS``, and each row's weight d loss / d token term (0 when skipped), all fp32 (fp64
    for fp64 inputs). When the masked mean ratio exceeds ``ratio_threshold`` the losses are zero (TRL
    skips the batch), decided without a host synchronisation.
    """
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    m = (mask != 0).to(acc)
    # Masked positions are read as 0 (padding may hold NaN or inf): nothing there reaches the loss,
    # a statistic or a gradient, as in the kernels; a NaN at an unmasked position stays visible.
    lp, v = _keep(logprobs.to(acc), m), _keep(vpreds.to(acc), m)
    old, v_old, adv, ret = (_keep(x.to(acc), m) for x in (old_logprobs, old_values, advantages, returns))
    if ref_logprobs is not None:
        ref_logprobs = _keep(ref_logprobs.to(acc), m)

    def clamp_log_ratio(x: torch.Tensor) -> torch.Tensor:
        return x if log_ratio_clamp is None else torch.clamp(x, -log_ratio_clamp, log_ratio_clamp)

    n = m.sum()
    ratio_mean = _token_mean(torch.exp(clamp_log_ratio(lp.detach() - old)), m)
    skip = (n > 0) & (ratio_mean > ratio_threshold)
    # A skipped batch has zero gradients: its inputs leave the graph here, so that no zero gradient
    # meets an infinite derivative (0 * inf = NaN in exp's or a square's backward) further down.
    lp, v = torch.where(skip, lp.detach(), lp), torch.where(skip, v.detach(), v)

    log_ratio = lp - old
    clamped = clamp_log_ratio(log_ratio)
    ratio = torch.exp(clamped)
    pg_losses = -adv * ratio
    high = cliprange if cliprange_high is None else cliprange_high
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    pg = torch.maximum(pg_losses, pg_losses2)
    dual_clipped = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (bound < pg)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)

    vpredclipped = torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value)
    vf_losses1 = (v - ret) ** 2
    vf_losses2 = (vpredclipped - ret) ** 2
    vf = 0.5 * torch.maximum(vf_losses1, vf_losses2)
    if kl_coef != 0.0:
        kl = _kl(lp, ref_logprobs.to(acc), kl_estimator, "kl_estimator", KL_ESTIMATORS)
    else:
        kl = torch.zeros_like(lp)

    pg_loss = _aggregate(pg, m, aggregation)
    vf_loss = _aggregate(vf, m, aggregation)
    kl_loss = _aggregate(kl, m, aggregation)
    zero = torch.zeros_like(pg_loss)
    pg_loss = torch.where(skip, zero, pg_loss)
    vf_loss = torch.where(skip, zero, vf_loss)
    loss = torch.where(skip, zero, pg_loss + vf_coef * vf_loss + kl_coef * kl_loss)

    row_n = m.sum(-1)
    rows = (row_n > 0).sum()
    if aggregation == "token_mean":
        row_scale = torch.where(row_n > 0, 1.0 / n.clamp(min=1), 0.0)
    elif aggregation == "seq_mean_token_mean":
        row_scale = torch.where(row_n > 0, 1.0 / (rows.clamp(min=1) * row_n.clamp(min=1)), 0.0)
    else:
        row_scale = torch.where(row_n > 0, 1.0 / rows.clamp(min=1), 0.0)
    row_scale = torch.where(skip, 0.0, row_scale).to(acc)

    with torch.no_grad():
        stats = torch.stack(
            [
                loss,
                pg_loss,
                vf_loss,
                kl_loss,
                _token_mean((pg_losses2 > pg_losses).to(acc), m),
                _token_mean(dual_clipped.to(acc), m),
                0.5 * _token_mean(log_ratio.square(), m),
                _token_mean(-log_ratio, m),
                ratio_mean,
                _stat_var(ratio, m),
                _token_mean(adv, m),
                _token_mean(ret, m),
                _stat_var(ret, m),
                _token_mean(v, m),
                _stat_var(v, m),
                _token_mean((v - ret).square(), m),
                _token_mean((vf_losses2 > vf_losses1).to(acc), m),
                _token_mean(v_old, m),
                _stat_var(v_old, m),
                skip.to(acc),
                n,
                rows.to(acc),
            ]
        ).detach()
    return loss, stats, row_scale


# ------------------------------------------------------------------------------------------------
# Running reward moments (TRL's RunningMoments, with fp64 state, Chan merges, std 1 below two
# samples or at most eps, and batches holding NaN or inf rejected instead of merged).

MOMENTS_EPS = float(torch.finfo(torch.float32).eps)


def moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A batch's ``(count, mean, M2, non-finite)`` as float64 [4] over the entries where ``mask`` is
    non-zero (all when None); non-finite values are counted apart and left out of the moments."""
    xs = x.double()
    sel = torch.ones_like(xs, dtype=torch.bool) if mask is None else mask != 0
    finite = torch.isfinite(xs)
    use = sel & finite
    n = use.sum().double()
    mean = torch.where(use, xs, 0.0).sum() / n.clamp(min=1)
    m2 = torch.where(use, xs - mean, 0.0).square().sum()
    return torch.stack([n, mean, m2, (sel & ~finite).sum().double()])


def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    delta = mean_b - mean_a
    w = torch.where(n > 0, n_b / n.clamp(min=1e-300), 0.0)
    return n, mean_a + delta * w, m2_a + m2_b + delta.square() * n_a * w


def moments_merge_(state: torch.Tensor, batches: torch.Tensor) -> None:
    """Merges ``batches`` [K, 4] (in order) into ``state`` [4] = (count, mean, M2, rejected), in place;
    if any batch holds a non-finite value nothing is merged and ``rejected`` grows by one."""
    n, mean, m2 = state[0], state[1], state[2]
    for b in batches:
        n, mean, m2 = _chan(n, mean, m2, b[0], b[1], b[2])
    bad = batches[:, 3].sum() > 0
    new = torch.stack([n, mean, m2, state[3]])
    rejected = state.clone()
    rejected[3] += 1
    state.copy_(torch.where(bad, rejected, new))


def running_var(state: torch.Tensor, eps: float = MOMENTS_EPS) -> torch.Tensor:
    """Bessel-corrected variance of a state or batch ``(count, mean, M2, ...)``: 1 with fewer than
    two samples (TRL: inf), and 1 when its std is at most ``eps`` (equal scores: ``x / (0 + eps)``
    would scale them by 1 / eps; ``<=`` so that eps = 0 never divides by a zero std). NaN stays NaN."""
    var = bessel_var(state[2], state[0], 1.0)
    return torch.where(var.sqrt() <= eps, torch.ones_like(var), var)


def running_std(state: torch.Tensor, eps: float = MOMENTS_EPS) -> torch.Tensor:
    """``sqrt(running_var(state, eps))``: the std that normalisation divides by (plus eps)."""
    return running_var(state, eps).sqrt()


def moments_normalize(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    state: torch.Tensor,
    scale: bool = True,
    center: bool = False,
    clip: float | None = None,
    eps: float = MOMENTS_EPS,
) -> torch.Tensor:
    """``x / (std + eps)`` (``scale``), minus the running mean first (``center``), then clipped to
    ``[-clip, clip]``; entries where ``mask`` is zero pass through unchanged. ``std`` is
    ``running_std(state, eps)``: 1 below two samples or when at most eps."""
    y = _acc(x)
    if center:
        y = y - state[1].to(y.dtype)
    if scale:
        y = y * (1.0 / (running_std(state, eps) + eps)).to(y.dtype)
    if clip is not None:
        y = y.clamp(-clip, clip)
    if mask is not None:
        y = torch.where(mask != 0, y, _acc(x))
    return y.to(x.dtype)


def moments_update_normalize_(
    state: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    scale: bool = True,
    center: bool = False,
    clip: float | None = None,
    eps: float = MOMENTS_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x``'s moments into ``state`` (in place), then normalise ``x`` with the updated state.
    Returns ``(normalised x, batch moments [4])``."""
    batch = moments(x, mask)
    moments_merge_(state, batch[None])
    return moments_normalize(x, mask, state, scale, center, clip, eps), batch


# ------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits (TRL's logprobs_from_logits and entropy_from_logits).


def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z = logits / temperature``: per-token ``log_softmax(z)[label]``, the entropy of
    ``softmax(z)`` and ``logsumexp(z)``, each [B, T] in fp32 (fp64 for fp64 logits). Materialises
    [B, T, V] temporaries, as TRL does; -inf logits (a masked vocabulary) add nothing to the entropy.

    Non-finite logits: a row holding a NaN or a +inf, or only -inf, has no distribution; its
    logprob, entropy and lse are NaN (log_softmax and softmax give NaN there; logsumexp's +-inf is
    made NaN to match) and so is its whole gradient row."""
    z = _acc(logits) / temperature
    logp = torch.log_softmax(z, dim=-1)
    V = logits.shape[-1]
    inside = (labels >= 0) & (labels < V)  # out-of-range labels give NaN, as the kernels do
    logprob = torch.gather(logp, 2, labels.long().clamp(0, V - 1).unsqueeze(2)).squeeze(2)
    logprob = torch.where(inside, logprob, float("nan"))
    lse = torch.logsumexp(z, dim=-1)
    pd = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isinf(z), 0.0, z)  # p = 0 there; keeps 0 * inf out of values and gradients
    entropy = lse - (pd * finite_z).sum(-1)
    lse = torch.where(torch.isfinite(lse), lse, float("nan"))  # +inf (a +inf logit), -inf (only -inf)
    return logprob, entropy, lse


def logprob_of_labels(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``logprobs(...)[0]`` alone: TRL's ``logprobs_from_logits`` (log_softmax + gather), without the
    entropy's extra [B, T, V] passes; what the eager trainer runs when it needs no entropy."""
    z = _acc(logits) / temperature
    V = logits.shape[-1]
    inside = (labels >= 0) & (labels < V)
    logp = torch.log_softmax(z, dim=-1)
    logprob = torch.gather(logp, 2, labels.long().clamp(0, V - 1).unsqueeze(2)).squeeze(2)
    return torch.where(inside, logprob, float("nan"))


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logprobs`` of the LM head's logits ``hidden @ weight.T + bias``: what a model computes with
    its ``nn.Linear`` head (logits in the inputs' dtype, the whole [B, T, V] of them) and then
    ``log_softmax`` + gather + entropy on them in fp32 (fp64 for fp64). ``hidden`` [B, T, H],
    ``weight`` [V, H], ``bias`` [V] or None, ``labels`` [B, T]; returns (logprob, entropy, lse),
    [B, T]. ``chunk_size`` is the fused op's and changes nothing here."""
    return logprobs(torch.nn.functional.linear(hidden, weight, bias), labels, temperature)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(policy || reference) over the whole vocabulary (TRL's ``kl_penalty="full"``:
    ``F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)``), [B, T] fp32.
    Tokens the policy excludes (-inf) add nothing; one the reference excludes and the policy allows
    makes the KL +inf; a row of either model without a distribution (a NaN or +inf logit, or only
    -inf) makes it NaN."""
    logp = torch.log_softmax(_acc(logits) / temperature, dim=-1)
    ref = torch.log_softmax(_acc(ref_logits) / temperature, dim=-1)
    p = logp.exp()
    # p == 0, not p > 0, picks the excluded tokens: a NaN p (no distribution) must stay in the sum.
    return torch.where(p == 0, 0.0, p * (logp - ref)).sum(-1)


# ------------------------------------------------------------------------------------------------
# Lion with 8-bit blockwise momentum (Chen et al. 2023; 8-bit state as in bitsandbytes, Dettmers et
# al. 2022). Every fp32 operation is a separately rounded multiply or add in the kernels' order (no
# ``alpha=``, which CPU kernels turn into a fused multiply-add), so the fused op matches this bit
# for bit. An element whose gradient is NaN or +-inf keeps its parameter and momentum for the step,
# and a block's absmax is the max over its finite values: one bad gradient element must not poison
# (freeze) the other 255 of its block.

LION8BIT_BLOCK = 256  # elements per absmax
LION8BIT_MIN_SIZE = 4096  # Lion8bit keeps fp32 momentum for tensors with fewer elements
LION8BIT_ZERO_CODE = 127
_LION8BIT_TABLES: dict = {}
_M32 = 0xFFFFFFFF


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed dynamic (exponent + fraction) 8-bit map, float32 [256], ascending: 127 negative
    values, 0 (code 127), 127 positive values, 1. Exactly ``bitsandbytes.functional.create_dynamic_map
    (signed=True)``: for exponents i = 0..6, the 2**i midpoints of ``linspace(0.1, 1, 2**i + 1)``
    scaled by ``10**(i - 6)``, with both signs."""
    return _lion8bit_tables(torch.device(device))[0]


def _lion8bit_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in _LION8BIT_TABLES:
        data = []
        for i in range(7):
            bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            means = (bounds[:-1] + bounds[1:]) / 2.0
            data += ((10 ** (-6 + i)) * means).tolist()
            data += (-(10 ** (-6 + i)) * means).tolist()
        code = torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)
        mag = code[LION8BIT_ZERO_CODE + 1 :]  # positive magnitudes, ascending, ending with 1
        thresholds = (mag[:-1] + mag[1:]) / 2.0
        _LION8BIT_TABLES[key] = (code.to(device), thresholds.to(device))
    return _LION8BIT_TABLES[key]


def quantize_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-preserving blockwise 8-bit quantisation of ``x`` (any shape, read as fp32, flattened).

    Each block of 256 elements is divided by its absmax (the max of its finite ``|x|``; 0 for an
    all-zero block) and takes the nearest code of the dynamic map among those of its own sign (ties go
    to the smaller magnitude), so a nonzero value never becomes 0 or changes sign; 0 (and NaN, and
    every entry of an all-zero block) takes the zero code, +-inf the code of +-1.
    Returns ``(codes uint8 [n], absmax float32 [ceil(n / 256)])``: the absmax is finite and >= 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // LION8BIT_BLOCK)
    blocks = torch.nn.functional.pad(flat, (0, nb * LION8BIT_BLOCK - n)).view(nb, LION8BIT_BLOCK)
    absmax = torch.where(blocks.isfinite(), blocks.abs(), 0.0).amax(dim=1)
    return _quantize(blocks, absmax[:, None]).reshape(-1)[:n], absmax


def _quantize(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    _, thresholds = _lion8bit_tables(x.device)
    s = x * torch.where(absmax > 0, 1.0 / absmax, 0.0)  # x / absmax as bitsandbytes: times the reciprocal
    k = torch.searchsorted(thresholds, s.abs().contiguous(), side="left")  # thresholds below |s|
    z = LION8BIT_ZERO_CODE
    code = torch.where(s > 0, z + 1 + k, torch.where(s < 0, z - 1 - k.clamp(max=126), z))
    return code.to(torch.uint8)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``code[codes] * absmax`` of each element's block: float32 [n] from uint8 codes [n] (any shape)."""
    code, _ = _lion8bit_tables(codes.device)
    flat = codes.reshape(-1).long()
    scale = absmax.repeat_interleave(LION8BIT_BLOCK)[: flat.numel()]
    return code[flat] * scale


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stochastic_round_bf16(x: torch.Tensor, seed: int, tensor_index: int) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding: add 16 random bits below the bf16 mantissa, truncate.
    The bits hash (seed, tensor_index, element index) as the kernels do (murmur3's fmix32); inf and
    NaN pass through. ``x`` fp32 of any shape; returns bf16 of its shape."""
    flat = x.reshape(-1)
    idx = torch.arange(flat.numel(), device=x.device, dtype=torch.int64)
    h = ((idx & _M32) * 0x9E3779B1) & _M32  # int64 products wrap; the low 32 bits are exact
    h = h ^ (((idx >> 32) * 0x85EBCA77) & _M32)
    h = h ^ (((tensor_index * 0xC2B2AE3D) & _M32) ^ (seed & _M32))
    random = _fmix32(h) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64) & _M32
    rounded = torch.where(torch.isfinite(flat), (bits + random) & 0xFFFF0000, bits)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return rounded.view(torch.float32).to(torch.bfloat16).view(x.shape)


def lion8bit_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum: list[torch.Tensor],
    absmax: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> None:
    """One Lion step over a list of tensors, in place (bitsandbytes' order, decoupled weight decay):
    ``p *= 1 - lr wd; p -= lr sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g``, in fp32.

    ``params[i]`` fp32, bf16 or fp16, contiguous; ``grads[i]`` of its shape and dtype. ``momentum[i]``
    is either uint8 codes [n] with ``absmax[i]`` float32 [ceil(n / 256)] (dequantised before the step,
    requantised after, absmax from the new momentum's finite values) or float32 with ``n`` elements
    and an empty ``absmax[i]``. An element whose gradient is NaN or +-inf keeps its parameter and
    momentum (no weight decay either). With ``stochastic_rounding``, bf16 parameters round
    stochastically (seeded by ``seed`` and the tensor's index in the list); otherwise to nearest.
    """
    decay = 1.0 - lr * weight_decay
    for i, (p, g, m, a) in enumerate(zip(params, grads, momentum, absmax, strict=True)):
        quantized = m.dtype == torch.uint8
        p32, g32 = p.reshape(-1).float(), g.reshape(-1).float()
        m32 = dequantize_blockwise(m, a) if quantized else m.reshape(-1)
        finite = g32.isfinite()
        c = m32 * beta1 + g32 * (1.0 - beta1)
        p32 = torch.where(finite, p32 * decay - lr * torch.sign(c), p32)
        m32 = torch.where(finite, m32 * beta2 + g32 * (1.0 - beta2), m32)
        if stochastic_rounding and p.dtype == torch.bfloat16:
            p.view(-1).copy_(stochastic_round_bf16(p32, seed, i))
        else:
            p.view(-1).copy_(p32)
        if quantized:
            codes, new_absmax = quantize_blockwise(m32)
            m.view(-1).copy_(codes)
            a.copy_(new_absmax)
        else:
            m.view(-1).copy_(m32)
