"""``PPOTrainer``: TRL 0.11's PPO trainer API, run on ppo_fast's fused ops.

One ``step(queries, responses, scores)`` does, in order (DESIGN.md section 3):

1. score scaling / normalisation / clipping with running moments shared by all processes;
2. no-grad forward passes of the policy and the reference in minibatches, log-probs straight from
   the logits through the fused ``logprobs`` op (the [B, T, V] logits are dropped chunk by chunk,
   never kept for the entropy);
3. per-token rewards, GAE, returns and advantage whitening in one fused op;
4. ``ppo_epochs`` over shuffled minibatches under ``accelerator.accumulate``: forward, the fused
   clipped loss, backward, optional grad-norm clipping, optimizer step; early stopping on the
   all-reduced policy KL;
5. the KL controller update; 6. ``lr_scheduler.step()`` once; 7. statistics reduced across
   processes, under TRL's key names.

The minibatch loop never synchronises with the host except for the early-stopping decision (once
per epoch, and only with ``early_stopping=True``). ``use_fused_kernels=False`` runs the same trainer
on the eager reference (``ppo_fast.reference``), for A/B comparisons.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from ppo_fast import functional as F
from ppo_fast.models import AutoModelForCausalLMWithValueHead, create_reference_model
from ppo_fast.reference import PPO_LOSS_STATS
from ppo_fast.trainer import checkpoint as _ckpt
from ppo_fast.trainer.config import PPOConfig
from ppo_fast.trainer.distributed import build_accelerator
from ppo_fast.trainer.kl_controllers import AdaptiveKLController, FixedKLController
from ppo_fast.trainer.running_moments import RunningMoments

__all__ = ["PPOTrainer"]

_PRETRAINED_DIR = "pretrained"  # the consolidated policy inside a checkpoint
_CHECKPOINT_META = "ppo_fast_checkpoint.json"
_TRAINER_STATE = "trainer_state.json"  # step, KL controller, reference checksum
_RUNNING_MOMENTS = "running_moments.safetensors"
_LR_SCHEDULER = "lr_scheduler.pt"
_USER_STATE = "user_state.json"

# Train statistics reported per step (TRL's names under ``ppo/``): the loss op's, in its order, then ours.
_LOSS_STAT_KEYS = tuple(k for k in PPO_LOSS_STATS if not k.startswith("ppo/"))
_SKIPPED = PPO_LOSS_STATS.index("ppo/skipped")
_POLICYKL = PPO_LOSS_STATS.index("policy/policykl")
_RATIO_MEAN = PPO_LOSS_STATS.index("policy/ratio_mean")
_N_TRAIN_STATS = len(PPO_LOSS_STATS) + 1  # + the entropy of the policy

# Per-row rollout quantities gathered from all processes once per step (columns of one tensor).
_ROW_COLUMNS = ("kl", "neg_logprob", "non_score_reward", "tokens", "score", "query_len", "response_len")


def _empty_device_cache() -> None:
    """Return cached device memory to the driver (``optimize_device_cache``)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


class PPOTrainer:
    """Proximal Policy Optimisation for a causal LM with a value head (TRL 0.11's ``PPOTrainer``).

    Args:
        config: a :class:`PPOConfig`.
        model: the policy, an :class:`AutoModelForCausalLMWithValueHead`.
        ref_model: the frozen reference (same class). None: a PEFT policy uses its base model with the
            adapter disabled; any other policy gets ``create_reference_model(model, num_shared_layers)``.
        tokenizer: the policy's tokenizer (``pad_token_id``, else ``eos_token_id``, pads batches).
        dataset: optional ``datasets.Dataset`` or torch dataset; ``trainer.dataloader`` then yields
            ``config.batch_size`` samples per process and step.
        optimizer: any ``torch.optim.Optimizer`` (SGD, bitsandbytes Adam8bit, ppo_fast Lion8bit, ...),
            used as given; default Adam over the trainable parameters at ``config.learning_rate``.
        data_collator: ``collate_fn`` of the dataloader.
        num_shared_layers: blocks the created reference shares with the policy (see
            ``create_reference_model``); only when ``ref_model`` is None.
        lr_scheduler: any scheduler; ``lr_scheduler.step()`` runs once per ``step()`` (on every
            process, whatever the number of processes).
        training_data_collator: TRL's hook to build model inputs from ``[{"input_ids", "attention_mask"}]``;
            by default the batch is right-padded here directly.
    """

    def __init__(
        self,
        config: PPOConfig | None = None,
        model: AutoModelForCausalLMWithValueHead | None = None,
        ref_model: AutoModelForCausalLMWithValueHead | None = None,
        tokenizer: Any = None,
        dataset: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_collator: Callable | None = None,
        num_shared_layers: int | None = None,
        lr_scheduler: Any = None,
        training_data_collator: Callable | None = None,
    ):
        config = PPOConfig() if config is None else config
        self._check_init_args(config, model, ref_model, tokenizer, optimizer, num_shared_layers, lr_scheduler)
        self.config = config
        self.use_fused = F.fused_available() if config.use_fused_kernels is None else bool(config.use_fused_kernels)
        if self.use_fused and not F.fused_available():
            raise RuntimeError(
                "PPOTrainer: use_fused_kernels=True but the ppo_fast extension is not available "
                "(build it, or set use_fused_kernels=False for the eager reference)"
            )
        config.use_fused_kernels = self.use_fused

        set_seed(config.seed)
        self.accelerator = build_accelerator(
            log_with=config.log_with,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            project_config=ProjectConfiguration(**config.project_kwargs),
            **config.accelerator_kwargs,
        )
        world = self.accelerator.num_processes
        config.world_size = world
        config.global_backward_batch_size = config.backward_batch_size * world
        config.global_batch_size = config.batch_size * world
        config.is_encoder_decoder = False
        config.is_peft_model = bool(getattr(model, "is_peft_model", False))
        self.is_encoder_decoder = False
        self.is_peft_model = config.is_peft_model

        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self._signature_columns: list[str] | None = None
        self.training_data_collator = training_data_collator
        self._checkpointed_blocks: list[torch.nn.Module] = []
        if config.gradient_checkpointing:
            if not model.supports_gradient_checkpointing:
                raise ValueError(
                    f"PPOTrainer: config.gradient_checkpointing=True but {type(model.pretrained_model).__name__} "
                    "does not support gradient checkpointing"
                )
            model.gradient_checkpointing_enable()
            from transformers.modeling_layers import GradientCheckpointingLayer

            self._checkpointed_blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

        if ref_model is not None:
            if num_shared_layers is not None:
                warnings.warn(
                    "PPOTrainer: num_shared_layers is ignored because ref_model was given", UserWarning, stacklevel=2
                )
            self.ref_model = ref_model
        elif self.is_peft_model:
            self.ref_model = None  # the policy with its adapter disabled
        else:
            self.ref_model = create_reference_model(model, num_shared_layers=num_shared_layers)

        self.optimizer = (
            torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
            if optimizer is None
            else optimizer
        )
        self.lr_scheduler = lr_scheduler

        self.dataloader = self.prepare_dataloader(dataset, data_collator) if dataset is not None else None
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._fill_deepspeed_config(config)
        # The scheduler is not prepared: Accelerate would step it once per process (and DeepSpeed once
        # per optimizer step); PPO steps it once per `step()`, as the user expects.
        self.model, self.optimizer, self.dataloader = self.accelerator.prepare(
            self.model, self.optimizer, self.dataloader
        )
        self.ref_model = self._prepare_reference(self.ref_model)
        self.current_device = self.accelerator.device
        self.is_distributed = world > 1
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]

        self.running = RunningMoments(self.accelerator, device=self.current_device)
        self.kl_ctl = (
            AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
            if config.adap_kl_ctrl
            else FixedKLController(config.init_kl_coef)
        )
        self.current_step = 0
        self._checkpoint_state = _TrainerState(self)  # saved by save_checkpoint as JSON, with the moments

        unwrapped = self.accelerator.unwrap_model(self.model)
        self._vocab_size = unwrapped.pretrained_model.get_input_embeddings().num_embeddings
        # The longest query + response the model can take (its position table): a longer one would fail inside
        # the forward, after the score moments were updated, so step() refuses it up front.
        model_config = unwrapped.pretrained_model.config
        self._max_positions_name = next(
            (f"config.{k}" for k in ("n_positions", "max_position_embeddings") if getattr(model_config, k, None)), None
        )
        self._max_positions = (
            int(getattr(model_config, self._max_positions_name[len("config.") :])) if self._max_positions_name else None
        )
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
        if self._pad_id is None:
            self._pad_id = 0
        if config.log_with is not None:
            run_config = config.to_dict()
            if config.log_with == "tensorboard":  # hparams take scalars and strings only, flat
                run_config = {
                    k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
                    for k, v in run_config.items()
                }
            else:
                run_config = {"ppo_fast_config": run_config}
            self.accelerator.init_trackers(
                config.tracker_project_name, config=run_config, init_kwargs=dict(config.tracker_kwargs)
            )

    # ------------------------------------------------------------------------------------ setup
    @staticmethod
    def _check_init_args(config, model, ref_model, tokenizer, optimizer, num_shared_layers, lr_scheduler) -> None:
        if not isinstance(config, PPOConfig):
            raise TypeError(f"PPOTrainer: config must be a PPOConfig, got {type(config).__name__}")
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise TypeError(
                "PPOTrainer: model must be an AutoModelForCausalLMWithValueHead, got "
                f"{type(model).__name__}; wrap it with AutoModelForCausalLMWithValueHead.from_pretrained(...)"
            )
        if ref_model is not None and not isinstance(ref_model, AutoModelForCausalLMWithValueHead):
            raise TypeError(
                "PPOTrainer: ref_model must be an AutoModelForCausalLMWithValueHead or None, got "
                f"{type(ref_model).__name__}"
            )
        if ref_model is model:
            raise ValueError("PPOTrainer: ref_model must not be the policy itself; pass a frozen copy or None")
        if tokenizer is None or not hasattr(tokenizer, "pad_token_id"):
            raise TypeError(f"PPOTrainer: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"PPOTrainer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if lr_scheduler is not None and not callable(getattr(lr_scheduler, "step", None)):
            raise TypeError(f"PPOTrainer: lr_scheduler must have a step() method, got {type(lr_scheduler).__name__}")
        if num_shared_layers is not None and (
            isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, int)
        ):
            raise TypeError(f"PPOTrainer: num_shared_layers must be an int or None, got {num_shared_layers!r}")
        if optimizer is None and not any(p.requires_grad for p in model.parameters()):
            raise ValueError("PPOTrainer: model has no trainable parameters")

    def _fill_deepspeed_config(self, config: PPOConfig) -> None:
        """Fill the DeepSpeed config's "auto" values from PPOConfig, as the user meant them: the micro batch is
        ``mini_batch_size`` and ``gradient_clipping`` is ``max_grad_norm`` (0: none). Left "auto", accelerate
        would clip at 1.0 whatever max_grad_norm says (DeepSpeed clips inside its step; ``clip_grad_norm_`` does
        nothing there). The config is process-wide, so the keys that were "auto" are remembered and refilled for
        each trainer."""
        plugin = self.accelerator.state.deepspeed_plugin
        ds_config = plugin.deepspeed_config
        if not hasattr(plugin, "_ppo_fast_auto_keys"):
            keys = ("train_micro_batch_size_per_gpu", "gradient_clipping", "train_batch_size")
            plugin._ppo_fast_auto_keys = {k for k in keys if ds_config.get(k, "auto") == "auto"}
        auto = plugin._ppo_fast_auto_keys
        if "train_micro_batch_size_per_gpu" in auto:
            ds_config["train_micro_batch_size_per_gpu"] = config.mini_batch_size
        if "train_batch_size" in auto:
            ds_config["train_batch_size"] = (
                config.mini_batch_size * config.gradient_accumulation_steps * self.accelerator.num_processes
            )
        if "gradient_clipping" in auto:
            ds_config["gradient_clipping"] = float(config.max_grad_norm or 0.0)
        elif config.max_grad_norm is not None and float(ds_config["gradient_clipping"]) != config.max_grad_norm:
            warnings.warn(
                f"PPOTrainer: the DeepSpeed config sets gradient_clipping={ds_config['gradient_clipping']}, which "
                f'DeepSpeed applies instead of max_grad_norm={config.max_grad_norm}; set it to "auto" to use '
                "max_grad_norm",
                UserWarning,
                stacklevel=3,
            )

    def _prepare_reference(self, ref: AutoModelForCausalLMWithValueHead | None) -> Any:
        """ZeRO-3: the reference is sharded as its own DeepSpeed engine (no optimizer), so it is not
        replicated on every rank; otherwise it is a plain frozen module on the device (an 8-bit or
        ``device_map``-placed model stays where it was loaded)."""
        if ref is None:
            return None
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        quantized = ref.is_quantized or getattr(ref.pretrained_model, "hf_device_map", None) is not None
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and not quantized:
            import copy

            import deepspeed

            ds_config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
                ds_config.pop("optimizer", None)
                ds_config.pop("scheduler", None)
                engine, *_ = deepspeed.initialize(model=ref, config=ds_config)
                engine.eval()
                return engine
        if not quantized:
            ref.to(self.accelerator.device)
        return ref

    def prepare_dataloader(self, dataset: Any, data_collator: Callable | None = None) -> torch.utils.data.DataLoader:
        """A shuffled dataloader of ``config.batch_size`` samples (last partial batch dropped); unused
        columns of a ``datasets.Dataset`` are removed first (``remove_unused_columns``)."""
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets comes with the test extra
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.config.batch_size, collate_fn=data_collator, shuffle=True, drop_last=True
        )

    def _remove_unused_columns(self, dataset: Any) -> Any:
        if not self.config.remove_unused_columns:
            return dataset
        if self._signature_columns is None:
            model = self.model if isinstance(self.model, AutoModelForCausalLMWithValueHead) else None
            model = model or self.accelerator.unwrap_model(self.model)
            self._signature_columns = [*inspect.signature(model.forward).parameters, "label", "query", "response"]
        ignored = [c for c in dataset.column_names if c not in self._signature_columns]
        return dataset.remove_columns(ignored)

    # ------------------------------------------------------------------------------------ inputs
    def _check_step_inputs(
        self, queries: Any, responses: Any, scores: Any, response_masks: Any
    ) -> tuple[list, list, torch.Tensor, list | None]:
        bs = self.config.batch_size
        named = {"queries": queries, "responses": responses, "scores": scores}
        if response_masks is not None:
            named["response_masks"] = response_masks
        for name, value in named.items():
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"PPOTrainer.step: {name} must be a list of tensors, got {type(value).__name__}")
            if len(value) != bs:
                raise ValueError(
                    f"PPOTrainer.step: {name} has {len(value)} elements but config.batch_size is {bs} (per process)"
                )
        device = self.current_device
        for name, value in named.items():
            for i, t in enumerate(value):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"PPOTrainer.step: {name}[{i}] must be a tensor, got {type(t).__name__}")
                if t.device.type != "cpu" and t.device != device:
                    raise ValueError(
                        f"PPOTrainer.step: {name}[{i}] is on {t.device} but the trainer runs on {device}; "
                        "pass CPU tensors or tensors on the trainer's device"
                    )
        for name in ("queries", "responses"):
            for i, t in enumerate(named[name]):
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
                    f"PPOTrainer.step: scores[{i}] must hold one real number, got shape {tuple(s.shape)} "
                    f"dtype {s.dtype}"
                )
        limit = self._max_positions
        if limit is not None:
            for i, (q, r) in enumerate(zip(queries, responses)):
                if q.numel() + r.numel() > limit:
                    raise ValueError(
                        f"PPOTrainer.step: queries[{i}] and responses[{i}] hold {q.numel()} + {r.numel()} tokens but "
                        f"the model takes at most {limit} positions ({self._max_positions_name}); truncate the "
                        "query or generate fewer tokens"
                    )
        if response_masks is not None:
            for i, (m, r) in enumerate(zip(response_masks, responses)):
                if m.shape != r.shape:
                    raise ValueError(
                        f"PPOTrainer.step: response_masks[{i}] has shape {tuple(m.shape)} but responses[{i}] has "
                        f"{tuple(r.shape)}"
                    )
        score_t = torch.stack([s.reshape(()).to(device, torch.float32) for s in scores])
        bad = ~torch.isfinite(score_t)
        if bad.any():  # one synchronisation per step, before anything changes
            raise ValueError(
                f"PPOTrainer.step: scores must be finite; NaN or inf at {bad.nonzero().flatten().tolist()}"
            )
        return list(queries), list(responses), score_t, None if response_masks is None else list(response_masks)

    def _build_inputs(
        self, queries: list, responses: list, response_masks: list | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` [B, L] and the response mask [B, L - 1]
        over log-prob positions (position t scores token t + 1)."""
        device = self.current_device
        seqs = [torch.cat([q.to(device), r.to(device)]).long() for q, r in zip(queries, responses)]
        if self.training_data_collator is not None:
            data = self.training_data_collator([{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in seqs])
            input_ids, attention_mask = data["input_ids"].to(device), data["attention_mask"].to(device)
            if (attention_mask[:, 0] == 0).any():
                raise ValueError("PPOTrainer: training_data_collator must pad on the right")
        else:
            input_ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self._pad_id)
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
        if self.is_distributed:
            # Equal lengths on every rank, so per-token statistics gather into one tensor.
            input_ids = self.accelerator.pad_across_processes(input_ids, dim=1, pad_index=self._pad_id)
            attention_mask = self.accelerator.pad_across_processes(attention_mask, dim=1, pad_index=0)
            seq_mask = self.accelerator.pad_across_processes(seq_mask, dim=1, pad_index=0)
        lo, hi = int(input_ids.min()), int(input_ids.max())  # one synchronisation, before any state changes
        if lo < 0 or hi >= self._vocab_size:
            raise ValueError(
                f"PPOTrainer.step: token ids must be in [0, {self._vocab_size}) (the model's vocabulary); "
                f"queries/responses hold ids in [{lo}, {hi}]"
            )
        return input_ids, attention_mask, seq_mask[:, 1:].contiguous()

    # ------------------------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _reference(self) -> Iterator[Any]:
        """The module that computes reference log-probs: the reference, or the PEFT policy with its
        adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with unwrapped.disable_adapter():
            yield self.model

    def _logprobs(self, logits: torch.Tensor, labels: torch.Tensor, *, train: bool) -> Any:
        """Training: ``(logprob, entropy)``; rollout: ``logprob`` only (TRL computes the entropy only in the loss)."""
        # In training the logits come straight from the LM head and nothing else reads them, so the
        # fused backward writes d loss / d logits into their storage (no second [B, T, V] buffer).
        return F.logprobs_from_logits(
            logits,
            labels,
            return_entropy=train,
            validate=False,
            inplace_backward=train and self.use_fused and logits.requires_grad,
            use_fused=self.use_fused,
        )

    @torch.no_grad()
    def _rollout_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy log-probs, values and reference log-probs [B, L - 1] (and the full-vocabulary KL for
        ``kl_penalty="full"``), in chunks of ``mini_batch_size``: one chunk's logits live at a time."""
        fbs = self.config.mini_batch_size
        full = self.config.kl_penalty == "full"
        logprobs, values, ref_logprobs, kls = [], [], [], []
        self.model.eval()
        for i in range(0, input_ids.shape[0], fbs):
            ids, am = input_ids[i : i + fbs], attention_mask[i : i + fbs]
            labels = ids[:, 1:]
            # No KV cache: one full pass, nothing to continue (it would only hold memory).
            logits, _, v = self.model(input_ids=ids, attention_mask=am, use_cache=False)
            logits = logits[:, :-1]
            logprobs.append(self._logprobs(logits, labels, train=False))
            values.append(v[:, :-1].float())
            if not full:
                del logits
            with self._reference() as ref:
                ref_logits, _, _ = ref(input_ids=ids, attention_mask=am, use_cache=False)
            ref_logits = ref_logits[:, :-1]
            ref_logprobs.append(self._logprobs(ref_logits, labels, train=False))
            if full:
                kls.append(F.full_kl(logits, ref_logits, use_fused=self.use_fused))
                del logits
            del ref_logits
        kl_full = torch.cat(kls) if full else None
        return torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs), kl_full

    def _advantages(
        self,
        scores: torch.Tensor,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        kl_full: torch.Tensor | None,
    ) -> F.RolloutAdvantages:
        cfg = self.config
        if kl_full is not None:  # rewards from the full-vocabulary KL: kl = kl_full - 0
            logprobs, ref_logprobs, penalty = kl_full, torch.zeros_like(kl_full), "kl"
        else:
            penalty = cfg.kl_penalty
        kl_coef = self.kl_ctl.value
        if cfg.advantage_whitening == "global" and self.is_distributed:
            rewards, non_score, kl = F.compute_rewards(
                scores, logprobs, ref_logprobs, mask, kl_coef, penalty, use_fused=self.use_fused
            )
            if cfg.whiten_rewards:
                rewards = F.masked_whiten(rewards, mask, shift_mean=False, use_fused=self.use_fused) * mask
            adv, returns = F.gae(values, rewards, mask, cfg.gamma, cfg.lam, use_fused=self.use_fused)
            adv = self._global_whiten(adv, mask)
            return F.RolloutAdvantages(rewards, non_score, kl, adv, returns)
        return F.rollout_advantages(
            scores,
            logprobs,
            ref_logprobs,
            values,
            mask,
            kl_coef,
            penalty,
            cfg.gamma,
            cfg.lam,
            whiten_rewards=cfg.whiten_rewards,
            use_fused=self.use_fused,
        )

    def _global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whiten with the masked mean and Bessel-corrected variance of all processes' tokens."""
        state = torch.zeros(4, dtype=torch.float64, device=x.device)
        batches = self.accelerator.gather(F.moments(x, mask, use_fused=self.use_fused)[None])
        F.moments_merge_(state, batches, use_fused=self.use_fused)
        n, mean = state[0], state[1]
        var = torch.where(n > 1, state[2] / (n - 1).clamp(min=1), torch.ones_like(n))
        return ((x.double() - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype)

    # ------------------------------------------------------------------------------------ step
    def step(
        self,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        scores: list[torch.Tensor],
        response_masks: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One PPO step on ``config.batch_size`` (query, response, score) triples of this process.

        Args:
            queries, responses: lists of 1-D token-id tensors (each at least one token).
            scores: list of scalar tensors, one per response.
            response_masks: optional lists of 0/1 per response token (0: the token is not trained on,
                e.g. tool output inside a multi-turn response).
        Returns: statistics under TRL's names (floats, and numpy arrays for distributions), identical
        on every process.
        """
        cfg = self.config
        queries, responses, scores, response_masks = self._check_step_inputs(queries, responses, scores, response_masks)
        input_ids, attention_mask, mask = self._build_inputs(queries, responses, response_masks)
        # -- nothing above changed any state; from here on the step runs
        if cfg.optimize_device_cache:
            _empty_device_cache()
        t0 = time.perf_counter()
        timing = {}
        if cfg.use_score_scaling:
            scores, _ = self.running.update_normalize(
                scores, scale=True, center=cfg.use_score_norm, clip=cfg.score_clip, validate=False
            )
        elif cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

        t = time.perf_counter()
        logprobs, values, ref_logprobs, kl_full = self._rollout_forward(input_ids, attention_mask)
        timing["time/ppo/forward_pass"] = time.perf_counter() - t
        if cfg.optimize_device_cache:
            _empty_device_cache()

        t = time.perf_counter()
        maskf = mask.to(values.dtype)
        values = values * maskf
        rollout = self._advantages(scores, logprobs, ref_logprobs, values, mask, kl_full)
        timing["time/ppo/compute_advantages"] = time.perf_counter() - t

        t = time.perf_counter()
        train_rows, ratios = self._optimize(input_ids, attention_mask, mask, logprobs, ref_logprobs, values, rollout)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t
        if cfg.optimize_device_cache:
            _empty_device_cache()

        t = time.perf_counter()
        stats = self._record_step_stats(
            scores, logprobs, ref_logprobs, mask, rollout, train_rows, ratios, queries, responses
        )
        timing["time/ppo/calc_stats"] = time.perf_counter() - t
        stats["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size * self.accelerator.num_processes)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        timing["time/ppo/total"] = time.perf_counter() - t0
        stats.update(timing)
        self.current_step += 1
        return stats

    def _optimize(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        rollout: F.RolloutAdvantages,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PPO epochs over shuffled minibatches. Returns the per-minibatch stat rows
        [n_minibatches, _N_TRAIN_STATS] and the policy ratios [n_minibatches x mb, T], -1 where masked."""
        cfg = self.config
        bs, mbs = cfg.batch_size, cfg.mini_batch_size
        device = self.current_device
        rows, ratios = [], []
        use_ref = cfg.kl_loss_coef > 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(bs).to(device)
            last_policykl = None
            for start in range(0, bs, mbs):
                idx = perm[start : start + mbs]
                mb_mask = mask[idx]
                with self.accelerator.accumulate(self.model):
                    self._train_mode_without_dropout()
                    ids = input_ids[idx]
                    logits, _, vpreds = self.model(input_ids=ids, attention_mask=attention_mask[idx], use_cache=False)
                    logprob, entropy = self._logprobs(logits[:, :-1], ids[:, 1:], train=True)
                    del logits
                    loss, st = F.ppo_loss(
                        logprob,
                        vpreds[:, :-1],
                        old_logprobs[idx],
                        old_values[idx],
                        rollout.advantages[idx],
                        rollout.returns[idx],
                        mb_mask,
                        ref_logprobs[idx] if use_ref else None,
                        cliprange=cfg.cliprange,
                        cliprange_value=cfg.cliprange_value,
                        vf_coef=cfg.vf_coef,
                        kl_coef=cfg.kl_loss_coef,
                        kl_estimator=cfg.kl_estimator,
                        dual_clip=cfg.dual_clip,
                        log_ratio_clamp=cfg.log_ratio_clamp,
                        aggregation=cfg.loss_aggregation,
                        ratio_threshold=cfg.ratio_threshold,
                        use_fused=self.use_fused,
                    )
                    self.accelerator.backward(loss)
                    if cfg.max_grad_norm is not None and self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.model_params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                with torch.no_grad():
                    mbm = mb_mask.to(entropy.dtype)
                    ent = (entropy.detach() * mbm).sum() / mbm.sum().clamp(min=1)
                    rows.append(torch.cat([st["_vector"].float(), ent.float()[None]]))
                    # -1 marks padding (a ratio is never negative; exp can underflow to a real 0).
                    ratios.append(torch.where(mbm != 0, torch.exp(logprob.detach() - old_logprobs[idx]), -1.0))
                last_policykl = st["_vector"][_POLICYKL]
            if cfg.early_stopping and self._early_stop(last_policykl):
                break
        return torch.stack(rows), torch.cat(ratios)

    def _train_mode_without_dropout(self) -> None:
        """Eval mode, as TRL trains (no dropout, so the first epoch's ratio is exactly 1). With
        ``gradient_checkpointing`` the checkpointed blocks alone are flagged as training, because transformers
        checkpoints a block only when ``block.training`` is set: TRL's eval mode silently turned checkpointing off.
        Their submodules (attention, MLP, dropout) stay in eval mode, so no dropout applies."""
        self.model.eval()
        for module in self._checkpointed_blocks:  # empty without gradient_checkpointing
            module.training = True

    def _early_stop(self, policykl: torch.Tensor) -> bool:
        """TRL's rule (stop when the last minibatch's policy KL > 1.5 target_kl), decided on the KL
        averaged over all processes, so every rank takes the same decision."""
        kl = policykl.detach().float().reshape(1)
        if self.is_distributed:
            kl = self.accelerator.reduce(kl, reduction="mean")
        stop = float(kl) > 1.5 * self.config.target_kl
        if stop:
            self.optimizer.zero_grad()
        return stop

    # ------------------------------------------------------------------------------------ stats
    def _record_step_stats(
        self,
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
        acc = self.accelerator
        m = mask.to(torch.float32)
        device = self.current_device
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
        train = train_rows.mean(0)
        arrays = {
            "objective/logprobs": logprobs.float(),
            "objective/ref_logprobs": ref_logprobs.float(),
            "advantages": rollout.advantages.float(),
            "mask": m,
        }
        if self.is_distributed:
            per_row = acc.gather(per_row)
            train = acc.reduce(train, reduction="mean")
            arrays = {k: acc.gather(v) for k, v in arrays.items()}
            ratios = acc.gather(ratios)
        # One device-to-host transfer of everything at the end of the step.
        per_row = per_row.double().cpu().numpy()
        train = train.double().cpu().tolist()
        arrays = {k: v.cpu().numpy() for k, v in arrays.items()}
        ratios = ratios.cpu().numpy()

        cols = dict(zip(_ROW_COLUMNS, per_row.T))
        n_tokens = cols["tokens"].sum()
        score = cols["score"]
        stats: dict[str, Any] = {
            "objective/kl": float(cols["kl"].mean()),
            "objective/kl_dist": cols["kl"].astype(np.float32),
            "objective/logprobs": arrays["objective/logprobs"],
            "objective/ref_logprobs": arrays["objective/ref_logprobs"],
            "objective/kl_coef": float(self.kl_ctl.value),
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
        if stats["ppo/policy/skipped"] > 0:
            warnings.warn(
                f"PPOTrainer.step: {stats['ppo/policy/skipped']:.0%} of the minibatches had a mean policy ratio above "
                f"ratio_threshold={self.config.ratio_threshold} and were skipped",
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

    def log_stats(
        self,
        stats: dict[str, Any],
        batch: dict[str, Any],
        rewards: Sequence[torch.Tensor] | torch.Tensor,
        columns_to_log: Sequence[str] = ("query", "response"),
    ) -> None:
        """Log ``stats`` (from ``step``) with the batch's reward mean/std/distribution to the tracker
        (``config.log_with``); with wandb, also a table of ``columns_to_log`` and rewards."""
        if isinstance(rewards, torch.Tensor):
            rewards = rewards.reshape(-1).float()
        else:
            rewards = torch.stack([torch.as_tensor(r).reshape(()).float() for r in rewards])
        rewards = self.accelerator.gather(rewards.to(self.current_device)).reshape(-1).cpu()
        missing = [c for c in columns_to_log if c not in batch]
        if missing:
            raise ValueError(f"PPOTrainer.log_stats: batch has no column(s) {missing}; it has {sorted(batch)}")
        columns = [list(batch[c]) for c in columns_to_log]
        if self.is_distributed:
            from accelerate.utils import gather_object

            columns = [gather_object(c) for c in columns]
        if not self.accelerator.is_main_process:
            return
        logs: dict[str, Any] = {}
        if self.config.log_with == "wandb":
            import wandb

            rows = [list(r) for r in zip(*columns, rewards.tolist())]
            logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"], rows=rows)
        logs.update(stats)
        logs["env/reward_mean"] = float(rewards.mean())
        logs["env/reward_std"] = float(rewards.std()) if rewards.numel() > 1 else float("nan")
        logs["env/reward_dist"] = rewards.numpy()
        if self.config.log_with == "tensorboard":
            logs = {k: v for k, v in logs.items() if isinstance(v, (int, float, str))}
        self.accelerator.log(logs, step=self.current_step)

    # ------------------------------------------------------------------------------------ generate
    @contextlib.contextmanager
    def _unwrapped_for_generation(self, model: Any) -> Iterator[AutoModelForCausalLMWithValueHead]:
        """The bare module; under ZeRO-3 its parameters are gathered once for the whole ``generate``
        call instead of once per generated token."""
        unwrapped = self.accelerator.unwrap_model(model)
        if (
            self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and getattr(model, "zero_optimization_stage", lambda: 0)() == 3
        ):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield unwrapped
        else:
            yield unwrapped

    @torch.no_grad()
    def generate(
        self,
        query_tensor: torch.Tensor | list[torch.Tensor],
        length_sampler: Callable[[], int] | None = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        generate_ref_response: bool = False,
        **generation_kwargs: Any,
    ) -> Any:
        """Generate responses: a 1-D query gives a [1, L] tensor; a list of 1-D queries is generated in
        left-padded batches of ``batch_size`` and gives a list of 1-D tensors (padding removed, cut after
        the first EOS). ``length_sampler()`` draws ``max_new_tokens`` per batch; ``return_prompt=False``
        returns the responses only; ``generate_ref_response`` also returns the reference's."""
        if batch_size < 1:
            raise ValueError(f"PPOTrainer.generate: batch_size must be >= 1, got {batch_size}")
        generation_kwargs.setdefault("pad_token_id", self._pad_id)
        ref = None
        if generate_ref_response:
            ref = self.model if self.is_peft_model else self.ref_model
        if isinstance(query_tensor, (list, tuple)):
            for i, q in enumerate(query_tensor):
                if not isinstance(q, torch.Tensor) or q.dim() != 1 or q.numel() < 1:
                    raise ValueError(
                        f"PPOTrainer.generate: query_tensor[{i}] must be a non-empty 1-D tensor of token ids"
                    )
            out = self._generate_batched(
                self.model, query_tensor, length_sampler, batch_size, return_prompt, **generation_kwargs
            )
            if ref is not None:
                with self._ref_generation_ctx():
                    ref_out = self._generate_batched(
                        ref, query_tensor, length_sampler, batch_size, return_prompt, **generation_kwargs
                    )
                return out, ref_out
            return out
        if not isinstance(query_tensor, torch.Tensor) or query_tensor.dim() != 1:
            raise ValueError(
                "PPOTrainer.generate: query_tensor must be a 1-D tensor of token ids or a list of them, got "
                f"{getattr(query_tensor, 'shape', type(query_tensor).__name__)}"
            )
        if length_sampler is not None:
            generation_kwargs["max_new_tokens"] = length_sampler()
        ids = query_tensor.to(self.current_device)[None]
        with self._unwrapped_for_generation(self.model) as m:
            response = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generation_kwargs)
        if not return_prompt:
            response = response[:, ids.shape[1] :]
        if ref is not None:
            with self._ref_generation_ctx(), self._unwrapped_for_generation(ref) as m:
                ref_response = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generation_kwargs)
            if not return_prompt:
                ref_response = ref_response[:, ids.shape[1] :]
            return response, ref_response
        return response

    def _ref_generation_ctx(self):
        if self.is_peft_model:
            return self.accelerator.unwrap_model(self.model).disable_adapter()
        return contextlib.nullcontext()

    def _generate_batched(
        self,
        model: Any,
        queries: Sequence[torch.Tensor],
        length_sampler: Callable[[], int] | None,
        batch_size: int,
        return_prompt: bool,
        remove_padding: bool = True,
        **generation_kwargs: Any,
    ) -> list[torch.Tensor]:
        outputs = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        device = self.current_device
        for i in range(0, len(queries), batch_size):
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            batch = [q.to(device) for q in queries[i : i + batch_size]]
            width = max(len(q) for q in batch)
            ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long, device=device)
            am = torch.zeros_like(ids)
            for j, q in enumerate(batch):  # left padding: generation continues every row at the end
                ids[j, width - len(q) :] = q
                am[j, width - len(q) :] = 1
            with self._unwrapped_for_generation(model) as m:
                generations = m.generate(input_ids=ids, attention_mask=am, **generation_kwargs)
            for q, generation in zip(batch, generations):
                output = generation[width - len(q) :]
                if not return_prompt:
                    output = output[len(q) :]
                if remove_padding and eos is not None:
                    hits = (output[len(q) if return_prompt else 0 :] == eos).nonzero()
                    if len(hits):
                        output = output[: int(hits[0, 0]) + (len(q) if return_prompt else 0) + 1]  # keep the EOS
                outputs.append(output)
        return outputs

    # ------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """The policy with its value head (consolidated from all ranks under ZeRO-3) and the tokenizer,
        loadable with ``AutoModelForCausalLMWithValueHead.from_pretrained`` without DeepSpeed."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(self.model)
            unwrapped.save_pretrained(save_directory, state_dict=state_dict)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(save_directory)
        self.accelerator.wait_for_everyone()

    def _save_pretrained(self, save_directory: str | os.PathLike) -> None:  # TRL's name
        self.save_pretrained(save_directory)

    def save_checkpoint(self, checkpoint_dir: str | os.PathLike, user_state: dict[str, Any] | None = None) -> None:
        """Everything a resumed run needs: model and value head, optimizer (8-bit state included), scheduler,
        running score moments, KL controller, step count and every process's RNG states (``accelerator.save_state``;
        under DeepSpeed its partitioned format), plus the consolidated policy in ``pretrained/`` (loadable with
        ``AutoModelForCausalLMWithValueHead.from_pretrained`` without DeepSpeed) and ``ppo_fast_checkpoint.json``
        saying how it was written. ``user_state`` (JSON) is saved with it and returned by ``load_checkpoint``, so a
        training script's own counters are part of the same atomic checkpoint. Call it on every process.

        The write is atomic: everything goes to ``.<name>.partial`` next to ``checkpoint_dir``, is flushed to disk and
        listed in a manifest (sizes and SHA-256), and only then replaces ``checkpoint_dir``; a crash at any point
        leaves the previous checkpoint of that name (if any) complete and loadable. The trainer's own state is JSON
        and safetensors; every pickle (accelerate's and DeepSpeed's) loads with ``weights_only=True``."""
        checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
        if user_state is not None:
            if not isinstance(user_state, dict):
                raise TypeError(
                    f"PPOTrainer.save_checkpoint: user_state must be a dict or None, got {type(user_state).__name__}"
                )
            try:
                json.dumps(user_state, allow_nan=True)
            except (TypeError, ValueError) as e:
                raise TypeError(f"PPOTrainer.save_checkpoint: user_state must be JSON-serialisable ({e})") from None
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"PPOTrainer.save_checkpoint: checkpoint_dir {checkpoint_dir} is a file")
        checksum = self._checkpoint_state.reference_checksum()  # collective under ZeRO-3
        writer = self.accelerator.is_main_process
        stage = _ckpt.staging_path(checkpoint_dir)
        if writer:
            _ckpt.begin(checkpoint_dir)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(stage, safe_serialization=False)
        self.save_pretrained(os.path.join(stage, _PRETRAINED_DIR))
        if writer:
            from safetensors.torch import save_file

            state = self._checkpoint_state.state_dict()
            state["reference_checksum"] = checksum
            _ckpt.write_json(os.path.join(stage, _TRAINER_STATE), state)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.running.state_dict().items()},
                os.path.join(stage, _RUNNING_MOMENTS),
            )
            if self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(stage, _LR_SCHEDULER))
            if user_state is not None:
                _ckpt.write_json(os.path.join(stage, _USER_STATE), user_state)
            _ckpt.write_json(os.path.join(stage, _CHECKPOINT_META), self._checkpoint_layout())
        _ckpt.flush(stage)  # every process: the files it wrote are on disk before the manifest says so
        self.accelerator.wait_for_everyone()
        if writer:
            _ckpt.publish(stage, checkpoint_dir)
        self.accelerator.wait_for_everyone()

    def _checkpoint_layout(self) -> dict[str, Any]:
        return {
            "format": "deepspeed" if self.accelerator.distributed_type == DistributedType.DEEPSPEED else "accelerate",
            "num_processes": self.accelerator.num_processes,
            "zero_stage": getattr(self.model, "zero_optimization_stage", lambda: 0)(),
            "current_step": self.current_step,
            "lr_scheduler": self.lr_scheduler is not None,
        }

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
        """Restore what ``save_checkpoint`` wrote; the next ``step`` continues as the original run would. Returns
        the ``user_state`` saved with it (None if none was).

        Resumed with the same launch (processes, DeepSpeed stage), everything comes back exactly. A DeepSpeed
        checkpoint loaded without DeepSpeed (e.g. one process) restores the consolidated policy, scheduler, running
        moments, KL controller and step count, and warns that the optimizer state (partitioned by DeepSpeed) and the
        RNG states start afresh.

        Everything is checked before anything changes: every file against the manifest (a missing, truncated or
        altered file is refused, naming it), every pickle with ``weights_only=True`` (one that would run code is
        refused, naming it), the model's parameter names and shapes, the optimizer's groups and states, the RNG
        states, the running moments and the reference model. A load that raises leaves the trainer as it was.

        The frozen reference model is not in the checkpoint (it would double its size): build the trainer as the
        original run did (same base model, same ``num_shared_layers``) and then load. A checksum of the reference's
        weights is saved, so a different reference is an error here, raised before anything is loaded."""
        who = "PPOTrainer.load_checkpoint"
        checkpoint_dir = os.fspath(checkpoint_dir)
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"{who}: no checkpoint directory at {checkpoint_dir}")
        meta_path = os.path.join(checkpoint_dir, _CHECKPOINT_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{who}: {checkpoint_dir} is not a checkpoint of this trainer (no {_CHECKPOINT_META}); write one "
                "with save_checkpoint"
            )
        files = _ckpt.verify_manifest(checkpoint_dir, who=who)
        _ckpt.check_pickles(checkpoint_dir, files)

        def path(name: str) -> str:
            return os.path.join(checkpoint_dir, name)

        saved_layout = _ckpt.read_json(meta_path, who=who)
        here = self._checkpoint_layout()
        if not isinstance(saved_layout, dict) or not {"format", "num_processes", "zero_stage"} <= saved_layout.keys():
            raise ValueError(f"{who}: {meta_path} is not a ppo_fast checkpoint layout")
        if bool(saved_layout.get("lr_scheduler")) != (self.lr_scheduler is not None):
            raise ValueError(
                f"{who}: the checkpoint was written {'with' if saved_layout.get('lr_scheduler') else 'without'} an "
                f"lr_scheduler and this trainer has {'one' if self.lr_scheduler is not None else 'none'}"
            )
        trainer_state = _ckpt.read_json(path(_TRAINER_STATE), who=who)
        self._checkpoint_state.check_compatible(trainer_state, check_reference=True)
        running = self._read_running_moments(path(_RUNNING_MOMENTS))
        scheduler = _ckpt.safe_load(path(_LR_SCHEDULER)) if self.lr_scheduler is not None else None
        user_state = _ckpt.read_json(path(_USER_STATE), who=who) if os.path.isfile(path(_USER_STATE)) else None

        native = saved_layout["format"] == here["format"] and (
            here["format"] == "accelerate"
            or (saved_layout["num_processes"], saved_layout["zero_stage"])
            == (here["num_processes"], here["zero_stage"])
        )
        if native and here["format"] == "accelerate":
            loaded = self._read_accelerate_state(checkpoint_dir)
        elif native:  # DeepSpeed reads its own files, through safe_load (the checks above already passed)
            loaded = None
        elif here["format"] == "deepspeed":
            raise ValueError(
                f"{who}: the checkpoint was written by {saved_layout['num_processes']} process(es) "
                f"({saved_layout['format']}, ZeRO stage {saved_layout['zero_stage']}) and this trainer runs DeepSpeed "
                f"ZeRO-{here['zero_stage']} on {here['num_processes']}; resume with the original launch, or start "
                f"from the consolidated policy in {path(_PRETRAINED_DIR)}"
            )
        else:  # DeepSpeed's partitioned checkpoint in a run without DeepSpeed: the consolidated policy
            loaded = {"model": self._read_pretrained(path(_PRETRAINED_DIR))}

        # -- everything is read and checked; from here on the state changes
        if loaded is None:
            with _safe_deepspeed_loads(self.model):
                self.accelerator.load_state(checkpoint_dir)
        elif "optimizer" in loaded:
            self._apply_accelerate_state(loaded)
        else:
            with torch.no_grad():
                self.accelerator.unwrap_model(self.model).load_state_dict(loaded["model"])
        self.running.load_state_dict(running)
        if scheduler is not None:
            self.lr_scheduler.load_state_dict(scheduler)
        self._checkpoint_state.load_state_dict(trainer_state)
        if not native:
            warnings.warn(
                f"{who}: {checkpoint_dir} was written under DeepSpeed ZeRO-{saved_layout['zero_stage']} by "
                f"{saved_layout['num_processes']} processes; restored the policy, scheduler, running moments, KL "
                "controller and step count; the optimizer state (partitioned by DeepSpeed) and the RNG states start "
                "afresh",
                UserWarning,
                stacklevel=2,
            )
        return user_state

    # ------------------------------------------------------------------------------------ checkpoint reading
    def _read_running_moments(self, path: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"PPOTrainer.load_checkpoint: checkpoint file {path} cannot be read ({e})") from None
        _check_tensors_like(state, self.running.state_dict(), path, "running moments")
        if not torch.isfinite(state["state"]).all() or state["state"][0] < 0:
            raise ValueError(f"PPOTrainer.load_checkpoint: {path} holds invalid running moments {state['state']}")
        return state

    def _read_pretrained(self, directory: str) -> dict[str, torch.Tensor]:
        """The consolidated policy's state dict, checked against this trainer's model."""
        pretrained = AutoModelForCausalLMWithValueHead.from_pretrained(directory)
        state = pretrained.state_dict()
        del pretrained
        _check_tensors_like(state, self.accelerator.unwrap_model(self.model).state_dict(), directory, "model")
        return state

    def _read_accelerate_state(self, checkpoint_dir: str) -> dict[str, Any]:
        """Read and check what ``accelerator.save_state`` wrote for this process (model, optimizer, RNG, scaler),
        without applying any of it."""
        who = "PPOTrainer.load_checkpoint"
        acc = self.accelerator
        if len(acc._models) != 1 or len(acc._optimizers) != 1:
            raise ValueError(
                f"{who}: expected one prepared model and optimizer, found {len(acc._models)} and {len(acc._optimizers)}"
            )
        model_path = os.path.join(checkpoint_dir, "pytorch_model.bin")
        model = _ckpt.safe_load(model_path, mmap=True)
        _check_tensors_like(model, acc._models[0].state_dict(), model_path, "model")
        opt_path = os.path.join(checkpoint_dir, "optimizer.bin")
        if not os.path.isfile(opt_path):
            raise ValueError(f"{who}: checkpoint file {opt_path} is missing")
        optimizer = _ckpt.safe_load(opt_path)
        _check_optimizer_state(optimizer, self.optimizer.state_dict(), opt_path)
        rng_path = os.path.join(checkpoint_dir, f"random_states_{acc.process_index}.pkl")
        if not os.path.isfile(rng_path):
            raise ValueError(f"{who}: checkpoint file {rng_path} is missing (this process's RNG states)")
        rng = _ckpt.safe_load(rng_path)
        _check_rng_states(rng, rng_path)
        scaler_path = os.path.join(checkpoint_dir, "scaler.pt")
        scaler = None
        if acc.scaler is not None:
            if not os.path.isfile(scaler_path):
                raise ValueError(f"{who}: checkpoint file {scaler_path} is missing (this run scales fp16 losses)")
            scaler = _ckpt.safe_load(scaler_path)
        custom = []  # objects the user registered with accelerator.register_for_checkpointing
        for i in range(len(acc._custom_objects)):
            custom_path = os.path.join(checkpoint_dir, f"custom_checkpoint_{i}.pkl")
            if not os.path.isfile(custom_path):
                raise ValueError(f"{who}: checkpoint file {custom_path} is missing (a registered object's state)")
            custom.append(_ckpt.safe_load(custom_path))
        return {"model": model, "optimizer": optimizer, "rng": rng, "scaler": scaler, "custom": custom}

    def _apply_accelerate_state(self, loaded: dict[str, Any]) -> None:
        """What ``accelerator.load_state`` does for one model and optimizer, from state read and checked by
        ``_read_accelerate_state``. The optimizer goes first: its own ``load_state_dict`` checks before it changes."""
        import random

        acc = self.accelerator
        acc._optimizers[0].load_state_dict(loaded["optimizer"])
        acc._models[0].load_state_dict(loaded["model"])
        if loaded["scaler"] is not None:
            acc.scaler.load_state_dict(loaded["scaler"])
        rng = loaded["rng"]
        random.setstate(rng["random_state"])
        np.random.set_state(rng["numpy_random_seed"])
        torch.set_rng_state(rng["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in rng:
            torch.cuda.set_rng_state_all(rng["torch_cuda_manual_seed"])
        if "step" in rng:
            acc.step = int(rng["step"])
        for obj, state in zip(acc._custom_objects, loaded["custom"]):
            obj.load_state_dict(state)


def _check_tensors_like(state: Any, expected: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``state`` has exactly ``expected``'s keys, each a tensor of the same shape (and dtype class)."""
    who = "PPOTrainer.load_checkpoint"
    if not isinstance(state, dict):
        raise ValueError(f"{who}: {path} does not hold a {what} state dict (found {type(state).__name__})")
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"{who}: {path} does not match this trainer's {what}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for k, want in expected.items():
        have = state[k]
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            shape = tuple(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise ValueError(f"{who}: {path}: {what} entry {k!r} is {shape}, this trainer's is {tuple(want.shape)}")
        if have.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ValueError(f"{who}: {path}: {what} entry {k!r} has dtype {have.dtype}, this trainer's {want.dtype}")


def _check_optimizer_state(state: Any, current: dict[str, Any], path: str) -> None:
    """The saved optimizer state fits this optimizer: same groups with the same number of parameters, per-parameter
    states for parameters that exist, tensors only where this optimizer (if it has stepped) has tensors of the same
    shape. The optimizer's own ``load_state_dict`` checks the rest before it changes anything."""
    who = "PPOTrainer.load_checkpoint"
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("param_groups"), list)
        or not isinstance(state.get("state"), dict)
    ):
        raise ValueError(f"{who}: {path} does not hold an optimizer state dict")
    groups, now = state["param_groups"], current["param_groups"]
    if len(groups) != len(now) or any(
        not isinstance(g, dict) or len(g.get("params", ())) != len(c["params"]) for g, c in zip(groups, now)
    ):
        raise ValueError(
            f"{who}: {path} holds an optimizer of {[len(g.get('params', ())) for g in groups]} parameters per group, "
            f"this trainer's has {[len(c['params']) for c in now]}"
        )
    ids = {i for g in groups for i in g["params"]}
    for pid, entry in state["state"].items():
        if pid not in ids or not isinstance(entry, dict):
            raise ValueError(f"{who}: {path} holds a state for parameter {pid!r}, which no group lists")
    by_saved = {i: c for g, cg in zip(groups, now) for i, c in zip(g["params"], cg["params"])}
    for pid, entry in state["state"].items():
        mine = current["state"].get(by_saved[pid])
        if mine is None:
            continue
        for key, value in entry.items():
            ref = mine.get(key)
            if isinstance(ref, torch.Tensor) and (not isinstance(value, torch.Tensor) or value.shape != ref.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{who}: {path}: optimizer state {key!r} of parameter {pid} is {shape}, this optimizer's is "
                    f"{tuple(ref.shape)}"
                )


def _check_rng_states(rng: Any, path: str) -> None:
    who = "PPOTrainer.load_checkpoint"
    keys = ("random_state", "numpy_random_seed", "torch_manual_seed")
    if not isinstance(rng, dict) or any(k not in rng for k in keys):
        raise ValueError(f"{who}: {path} does not hold RNG states (expected keys {list(keys)})")
    t = rng["torch_manual_seed"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        raise ValueError(f"{who}: {path}: torch_manual_seed is not a torch RNG state")
    import random

    probe_py, probe_np = random.Random(), np.random.RandomState()
    try:  # on throwaway generators: a malformed state raises here, not half-way through the load
        probe_py.setstate(rng["random_state"])
        probe_np.set_state(rng["numpy_random_seed"])
        torch.Generator().set_state(t)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{who}: {path} holds a malformed RNG state ({e})") from None


@contextlib.contextmanager
def _safe_deepspeed_loads(engine: Any) -> Iterator[None]:
    """DeepSpeed's checkpoint engine unpickles with ``weights_only=False``; while it loads this trainer's
    checkpoint, it reads through ``safe_load`` instead."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield
        return
    original = ce.load

    def load(path: str, map_location: Any = None) -> Any:
        return _ckpt.safe_load(path, map_location=map_location)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


class _TrainerState:
    """The trainer's own counters, saved as JSON: KL controller, step count and the reference's checksum."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_step": self.trainer.current_step,
            "kl_ctl": self.trainer.kl_ctl.state_dict(),
            "kl_ctl_type": type(self.trainer.kl_ctl).__name__,
            "reference_checksum": None,  # filled by save_checkpoint (a collective under ZeRO-3)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_compatible(state, check_reference=False)  # load_checkpoint checked it, on every process
        self.trainer.current_step = int(state["current_step"])
        self.trainer.kl_ctl.load_state_dict(state["kl_ctl"])

    def reference_checksum(self) -> list[float] | None:
        """Sum and absolute sum (fp64) of the reference's weights but its (unused) value head; None for a PEFT
        policy (its reference is the base model, saved with the policy). Under ZeRO-3 each rank sums the valid part
        of its own shard and the sums are all-reduced (a collective: every process calls this)."""
        ref = self.trainer.ref_model
        if ref is None:
            return None
        total = torch.zeros(2, dtype=torch.float64, device=self.trainer.current_device)
        sharded = False
        rank = self.trainer.accelerator.process_index
        for name, p in ref.named_parameters():
            if "v_head" in name.split("."):  # unused by the reference, and initialised from the global RNG
                continue
            if hasattr(p, "ds_tensor"):  # this rank's flat shard; its tail past the parameter is padding
                sharded = True
                part = p.ds_tensor.numel()
                valid = max(0, min(part, p.ds_numel - rank * part))
                data = p.ds_tensor.detach().reshape(-1)[:valid]
            else:
                data = p.detach()
            data = data.to(total.device, torch.float64)
            total += torch.stack([data.sum(), data.abs().sum()])
        if sharded:  # the shards' valid parts are disjoint, so their sums add up to the whole's
            total = self.trainer.accelerator.reduce(total, reduction="sum")
        return total.cpu().tolist()

    def check_compatible(self, state: Any, *, check_reference: bool) -> None:
        """Raise (before anything is applied) unless ``state`` is a well-formed trainer state of this trainer."""
        if not isinstance(state, dict):
            raise ValueError(f"PPOTrainer.load_checkpoint: the trainer state {_TRAINER_STATE} is not a JSON object")
        kind = state.get("kl_ctl_type")
        if kind is not None and kind != type(self.trainer.kl_ctl).__name__:
            raise ValueError(
                f"PPOTrainer.load_checkpoint: the checkpoint was written with a {kind} but this trainer has a "
                f"{type(self.trainer.kl_ctl).__name__} (config.adap_kl_ctrl differs)"
            )
        kl_keys = self.trainer.kl_ctl.state_dict().keys()
        if (
            isinstance(state.get("current_step"), bool)
            or not isinstance(state.get("current_step"), int)
            or state["current_step"] < 0
            or not isinstance(state.get("kl_ctl"), dict)
            or state["kl_ctl"].keys() != kl_keys
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in state["kl_ctl"].values())
        ):
            raise ValueError(
                f"PPOTrainer.load_checkpoint: the trainer state {_TRAINER_STATE} is malformed (expected a "
                f"non-negative current_step and a kl_ctl with finite {sorted(kl_keys)}); got {state!r:.200}"
            )
        saved = state.get("reference_checksum")
        if not check_reference or saved is None:  # None: a PEFT policy's reference, or written by save_state alone
            return
        now = self.reference_checksum()
        if now is None or not all(abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1.0) for a, b in zip(saved, now)):
            raise ValueError(
                "PPOTrainer.load_checkpoint: this trainer's reference model differs from the one the checkpoint was "
                f"trained against (weight checksums {now} vs {saved}); build the trainer from the same base model "
                "(and num_shared_layers) as the original run, then load the checkpoint"
            )
