"""A PPO step's statistics under TRL's key names, and the tracker they are logged to.

The statistics are computed on the device, gathered or reduced across processes once per kind (the per-row sums,
the mean of the minibatch rows, the per-token arrays) and brought to the host in one transfer at the end of the
step (DESIGN.md section 3, step 7), so every process returns the same numbers.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ppo_fast.reference import PPO_LOSS_STATS

if TYPE_CHECKING:  # the trainer imports this module: the functions below only take one
    from ppo_fast import functional as F
    from ppo_fast.trainer.ppo_trainer import PPOTrainer

# Per-row rollout quantities gathered from all processes once per step (columns of one tensor).
_ROW_COLUMNS = ("kl", "neg_logprob", "non_score_reward", "tokens", "score", "query_len", "response_len")


def init_trackers(trainer: PPOTrainer) -> None:
    """Start ``config.log_with``'s tracker with the run's config (flattened to scalars and strings for
    tensorboard's hparams)."""
    config = trainer.config
    run_config = config.to_dict()
    if config.log_with == "tensorboard":  # hparams take scalars and strings only, flat
        run_config = {
            k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
            for k, v in run_config.items()
        }
    else:
        run_config = {"ppo_fast_config": run_config}
    trainer.accelerator.init_trackers(
        config.tracker_project_name, config=run_config, init_kwargs=dict(config.tracker_kwargs)
    )


def step_stats(
    trainer: PPOTrainer,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rollout: F.RolloutAdvantages,
    train_rows: torch.Tensor,
    ratios: torch.Tensor,
    queries: list,
    responses: list,
) -> dict[str, Any]:
    """The step's statistics, identical on every process; warns (at the caller of ``step``) when minibatches were
    skipped by ``ratio_threshold`` or the KL is negative. ``train_rows`` [n_minibatches, len(PPO_LOSS_STATS) + 1]
    are the loss op's stats and the entropy per minibatch; ``ratios`` the policy ratios, -1 where masked."""
    m = mask.to(torch.float32)
    device = trainer.current_device
    per_row = torch.stack(
        [
            (rollout.kl.float() * m).sum(-1),
            (-logprobs.float() * m).sum(-1),
            (rollout.non_score_rewards.float() * m).sum(-1),
            m.sum(-1),
            scores.float(),
            torch.tensor([len(q) for q in queries], dtype=torch.float32, device=device),
            torch.tensor([len(r) for r in responses], dtype=torch.float32, device=device),
        ],
        dim=1,
    )
    arrays = {
        "objective/logprobs": logprobs.float(),
        "objective/ref_logprobs": ref_logprobs.float(),
        "advantages": rollout.advantages.float(),
        "mask": m,
    }
    cols, train, arrays, ratios = _to_host(trainer, per_row, train_rows.mean(0), arrays, ratios)
    stats = _trl_stats(cols, train, arrays, ratios, float(trainer.kl_ctl.value))
    if stats["ppo/policy/skipped"] > 0:
        warnings.warn(
            f"PPOTrainer.step: {stats['ppo/policy/skipped']:.0%} of the minibatches had a mean policy ratio above "
            f"ratio_threshold={trainer.config.ratio_threshold} and were skipped",
            UserWarning,
            stacklevel=3,
        )
    if stats["objective/kl"] < -1.0:
        warnings.warn(
            f"PPOTrainer.step: the KL divergence is negative ({stats['objective/kl']:.2f}); generation "
            "settings (e.g. top_k, min_length) that do not sample from the full distribution cause this",
            UserWarning,
            stacklevel=3,
        )
    return stats


def _to_host(
    trainer: PPOTrainer,
    per_row: torch.Tensor,
    train: torch.Tensor,
    arrays: dict[str, torch.Tensor],
    ratios: torch.Tensor,
) -> tuple[dict[str, np.ndarray], list[float], dict[str, np.ndarray], np.ndarray]:
    """All processes' rows, arrays and ratios (gathered) and the mean train stats (reduced), in one
    device-to-host transfer at the end of the step; the per-row sums as columns named by ``_ROW_COLUMNS``."""
    if trainer.is_distributed:
        acc = trainer.accelerator
        per_row = acc.gather(per_row)
        train = acc.reduce(train, reduction="mean")
        arrays = {k: acc.gather(v) for k, v in arrays.items()}
        ratios = acc.gather(ratios)
    per_row = per_row.double().cpu().numpy()
    cols = dict(zip(_ROW_COLUMNS, per_row.T))
    return cols, train.double().cpu().tolist(), {k: v.cpu().numpy() for k, v in arrays.items()}, ratios.cpu().numpy()


def _trl_stats(
    cols: dict[str, np.ndarray],
    train: list[float],
    arrays: dict[str, np.ndarray],
    ratios: np.ndarray,
    kl_coef: float,
) -> dict[str, Any]:
    """The host-side statistics under TRL's key names (``objective/``, ``ppo/``, ``tokens/``)."""
    n_tokens = cols["tokens"].sum()
    score = cols["score"]
    stats: dict[str, Any] = {
        "objective/kl": float(cols["kl"].mean()),
        "objective/kl_dist": cols["kl"].astype(np.float32),
        "objective/logprobs": arrays["objective/logprobs"],
        "objective/ref_logprobs": arrays["objective/ref_logprobs"],
        "objective/kl_coef": kl_coef,
        "objective/entropy": float(cols["neg_logprob"].mean()),
        "ppo/mean_non_score_reward": float(cols["non_score_reward"].sum() / max(n_tokens, 1.0)),
        "ppo/mean_scores": float(score.mean()),
        "ppo/std_scores": float(score.std(ddof=1)) if len(score) > 1 else float("nan"),
    }
    for key, col in (("queries", "query_len"), ("responses", "response_len")):
        lens = cols[col]
        stats[f"tokens/{key}_len_mean"] = float(lens.mean())
        stats[f"tokens/{key}_len_std"] = float(lens.std(ddof=1)) if len(lens) > 1 else float("nan")
        stats[f"tokens/{key}_dist"] = lens.astype(np.float32)
    for key, value in zip(PPO_LOSS_STATS, train[: len(PPO_LOSS_STATS)]):
        if key in ("ppo/tokens", "ppo/rows"):
            continue
        stats["ppo/policy/skipped" if key == "ppo/skipped" else f"ppo/{key}"] = value
    stats["ppo/policy/entropy"] = train[-1]
    keep = arrays["mask"] != 0
    stats["ppo/policy/advantages"] = arrays["advantages"][keep].astype(np.float32)
    stats["ppo/policy/ratio"] = ratios[ratios >= 0].astype(np.float32)
    returns_var = stats["ppo/returns/var"]
    stats["ppo/val/var_explained"] = 1.0 - stats["ppo/val/error"] / returns_var if returns_var > 0 else float("nan")
    return stats


def log_stats(
    trainer: PPOTrainer, stats: dict[str, Any], batch: dict[str, Any], rewards: Any, columns_to_log: Sequence[str]
) -> None:
    """``PPOTrainer.log_stats``: every process gathers, the main process logs."""
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.reshape(-1).float()
    else:
        rewards = torch.stack([torch.as_tensor(r).reshape(()).float() for r in rewards])
    rewards = trainer.accelerator.gather(rewards.to(trainer.current_device)).reshape(-1).cpu()
    missing = [c for c in columns_to_log if c not in batch]
    if missing:
        raise ValueError(f"PPOTrainer.log_stats: batch has no column(s) {missing}; it has {sorted(batch)}")
    columns = [list(batch[c]) for c in columns_to_log]
    if trainer.is_distributed:
        from accelerate.utils import gather_object

        columns = [gather_object(c) for c in columns]
    if not trainer.accelerator.is_main_process:
        return
    logs: dict[str, Any] = {}
    if trainer.config.log_with == "wandb":
        import wandb

        rows = [list(r) for r in zip(*columns, rewards.tolist())]
        logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"], rows=rows)
    logs.update(stats)
    logs["env/reward_mean"] = float(rewards.mean())
    logs["env/reward_std"] = float(rewards.std()) if rewards.numel() > 1 else float("nan")
    logs["env/reward_dist"] = rewards.numpy()
    if trainer.config.log_with == "tensorboard":
        logs = {k: v for k, v in logs.items() if isinstance(v, (int, float, str))}
    trainer.accelerator.log(logs, step=trainer.current_step)
