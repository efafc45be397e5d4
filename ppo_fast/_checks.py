"""Argument checks of every op, mirroring the C++ ``TORCH_CHECK``s message for message
(``csrc/include/ppo_fast/common.h`` and each op's header).

They run in the fake kernels (so ``torch.compile`` and ``opcheck`` see the same errors as eager
calls) and in ``ppo_fast.functional`` before it routes to the fused op or the reference, so both
routes reject bad input the same way and before any state changes. Callers that check their own
arguments and then call the ops directly (``functional.backend``) rely on the C++ checks instead.
"""

from __future__ import annotations

import math

import torch

from ppo_fast._modes import AGGREGATIONS, GROUP_ESTIMATORS, KL_ESTIMATORS, KL_PENALTIES, one_of

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise RuntimeError(
            f"{op}: {name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}"
        )


def _device_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda" and t.dtype == torch.float64:
        raise RuntimeError(
            f"{op}: CUDA tensors must be float32, bfloat16 or float16 (float64 runs on the CPU), got {t.dtype}"
        )


def _same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device"
        )


def _nonempty(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise RuntimeError(f"{op}: {name} is empty (shape {_shape(t)}); an empty batch has nothing to do")


def _check_mask(op: str, mask: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _same_device(op, "mask", mask, ref_name, ref)
    if mask.shape != ref.shape:
        raise RuntimeError(f"{op}: mask must have the shape of {ref_name} {_shape(ref)}, got {_shape(mask)}")
    if mask.dtype.is_complex:
        raise RuntimeError(f"{op}: mask must be bool, integer or floating-point, got {mask.dtype}")


def _finite(op: str, name: str, v: float) -> None:
    if not math.isfinite(v):
        raise RuntimeError(f"{op}: {name} must be finite, got {v}")


def check_bt(op: str, first_name: str, first: torch.Tensor, others: dict, mask: torch.Tensor) -> None:
    if first.dim() != 2:
        raise RuntimeError(f"{op}: {first_name} must be 2-D [B, T], got shape {_shape(first)}")
    _floating(op, first_name, first)
    _device_dtype(op, first_name, first)
    _nonempty(op, first_name, first)
    for name, t in others.items():
        _same_device(op, name, t, first_name, first)
        if t.dim() != 2:
            raise RuntimeError(f"{op}: {name} must be 2-D [B, T], got shape {_shape(t)}")
        _floating(op, name, t)
        if t.shape != first.shape:
            raise RuntimeError(f"{op}: {name} must have the shape of {first_name} {_shape(first)}, got {_shape(t)}")
        if t.dtype != first.dtype:
            raise RuntimeError(f"{op}: {name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
    _check_mask(op, mask, first_name, first)


def check_kl_penalty(op: str, kl_penalty: str) -> None:
    if kl_penalty == "full":
        raise RuntimeError(
            f"{op}: kl_penalty='full' needs the full vocabulary KL, computed from logits; pass it as logprobs "
            "with ref_logprobs of zeros and kl_penalty='kl'"
        )
    if kl_penalty not in KL_PENALTIES:
        raise RuntimeError(f"{op}: kl_penalty must be one of {one_of(KL_PENALTIES)}, got '{kl_penalty}'")


def check_scores(op: str, scores: torch.Tensor, logprobs: torch.Tensor) -> None:
    _same_device(op, "scores", scores, "logprobs", logprobs)
    _floating(op, "scores", scores)
    if scores.dim() != 1 or scores.shape[0] != logprobs.shape[0]:
        raise RuntimeError(
            f"{op}: scores must be 1-D [B] with B = logprobs.size(0) = {logprobs.shape[0]}, got shape {_shape(scores)}"
        )


def check_gae_scalars(op: str, gamma: float, lam: float) -> None:
    _finite(op, "gamma", gamma)
    _finite(op, "lam", lam)
    if not 0.0 <= gamma <= 1.0:
        raise RuntimeError(f"{op}: gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise RuntimeError(f"{op}: lam must be in [0, 1], got {lam}")


def check_compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_penalty) -> None:
    op = "compute_rewards"
    check_kl_penalty(op, kl_penalty)
    _finite(op, "kl_coef", kl_coef)
    check_bt(op, "logprobs", logprobs, {"ref_logprobs": ref_logprobs}, mask)
    check_scores(op, scores, logprobs)


def check_gae(values, rewards, mask, gamma, lam, op: str = "gae") -> None:
    check_gae_scalars(op, gamma, lam)
    check_bt(op, "values", values, {"rewards": rewards}, mask)


def check_masked_whiten(x, mask, eps) -> None:
    op = "masked_whiten"
    _floating(op, "x", x)
    _device_dtype(op, "x", x)
    _nonempty(op, "x", x)
    _finite(op, "eps", eps)
    if eps < 0:
        raise RuntimeError(f"{op}: eps must be >= 0, got {eps}")
    _check_mask(op, mask, "x", x)


def check_rollout_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, kl_penalty, gamma, lam) -> None:
    op = "rollout_advantages"
    check_kl_penalty(op, kl_penalty)
    _finite(op, "kl_coef", kl_coef)
    check_gae_scalars(op, gamma, lam)
    check_bt(op, "logprobs", logprobs, {"ref_logprobs": ref_logprobs, "values": values}, mask)
    check_scores(op, scores, logprobs)


PPO_LOSS_TENSORS = ("vpreds", "old_logprobs", "old_values", "advantages", "returns")


def check_ppo_loss_params(
    op, cliprange, cliprange_value, vf_coef, kl_coef, kl_estimator, dual_clip, log_ratio_clamp, cliprange_high=None
):
    for name, v in (("cliprange", cliprange), ("cliprange_value", cliprange_value), ("vf_coef", vf_coef)):
        _finite(op, name, v)
    _finite(op, "kl_coef", kl_coef)
    if cliprange < 0:
        raise RuntimeError(f"{op}: cliprange must be >= 0, got {cliprange}")
    if cliprange_value < 0:
        raise RuntimeError(f"{op}: cliprange_value must be >= 0, got {cliprange_value}")
    if cliprange_high is not None and not (math.isfinite(cliprange_high) and cliprange_high >= 0):
        raise RuntimeError(f"{op}: cliprange_high must be finite and >= 0 (or None), got {cliprange_high}")
    if kl_estimator not in KL_ESTIMATORS:
        raise RuntimeError(f"{op}: kl_estimator must be one of {one_of(KL_ESTIMATORS)}, got '{kl_estimator}'")
    if dual_clip is not None and not (math.isfinite(dual_clip) and dual_clip > 1.0):
        raise RuntimeError(f"{op}: dual_clip must be > 1 (or None), got {dual_clip}")
    if log_ratio_clamp is not None and not (math.isfinite(log_ratio_clamp) and log_ratio_clamp > 0.0):
        raise RuntimeError(f"{op}: log_ratio_clamp must be > 0 (or None), got {log_ratio_clamp}")


def check_ppo_loss_tensors(op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref, kl_coef):
    tensors = dict(zip(PPO_LOSS_TENSORS, (vpreds, old_logprobs, old_values, advantages, returns), strict=True))
    if ref is not None:
        tensors["ref_logprobs"] = ref
    check_bt(op, "logprobs", logprobs, tensors, mask)
    if kl_coef != 0.0 and ref is None:
        raise RuntimeError(
            f"{op}: kl_coef is {kl_coef} but ref_logprobs is None; pass the reference log-probs or set kl_coef=0"
        )


def check_ppo_loss(
    logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, cliprange, cliprange_value,
    vf_coef, kl_coef, kl_estimator, dual_clip, log_ratio_clamp, aggregation, ratio_threshold, cliprange_high=None,
) -> None:  # fmt: skip
    op = "ppo_loss"
    check_ppo_loss_params(
        op, cliprange, cliprange_value, vf_coef, kl_coef, kl_estimator, dual_clip, log_ratio_clamp, cliprange_high
    )
    if aggregation not in AGGREGATIONS:
        raise RuntimeError(f"{op}: aggregation must be one of {one_of(AGGREGATIONS)}, got '{aggregation}'")
    if math.isnan(ratio_threshold) or ratio_threshold <= 0:
        raise RuntimeError(f"{op}: ratio_threshold must be > 0 (inf disables it), got {ratio_threshold}")
    check_ppo_loss_tensors(
        op, logprobs, vpreds, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, kl_coef
    )


def check_moments_x(op: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    _floating(op, "x", x)
    _device_dtype(op, "x", x)
    _nonempty(op, "x", x)
    if mask is not None:
        _check_mask(op, mask, "x", x)


def check_moments_state(op: str, state: torch.Tensor, x: torch.Tensor) -> None:
    _same_device(op, "state", state, "x", x)
    if state.dtype != torch.float64 or state.dim() != 1 or state.shape[0] != 4:
        raise RuntimeError(
            f"{op}: state must be float64 [4] (count, mean, M2, rejected), got {state.dtype} {_shape(state)}"
        )
    if not state.is_contiguous():
        raise RuntimeError(f"{op}: state must be contiguous")


def check_moments_normalize(op: str, clip: float | None, eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise RuntimeError(f"{op}: eps must be finite and >= 0, got {eps}")
    if clip is not None and not (clip > 0):
        raise RuntimeError(f"{op}: clip must be > 0 (or None), got {clip}")


def check_moments_normalize_call(op: str, x, mask, state, clip: float | None, eps: float) -> None:
    """Everything ``moments_normalize`` and ``moments_update_normalize_`` check, in the C++ order."""
    check_moments_x(op, x, mask)
    check_moments_state(op, state, x)
    check_moments_normalize(op, clip, eps)


def check_moments_merge(state: torch.Tensor, batches: torch.Tensor) -> None:
    op = "moments_merge_"
    check_moments_state(op, state, state)
    _same_device(op, "batches", batches, "state", state)
    if batches.dtype != torch.float64 or batches.dim() != 2 or batches.shape[1] != 4:
        raise RuntimeError(
            f"{op}: batches must be float64 [K, 4] (count, mean, M2, non-finite per batch), got "
            f"{batches.dtype} {_shape(batches)}"
        )


def check_gelu_tanh(x: torch.Tensor) -> None:
    """Mirrors csrc/host/gelu_tanh.cpp (gelu_tanh)."""
    _floating("gelu_tanh", "x", x)
    _device_dtype("gelu_tanh", "x", x)  # the CUDA kernel's dispatch


def check_gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> None:
    """Mirrors csrc/host/gelu_tanh.cpp (gelu_tanh_backward), in its order."""
    op = "gelu_tanh_backward"
    _floating(op, "x", x)
    _same_device(op, "grad", grad, "x", x)
    if grad.shape != x.shape:
        raise RuntimeError(f"{op}: grad must have the shape of x {_shape(x)}, got {_shape(grad)}")
    if grad.dtype != x.dtype:
        raise RuntimeError(f"{op}: grad must have the dtype of x ({x.dtype}), got {grad.dtype}")
    _device_dtype(op, "x", x)


def check_group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float) -> None:
    """Mirrors csrc/host/group_advantages.cpp, in its order."""
    op = "group_advantages"
    if estimator not in GROUP_ESTIMATORS:
        raise RuntimeError(f"{op}: estimator must be one of {one_of(GROUP_ESTIMATORS)}, got '{estimator}'")
    if not (math.isfinite(eps) and eps >= 0):
        raise RuntimeError(f"{op}: eps must be finite and >= 0, got {eps}")
    if group_size < 1:
        raise RuntimeError(f"{op}: group_size must be >= 1, got {group_size}")
    _floating(op, "scores", scores)
    if scores.dim() != 1:
        raise RuntimeError(f"{op}: scores must be 1-D [N], got shape {_shape(scores)}")
    _nonempty(op, "scores", scores)
    n = scores.shape[0]
    if n % group_size:
        raise RuntimeError(
            f"{op}: scores has {n} entries, not a multiple of group_size {group_size} "
            "(each group is group_size consecutive samples)"
        )
    _device_dtype(op, "scores", scores)  # the CUDA kernel's dispatch


def check_logits(op: str, name: str, logits: torch.Tensor, device_dtype: bool = True) -> None:
    if logits.dim() != 3:
        raise RuntimeError(f"{op}: {name} must be 3-D [B, T, V], got shape {_shape(logits)}")
    _floating(op, name, logits)
    if device_dtype:
        _device_dtype(op, name, logits)
    _nonempty(op, name, logits)


def check_labels(op: str, labels: torch.Tensor, logits: torch.Tensor) -> None:
    _same_device(op, "labels", labels, "logits", logits)
    if labels.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    if labels.dim() != 2 or labels.shape[0] != logits.shape[0] or labels.shape[1] != logits.shape[1]:
        raise RuntimeError(
            f"{op}: labels must be [B, T] = [{logits.shape[0]}, {logits.shape[1]}] to match logits "
            f"{_shape(logits)}, got {_shape(labels)}"
        )


def check_temperature(op: str, temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise RuntimeError(f"{op}: temperature must be finite and > 0, got {temperature}")


def check_logprobs(logits, labels, temperature, op: str = "logprobs") -> None:
    check_temperature(op, temperature)
    check_logits(op, "logits", logits)
    check_labels(op, labels, logits)


def check_logprobs_backward(
    op, grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature, inplace: bool = False
) -> None:  # fmt: skip
    check_temperature(op, temperature)
    if inplace and logits.dim() == 3 and logits.stride(2) != 1:
        raise RuntimeError(f"{op}: logits must have a contiguous last dimension to take its gradient in place")
    check_logits(op, "logits", logits)
    check_labels(op, labels, logits)
    B, T = logits.shape[:2]
    for name, t in (("grad_logprob", grad_logprob), ("lse", lse), ("entropy", entropy), ("grad_entropy", grad_entropy)):
        if t is None:
            continue
        _same_device(op, name, t, "logits", logits)
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] != T:
            raise RuntimeError(f"{op}: {name} must be [B, T] = [{B}, {T}], got {_shape(t)}")


def check_full_kl(logits, ref_logits, temperature) -> None:
    op = "full_kl"
    check_temperature(op, temperature)
    check_logits(op, "logits", logits)
    check_logits(op, "ref_logits", ref_logits, device_dtype=False)  # the C++ checks that at dispatch
    _same_device(op, "ref_logits", ref_logits, "logits", logits)
    if ref_logits.shape != logits.shape:
        raise RuntimeError(f"{op}: ref_logits must have the shape of logits {_shape(logits)}, got {_shape(ref_logits)}")
    if ref_logits.dtype != logits.dtype:
        raise RuntimeError(f"{op}: ref_logits must have the dtype of logits ({logits.dtype}), got {ref_logits.dtype}")


def _lion8bit_blocks(n: int) -> int:
    return -(-n // 256)


def check_lion8bit_step(params, grads, momentum, absmax, lr, beta1, beta2, weight_decay) -> None:
    """Mirrors lion8bit.h:check_inputs: every tensor is checked before anything is written."""
    op = "lion8bit_step_"
    if not (math.isfinite(lr) and lr >= 0):
        raise RuntimeError(f"{op}: lr must be finite and >= 0, got {lr}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b <= 1.0:
            raise RuntimeError(f"{op}: {name} must be in [0, 1], got {b}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise RuntimeError(f"{op}: weight_decay must be finite and >= 0, got {weight_decay}")
    n = len(params)
    if not (len(grads) == len(momentum) == len(absmax) == n):
        raise RuntimeError(
            f"{op}: params, grads, momentum and absmax must have one entry per tensor, got {n}, {len(grads)}, "
            f"{len(momentum)}, {len(absmax)}"
        )
    for i, (p, g, m, a) in enumerate(zip(params, grads, momentum, absmax)):
        pn, gn, mn, an = f"params[{i}]", f"grads[{i}]", f"momentum[{i}]", f"absmax[{i}]"
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RuntimeError(f"{op}: {pn} must be float32, bfloat16 or float16, got {p.dtype}")
        if p.layout != torch.strided or not p.is_contiguous():
            raise RuntimeError(f"{op}: {pn} must be a contiguous dense tensor")
        _same_device(op, pn, p, "params[0]", params[0])
        _same_device(op, gn, g, "params[0]", params[0])
        if g.layout != torch.strided:
            raise RuntimeError(f"{op}: {gn} must be a dense tensor, got layout {g.layout}")
        if g.shape != p.shape:
            raise RuntimeError(f"{op}: {gn} must have the shape of {pn} {_shape(p)}, got {_shape(g)}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"{op}: {gn} must have the dtype of {pn} ({p.dtype}), got {g.dtype}")
        _same_device(op, mn, m, "params[0]", params[0])
        _same_device(op, an, a, "params[0]", params[0])
        if m.dtype not in (torch.uint8, torch.float32):
            raise RuntimeError(f"{op}: {mn} must be uint8 (8-bit state) or float32 (fp32 state), got {m.dtype}")
        if m.numel() != p.numel():
            raise RuntimeError(f"{op}: {mn} must have {p.numel()} elements (one per element of {pn}), got {m.numel()}")
        if m.layout != torch.strided or not m.is_contiguous():
            raise RuntimeError(f"{op}: {mn} must be a contiguous dense tensor")
        if m.dtype == torch.uint8:
            nb = _lion8bit_blocks(p.numel())
            if a.dtype != torch.float32 or a.numel() != nb:
                raise RuntimeError(
                    f"{op}: {an} must be float32 with {nb} elements (one per 256 elements of {pn}), got "
                    f"{a.dtype} with {a.numel()}"
                )
            if a.layout != torch.strided or not a.is_contiguous():
                raise RuntimeError(f"{op}: {an} must be a contiguous dense tensor")
        elif a.numel() != 0:
            raise RuntimeError(f"{op}: {an} must be empty when {mn} is float32, got {a.numel()} elements")


def check_chunk_size(op: str, chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise RuntimeError(f"{op}: chunk_size must be an int >= 1 (or None for the default), got {chunk_size!r}")
    if chunk_size < 1:
        raise RuntimeError(f"{op}: chunk_size must be >= 1 (or None for the default), got {chunk_size}")


def check_linear_logprobs(hidden, weight, labels, bias, temperature, chunk_size, op: str = "linear_logprobs") -> None:
    """Mirrors csrc/host/linear_logprobs.cpp:check_inputs, in its order."""
    check_temperature(op, temperature)
    check_chunk_size(op, chunk_size)
    if hidden.dim() != 3:
        raise RuntimeError(f"{op}: hidden must be 3-D [B, T, H], got shape {_shape(hidden)}")
    _floating(op, "hidden", hidden)
    _device_dtype(op, "hidden", hidden)
    _nonempty(op, "hidden", hidden)
    B, T, H = hidden.shape
    _same_device(op, "weight", weight, "hidden", hidden)
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be 2-D [V, H], got shape {_shape(weight)}")
    if weight.dtype != hidden.dtype:
        raise RuntimeError(f"{op}: weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != H:
        raise RuntimeError(
            f"{op}: weight must be [V, H] with H = {H} (the last dimension of hidden), got {_shape(weight)}"
        )
    _nonempty(op, "weight", weight)
    V = weight.shape[0]
    if bias is not None:
        _same_device(op, "bias", bias, "hidden", hidden)
        if bias.dtype != weight.dtype:
            raise RuntimeError(f"{op}: bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != V:
            raise RuntimeError(f"{op}: bias must be [V] = [{V}] to match weight {_shape(weight)}, got {_shape(bias)}")
    _same_device(op, "labels", labels, "hidden", hidden)
    if labels.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    if labels.dim() != 2 or labels.shape[0] != B or labels.shape[1] != T:
        raise RuntimeError(
            f"{op}: labels must be [B, T] = [{B}, {T}] to match hidden {_shape(hidden)}, got {_shape(labels)}"
        )


def check_linear_logprobs_backward(
    grad_logprob, grad_entropy, hidden, weight, labels, bias, lse, entropy, temperature, chunk_size
) -> None:  # fmt: skip
    op = "linear_logprobs_backward"
    check_linear_logprobs(hidden, weight, labels, bias, temperature, chunk_size, op=op)
    B, T = hidden.shape[:2]
    for name, t in (("grad_logprob", grad_logprob), ("lse", lse), ("entropy", entropy), ("grad_entropy", grad_entropy)):
        if t is None:
            continue
        _same_device(op, name, t, "hidden", hidden)
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] != T:
            raise RuntimeError(f"{op}: {name} must be [B, T] = [{B}, {T}], got {_shape(t)}")
