"""The value-free advantage estimators of ``PPOTrainer`` (``PPOConfig.advantage_estimator``), GSPO's
sequence-level importance ratio (``importance_sampling_level="sequence"``) and what they change in the
trainer: a policy without a trained value head, and no value statistics.

Advantages, per sample (``s``: the sample's score after scaling / normalisation / clipping, plus the sum of
its per-token KL rewards ``-kl_coef * kl_t``, verl's ``use_kl_in_reward``; groups are ``group_size``
consecutive samples of the batch; the op is ``functional.group_advantages``):

* ``grpo``: ``(s - mean_g) / (std_g + 1e-6)`` broadcast over the response tokens (Shao et al. 2024);
* ``dr_grpo``: ``s - mean_g`` (Liu et al. 2025);
* ``rloo``: ``s - mean of the group's other samples`` (Ahmadian et al. 2024);
* ``reinforce_pp_baseline``: ``s - mean_g`` broadcast, then whitened over the batch's response tokens;
* ``reinforce_pp``: token-level rewards (the score at the last token, ``-kl_coef * kl_t`` at every token, as
  ``compute_rewards``), their discounted returns (GAE with ``lam = 1`` and values 0: the same ops), whitened
  over the batch's tokens (Hu 2025). ``whiten_rewards`` applies as for GAE.

Whitening is over this process's tokens, or all processes' with ``advantage_whitening="global"``. The returns
reported are the advantages (verl's convention), or the discounted returns for ``reinforce_pp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ppo_fast import functional as F
from ppo_fast.reference import GROUP_EPS, WHITEN_EPS

if TYPE_CHECKING:  # the trainer imports this module: the functions below only take one
    from ppo_fast.models import AutoModelForCausalLMWithValueHead
    from ppo_fast.trainer.config import PPOConfig
    from ppo_fast.trainer.ppo_trainer import PPOTrainer

# Statistics of the value head and its loss: left out of step()'s statistics when nothing trains it.
VALUE_STATS = (
    "ppo/loss/value",
    "ppo/val/vpred",
    "ppo/val/vpred_var",
    "ppo/val/error",
    "ppo/val/clipfrac",
    "ppo/val/mean",
    "ppo/val/var",
    "ppo/val/var_explained",
)


def accept_models(config: Any, model: Any, ref_model: Any) -> tuple[Any, Any]:
    """With a value-free estimator: a plain transformers causal LM (no value head) is accepted as the policy or
    the reference and wrapped in ``AutoModelForCausalLMWithValueHead``, and the policy's value head is frozen
    (``requires_grad=False``, set on the model passed in), so it gets no gradient, is not in the default
    optimizer, and DDP / DeepSpeed expect no gradient for it. With ``gae`` the models are returned as they are."""
    from transformers import PreTrainedModel

    from ppo_fast.models import AutoModelForCausalLMWithValueHead

    if getattr(config, "advantage_estimator", "gae") == "gae":
        return model, ref_model

    def wrap(m: Any) -> Any:
        return AutoModelForCausalLMWithValueHead(m) if isinstance(m, PreTrainedModel) else m

    model, ref_model = wrap(model), wrap(ref_model)
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        freeze_value_head(model)
    return model, ref_model


def freeze_value_head(model: AutoModelForCausalLMWithValueHead) -> None:
    model.v_head.requires_grad_(False)


def advantages(
    trainer: PPOTrainer,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_full: torch.Tensor | None,
) -> F.RolloutAdvantages:
    """``rollout.advantages`` for a value-free estimator: the per-token rewards, non-score rewards and KL (as
    for GAE), the advantages [B, T] (0 where masked) and the returns."""
    from ppo_fast.trainer import rollout as _rollout

    cfg = trainer.config
    if kl_full is not None:  # rewards from the full-vocabulary KL: kl = kl_full - 0
        logprobs, ref_logprobs, penalty = kl_full, torch.zeros_like(kl_full), "kl"
    else:
        penalty = cfg.kl_penalty
    kl_coef = float(trainer.kl_ctl.value)
    ops = F.backend(trainer.use_fused)
    scores = scores.detach()
    global_whiten = cfg.advantage_whitening == "global" and trainer.is_distributed
    est = cfg.advantage_estimator
    m = mask != 0
    if est == "reinforce_pp":
        # The discounted return of the token-level rewards is GAE with lam = 1 over values 0: the same ops.
        zeros = torch.zeros_like(logprobs)
        if not global_whiten:
            out = ops.rollout_advantages(
                scores, logprobs, ref_logprobs, zeros, mask, kl_coef, penalty, cfg.gamma, 1.0, cfg.whiten_rewards, False
            )
            rewards, non_score, kl, adv, returns = out
            return F.RolloutAdvantages(rewards, non_score, kl, torch.where(m, adv, 0.0), returns)
        rewards, non_score, kl = ops.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, penalty)
        if cfg.whiten_rewards:
            rewards = ops.masked_whiten(rewards, mask, False, WHITEN_EPS) * mask
        returns, _ = ops.gae(zeros, rewards, mask, cfg.gamma, 1.0, False)
        adv = _rollout._global_whiten(trainer, returns, mask)
        return F.RolloutAdvantages(rewards, non_score, kl, torch.where(m, adv, 0.0), returns)

    rewards, non_score, kl = ops.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, penalty)
    # verl with use_kl_in_reward: the outcome is the sum of the token-level rewards, the score plus the KL rewards.
    total = scores.float() + torch.where(m, non_score, 0.0).sum(-1).float()
    seq = ops.group_advantages(total, cfg.group_size, est, GROUP_EPS)
    adv = torch.where(m, seq[:, None].to(logprobs.dtype), 0.0)
    if est == "reinforce_pp_baseline":
        adv = (
            _rollout._global_whiten(trainer, adv, mask)
            if global_whiten
            else ops.masked_whiten(adv, mask, True, WHITEN_EPS)
        )
        adv = torch.where(m, adv, 0.0)
    return F.RolloutAdvantages(rewards, non_score, kl, adv, adv)


def importance_logprobs(
    config: PPOConfig,
    logprob: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probs (and reference log-probs) the loss op sees. ``token``: as they are. ``sequence`` (GSPO,
    Zheng et al. 2025, "Group Sequence Policy Optimization", the GSPO-token form of its eq. 13):
    ``logp' = old + sg(mean_t(logp - old)) + logp - sg(logp)``, so the op's ratio ``exp(logp' - old)`` is the
    sequence's length-normalised ratio ``s_i = exp(mean_t(logp - old))`` on every token (and so is its
    clipping), while d logp' / d logp = 1 makes each token's gradient ``s_i`` times its own, as GSPO-token's
    ``sg(s_i) pi / sg(pi)``; with ``loss_aggregation="seq_mean_token_mean"`` this is GSPO's objective and
    gradient exactly. No kernel change. The reference log-probs move by the same detached shift, so the
    KL-to-reference term of the loss still sees each token's own ``logp - ref``."""
    if config.importance_sampling_level == "token":
        return logprob, ref_logprobs
    m = mask != 0
    n = m.sum(-1).clamp(min=1)
    seq = torch.where(m, logprob.detach() - old_logprobs, 0.0).sum(-1) / n
    shifted = old_logprobs + seq[:, None]
    out = shifted + (logprob - logprob.detach())
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs + (shifted - logprob.detach())
    return out, ref_logprobs


def drop_value_stats(stats: dict[str, Any]) -> None:
    """Remove the value head's statistics (``VALUE_STATS``) from a step's statistics, in place."""
    for key in VALUE_STATS:
        stats.pop(key, None)
