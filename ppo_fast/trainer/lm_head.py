"""Log-probs straight from hidden states (``PPOConfig.fused_lm_head``): whether the policy and the reference can
skip their [B, T, V] logits, decided once when the trainer is built.

On when the LM head is a plain linear layer applied to the backbone's last hidden state
(``AutoModelForCausalLMWithValueHead.lm_head_fusable``) and a probe forward agrees with the logits path (a model
whose forward does anything else to its logits fails it); off, with the reason in the log, otherwise, and for
``kl_penalty="full"``, which needs both models' whole distributions (the logits path serves it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ppo_fast.trainer.ppo_trainer import PPOTrainer

__all__ = ["select"]

_log = logging.getLogger(__name__)


def select(trainer: PPOTrainer) -> tuple[bool, bool]:
    """(policy, reference): whether each computes its log-probs from hidden states. ``fused_lm_head=True`` makes a
    policy that cannot an error; None decides from the model; False keeps the logits."""
    want = trainer.config.fused_lm_head
    if want is False:
        return False, False
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reason = policy.lm_head_fusable()
    if reason is None and trainer.config.kl_penalty == "full":
        reason = 'kl_penalty="full" needs both models\' full logits'
    if reason is None:
        reason = _probe(trainer)
    if reason is not None:
        if want:
            raise ValueError(f"PPOTrainer: config.fused_lm_head=True, but {reason}")
        _log.info("PPOTrainer: log-probs from the logits (fused_lm_head off): %s", reason)
        return False, False
    ref = trainer.ref_model
    ref_reason = None if ref is None else ref.lm_head_fusable()  # None: the PEFT policy itself
    if ref_reason is not None:
        _log.info("PPOTrainer: the reference computes log-probs from its logits: %s", ref_reason)
    return True, ref_reason is None


@torch.no_grad()
def _probe(trainer: PPOTrainer) -> str | None:
    """None if the policy's log-probs from hidden states match those of its logits on a short probe sequence."""
    model = trainer.model
    vocab = trainer._vocab_size
    ids = (torch.arange(8, device=trainer.current_device) * 7919 % vocab)[None]
    was_training = model.training
    model.eval()
    try:
        logits, _, _ = model(input_ids=ids, use_cache=False)
        expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        got, _, _ = model(input_ids=ids, use_cache=False, logprobs_of=ids[:, 1:], use_fused=trainer.use_fused)
    finally:
        model.train(was_training)
    tol = 1e-4 if logits.dtype == torch.float32 else 5e-2
    err = float((got - expected).abs().max())
    if not err <= tol * max(1.0, float(expected.abs().max())):
        return f"a probe's log-probs from hidden states differ from its logits' by {err:.3g}"
    return None
