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

This module holds the orchestration: the setup, ``step``, the minibatch loop and the public API. The batch's
checks, steps 2 and 3 are in ``rollout``, step 7 and ``log_stats`` in ``stats``, ``generate`` in ``generation``,
and ``save_checkpoint`` / ``load_checkpoint`` in ``checkpoint``.

The minibatch loop never synchronises with the host except for the early-stopping decision (once
per epoch, and only with ``early_stopping=True``). ``use_fused_kernels=False`` runs the same trainer
on the eager reference (``ppo_fast.reference``), for A/B comparisons.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from ppo_fast import functional as F
from ppo_fast.models import AutoModelForCausalLMWithValueHead, create_reference_model
from ppo_fast.reference import PPO_LOSS_STATS
from ppo_fast.trainer import activations as _activations
from ppo_fast.trainer import checkpoint as _ckpt
from ppo_fast.trainer import estimators as _estimators
from ppo_fast.trainer import generation as _generation
from ppo_fast.trainer import lm_head as _lm_head
from ppo_fast.trainer import rollout as _rollout
from ppo_fast.trainer import stats as _stats
from ppo_fast.trainer.config import PPOConfig
from ppo_fast.trainer.distributed import build_accelerator
from ppo_fast.trainer.kl_controllers import AdaptiveKLController, FixedKLController
from ppo_fast.trainer.running_moments import RunningMoments
from ppo_fast.trainer.trunk import FrozenTrunk

__all__ = ["PPOTrainer"]

_POLICYKL = PPO_LOSS_STATS.index("policy/policykl")  # in the loss op's stats vector


def _empty_device_cache(device: torch.device) -> None:
    """Return cached device memory to the driver (``optimize_device_cache``). Nothing on the CPU: its allocator
    keeps no cache, and a ``gc.collect()`` there only costs time (~0.15 s each in a process that imported
    transformers: three per step doubled a small model's step)."""
    if device.type == "cpu":
        return
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
        model, ref_model = _estimators.accept_models(config, model, ref_model)  # value-free: no value head needed
        self._check_init_args(config, model, ref_model, tokenizer, optimizer, num_shared_layers, lr_scheduler)
        self.config = config
        self.use_fused = self._select_kernels(config)
        set_seed(config.seed)
        self._build_accelerator(config, model)

        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self._signature_columns: list[str] | None = None
        self.training_data_collator = training_data_collator
        self._checkpointed_blocks = self._enable_gradient_checkpointing(config, model)
        self.ref_model = self._reference_model(model, ref_model, num_shared_layers)
        self.optimizer = (
            torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
            if optimizer is None
            else optimizer
        )
        self.lr_scheduler = lr_scheduler
        self.dataloader = self.prepare_dataloader(dataset, data_collator) if dataset is not None else None
        self._prepare(config)

        self.running = RunningMoments(self.accelerator, device=self.current_device)
        self.kl_ctl = (
            AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
            if config.adap_kl_ctrl
            else FixedKLController(config.init_kl_coef)
        )
        self.current_step = 0
        self._checkpoint_state = _ckpt.TrainerState(self)  # saved by save_checkpoint as JSON, with the moments
        self._read_model_limits(tokenizer)
        self._fused_head, self._ref_fused_head = _lm_head.select(self)
        if config.fused_activations:  # last: a constructor that raised has left the user's models as they were
            _activations.fuse_activations(self.model, self.ref_model, use_fused=self.use_fused)
        if config.log_with is not None:
            _stats.init_trackers(self)

    # ------------------------------------------------------------------------------------ setup
    @staticmethod
    def _select_kernels(config: PPOConfig) -> bool:
        """``use_fused_kernels`` resolved (None: fused when the extension is built) and written back to the config."""
        use_fused = F.resolve_fused(config.use_fused_kernels, "PPOTrainer", "use_fused_kernels")
        config.use_fused_kernels = use_fused
        return use_fused

    def _build_accelerator(self, config: PPOConfig, model: AutoModelForCausalLMWithValueHead) -> None:
        """The Accelerator, and the config fields TRL derives from it and from the policy."""
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

    @staticmethod
    def _enable_gradient_checkpointing(
        config: PPOConfig, model: AutoModelForCausalLMWithValueHead
    ) -> list[torch.nn.Module]:
        """With ``config.gradient_checkpointing``: turn it on and return the checkpointed blocks (see
        ``_train_mode_without_dropout``); else none."""
        if not config.gradient_checkpointing:
            return []
        if not model.supports_gradient_checkpointing:
            raise ValueError(
                f"PPOTrainer: config.gradient_checkpointing=True but {type(model.pretrained_model).__name__} "
                "does not support gradient checkpointing"
            )
        model.gradient_checkpointing_enable()
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def _reference_model(
        self,
        model: AutoModelForCausalLMWithValueHead,
        ref_model: AutoModelForCausalLMWithValueHead | None,
        num_shared_layers: int | None,
    ) -> AutoModelForCausalLMWithValueHead | None:
        """The given reference; None for a PEFT policy (its adapter disabled is the reference); else a frozen copy
        sharing ``num_shared_layers`` blocks with the policy."""
        if ref_model is not None:
            if num_shared_layers is not None:
                warnings.warn(
                    "PPOTrainer: num_shared_layers is ignored because ref_model was given", UserWarning, stacklevel=3
                )
            return ref_model
        if self.is_peft_model:
            return None
        return create_reference_model(model, num_shared_layers=num_shared_layers)

    def _prepare(self, config: PPOConfig) -> None:
        """Model, optimizer and dataloader through ``accelerator.prepare``; the reference placed (or sharded)."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._fill_deepspeed_config(config)
        # The scheduler is not prepared: Accelerate would step it once per process (and DeepSpeed once
        # per optimizer step); PPO steps it once per `step()`, as the user expects.
        self.model, self.optimizer, self.dataloader = self.accelerator.prepare(
            self.model, self.optimizer, self.dataloader
        )
        self.ref_model = self._prepare_reference(self.ref_model)
        self.current_device = self.accelerator.device
        self.is_distributed = self.accelerator.num_processes > 1
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]
        self._trunk = FrozenTrunk(
            self.accelerator.unwrap_model(self.model),
            self.ref_model if isinstance(self.ref_model, AutoModelForCausalLMWithValueHead) else None,
            enabled=config.cache_frozen_trunk,
            partitioned=self._parameters_partitioned(),
        )

    def _parameters_partitioned(self) -> bool:
        """Whether the policy's parameters live partitioned between forwards (ZeRO-3, FSDP)."""
        if self.accelerator.distributed_type == DistributedType.FSDP:
            return True
        return any(hasattr(p, "ds_id") for p in self.model.parameters())

    def _read_model_limits(self, tokenizer: Any) -> None:
        """The vocabulary size, the position limit and the padding id that ``step`` checks and pads with."""
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
                stacklevel=4,
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

    # ------------------------------------------------------------------------------------ rollout
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

    def _policy_logprobs(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training forward: log-probs and entropy [mb, L - 1] (zero before ``start``, which no response
        needs, with the fused LM head) and values [mb, L]."""
        if self._fused_head:
            logprob, entropy, vpreds = self.model(
                input_ids=ids,
                attention_mask=attention_mask,
                use_cache=False,
                logprobs_of=ids[:, start + 1 :],
                logprobs_from=start,
                return_entropy=True,
                use_fused=self.use_fused,
            )
            pad = torch.nn.functional.pad
            return pad(logprob, (start, 0)), pad(entropy, (start, 0)), vpreds
        logits, _, vpreds = self.model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        logprob, entropy = self._logprobs(logits[:, :-1], ids[:, 1:], train=True)
        return logprob, entropy, vpreds

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
        queries, responses, scores, response_masks = _rollout.check_step_inputs(
            self, queries, responses, scores, response_masks
        )
        input_ids, attention_mask, mask = _rollout.build_inputs(self, queries, responses, response_masks)
        # -- nothing above changed any state; from here on the step runs
        if cfg.optimize_device_cache:
            _empty_device_cache(self.current_device)
        t0 = time.perf_counter()
        timing = {}
        if cfg.use_score_scaling:
            scores, _ = self.running.update_normalize(
                scores, scale=True, center=cfg.use_score_norm, clip=cfg.score_clip, validate=False
            )
        elif cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

        t = time.perf_counter()
        # The first log-prob position that any response needs: the fused LM head skips the ones before it.
        start = min(len(q) for q in queries) - 1
        logprobs, values, ref_logprobs, kl_full, trunk = _rollout.forward(self, input_ids, attention_mask, start)
        timing["time/ppo/forward_pass"] = time.perf_counter() - t
        if cfg.optimize_device_cache:
            _empty_device_cache(self.current_device)

        t = time.perf_counter()
        maskf = mask.to(values.dtype)
        values = values * maskf
        if cfg.uses_value_head:
            rollout = _rollout.advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_full)
        else:  # value-free: the loss sees vpreds = old values = returns, so its value term is exactly 0
            rollout = _estimators.advantages(self, scores, logprobs, ref_logprobs, mask, kl_full)
            values = rollout.returns
        timing["time/ppo/compute_advantages"] = time.perf_counter() - t

        t = time.perf_counter()
        train_rows, ratios = self._optimize(
            input_ids, attention_mask, mask, logprobs, ref_logprobs, values, rollout, trunk, start
        )
        timing["time/ppo/optimize_step"] = time.perf_counter() - t
        if cfg.optimize_device_cache:
            _empty_device_cache(self.current_device)

        t = time.perf_counter()
        stats = _stats.step_stats(
            self, scores, logprobs, ref_logprobs, mask, rollout, train_rows, ratios, queries, responses
        )
        if not cfg.uses_value_head:
            _estimators.drop_value_stats(stats)
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
        trunk: torch.Tensor | None,
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PPO epochs over shuffled minibatches (``trunk``: the frozen trunk's output from the rollout, or None;
        ``start``: the first log-prob position a response needs).
        Returns the per-minibatch stat rows
        [n_minibatches, len(PPO_LOSS_STATS) + 1] and the policy ratios [n_minibatches x mb, T], -1 where masked."""
        cfg = self.config
        bs, mbs = cfg.batch_size, cfg.mini_batch_size
        device = self.current_device
        rows, ratios = [], []
        use_ref = cfg.kl_loss_coef > 0
        ops = F.backend(self.use_fused)
        vf_coef = float(cfg.vf_coef) if cfg.uses_value_head else 0.0  # value-free: no value loss
        loss_scalars = (
            float(cfg.cliprange), float(cfg.cliprange_value), vf_coef, float(cfg.kl_loss_coef),
            cfg.kl_estimator, None if cfg.dual_clip is None else float(cfg.dual_clip),
            None if cfg.log_ratio_clamp is None else float(cfg.log_ratio_clamp),
            cfg.loss_aggregation, float(cfg.ratio_threshold),
            None if cfg.cliprange_high is None else float(cfg.cliprange_high),
        )  # fmt: skip
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(bs).to(device)
            last_policykl = None
            for first in range(0, bs, mbs):
                idx = perm[first : first + mbs]
                mb_mask = mask[idx]
                with self.accelerator.accumulate(self.model):
                    self._train_mode_without_dropout()
                    ids = input_ids[idx]
                    with self._trunk.replay(
                        self._trunk.blocks, self._trunk.depth, None if trunk is None else trunk[idx]
                    ):
                        logprob, entropy, vpreds = self._policy_logprobs(ids, attention_mask[idx], start)
                    # GSPO (importance_sampling_level="sequence"): the sequence ratio through the same op.
                    logprob, mb_ref = _estimators.importance_logprobs(
                        cfg, logprob, old_logprobs[idx], ref_logprobs[idx] if use_ref else None, mb_mask
                    )
                    # Inputs built by the trainer: the op itself (its C++ checks remain), not functional's checks.
                    loss, stats, _ = ops.ppo_loss(
                        logprob,
                        vpreds[:, :-1].to(logprob.dtype) if cfg.uses_value_head else old_values[idx],
                        old_logprobs[idx],
                        old_values[idx],
                        rollout.advantages[idx],
                        rollout.returns[idx],
                        mb_mask,
                        mb_ref,
                        *loss_scalars,
                    )
                    self.accelerator.backward(loss)
                    if cfg.max_grad_norm is not None and self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.model_params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                with torch.no_grad():
                    mbm = mb_mask.to(entropy.dtype)
                    ent = (entropy.detach() * mbm).sum() / mbm.sum().clamp(min=1)
                    rows.append(torch.cat([stats.float(), ent.float()[None]]))
                    # -1 marks padding (a ratio is never negative; exp can underflow to a real 0).
                    ratios.append(torch.where(mbm != 0, torch.exp(logprob.detach() - old_logprobs[idx]), -1.0))
                last_policykl = stats[_POLICYKL]
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

    # ------------------------------------------------------------------------------------ logging, generation
    def log_stats(
        self,
        stats: dict[str, Any],
        batch: dict[str, Any],
        rewards: Sequence[torch.Tensor] | torch.Tensor,
        columns_to_log: Sequence[str] = ("query", "response"),
    ) -> None:
        """Log ``stats`` (from ``step``) with the batch's reward mean/std/distribution to the tracker
        (``config.log_with``); with wandb, also a table of ``columns_to_log`` and rewards."""
        _stats.log_stats(self, stats, batch, rewards, columns_to_log)

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
        return _generation.generate(
            self, query_tensor, length_sampler, batch_size, return_prompt, generate_ref_response, generation_kwargs
        )

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
        _ckpt.save_trainer(self, checkpoint_dir, user_state)

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
        return _ckpt.load_trainer(self, checkpoint_dir)
