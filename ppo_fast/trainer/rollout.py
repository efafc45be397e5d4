"""Steps 2 and 3 of ``PPOTrainer.step``, and the checks before them: the batch checked and right-padded, the
no-grad forward passes of the policy and the reference (log-probs straight from each chunk's logits, which are
then dropped), and the rewards, GAE, returns and whitened advantages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ppo_fast import functional as F
from ppo_fast.reference import WHITEN_EPS, bessel_var

if TYPE_CHECKING:  # the trainer imports this module: the functions below only take one
    from ppo_fast.trainer.ppo_trainer import PPOTrainer


def check_step_inputs(
    trainer: PPOTrainer, queries: Any, responses: Any, scores: Any, response_masks: Any
) -> tuple[list, list, torch.Tensor, list | None]:
    """``step``'s arguments checked, each error naming the argument; the scores as one float32 tensor [B] on the
    trainer's device. One synchronisation (are the scores finite?), before anything changes."""
    named = {"queries": queries, "responses": responses, "scores": scores}
    if response_masks is not None:
        named["response_masks"] = response_masks
    _check_containers(trainer, named)
    _check_contents(trainer, queries, responses, scores, response_masks)
    device = trainer.current_device
    score_t = torch.stack([s.reshape(()).to(device, torch.float32) for s in scores])
    bad = ~torch.isfinite(score_t)
    if bad.any():  # one synchronisation per step, before anything changes
        raise ValueError(f"PPOTrainer.step: scores must be finite; NaN or inf at {bad.nonzero().flatten().tolist()}")
    return list(queries), list(responses), score_t, None if response_masks is None else list(response_masks)


def _check_containers(trainer: PPOTrainer, named: dict[str, Any]) -> None:
    """Each argument is a list of ``config.batch_size`` tensors, on the CPU or on the trainer's device."""
    bs = trainer.config.batch_size
    device = trainer.current_device
    for name, value in named.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"PPOTrainer.step: {name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != bs:
            raise ValueError(
                f"PPOTrainer.step: {name} has {len(value)} elements but config.batch_size is {bs} (per process)"
            )
    for name, value in named.items():
        for i, t in enumerate(value):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"PPOTrainer.step: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.device.type != "cpu" and t.device != device:
                raise ValueError(
                    f"PPOTrainer.step: {name}[{i}] is on {t.device} but the trainer runs on {device}; "
                    "pass CPU tensors or tensors on the trainer's device"
                )


def _check_contents(
    trainer: PPOTrainer, queries: list, responses: list, scores: list, response_masks: list | None
) -> None:
    """Token ids are 1-D integer tensors of at least one token that fit the model's positions; each score is one real
    number; each response mask has its response's shape."""
    for name, values in (("queries", queries), ("responses", responses)):
        for i, t in enumerate(values):
            if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(
                    f"PPOTrainer.step: {name}[{i}] must be a 1-D tensor of token ids, got "
                    f"shape {tuple(t.shape)} dtype {t.dtype}"
                )
            if t.numel() < 1:
                raise ValueError(f"PPOTrainer.step: {name}[{i}] is empty; every {name[:-1]} needs >= 1 token")
    for i, s in enumerate(scores):
        if s.numel() != 1 or s.dtype == torch.bool or s.dtype.is_complex:
            raise ValueError(
                f"PPOTrainer.step: scores[{i}] must hold one real number, got shape {tuple(s.shape)} dtype {s.dtype}"
            )
    limit = trainer._max_positions
    if limit is not None:
        for i, (q, r) in enumerate(zip(queries, responses)):
            if q.numel() + r.numel() > limit:
                raise ValueError(
                    f"PPOTrainer.step: queries[{i}] and responses[{i}] hold {q.numel()} + {r.numel()} tokens but "
                    f"the model takes at most {limit} positions ({trainer._max_positions_name}); truncate the "
                    "query or generate fewer tokens"
                )
    if response_masks is not None:
        for i, (m, r) in enumerate(zip(response_masks, responses)):
            if m.shape != r.shape:
                raise ValueError(
                    f"PPOTrainer.step: response_masks[{i}] has shape {tuple(m.shape)} but responses[{i}] has "
                    f"{tuple(r.shape)}"
                )


def build_inputs(
    trainer: PPOTrainer, queries: list, responses: list, response_masks: list | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` [B, L] and the response mask [B, L - 1]
    over log-prob positions (position t scores token t + 1)."""
    device = trainer.current_device
    seqs = [torch.cat([q.to(device), r.to(device)]).long() for q, r in zip(queries, responses)]
    if trainer.training_data_collator is not None:
        data = trainer.training_data_collator([{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in seqs])
        input_ids, attention_mask = data["input_ids"].to(device), data["attention_mask"].to(device)
        if (attention_mask[:, 0] == 0).any():
            raise ValueError("PPOTrainer: training_data_collator must pad on the right")
    else:
        input_ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=trainer._pad_id)
        attention_mask = torch.nn.utils.rnn.pad_sequence(
            [torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0
        )
    resp = [
        torch.cat(
            [
                torch.zeros(len(q), device=device),
                (m.to(device) != 0).float() if m is not None else torch.ones(len(r), device=device),
            ]
        )
        for q, r, m in zip(queries, responses, response_masks or [None] * len(queries))
    ]
    seq_mask = torch.nn.utils.rnn.pad_sequence(resp, batch_first=True, padding_value=0.0)
    if seq_mask.shape[1] < input_ids.shape[1]:
        seq_mask = torch.nn.functional.pad(seq_mask, (0, input_ids.shape[1] - seq_mask.shape[1]))
    if trainer.is_distributed:
        # Equal lengths on every rank, so per-token statistics gather into one tensor.
        input_ids = trainer.accelerator.pad_across_processes(input_ids, dim=1, pad_index=trainer._pad_id)
        attention_mask = trainer.accelerator.pad_across_processes(attention_mask, dim=1, pad_index=0)
        seq_mask = trainer.accelerator.pad_across_processes(seq_mask, dim=1, pad_index=0)
    lo, hi = int(input_ids.min()), int(input_ids.max())  # one synchronisation, before any state changes
    if lo < 0 or hi >= trainer._vocab_size:
        raise ValueError(
            f"PPOTrainer.step: token ids must be in [0, {trainer._vocab_size}) (the model's vocabulary); "
            f"queries/responses hold ids in [{lo}, {hi}]"
        )
    return input_ids, attention_mask, seq_mask[:, 1:].contiguous()


@torch.no_grad()
def forward(
    trainer: PPOTrainer, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Policy log-probs, values and reference log-probs [B, L - 1] (and the full-vocabulary KL for
    ``kl_penalty="full"``), in chunks of ``mini_batch_size``: one chunk's logits live at a time, or none with the
    fused LM head (log-probs from ``start`` on; zero before, where no response is). Last, the output of the
    policy's frozen trunk [B, L, H] (``trainer._trunk``; None without one), which the reference forward here and
    the minibatch forwards reuse."""
    fbs = trainer.config.mini_batch_size
    full = trainer.config.kl_penalty == "full"
    trunk = trainer._trunk
    logprobs, values, ref_logprobs, kls, trunk_out = [], [], [], [], []
    trainer.model.eval()
    for i in range(0, input_ids.shape[0], fbs):
        ids, am = input_ids[i : i + fbs], attention_mask[i : i + fbs]
        # No KV cache: one full pass, nothing to continue (it would only hold memory).
        with trunk.capture() as captured:
            logp, logits, v = _logprobs(trainer, trainer.model, trainer._fused_head, ids, am, start)
        if not full:
            logits = None  # freed before the reference's forward
        trunk_out.append(captured.get(trunk.depth))
        logprobs.append(logp)
        values.append(v[:, :-1].float())
        with _reference(trainer) as ref, trunk.replay(trunk.ref_blocks, trunk.ref_depth, captured.get(trunk.ref_depth)):
            ref_logp, ref_logits, _ = _logprobs(trainer, ref, trainer._ref_fused_head, ids, am, start)
        ref_logprobs.append(ref_logp)
        if full:
            kls.append(F.backend(trainer.use_fused).full_kl(logits, ref_logits, 1.0))
        del logits, ref_logits
    kl_full = torch.cat(kls) if full else None
    trunk_hidden = torch.cat(trunk_out) if trunk and all(t is not None for t in trunk_out) else None
    return torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs), kl_full, trunk_hidden


def _logprobs(
    trainer: PPOTrainer, model: Any, fused_head: bool, ids: torch.Tensor, am: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One model's log-probs [b, L - 1], its logits [b, L - 1, V] (None with the fused head) and values [b, L]."""
    if fused_head:
        logp, _, v = model(
            input_ids=ids,
            attention_mask=am,
            use_cache=False,
            logprobs_of=ids[:, start + 1 :],
            logprobs_from=start,
            use_fused=trainer.use_fused,
        )
        return torch.nn.functional.pad(logp, (start, 0)), None, v
    logits, _, v = model(input_ids=ids, attention_mask=am, use_cache=False)
    logits = logits[:, :-1]
    return trainer._logprobs(logits, ids[:, 1:], train=False), logits, v


@contextlib.contextmanager
def _reference(trainer: PPOTrainer) -> Iterator[Any]:
    """The module that computes reference log-probs: the reference, or the PEFT policy with its
    adapter disabled."""
    if trainer.ref_model is not None:
        yield trainer.ref_model
        return
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with unwrapped.disable_adapter():
        yield trainer.model


def advantages(
    trainer: PPOTrainer,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_full: torch.Tensor | None,
) -> F.RolloutAdvantages:
    """Per-token rewards, GAE, returns and whitened advantages [B, L - 1]: one fused op, or with
    ``advantage_whitening="global"`` on several processes the same steps with the whitening over all of them."""
    cfg = trainer.config
    if kl_full is not None:  # rewards from the full-vocabulary KL: kl = kl_full - 0
        logprobs, ref_logprobs, penalty = kl_full, torch.zeros_like(kl_full), "kl"
    else:
        penalty = cfg.kl_penalty
    kl_coef = float(trainer.kl_ctl.value)
    # The inputs were built and checked by the trainer: the ops themselves (their C++ checks remain).
    ops = F.backend(trainer.use_fused)
    scores, values = scores.detach(), values.detach()
    if cfg.advantage_whitening == "global" and trainer.is_distributed:
        rewards, non_score, kl = ops.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, penalty)
        if cfg.whiten_rewards:
            rewards = ops.masked_whiten(rewards, mask, False, WHITEN_EPS) * mask
        adv, returns = ops.gae(values, rewards, mask, cfg.gamma, cfg.lam, False)
        adv = _global_whiten(trainer, adv, mask)
        return F.RolloutAdvantages(rewards, non_score, kl, adv, returns)
    out = ops.rollout_advantages(
        scores, logprobs, ref_logprobs, values, mask, kl_coef, penalty, cfg.gamma, cfg.lam, cfg.whiten_rewards, False
    )
    return F.RolloutAdvantages(*out)


def _global_whiten(trainer: PPOTrainer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whiten with the masked mean and Bessel-corrected variance of all processes' tokens."""
    state = torch.zeros(4, dtype=torch.float64, device=x.device)
    ops = F.backend(trainer.use_fused)
    batches = trainer.accelerator.gather(ops.moments(x, mask)[None])
    ops.moments_merge_(state, batches)
    var = bessel_var(state[2], state[0], 1.0)  # as masked_whiten: 1 below two tokens
    return ((x.double() - state[1]) * torch.rsqrt(var + WHITEN_EPS)).to(x.dtype)
