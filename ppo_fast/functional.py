"""Public functional API. Each function checks its arguments, then runs the fused op (the
extension's CPU or CUDA kernel, picked by the dispatcher from the inputs' device) or, when the
extension is not built or ``use_fused=False``, the eager reference in ``ppo_fast.reference``.

Shapes: ``B`` sequences (rows) of ``T`` tokens. ``mask`` is 1 (non-zero) on response tokens; bool
or the values' dtype are read directly, other dtypes are converted once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppo_fast import _checks, _ops, reference

__all__ = [
    "RolloutAdvantages",
    "backend",
    "compute_advantages",
    "compute_rewards",
    "entropy_from_logits",
    "full_kl",
    "fused_available",
    "gae",
    "gelu_tanh",
    "group_advantages",
    "linear_logprobs",
    "logprobs_from_logits",
    "lion8bit_step_",
    "masked_whiten",
    "moments",
    "moments_merge_",
    "moments_normalize",
    "moments_update_normalize_",
    "ppo_loss",
    "resolve_fused",
    "rollout_advantages",
]


class RolloutAdvantages(NamedTuple):
    rewards: torch.Tensor
    non_score_rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def fused_available() -> bool:
    """True when the compiled extension is loaded (and not disabled by ``PPO_FAST_DISABLE_EXT=1``)."""
    return _ops.HAS_EXT


def resolve_fused(use_fused: bool | None, who: str = "ppo_fast", flag: str = "use_fused") -> bool:
    """Whether a call with ``use_fused`` runs fused: None means "when the extension is built"; True
    without the extension raises a RuntimeError that names ``who`` and its ``flag``."""
    if use_fused is None:
        return _ops.HAS_EXT
    if use_fused and not _ops.HAS_EXT:
        raise RuntimeError(f"{who}: {flag}=True but the compiled extension is not available ({_ops.EXT_ERROR})")
    return bool(use_fused)


def backend(use_fused: bool | None = None):
    """The ops themselves, for a caller that has checked its own arguments (the trainer,
    ``RunningMoments``, the Lion optimizers): ``torch.ops.ppo_fast`` when fused, whose kernels check
    their arguments in C++ (and the fake kernels under ``torch.compile``), else ``ppo_fast.reference``,
    which checks nothing. Either takes each op's schema arguments, positionally, and returns what the
    schema returns; the functions of this module add the Python checks and the conveniences."""
    return _ops.ops if resolve_fused(use_fused) else reference


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_penalty: str = "kl",
    *,
    use_fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * penalty(logprobs, ref_logprobs)`` plus ``scores[b]`` at row b's
    last unmasked token (a fully masked row gets no score).

    Args: ``scores`` [B] (any float dtype), ``logprobs``/``ref_logprobs`` [B, T] (fp32, bf16, fp16,
    fp64; one dtype), ``mask`` [B, T]; ``kl_penalty`` in ``kl | abs | mse | k3``.
    Returns ``(rewards, non_score_rewards, kl)``, [B, T] in the dtype of ``logprobs``.
    """
    kl_coef = float(kl_coef)
    _checks.check_compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_penalty)
    fn = backend(use_fused).compute_rewards
    return fn(scores.detach(), logprobs.detach(), ref_logprobs.detach(), mask, kl_coef, kl_penalty)


def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    carry_masked: bool = False,
    use_fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unwhitened) GAE advantages and returns, TRL's semantics: values and rewards multiplied by
    the mask, value 0 past the end. ``carry_masked=True`` skips masked positions instead (advantage
    and next value carried through them), for multi-turn rollouts with masked observation tokens.
    [B, T] in, ``(advantages, returns)`` [B, T] out, in the dtype of ``values``."""
    gamma, lam = float(gamma), float(lam)
    _checks.check_gae(values, rewards, mask, gamma, lam)
    fn = backend(use_fused).gae
    return fn(values.detach(), rewards.detach(), mask, gamma, lam, bool(carry_masked))


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = reference.WHITEN_EPS,
    *,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with the mean and Bessel-corrected variance taken over the
    unmasked positions and applied to every position; ``shift_mean=False`` adds the mean back. With
    fewer than two unmasked positions the variance is taken as 1 (TRL raises or returns NaN).
    ``x`` of any shape, ``mask`` of the same shape; returns the dtype of ``x``."""
    eps = float(eps)
    _checks.check_masked_whiten(x, mask, eps)
    fn = backend(use_fused).masked_whiten
    return fn(x.detach(), mask, bool(shift_mean), eps)


def compute_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    whiten_rewards: bool = False,
    carry_masked: bool = False,
    use_fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``PPOTrainer.compute_advantages``: optional reward whitening (mean kept, padding masked
    out again), GAE, returns, then advantages whitened over the mask. [B, T] in; returns
    ``(advantages, returns)`` in the dtype of ``values``. On CUDA: at most three launches, no host
    synchronisation."""
    gamma, lam = float(gamma), float(lam)
    _checks.check_gae(values, rewards, mask, gamma, lam, op="compute_advantages")
    fn = backend(use_fused).compute_advantages
    return fn(values.detach(), rewards.detach(), mask, gamma, lam, bool(whiten_rewards), bool(carry_masked))


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
    *,
    whiten_rewards: bool = False,
    carry_masked: bool = False,
    use_fused: bool | None = None,
) -> RolloutAdvantages:
    """The whole post-processing of a PPO rollout in one op: ``compute_rewards`` then
    ``compute_advantages``. On CUDA this is two launches (three with ``whiten_rewards``) and no host
    synchronisation. Returns ``RolloutAdvantages(rewards, non_score_rewards, kl, advantages, returns)``."""
    kl_coef, gamma, lam = float(kl_coef), float(gamma), float(lam)
    _checks.check_rollout_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, kl_penalty, gamma, lam)
    fn = backend(use_fused).rollout_advantages
    out = fn(
        scores.detach(),
        logprobs.detach(),
        ref_logprobs.detach(),
        values.detach(),
        mask,
        kl_coef,
        kl_penalty,
        gamma,
        lam,
        bool(whiten_rewards),
        bool(carry_masked),
    )
    return RolloutAdvantages(*out)


def ppo_loss(
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
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
    use_fused: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's clipped PPO loss with value clipping, in one pass, with all of its minibatch statistics.

    ``ratio = exp(logprobs - old_logprobs)`` (optionally clamped in log space to
    ``[-log_ratio_clamp, log_ratio_clamp]``); ``pg = max(-A ratio, -A clip(ratio, 1 - cliprange,
    1 + cliprange_high))`` (``cliprange_high`` None: ``cliprange``; a larger one is DAPO's clip-higher,
    Yu et al. 2025), bounded by ``-A dual_clip`` where ``A < 0`` when ``dual_clip`` is set;
    ``vf = 0.5 max((v - R)^2, (clip(v, old_v - cliprange_value, old_v + cliprange_value) - R)^2)``;
    ``loss = agg(pg) + vf_coef agg(vf) + kl_coef agg(kl)`` with ``kl`` the ``kl_estimator`` (k1, k2,
    k3) of ``logprobs`` against ``ref_logprobs``. ``aggregation``: ``token_mean`` (TRL: mean over all
    unmasked tokens), ``seq_mean_token_mean`` (mean over rows of each row's token mean) or
    ``seq_mean_token_sum`` (mean over rows of each row's token sum); rows without tokens count for
    nothing. When the masked mean ratio exceeds ``ratio_threshold`` the losses and gradients are zero
    (TRL skips the minibatch), decided on the device without a host synchronisation.

    Tensors: [B, T], one float dtype (fp32, bf16, fp16; fp64 on CPU); ``mask`` [B, T]. Gradients
    flow to ``logprobs`` and ``vpreds`` only. Returns ``(loss, stats)``: a 0-d fp32 loss (fp64 for
    fp64 inputs) and a dict of 0-d tensors named as TRL's (``loss/total``, ``loss/policy``,
    ``loss/value``, ``policy/clipfrac``, ``policy/approxkl``, ``policy/policykl``, ``val/clipfrac``,
    ``returns/mean``, ...); ``stats["_vector"]`` is all of them as one tensor, in the order of
    ``reference.PPO_LOSS_STATS``, for one all-reduce.
    """
    scalars = (float(cliprange), float(cliprange_value), float(vf_coef), float(kl_coef), kl_estimator)
    scalars += (
        None if dual_clip is None else float(dual_clip),
        None if log_ratio_clamp is None else float(log_ratio_clamp),
    )
    scalars += (aggregation, float(ratio_threshold), None if cliprange_high is None else float(cliprange_high))
    tensors = (logprobs, vpreds, old_logprobs.detach(), old_values.detach(), advantages.detach(), returns.detach())
    ref = None if ref_logprobs is None else ref_logprobs.detach()
    _checks.check_ppo_loss(*tensors, mask, ref, *scalars)
    fn = backend(use_fused).ppo_loss
    loss, stats, _ = fn(*tensors, mask, ref, *scalars)
    named = dict(zip(reference.PPO_LOSS_STATS, stats.unbind(0), strict=True))
    named["_vector"] = stats
    return loss, named


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    estimator: str = "grpo",
    *,
    eps: float = reference.GROUP_EPS,
    validate: bool = True,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """Value-free per-sample advantages from ``scores`` [N] (fp32, bf16, fp16; fp64 on CPU), whose
    consecutive runs of ``group_size`` samples are groups (the responses to one prompt); N must be a
    multiple of ``group_size``. With the group's mean, sum and Bessel-corrected std:

    * ``grpo``: ``(s - mean) / (std + eps)``; 0 for a group of one (and for a zero deviation);
    * ``dr_grpo``: ``s - mean``;
    * ``rloo``: ``s - (sum - s) / (n - 1)``, the mean of the group's other samples as the baseline; 0
      for a group of one;
    * ``reinforce_pp_baseline``: ``s - mean`` (the trainer then whitens it over the batch's tokens);
    * ``reinforce_pp``: ``s`` (the trainer builds token-level returns from it).

    Returns fp32 [N] (fp64 for fp64 scores); group moments accumulate in fp64. On CUDA one launch, no
    host synchronisation. ``validate`` first checks that the scores are finite (one host
    synchronisation on CUDA) and raises naming the positions; without it a NaN or inf spreads to its
    group's advantages.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise RuntimeError(f"group_advantages: group_size must be an int, got {group_size!r}")
    eps = float(eps)
    _checks.check_group_advantages(scores, group_size, estimator, eps)
    if validate:
        bad = ~torch.isfinite(scores)
        if bad.any():  # one host synchronisation; validate=False skips it
            where = bad.nonzero().flatten().tolist()
            shown = ", ".join(map(str, where[:8])) + (f" and {len(where) - 8} more" if len(where) > 8 else "")
            raise RuntimeError(f"group_advantages: scores must be finite; NaN or inf at {shown}")
    fn = backend(use_fused).group_advantages
    return fn(scores.detach(), group_size, estimator, eps)


def gelu_tanh(x: torch.Tensor, *, use_fused: bool | None = None) -> torch.Tensor:
    """The tanh-approximate GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2's
    ``gelu_new``, transformers' ``NewGELUActivation``), differentiable w.r.t. ``x``.

    ``x`` of any shape, fp32/bf16/fp16 (fp64 on CPU); returns x's shape and dtype (computed in fp32
    for bf16/fp16). Fused, it is computed as ``x * sigmoid(2u)`` with one exp per element, forward
    and backward each one pass over memory; a non-contiguous ``x`` is copied to a contiguous one
    first. NaN and inf give what the reference gives (``gelu(-inf)`` is NaN, as ``-inf * 0``).
    """
    _checks.check_gelu_tanh(x)
    return backend(use_fused).gelu_tanh(x)


def moments(x: torch.Tensor, mask: torch.Tensor | None = None, *, use_fused: bool | None = None) -> torch.Tensor:
    """A batch's moments ``(count, mean, M2, non-finite)`` as float64 [4], over the entries where
    ``mask`` is non-zero (all when None). Non-finite values are counted apart, not in the moments.
    ``x`` of any shape (fp32, bf16, fp16; fp64 on CPU); ``mask`` of x's shape."""
    _checks.check_moments_x("moments", x, mask)
    fn = backend(use_fused).moments
    return fn(x.detach(), mask)


def moments_merge_(state: torch.Tensor, batches: torch.Tensor, *, use_fused: bool | None = None) -> torch.Tensor:
    """Merges ``batches`` [K, 4] (e.g. one per process, in rank order) into the running ``state``
    [4] = (count, mean, M2, rejected), in place, with Chan's formula in fp64. If any batch holds a
    non-finite value nothing is merged and ``rejected`` grows by one. Returns ``state``."""
    _checks.check_moments_merge(state, batches)
    fn = backend(use_fused).moments_merge_
    fn(state, batches)
    return state


def moments_normalize(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    state: torch.Tensor,
    *,
    scale: bool = True,
    center: bool = False,
    clip: float | None = None,
    eps: float = reference.MOMENTS_EPS,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """``x / (std + eps)`` with the running std (Bessel-corrected; 1 below two samples) when
    ``scale``; ``x - mean`` first when ``center``; then clipped to ``[-clip, clip]``. Entries where
    ``mask`` is zero pass through unchanged (None: no entry is masked). Arguments in the schema's
    order, as ``moments_update_normalize_``. Returns x's dtype and shape."""
    clip = None if clip is None else float(clip)
    _checks.check_moments_normalize_call("moments_normalize", x, mask, state, clip, float(eps))
    fn = backend(use_fused).moments_normalize
    return fn(x.detach(), mask, state, bool(scale), bool(center), clip, float(eps))


def moments_update_normalize_(
    state: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: bool = True,
    center: bool = False,
    clip: float | None = None,
    eps: float = reference.MOMENTS_EPS,
    use_fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x``'s moments into ``state`` (in place), then ``moments_normalize`` with the updated
    state: one process's whole score scaling / normalisation / clipping, two CUDA launches and no
    host synchronisation. Returns ``(normalised x, batch moments [4])``."""
    clip = None if clip is None else float(clip)
    _checks.check_moments_normalize_call("moments_update_normalize_", x, mask, state, clip, float(eps))
    fn = backend(use_fused).moments_update_normalize_
    return fn(state, x.detach(), mask, bool(scale), bool(center), clip, float(eps))


def lion8bit_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum: list[torch.Tensor],
    absmax: list[torch.Tensor],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    *,
    stochastic_rounding: bool = False,
    seed: int = 0,
    use_fused: bool | None = None,
) -> None:
    """One Lion step over a list of tensors, in place, as one fused pass (one CUDA launch for the
    whole list): ``p *= 1 - lr wd; p -= lr sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g``.

    ``params[i]``: fp32, bf16 or fp16, contiguous, any shape; ``grads[i]``: its shape and dtype.
    ``momentum[i]``: uint8 codes [n] of the signed dynamic map with ``absmax[i]`` float32
    [ceil(n / 256)] (8-bit state, dequantised and requantised in the same pass), or float32 with n
    elements and an empty ``absmax[i]`` (fp32 state). All on one device. ``stochastic_rounding``
    rounds bf16 parameters stochastically, from a hash of (``seed``, tensor index, element index).
    ``ppo_fast.optim.Lion8bit`` and ``Lion`` are built on this.
    """
    lr, beta1, beta2, weight_decay = float(lr), float(beta1), float(beta2), float(weight_decay)
    _checks.check_lion8bit_step(params, grads, momentum, absmax, lr, beta1, beta2, weight_decay)
    if not params:
        return  # nothing to step (and an op call without tensors has no device to dispatch on)
    fn = backend(use_fused).lion8bit_step_
    grads = [g.detach() for g in grads]
    fn(params, grads, momentum, absmax, lr, beta1, beta2, weight_decay, bool(stochastic_rounding), int(seed))


def _check_label_range(op: str, labels: torch.Tensor, vocab: int) -> None:
    bad = (labels < 0) | (labels >= vocab)
    if bad.any():  # one host synchronisation; validate=False skips it
        where = bad.nonzero().tolist()
        shown = ", ".join(str(tuple(p)) for p in where[:8]) + (f" and {len(where) - 8} more" if len(where) > 8 else "")
        raise RuntimeError(f"{op}: labels must be in [0, V) = [0, {vocab}); out of range at {shown}")


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    validate: bool = True,
    inplace_backward: bool = False,
    use_fused: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log_softmax(logits / temperature)[label]`` (TRL's ``logprobs_from_logits``), and
    with ``return_entropy`` the entropy of the same distribution (TRL's ``entropy_from_logits``), in
    one pass over the vocabulary without a [B, T, V] temporary. Differentiable w.r.t. ``logits``
    through either output; the backward recomputes the softmax from the saved log-sum-exp.

    ``logits`` [B, T, V] fp32/bf16/fp16 (fp64 on CPU) with a contiguous last dimension (other
    strides arbitrary: ``logits[:, :-1]`` is not copied); ``labels`` [B, T] int64/int32. Returns fp32
    [B, T] (log-probs feed ``exp(logp - old)`` ratios: bf16 would ruin them). ``validate`` checks the
    labels' range (one host synchronisation); out-of-range labels otherwise give NaN.
    ``inplace_backward=True`` (fused only) writes the gradient into the logits' own storage instead
    of a new [B, T, V] tensor: the logits are overwritten in the backward, so use it only when
    nothing else needs them afterwards (the usual case: they come straight from the LM head).
    """
    temperature = float(temperature)
    _checks.check_logprobs(logits, labels, temperature)
    if validate:
        _check_label_range("logprobs", labels, logits.shape[-1])
    fused = resolve_fused(use_fused)
    if inplace_backward and not fused:
        raise RuntimeError(
            "logprobs: inplace_backward needs the fused op (use_fused=False was asked or it is not built)"
        )
    if inplace_backward:
        logprob, entropy, _ = _ops.LogprobsInplaceGrad.apply(logits, labels, temperature)
    elif not fused and not return_entropy:
        return reference.logprob_of_labels(logits, labels, temperature)
    else:
        fn = _ops.ops.logprobs if fused else reference.logprobs
        logprob, entropy, _ = fn(logits, labels, temperature)
    return (logprob, entropy) if return_entropy else logprob


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, use_fused: bool | None = None
) -> torch.Tensor:
    """Per-token entropy of ``softmax(logits / temperature)`` (TRL's ``entropy_from_logits``), [B, T] fp32."""
    labels = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device) if logits.dim() == 3 else logits
    return logprobs_from_logits(logits, labels, temperature, return_entropy=True, validate=False, use_fused=use_fused)[
        1
    ]


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    validate: bool = True,
    use_fused: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits(hidden @ weight.T + bias, labels, temperature, return_entropy)`` without
    the [B, T, V] logits: the LM head's GEMM and the log-softmax fused, chunk by chunk over the tokens.

    The B * T token rows go through ``chunk_size`` at a time: each chunk's logits [chunk, V] are one
    GEMM (ATen's: cuBLAS on CUDA), reduced to log-prob, entropy and log-sum-exp by the log-prob
    kernels, then overwritten by the next chunk's; the backward recomputes them. (When all rows fit one chunk
    and a backward will run, chunking saves nothing: that one block of logits is kept for the backward, through
    the ``logprobs`` op, instead of recomputed, which saves a GEMM.) Beyond its inputs,
    outputs and gradients the op holds about one chunk of logits, plus an fp32 accumulator of the
    weight's gradient when the weight is not fp32. The default ``chunk_size`` (None) takes the rows
    whose logits fill 64 MiB in the inputs' dtype, at least 256 (V = 32000 fp32: 524 rows; V = 128256
    bf16: 261), and at most B * T.

    ``hidden`` [B, T, H] fp32/bf16/fp16 (fp64 on CPU), any strides (``h[:, :-1]`` is read a chunk at a
    time, not copied whole); ``weight`` [V, H] (the LM head's, hidden's dtype); ``bias`` [V] or None;
    ``labels`` [B, T] int64/int32 in [0, V). Returns fp32 [B, T] ``logprob`` (fp64 for fp64 inputs),
    and with ``return_entropy`` the tuple ``(logprob, entropy)``: ``logprobs_from_logits``'s
    convention, so one swaps for the other. Differentiable in ``hidden``, ``weight`` and ``bias``
    through either output; gradients come in the inputs' dtypes (the weight's and bias's accumulated
    in fp32 across chunks), and only those that are needed are computed. ``validate`` checks the
    labels' range (one host synchronisation); out-of-range labels otherwise give NaN. With
    ``use_fused=False`` (or without the extension) this is ``reference.linear_logprobs``: the logits
    whole, as the model's ``nn.Linear`` head computes them, then the log-softmax in fp32.
    """
    temperature = float(temperature)
    _checks.check_linear_logprobs(hidden, weight, labels, bias, temperature, chunk_size)
    if validate:
        _check_label_range("linear_logprobs", labels, weight.shape[0])
    fused = resolve_fused(use_fused)
    if fused and _one_chunk_with_grad(hidden, weight, bias, chunk_size):
        # One chunk that a backward will need: its logits are kept from the forward (the logprobs op saves them)
        # instead of recomputed, which saves the backward's head GEMM. The same GEMM, the same kernels.
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logprob, entropy, _ = _ops.ops.logprobs(logits, labels, temperature)
    else:
        fn = _ops.ops.linear_logprobs if fused else reference.linear_logprobs
        logprob, entropy, _ = fn(hidden, weight, labels, bias, temperature, chunk_size)
    return (logprob, entropy) if return_entropy else logprob


# linear_logprobs.h's default chunk: the rows whose logits fill 64 MiB, at least 256.
_CHUNK_BYTES, _MIN_CHUNK_ROWS = 64 << 20, 256


def _one_chunk_with_grad(hidden, weight, bias, chunk_size) -> bool:
    """Whether ``linear_logprobs`` would run one chunk (all B * T rows' logits in one block) and autograd will
    want its backward. Then the op's chunking saves no memory and its recompute costs one GEMM."""
    if not torch.is_grad_enabled() or not (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    rows = hidden.shape[0] * hidden.shape[1]
    limit = (
        chunk_size
        if chunk_size is not None
        else max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (weight.shape[0] * weight.element_size()))
    )
    return rows <= limit


def full_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0, *, use_fused: bool | None = None
) -> torch.Tensor:
    """Per-token KL(policy || reference) over the whole vocabulary, for ``kl_penalty="full"``, in one
    pass over both logits; [B, T] fp32. Not differentiable (rewards are computed without gradients)."""
    temperature = float(temperature)
    _checks.check_full_kl(logits, ref_logits, temperature)
    fn = backend(use_fused).full_kl
    return fn(logits.detach(), ref_logits.detach(), temperature)
