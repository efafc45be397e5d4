"""The names of every mode an op or the trainer takes, in one place: ``PPOConfig``, the argument
checks in ``_ops`` and the reference all read these, and the C++ parses the same strings
(``gae.h``: ``parse_kl_penalty``; ``ppo_loss.h``: ``parse_kl_estimator``, ``parse_aggregation``;
``group_advantages.h``: ``parse_estimator``)."""

from __future__ import annotations

# Per-token KL penalties the ops compute (compute_rewards, rollout_advantages): TRL's kl, abs and
# mse, and Schulman's k3 (exp(-d) + d - 1, unbiased and low-variance).
KL_PENALTIES = ("kl", "abs", "mse", "k3")
# PPOConfig.kl_penalty: TRL's four. "full" is the whole-vocabulary KL from logits (functional.full_kl),
# passed to the ops as a per-token "kl" against zeros.
CONFIG_KL_PENALTIES = ("kl", "abs", "mse", "full")
# KL-to-reference term of the loss (ppo_loss's kl_estimator; PPOConfig.kl_estimator): Schulman's k1
# (= "kl"), k2 (= "mse") and k3.
KL_ESTIMATORS = ("k1", "k2", "k3")
# How the loss reduces its token terms (ppo_loss's aggregation; PPOConfig.loss_aggregation).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
# Over which tokens the trainer whitens advantages (PPOConfig.advantage_whitening).
ADVANTAGE_WHITENING = ("process", "global")
# Value-free per-sample advantages from groups of scores (group_advantages' estimator): GRPO, Dr. GRPO,
# RLOO, REINFORCE++ with a group-mean baseline, and REINFORCE++ (the score itself).
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "reinforce_pp")
# PPOConfig.advantage_estimator: GAE with the value head (TRL), or one of the value-free ones.
ADVANTAGE_ESTIMATORS = ("gae", *GROUP_ESTIMATORS)
# The estimators whose baseline is the group's other samples: they need group_size >= 2.
GROUPED_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
# PPOConfig.importance_sampling_level: a ratio per token (PPO), or the length-normalised sequence ratio (GSPO).
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def one_of(choices: tuple[str, ...]) -> str:
    """``'a', 'b', 'c'``: the choices as the error messages list them."""
    return ", ".join(f"'{c}'" for c in choices)
