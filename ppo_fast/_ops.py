"""Loads the compiled ops (``ppo_fast._C``) and registers their fake kernels (shapes and dtypes,
with the argument checks of ``ppo_fast._checks``) and their autograd formulas.

Extension loading is explicit: ``PPO_FAST_DISABLE_EXT=1`` forces the reference;
``PPO_FAST_REQUIRE_EXT=1`` (set in CI) turns a missing or broken extension into an ImportError;
otherwise a failed load warns once and ppo_fast runs on the reference.
"""

from __future__ import annotations

import os
import warnings

import torch

from ppo_fast._checks import (
    check_compute_rewards,
    check_full_kl,
    check_gae,
    check_gelu_tanh,
    check_gelu_tanh_backward,
    check_group_advantages,
    check_linear_logprobs,
    check_linear_logprobs_backward,
    check_lion8bit_step,
    check_logprobs,
    check_logprobs_backward,
    check_masked_whiten,
    check_moments_merge,
    check_moments_normalize_call,
    check_moments_x,
    check_ppo_loss,
    check_ppo_loss_params,
    check_ppo_loss_tensors,
    check_rollout_advantages,
)

# Layout of ppo_loss's stats vector (csrc/include/ppo_fast/ppo_loss.h, enum Stat).
from ppo_fast.reference import PPO_LOSS_STATS


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ImportError(f"ppo_fast: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _load_extension() -> tuple[bool, str | None]:
    disable, require = _env_flag("PPO_FAST_DISABLE_EXT"), _env_flag("PPO_FAST_REQUIRE_EXT")
    if disable and require:
        raise ImportError("ppo_fast: PPO_FAST_DISABLE_EXT=1 and PPO_FAST_REQUIRE_EXT=1 contradict each other")
    if disable:
        return False, "disabled by PPO_FAST_DISABLE_EXT=1"
    try:
        from ppo_fast import _C  # noqa: F401  (registers the ops through its static initialisers)
    except ImportError as e:
        if require:
            raise ImportError(
                f"ppo_fast: the compiled extension ppo_fast._C failed to load ({e}) and PPO_FAST_REQUIRE_EXT=1; "
                "build it with `pip install --no-build-isolation -e .`"
            ) from e
        warnings.warn(
            f"ppo_fast: compiled extension not available ({e}); running the eager reference ops. "
            "Build with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, str(e)
    return True, None


HAS_EXT, EXT_ERROR = _load_extension()


# ------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, with the same checks as the real kernels.


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _empty(t: torch.Tensor) -> torch.Tensor:
    # The kernels write fresh contiguous outputs whatever the inputs' strides.
    return t.new_empty(t.shape)


if HAS_EXT:
    ops = torch.ops.ppo_fast

    @torch.library.register_fake("ppo_fast::compute_rewards")
    def _(scores, logprobs, ref_logprobs, mask, kl_coef, kl_penalty):
        check_compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_penalty)
        return _empty(logprobs), _empty(logprobs), _empty(logprobs)

    @torch.library.register_fake("ppo_fast::gae")
    def _(values, rewards, mask, gamma, lam, carry_masked):
        check_gae(values, rewards, mask, gamma, lam)
        return _empty(values), _empty(values)

    @torch.library.register_fake("ppo_fast::masked_whiten")
    def _(x, mask, shift_mean, eps):
        check_masked_whiten(x, mask, eps)
        return _empty(x)

    @torch.library.register_fake("ppo_fast::compute_advantages")
    def _(values, rewards, mask, gamma, lam, whiten_rewards, carry_masked):
        check_gae(values, rewards, mask, gamma, lam, op="compute_advantages")
        return _empty(values), _empty(values)

    @torch.library.register_fake("ppo_fast::rollout_advantages")
    def _(scores, logprobs, ref_logprobs, values, mask, kl_coef, kl_penalty, gamma, lam, whiten_rewards, carry_masked):
        check_rollout_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, kl_penalty, gamma, lam)
        return tuple(_empty(logprobs) for _ in range(5))

    @torch.library.register_fake("ppo_fast::ppo_loss")
    def _(logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, *scalars):
        check_ppo_loss(logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, *scalars)
        acc = _acc_dtype(logprobs)
        n_stats = len(PPO_LOSS_STATS)
        return (
            logprobs.new_empty((), dtype=acc),
            logprobs.new_empty((n_stats,), dtype=acc),
            logprobs.new_empty((logprobs.shape[0],), dtype=acc),
        )

    @torch.library.register_fake("ppo_fast::ppo_loss_backward")
    def _(grad_loss, row_scale, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref, *scalars):
        op = "ppo_loss_backward"
        check_ppo_loss_params(op, *scalars)
        check_ppo_loss_tensors(
            op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref, scalars[3]
        )
        return _empty(logprobs), _empty(logprobs)

    def _ppo_loss_setup_context(ctx, inputs, output):
        # The backward needs no aggregation/threshold (row_scale has them); cliprange_high comes last.
        tensors, scalars = inputs[:8], inputs[8:15]
        cliprange_high = inputs[17] if len(inputs) > 17 else None
        ctx.save_for_backward(*tensors, output[2])
        ctx.scalars = (*scalars, cliprange_high)
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(output[1], output[2])  # stats and row_scale carry no gradient

    def _ppo_loss_backward(ctx, grad_loss, grad_stats, grad_row_scale):
        *tensors, row_scale = ctx.saved_tensors
        d_logprobs, d_vpreds = ops.ppo_loss_backward(grad_loss, row_scale, *tensors, *ctx.scalars)
        return (d_logprobs, d_vpreds) + (None,) * (ctx.n_inputs - 2)

    torch.library.register_autograd("ppo_fast::ppo_loss", _ppo_loss_backward, setup_context=_ppo_loss_setup_context)

    @torch.library.register_fake("ppo_fast::logprobs")
    def _(logits, labels, temperature):
        check_logprobs(logits, labels, temperature)
        return tuple(logits.new_empty(logits.shape[:2], dtype=_acc_dtype(logits)) for _ in range(3))

    @torch.library.register_fake("ppo_fast::logprobs_backward")
    def _(grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature):
        check_logprobs_backward(
            "logprobs_backward", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature
        )
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("ppo_fast::full_kl")
    def _(logits, ref_logits, temperature):
        check_full_kl(logits, ref_logits, temperature)
        return logits.new_empty(logits.shape[:2], dtype=_acc_dtype(logits))

    def _logprobs_setup_context(ctx, inputs, output):
        logits, labels, temperature = inputs
        ctx.save_for_backward(logits, labels, output[2], output[1])
        ctx.temperature = temperature
        ctx.mark_non_differentiable(output[2])  # lse is saved for the backward, not a result

    def _logprobs_backward(ctx, grad_logprob, grad_entropy, grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse)
        grad = ops.logprobs_backward(grad_logprob, grad_entropy, logits, labels, lse, entropy, ctx.temperature)
        return grad, None, None

    torch.library.register_autograd("ppo_fast::logprobs", _logprobs_backward, setup_context=_logprobs_setup_context)

    @torch.library.register_fake("ppo_fast::logprobs_backward_")
    def _(logits, grad_logprob, grad_entropy, labels, lse, entropy, temperature):
        check_logprobs_backward(
            "logprobs_backward_", grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature, inplace=True
        )

    class LogprobsInplaceGrad(torch.autograd.Function):
        """``logprobs`` whose backward writes the gradient into the logits' own storage (no second
        [B, T, V] buffer); the logits are overwritten, so nothing else may still need them."""

        @staticmethod
        def forward(ctx, logits, labels, temperature):
            logprob, entropy, lse = ops.logprobs(logits, labels, temperature)
            ctx.save_for_backward(logits, labels, lse, entropy)
            ctx.temperature = temperature
            ctx.mark_non_differentiable(lse)
            return logprob, entropy, lse

        @staticmethod
        def backward(ctx, grad_logprob, grad_entropy, grad_lse):
            logits, labels, lse, entropy = ctx.saved_tensors
            if grad_logprob is None:
                grad_logprob = torch.zeros_like(lse)
            ops.logprobs_backward_(logits, grad_logprob, grad_entropy, labels, lse, entropy, ctx.temperature)
            return logits, None, None

    @torch.library.register_fake("ppo_fast::linear_logprobs")
    def _(hidden, weight, labels, bias, temperature, chunk_size):
        check_linear_logprobs(hidden, weight, labels, bias, temperature, chunk_size)
        return tuple(hidden.new_empty(hidden.shape[:2], dtype=_acc_dtype(hidden)) for _ in range(3))

    @torch.library.register_fake("ppo_fast::linear_logprobs_backward")
    def _(grad_logprob, grad_entropy, hidden, weight, labels, bias, lse, entropy, temperature, chunk_size, mask):
        check_linear_logprobs_backward(
            grad_logprob, grad_entropy, hidden, weight, labels, bias, lse, entropy, temperature, chunk_size
        )
        grad_bias = bias is not None and mask[2]
        return (
            hidden.new_empty(hidden.shape if mask[0] else (0,)),
            weight.new_empty(weight.shape if mask[1] else (0,)),
            weight.new_empty(weight.shape[:1] if grad_bias else (0,)),
        )

    def _linear_logprobs_setup_context(ctx, inputs, output):
        hidden, weight, labels, bias, temperature, chunk_size = inputs
        ctx.save_for_backward(hidden, weight, labels, bias, output[2], output[1])
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(output[2])  # lse is saved for the backward, not a result

    def _linear_logprobs_backward(ctx, grad_logprob, grad_entropy, grad_lse):
        hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse)
        need = ctx.needs_input_grad
        mask = [need[0], need[1], bias is not None and need[3]]
        d_hidden, d_weight, d_bias = ops.linear_logprobs_backward(
            grad_logprob, grad_entropy, hidden, weight, labels, bias, lse, entropy, ctx.temperature, ctx.chunk_size,
            mask,
        )  # fmt: skip
        return (
            d_hidden if mask[0] else None,
            d_weight if mask[1] else None,
            None,
            d_bias if mask[2] else None,
            None,
            None,
        )

    torch.library.register_autograd(
        "ppo_fast::linear_logprobs", _linear_logprobs_backward, setup_context=_linear_logprobs_setup_context
    )

    @torch.library.register_fake("ppo_fast::moments")
    def _(x, mask):
        check_moments_x("moments", x, mask)
        return x.new_empty((4,), dtype=torch.float64)

    @torch.library.register_fake("ppo_fast::moments_merge_")
    def _(state, batches):
        check_moments_merge(state, batches)

    @torch.library.register_fake("ppo_fast::moments_normalize")
    def _(x, mask, state, scale, center, clip, eps):
        check_moments_normalize_call("moments_normalize", x, mask, state, clip, eps)
        return _empty(x)

    @torch.library.register_fake("ppo_fast::moments_update_normalize_")
    def _(state, x, mask, scale, center, clip, eps):
        check_moments_normalize_call("moments_update_normalize_", x, mask, state, clip, eps)
        return _empty(x), x.new_empty((4,), dtype=torch.float64)

    @torch.library.register_fake("ppo_fast::group_advantages")
    def _(scores, group_size, estimator, eps):
        check_group_advantages(scores, group_size, estimator, eps)
        return scores.new_empty(scores.shape, dtype=_acc_dtype(scores))

    @torch.library.register_fake("ppo_fast::gelu_tanh")
    def _(x):
        check_gelu_tanh(x)
        return _empty(x)

    @torch.library.register_fake("ppo_fast::gelu_tanh_backward")
    def _(grad, x):
        check_gelu_tanh_backward(grad, x)
        return _empty(x)

    def _gelu_tanh_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _gelu_tanh_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.gelu_tanh_backward(grad, x)

    torch.library.register_autograd("ppo_fast::gelu_tanh", _gelu_tanh_backward, setup_context=_gelu_tanh_setup_context)

    @torch.library.register_fake("ppo_fast::lion8bit_step_")
    def _(params, grads, momentum, absmax, lr, beta1, beta2, weight_decay, stochastic_rounding, seed):
        check_lion8bit_step(params, grads, momentum, absmax, lr, beta1, beta2, weight_decay)

else:
    ops = None
