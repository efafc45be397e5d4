"""``PPOConfig``: every field of TRL 0.11's ``PPOConfig`` with its default, plus ppo_fast's own
(fused kernels, KL in the loss, dual clip, loss aggregation, global advantage whitening, the value-free
advantage estimators GRPO / Dr. GRPO / RLOO / REINFORCE++, GSPO's sequence-level ratio, DAPO's clip-higher).

It is a plain dataclass, so ``transformers.HfArgumentParser(PPOConfig)`` turns it into command-line
flags (``--use_score_scaling --use_score_norm --score_clip 0.5``); ``PPOConfig.from_args()`` does
that in one call. ``__post_init__`` validates every field and raises ``ValueError`` naming it, so a
bad configuration fails where it is written rather than inside the first ``step``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from ppo_fast._modes import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_WHITENING,
    AGGREGATIONS,
    CONFIG_KL_PENALTIES,
    GROUPED_ESTIMATORS,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
)

__all__ = ["JSONDict", "PPOConfig"]


class JSONDict(dict):
    """A dict that also accepts a JSON string, so dict fields parse from the command line
    (``--tracker_kwargs '{"wandb": {"mode": "offline"}}'``)."""

    def __init__(self, value: Any = (), **kwargs: Any):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON object, got {value!r} ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {value!r}")
        super().__init__(value, **kwargs)


def _script_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ppo"
    return name[: -len(".py")] if name.endswith(".py") else name


@dataclass
class PPOConfig:
    """Configuration of :class:`ppo_fast.PPOTrainer`. Defaults are TRL 0.11's."""

    # -- run and logging (TRL) ----------------------------------------------------------------------
    exp_name: str = field(default_factory=_script_name, metadata={"help": "Name of this experiment."})
    seed: int = field(default=0, metadata={"help": "Seed of the run (torch, numpy, python, on every process)."})
    log_with: Literal["wandb", "tensorboard"] | None = field(
        default=None, metadata={"help": "Tracker for log_stats: wandb or tensorboard (through Accelerate)."}
    )
    task_name: str | None = field(default=None, metadata={"help": "Name of the task, for logging."})
    model_name: str = field(default="gpt2", metadata={"help": "Name of the model, for logging."})
    query_dataset: str = field(default="stanfordnlp/imdb", metadata={"help": "Name of the dataset, for logging."})
    reward_model: str = field(
        default="sentiment-analysis:lvwerra/distilbert-imdb", metadata={"help": "The reward model, for logging."}
    )
    remove_unused_columns: bool = field(
        default=True, metadata={"help": "Drop dataset columns that the model's forward does not take."}
    )
    tracker_kwargs: JSONDict = field(
        default_factory=JSONDict, metadata={"help": "Keywords for the tracker's init (JSON), e.g. wandb's."}
    )
    accelerator_kwargs: JSONDict = field(
        default_factory=JSONDict, metadata={"help": "Keywords for the Accelerator (JSON)."}
    )
    project_kwargs: JSONDict = field(
        default_factory=JSONDict, metadata={"help": "Keywords for Accelerate's ProjectConfiguration (JSON)."}
    )
    tracker_project_name: str = field(default="trl", metadata={"help": "Project name of the tracker."})
    push_to_hub_if_best_kwargs: JSONDict = field(
        default_factory=JSONDict, metadata={"help": "Accepted for compatibility; pushing is left to the user."}
    )

    # -- hyperparameters (TRL) ----------------------------------------------------------------------
    steps: int = field(default=20000, metadata={"help": "Number of training steps (samples), for total_ppo_epochs."})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "Learning rate of the default Adam."})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adaptive KL controller (else a fixed coefficient)."})
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial KL penalty coefficient in the reward."})
    kl_penalty: Literal[CONFIG_KL_PENALTIES] = field(
        default="kl",
        metadata={"help": "Per-token KL in the reward: kl (logp - ref), abs, mse (0.5 d^2), full (whole vocabulary)."},
    )
    target: float = field(default=6.0, metadata={"help": "Target KL of the adaptive controller."})
    horizon: float = field(default=10000.0, metadata={"help": "Horizon of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    batch_size: int = field(default=128, metadata={"help": "Samples per step, per process."})
    forward_batch_size: int | None = field(
        default=None, metadata={"help": "Deprecated (TRL): use mini_batch_size; sets it when given."}
    )
    mini_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per forward pass and optimizer minibatch (default: TRL's 128, or batch_size when smaller)."
        },
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Minibatches per optimizer step."})
    world_size: int | None = field(default=None, metadata={"help": "Set by the trainer: number of processes."})
    ppo_epochs: int = field(default=4, metadata={"help": "Optimisation epochs over each batch."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip the gradient norm to this."})
    optimize_cuda_cache: bool | None = field(
        default=None, metadata={"help": "Alias of optimize_device_cache (TRL's old name; it works here)."}
    )
    optimize_device_cache: bool = field(
        default=False, metadata={"help": "Free cached device memory between the phases of a step."}
    )
    early_stopping: bool = field(
        default=False, metadata={"help": "Stop the epochs when policy KL passes 1.5 target_kl."}
    )
    target_kl: float = field(default=1.0, metadata={"help": "KL target of early stopping."})
    compare_steps: int = field(default=1, metadata={"help": "Accepted for compatibility (TRL's push-to-hub cadence)."})
    ratio_threshold: float = field(
        default=10.0, metadata={"help": "Skip a minibatch whose mean policy ratio exceeds this."}
    )
    use_score_scaling: bool = field(default=False, metadata={"help": "Divide scores by their running std."})
    use_score_norm: bool = field(
        default=False, metadata={"help": "With use_score_scaling, also subtract the running mean."}
    )
    score_clip: float | None = field(
        default=None, metadata={"help": "Clip (scaled) scores to [-score_clip, score_clip]."}
    )
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Enable gradient checkpointing on the policy."}
    )
    is_encoder_decoder: bool | None = field(default=None, metadata={"help": "Set by the trainer."})
    is_peft_model: bool | None = field(default=None, metadata={"help": "Set by the trainer."})
    backward_batch_size: int | None = field(default=None, metadata={"help": "Set: mini_batch_size x accumulation."})
    global_backward_batch_size: int | None = field(default=None, metadata={"help": "Set: backward x processes."})
    global_batch_size: int | None = field(default=None, metadata={"help": "Set: batch_size x processes."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preprocessing."})

    # -- ppo_fast's own -----------------------------------------------------------------------------
    use_fused_kernels: bool | None = field(
        default=None,
        metadata={
            "help": "Fused C++/CUDA ops (default: on when the extension is built); false runs the eager reference."
        },
    )
    kl_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of a KL-to-reference term in the loss (0: KL only in the reward)."}
    )
    kl_estimator: Literal[KL_ESTIMATORS] = field(
        default="k1", metadata={"help": "Estimator of the KL term in the loss: k1, k2 or k3."}
    )
    dual_clip: float | None = field(
        default=None, metadata={"help": "Dual-clip constant (> 1) bounding the loss of negative advantages."}
    )
    loss_aggregation: Literal[AGGREGATIONS] = field(
        default="token_mean", metadata={"help": "How token losses are averaged (TRL: token_mean)."}
    )
    advantage_whitening: Literal[ADVANTAGE_WHITENING] = field(
        default="process", metadata={"help": "Whiten advantages per process (TRL) or across all processes."}
    )
    fused_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "Log-probs straight from the hidden states, the [batch, length, vocab] logits never built "
            "(default: on when the LM head is a plain linear layer; false: from the logits, as TRL)."
        },
    )
    cache_frozen_trunk: bool = field(
        default=True,
        metadata={
            "help": "Run the policy's frozen bottom (embeddings and leading frozen blocks, e.g. those "
            "create_reference_model shares) once per step and reuse its output in the reference forward and every "
            "minibatch (exact; holds one [batch, length, hidden] activation)."
        },
    )
    fused_activations: bool = field(
        default=True,
        metadata={
            "help": "Run the models' tanh-approximate GELU (GPT-2's gelu_new, seven tensor ops) as one fused op "
            "(ppo_fast::gelu_tanh with the fused kernels, else torch's gelu(approximate='tanh')), the same "
            "function up to rounding (false: as the model wrote it)."
        },
    )
    log_ratio_clamp: float | None = field(
        default=None, metadata={"help": "Clamp log(ratio) to [-c, c] before exp (guards against overflow)."}
    )
    cliprange_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip of the ratio, 1 + cliprange_high (DAPO's clip-higher; default: cliprange)."},
    )
    advantage_estimator: Literal[ADVANTAGE_ESTIMATORS] = field(
        default="gae",
        metadata={
            "help": "gae (value head, TRL) or value-free: grpo, dr_grpo, rloo, reinforce_pp_baseline (need "
            "group_size >= 2), reinforce_pp."
        },
    )
    group_size: int = field(
        default=1,
        metadata={
            "help": "Responses per prompt: each run of group_size consecutive samples of a batch is one group "
            "(batch_size per process must be a multiple of it)."
        },
    )
    importance_sampling_level: Literal[IMPORTANCE_SAMPLING_LEVELS] = field(
        default="token",
        metadata={"help": "token: PPO's per-token ratio; sequence: GSPO's length-normalised sequence ratio."},
    )

    def __post_init__(self) -> None:
        if self.optimize_cuda_cache is not None:
            # TRL's alias assigned optimize_device_cache in the class body, so it never took effect.
            self.optimize_device_cache = bool(self.optimize_cuda_cache)
        if self.forward_batch_size is not None:
            warnings.warn(
                "PPOConfig: forward_batch_size is deprecated; use mini_batch_size (set from it now)",
                FutureWarning,
                stacklevel=3,
            )
            self.mini_batch_size = self.forward_batch_size
        if self.mini_batch_size is None:
            # TRL's default is 128, which made its own guide's PPOConfig(batch_size=1) raise; a batch smaller than
            # 128 is one minibatch here unless the user says otherwise.
            bs = self.batch_size
            self.mini_batch_size = min(128, bs) if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0 else 128
        for name in ("tracker_kwargs", "accelerator_kwargs", "project_kwargs", "push_to_hub_if_best_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                try:
                    setattr(self, name, JSONDict(value))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"PPOConfig: {name} must be a dict or a JSON object string: {e}") from None
        self._validate()
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        self.total_ppo_epochs = int(math.ceil(self.steps / self.batch_size))
        if self.use_score_norm and not self.use_score_scaling:
            warnings.warn(
                "PPOConfig: use_score_norm only takes effect with use_score_scaling=True (as in TRL)",
                UserWarning,
                stacklevel=3,
            )

    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PPOConfig: {name} must be a positive int, got {v!r}")

        def number(name: str, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"PPOConfig: {name} must be a finite number, got {v!r}")
            if lo is not None and (v <= lo if open_lo else v < lo):
                raise ValueError(f"PPOConfig: {name} must be {'>' if open_lo else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"PPOConfig: {name} must be <= {hi}, got {v!r}")

        def choice(name: str, choices: tuple) -> None:
            if getattr(self, name) not in choices:
                raise ValueError(f"PPOConfig: {name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "steps"):
            positive_int(name)
        positive_int("compare_steps")
        if self.dataset_num_proc is not None:
            positive_int("dataset_num_proc")
        number("learning_rate", 0.0)
        number("init_kl_coef", 0.0)
        number("target", 0.0, open_lo=True)
        number("horizon", 0.0, open_lo=True)
        number("gamma", 0.0, 1.0)
        number("lam", 0.0, 1.0)
        number("cliprange", 0.0)
        number("cliprange_value", 0.0)
        number("vf_coef", 0.0)
        number("target_kl", 0.0)
        number("ratio_threshold", 0.0, open_lo=True)
        number("kl_loss_coef", 0.0)
        if self.max_grad_norm is not None:
            number("max_grad_norm", 0.0, open_lo=True)
        if self.score_clip is not None:
            number("score_clip", 0.0, open_lo=True)
        if self.dual_clip is not None:
            number("dual_clip", 1.0, open_lo=True)
        if self.log_ratio_clamp is not None:
            number("log_ratio_clamp", 0.0, open_lo=True)
        if self.cliprange_high is not None:
            number("cliprange_high", 0.0)
        choice("kl_penalty", CONFIG_KL_PENALTIES)
        choice("kl_estimator", KL_ESTIMATORS)
        choice("loss_aggregation", AGGREGATIONS)
        choice("advantage_whitening", ADVANTAGE_WHITENING)
        choice("advantage_estimator", ADVANTAGE_ESTIMATORS)
        choice("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
        positive_int("group_size")
        self._validate_groups()
        if self.log_with not in (None, "wandb", "tensorboard"):
            raise ValueError(f"PPOConfig: log_with must be None, 'wandb' or 'tensorboard'; got {self.log_with!r}")
        if self.use_fused_kernels is not None and not isinstance(self.use_fused_kernels, bool):
            raise ValueError(f"PPOConfig: use_fused_kernels must be a bool or None, got {self.use_fused_kernels!r}")
        if self.fused_lm_head is not None and not isinstance(self.fused_lm_head, bool):
            raise ValueError(f"PPOConfig: fused_lm_head must be a bool or None, got {self.fused_lm_head!r}")
        if not isinstance(self.cache_frozen_trunk, bool):
            raise ValueError(f"PPOConfig: cache_frozen_trunk must be a bool, got {self.cache_frozen_trunk!r}")
        if not isinstance(self.fused_activations, bool):
            raise ValueError(f"PPOConfig: fused_activations must be a bool, got {self.fused_activations!r}")
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % backward:
            raise ValueError(
                f"PPOConfig: batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                f"x gradient_accumulation_steps ({self.mini_batch_size} x {self.gradient_accumulation_steps} "
                f"= {backward})"
            )

    def _validate_groups(self) -> None:
        est, n = self.advantage_estimator, self.group_size
        if est in GROUPED_ESTIMATORS and n < 2:
            raise ValueError(
                f"PPOConfig: group_size must be >= 2 with advantage_estimator={est!r}, whose baseline is the other "
                f"responses to the same prompt (got {n}); sample group_size responses per prompt"
            )
        if est not in GROUPED_ESTIMATORS and n != 1:
            raise ValueError(
                f"PPOConfig: group_size must be 1 with advantage_estimator={est!r}, which uses no groups (got {n}); "
                f"group_size > 1 needs a group estimator: {', '.join(GROUPED_ESTIMATORS)}"
            )
        if self.batch_size % n:
            raise ValueError(
                f"PPOConfig: batch_size ({self.batch_size}, per process) must be a multiple of group_size ({n}): "
                "each process holds whole groups"
            )
        if self.whiten_rewards and est not in ("gae", "reinforce_pp"):
            raise ValueError(
                f"PPOConfig: whiten_rewards whitens per-token rewards before the return scan, which only gae and "
                f"reinforce_pp run; advantage_estimator={est!r} uses the sequence's total reward"
            )

    @property
    def uses_value_head(self) -> bool:
        """Whether the value head is trained and its loss is in the objective (gae only)."""
        return self.advantage_estimator == "gae"

    def to_dict(self) -> dict[str, Any]:
        """All fields as a flat dict (what the tracker records)."""
        out = dataclasses.asdict(self)
        out["total_ppo_epochs"] = self.total_ppo_epochs
        return out

    @classmethod
    def from_args(cls, args: list[str] | None = None) -> PPOConfig:
        """Parse ``args`` (default ``sys.argv[1:]``) as command-line flags, one per field."""
        from transformers import HfArgumentParser

        (config,) = HfArgumentParser(cls).parse_args_into_dataclasses(args=args)
        return config
