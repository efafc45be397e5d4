"""A causal LM with a scalar value head: TRL 0.11's ``AutoModelForCausalLMWithValueHead`` on transformers 5."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ppo_fast.models import _loading


def _is_peft_model(module: nn.Module) -> bool:
    # peft is optional (`pip install 'ppo_fast[peft]'`) and slow to import (it imports bitsandbytes): a model
    # can only be a PeftModel if peft has been imported, so look without importing it.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def _require_peft(what: str) -> Any:
    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"from_pretrained: {what} needs peft, which is not installed: pip install 'ppo_fast[peft]'")
    import peft

    return peft


def hf_model(module: nn.Module) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (the one holding the blocks), or ``module`` itself."""
    return module.get_base_model() if _is_peft_model(module) else module


class ValueHead(nn.Module):
    """Dropout then ``Linear(hidden_size, 1)``: one scalar per token, as TRL 0.11's ``ValueHead``.

    Same submodule names as TRL (``dropout``, ``summary``), so its state_dict keys are ``summary.weight`` [1, H]
    and ``summary.bias`` [1]. ``summary_dropout_prob``: the explicit argument, else the config's
    ``summary_dropout_prob`` attribute, else 0.1 (TRL's default; TRL let the config win over the argument).
    The head keeps its own dtype (fp32 unless cast) and upcasts hidden states to it: values stay in fp32
    for a bf16/fp16 model, as in TRL.
    """

    def __init__(self, config: Any, hidden_size: int, summary_dropout_prob: float | None = None):
        super().__init__()
        if summary_dropout_prob is None:
            summary_dropout_prob = getattr(config, "summary_dropout_prob", None)
        if summary_dropout_prob is None:
            summary_dropout_prob = 0.1
        if isinstance(summary_dropout_prob, bool) or not isinstance(summary_dropout_prob, (int, float)):
            raise TypeError(f"summary_dropout_prob must be a float in [0, 1), got {summary_dropout_prob!r}")
        if not 0.0 <= summary_dropout_prob < 1.0:
            raise ValueError(f"summary_dropout_prob must be in [0, 1), got {summary_dropout_prob}")
        self.dropout = nn.Dropout(summary_dropout_prob) if summary_dropout_prob else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., H] (any float dtype) -> values [..., 1] in the head's dtype."""
        output = self.dropout(hidden_states)
        if output.dtype != self.summary.weight.dtype:
            output = output.to(self.summary.weight.dtype)
        return self.summary(output)


class AutoModelForCausalLMWithValueHead(nn.Module):
    """Any transformers causal LM (optionally with a PEFT adapter) plus a :class:`ValueHead` on its last hidden state.

    A drop-in for TRL 0.11's class of the same name:

    * ``forward(input_ids, past_key_values=None, attention_mask=None, return_past_key_values=False, **kwargs)``
      returns ``(lm_logits, loss, value)``: logits [B, T, V] (upcast to fp32 unless ``upcast_logits=False``),
      the LM loss when ``labels`` is given (else None), values [B, T] in the head's dtype (fp32 by default).
      With ``return_past_key_values=True`` the model's cache is appended.
    * ``generate(...)`` is the wrapped model's.
    * ``state_dict()`` is the wrapped model's (unprefixed keys) plus ``v_head.summary.weight`` /
      ``v_head.summary.bias``, exactly TRL's layout; ``load_state_dict`` accepts that layout (and the module's
      own ``pretrained_model.``-prefixed one).
    * ``save_pretrained(dir)`` writes the wrapped model with the value head inside its safetensors file
      (``v_head.*`` keys, as TRL); a PEFT policy writes its adapter plus ``value_head.safetensors``.
      ``from_pretrained`` finds the head in either, and in TRL's ``pytorch_model.bin``.

    Value-head options (constructor or ``from_pretrained`` keywords): ``summary_dropout_prob`` (default 0.1),
    ``v_head_init_strategy`` (None: PyTorch's default ``Linear`` init, TRL's default; ``"normal"``: weights
    ~ N(0, ``v_head_initializer_range``) with default 0.2, bias 0), and ``upcast_logits`` (default True, as TRL;
    False keeps bf16/fp16 logits, for log-prob kernels that read them directly).
    """

    transformers_parent_class = AutoModelForCausalLM
    lm_head_namings = ("lm_head", "embed_out", "output_layer")
    supported_args = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy", "upcast_logits")

    def __init__(self, pretrained_model: nn.Module, **kwargs: Any):
        super().__init__()
        if not isinstance(pretrained_model, PreTrainedModel) and not _is_peft_model(pretrained_model):
            raise TypeError(
                "AutoModelForCausalLMWithValueHead: pretrained_model must be a transformers PreTrainedModel "
                f"(or a peft PeftModel around one), got {type(pretrained_model).__name__}"
            )
        self._check_v_head_kwargs(kwargs)
        init_strategy = kwargs.get("v_head_init_strategy")
        init_range = kwargs.get("v_head_initializer_range", 0.2)
        upcast_logits = kwargs.get("upcast_logits", True)
        base = hf_model(pretrained_model)
        output_embeddings = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if output_embeddings is None and not any(hasattr(base, n) for n in self.lm_head_namings):
            raise ValueError(
                f"AutoModelForCausalLMWithValueHead: {type(base).__name__} has no language-model head; "
                "wrap a causal LM (a model that AutoModelForCausalLM loads)"
            )
        hidden_size = getattr(output_embeddings, "in_features", None) or _hidden_size(base.config)
        v_head = ValueHead(base.config, hidden_size, kwargs.get("summary_dropout_prob"))

        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.upcast_logits = upcast_logits
        self.v_head = v_head
        if init_strategy == "normal":
            with torch.no_grad():
                self.v_head.summary.weight.normal_(mean=0.0, std=init_range)
                self.v_head.summary.bias.zero_()
        # Next to the LM head: its input is the last hidden state, so no device hop on a model split by device_map.
        weight = getattr(output_embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            self.v_head.to(weight.device)
        # TRL's state_dict layout (no `pretrained_model.` prefix) must load back, also when this module is nested.
        self.register_load_state_dict_pre_hook(_accept_trl_keys)

    @classmethod
    def _check_v_head_kwargs(cls, kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(cls.supported_args))
        if unknown:
            raise TypeError(
                f"AutoModelForCausalLMWithValueHead: unexpected keyword argument(s) {unknown}; "
                f"supported: {list(cls.supported_args)}"
            )
        dropout = kwargs.get("summary_dropout_prob")
        if dropout is not None:
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
                raise TypeError(f"summary_dropout_prob must be a float in [0, 1), got {dropout!r}")
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"summary_dropout_prob must be in [0, 1), got {dropout}")
        init_strategy = kwargs.get("v_head_init_strategy")
        if init_strategy not in (None, "normal"):
            raise ValueError(f"v_head_init_strategy must be None or 'normal', got {init_strategy!r}")
        init_range = kwargs.get("v_head_initializer_range", 0.2)
        if isinstance(init_range, bool) or not isinstance(init_range, (int, float)) or not init_range > 0:
            raise ValueError(f"v_head_initializer_range must be a positive float, got {init_range!r}")
        if not isinstance(kwargs.get("upcast_logits", True), bool):
            raise TypeError(f"upcast_logits must be a bool, got {kwargs['upcast_logits']!r}")

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | nn.Module, *model_args: Any, **kwargs: Any
    ) -> AutoModelForCausalLMWithValueHead:
        """Load a causal LM (local directory, hub name or a model instance) and attach a value head.

        Every keyword that is not ours goes to ``AutoModelForCausalLM.from_pretrained``: ``dtype`` /
        ``torch_dtype``, ``device_map``, ``quantization_config``, ``attn_implementation``, ``revision``, ...
        Ours: the value-head options (see the class), ``peft_config`` (a peft ``PeftConfig``: the loaded model
        gets that adapter; a quantized one is first prepared with peft's ``prepare_model_for_kbit_training``,
        which takes ``use_gradient_checkpointing`` / ``gradient_checkpointing_kwargs``), and ``is_trainable``
        (default False, as peft and TRL: whether an adapter loaded from a PEFT checkpoint directory is trainable).

        ``load_in_8bit=True`` / ``load_in_4bit=True`` (transformers 4's spelling, which TRL's guide uses and
        transformers 5 rejects) become ``quantization_config=BitsAndBytesConfig(...)``, together with any other
        ``BitsAndBytesConfig`` option given as a keyword. The value head is never quantized, and a quantized
        model is never moved or cast: ``device_map`` places it.

        A value head saved with the checkpoint (ours or TRL 0.11's) is loaded; otherwise it is freshly
        initialised.
        """
        # Every argument of ours is checked before anything is loaded or changed (a user's model gets no adapter
        # injected if the call then fails on a bad option).
        v_head_kwargs = {k: kwargs.pop(k) for k in cls.supported_args if k in kwargs}
        cls._check_v_head_kwargs(v_head_kwargs)
        peft_config = kwargs.pop("peft_config", None)
        is_trainable = kwargs.pop("is_trainable", False)
        kbit_kwargs = {k: kwargs.pop(k) for k in _loading.KBIT_TRAINING_KWARGS if k in kwargs}
        for name in ("reward_adapter", "reward_adapter_name"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(
                    f"from_pretrained: {name} (TRL's multi-adapter reward model) is not supported by ppo_fast; "
                    "load the reward model separately"
                )
            kwargs.pop(name, None)
        if peft_config is not None:
            if not isinstance(peft_config, _require_peft("peft_config").PeftConfig):
                raise TypeError(f"from_pretrained: peft_config must be a peft PeftConfig, got {type(peft_config)}")
        if not isinstance(is_trainable, bool):
            raise TypeError(f"from_pretrained: is_trainable must be a bool, got {is_trainable!r}")

        if isinstance(pretrained_model_name_or_path, nn.Module):
            model = pretrained_model_name_or_path
            if model_args or kwargs:
                raise TypeError(
                    "from_pretrained: loading options "
                    f"{sorted(kwargs) or list(model_args)} apply when loading from a path or hub name, "
                    f"not to an already-built {type(model).__name__}"
                )
            if peft_config is not None:
                if _is_peft_model(model):
                    raise ValueError("from_pretrained: the model already has a PEFT adapter; drop peft_config")
                model = _add_adapter(model, peft_config, kbit_kwargs)
            return cls(model, **v_head_kwargs)

        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "from_pretrained: pretrained_model_name_or_path must be a path, a hub name or a transformers model, "
                f"got {type(pretrained_model_name_or_path).__name__}"
            )
        path = os.fspath(pretrained_model_name_or_path)
        _loading.translate_legacy_quantization(kwargs)
        hub_kwargs = _loading.split_hub_kwargs(kwargs)

        if importlib.util.find_spec("peft") is not None and _loading.is_peft_checkpoint(path, hub_kwargs):
            from peft import PeftConfig, PeftModel

            if peft_config is not None:
                raise ValueError(
                    f"from_pretrained: {path!r} is a PEFT adapter checkpoint with its own adapter; drop peft_config"
                )
            adapter_config = PeftConfig.from_pretrained(path, **hub_kwargs)
            base_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "subfolder")}
            base = _load_causal_lm(cls, adapter_config.base_model_name_or_path, model_args, base_kwargs)
            if _is_quantized(base):
                base = _prepare_kbit(base, kbit_kwargs)
            model = PeftModel.from_pretrained(base, path, is_trainable=is_trainable, **hub_kwargs)
        else:
            model = _load_causal_lm(cls, path, model_args, kwargs)
            if peft_config is not None:
                model = _add_adapter(model, peft_config, kbit_kwargs)

        wrapper = cls(model, **v_head_kwargs)
        state = _loading.load_value_head_state(path, hub_kwargs)
        if state is not None:
            wrapper.v_head.load_state_dict(state)
        return wrapper

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Save the wrapped model with its value head (see the class docstring for the files).

        Keywords go to the wrapped model's ``save_pretrained`` (``safe_serialization``, ``max_shard_size``,
        ``is_main_process``, ...). A ``state_dict`` given in TRL's layout is written as is.
        """
        save_directory = os.fspath(save_directory)
        state_dict = kwargs.pop("state_dict", None)
        if state_dict is not None:
            # Module-path keys (``pretrained_model.model.layers.0...``, as DeepSpeed's consolidated ZeRO-3 state
            # dict names them) become TRL's layout, which from_pretrained reads.
            inner = "pretrained_model."
            state_dict = {k[len(inner) :] if k.startswith(inner) else k: v for k, v in state_dict.items()}
        if self.is_peft_model:
            v_head_state = self.v_head.state_dict()
            if state_dict is not None:
                prefix = _loading.V_HEAD_PREFIX
                v_head_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)} or (
                    v_head_state
                )
                kwargs["state_dict"] = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
            out = self.pretrained_model.save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                _loading.save_value_head(save_directory, v_head_state)
            return out
        if state_dict is None:
            state_dict = self.state_dict()
        return self.pretrained_model.save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The wrapped model's state dict plus the value head's under ``v_head.`` (TRL 0.11's layout)."""
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args) :])[:3]
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        self.pretrained_model.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self.v_head.state_dict(destination=destination, prefix=prefix + _loading.V_HEAD_PREFIX, keep_vars=keep_vars)
        return destination

    def post_init(self, state_dict: dict[str, torch.Tensor]) -> None:
        """TRL's hook: load the ``v_head.*`` entries of a full state dict into the value head."""
        prefix = _loading.V_HEAD_PREFIX
        self.v_head.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})

    # ----------------------------------------------------------------------------------------------- running
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        return_past_key_values: bool = False,
        *,
        logprobs_of: torch.Tensor | None = None,
        logprobs_from: int = 0,
        return_entropy: bool = False,
        use_fused: bool | None = None,
        **kwargs: Any,
    ) -> tuple:
        """input_ids/attention_mask [B, T] -> (lm_logits [B, T, V], loss or None, value [B, T]); see the class.

        With ``logprobs_of`` (labels [B, T'], ppo_fast's own): the logits are never built. The hidden states at
        positions ``[logprobs_from, logprobs_from + T')`` go through the LM head chunk by chunk
        (``ppo_fast.functional.linear_logprobs``, its ``use_fused``), and the call returns
        ``(logprob [B, T'] fp32, entropy [B, T'] fp32 or None, value [B, T])``; gradients reach the hidden states
        and the head. Only for a head that ``lm_head_fusable()`` accepts. Labels are not range-checked (that would
        synchronise with the host): one outside ``[0, V)`` gives a NaN log-prob.
        """
        if logprobs_of is not None:
            return self._forward_logprobs(
                input_ids, attention_mask, logprobs_of, logprobs_from, return_entropy, use_fused, kwargs
            )
        kwargs["output_hidden_states"] = True  # the value head reads the last hidden state
        if past_key_values is not None:
            # TRL's name; transformers >= 5.24 calls the KV cache `cache` (past_key_values is deprecated there).
            kwargs[self._cache_kwarg] = past_key_values
        if _is_peft_model(self.pretrained_model) and self.pretrained_model.active_peft_config.peft_type == (
            "PREFIX_TUNING"
        ):
            kwargs.pop(self._cache_kwarg, None)  # prefix tuning supplies its own cache
        output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        last_hidden_state = output.hidden_states[-1]
        if last_hidden_state.device != self.v_head.summary.weight.device:
            last_hidden_state = last_hidden_state.to(self.v_head.summary.weight.device)
        value = self.v_head(last_hidden_state).squeeze(-1)
        lm_logits = output.logits
        if self.upcast_logits and lm_logits.dtype != torch.float32:
            lm_logits = lm_logits.float()
        if return_past_key_values:
            cache = output.get("cache", output.get("past_key_values"))  # dict access: no deprecation warning
            return lm_logits, output.loss, value, cache
        return lm_logits, output.loss, value

    def lm_head_fusable(self) -> str | None:
        """None when log-probs can come straight from the hidden states (``forward(logprobs_of=...)``): the LM head
        is a plain ``nn.Linear`` (tied or not, with or without bias) applied to the backbone's last hidden state,
        with nothing done to the logits after it. Otherwise the reason it cannot."""
        model = self.pretrained_model
        if _is_peft_model(model) and getattr(model.active_peft_config, "is_prompt_learning", False):
            return "a prompt-learning PEFT adapter adds virtual tokens in the wrapped model's forward"
        base = hf_model(model)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if type(head) is not nn.Linear:
            return f"the LM head is a {type(head).__name__}, not a plain nn.Linear (quantised or adapted?)"
        backbone = getattr(base, "base_model", base)
        if backbone is base or not isinstance(backbone, nn.Module):
            return f"{type(base).__name__} has no separate backbone (base_model) to take hidden states from"
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        for name in _LOGIT_TRANSFORMS:
            value = getattr(config, name, None)
            if value is not None and value != 1:
                return f"the model transforms its logits after the head (config.{name}={value})"
        return None

    def _forward_logprobs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        start: int,
        return_entropy: bool,
        use_fused: bool | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        from ppo_fast import functional as F

        reason = self.lm_head_fusable()
        if reason is not None:
            raise ValueError(
                f"AutoModelForCausalLMWithValueHead.forward: logprobs_of needs a fusable LM head: {reason}"
            )
        base = hf_model(self.pretrained_model)
        kwargs.pop("output_hidden_states", None)
        output = base.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = output[0]  # the last hidden state, after the final norm (what the LM head reads)
        if not 0 <= start <= hidden.shape[1] - labels.shape[1]:
            raise ValueError(
                f"AutoModelForCausalLMWithValueHead.forward: logprobs_from={start} with {labels.shape[1]} labels "
                f"does not fit {hidden.shape[1]} positions"
            )
        v_in = (
            hidden
            if hidden.device == self.v_head.summary.weight.device
            else hidden.to(self.v_head.summary.weight.device)
        )
        value = self.v_head(v_in).squeeze(-1)
        head = base.get_output_embeddings()

        def head_logprobs(h: torch.Tensor) -> Any:
            # No label-range check (a host synchronisation per call): an id outside [0, V) gives a NaN log-prob.
            return F.linear_logprobs(
                h, head.weight, labels, head.bias, return_entropy=return_entropy, validate=False, use_fused=use_fused
            )

        # Through the head module's own __call__, so its hooks run as for a logits forward (DeepSpeed ZeRO-3
        # gathers the head's weight once for the whole call, and again for the backward).
        head.forward = head_logprobs
        try:
            out = head(hidden[:, start : start + labels.shape[1]])
        finally:
            del head.forward
        logprob, entropy = out if return_entropy else (out, None)
        return logprob, entropy, value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``."""
        return self.pretrained_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the wrapped model without its PEFT adapter(s) inside the block: the PPO reference of a LoRA policy.

        A policy with a LoRA adapter needs no reference copy: its frozen base is the reference. ::

            with torch.no_grad(), policy.disable_adapter():
                ref_logits, _, _ = policy(input_ids, attention_mask=mask)

        Works for a peft ``PeftModel`` and for an adapter added with transformers' ``add_adapter``; raises
        ValueError for a model without an adapter. The value head is not affected.
        """
        model = self.pretrained_model
        if _is_peft_model(model):
            with model.disable_adapter():
                yield
        elif getattr(model, "_hf_peft_config_loaded", False):
            model.disable_adapters()
            try:
                yield
            finally:
                model.enable_adapters()
        else:
            raise ValueError(
                "disable_adapter: this model has no PEFT adapter; use create_reference_model(model) for a reference"
            )

    @property
    def _cache_kwarg(self) -> str:
        params = inspect.signature(hf_model(self.pretrained_model).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def is_peft_model(self) -> bool:
        return _is_peft_model(self.pretrained_model) or getattr(self.pretrained_model, "_hf_peft_config_loaded", False)

    @property
    def is_loaded_in_8bit(self) -> bool:
        return bool(getattr(hf_model(self.pretrained_model), "is_loaded_in_8bit", False))

    @property
    def is_loaded_in_4bit(self) -> bool:
        return bool(getattr(hf_model(self.pretrained_model), "is_loaded_in_4bit", False))

    @property
    def is_quantized(self) -> bool:
        return _is_quantized(hf_model(self.pretrained_model))

    @property
    def is_sequential_parallel(self) -> bool:
        """Whether ``device_map`` split the model over several devices."""
        device_map = getattr(hf_model(self.pretrained_model), "hf_device_map", None) or {}
        return len({str(d) for d in device_map.values()} - {"cpu", "disk"}) > 1

    @property
    def device(self) -> torch.device:
        return self.v_head.summary.weight.device

    @property
    def name_or_path(self) -> str:
        return getattr(hf_model(self.pretrained_model), "name_or_path", "")

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(hf_model(self.pretrained_model), "supports_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        return self.pretrained_model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self, *args: Any, **kwargs: Any) -> Any:
        return self.pretrained_model.gradient_checkpointing_disable(*args, **kwargs)

    def enable_input_require_grads(self) -> Any:
        return self.pretrained_model.enable_input_require_grads()

    def disable_input_require_grads(self) -> Any:
        return self.pretrained_model.disable_input_require_grads()

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.pretrained_model.prepare_inputs_for_generation(*args, **kwargs)

    # A quantized model keeps the dtype it was loaded in: casting int8/4-bit weights corrupts them.
    def to(self, *args: Any, **kwargs: Any) -> AutoModelForCausalLMWithValueHead:
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self._refuse_cast_if_quantized(f"to({dtype})")
        return super().to(*args, **kwargs)

    def half(self) -> AutoModelForCausalLMWithValueHead:
        self._refuse_cast_if_quantized("half()")
        return super().half()

    def float(self) -> AutoModelForCausalLMWithValueHead:
        self._refuse_cast_if_quantized("float()")
        return super().float()

    def bfloat16(self) -> AutoModelForCausalLMWithValueHead:
        self._refuse_cast_if_quantized("bfloat16()")
        return super().bfloat16()

    def double(self) -> AutoModelForCausalLMWithValueHead:
        self._refuse_cast_if_quantized("double()")
        return super().double()

    def _refuse_cast_if_quantized(self, call: str) -> None:
        if self.is_quantized:
            raise ValueError(
                f"AutoModelForCausalLMWithValueHead.{call}: the model is quantized and cannot be cast to another "
                "dtype; load it with the dtype you want (from_pretrained(..., dtype=...))"
            )


# Config fields of models that scale or squash their logits after the LM head (Gemma 2/3 soft-capping, Cohere,
# Granite, ...): log-probs from the head alone would be wrong for them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _hidden_size(config: Any) -> int:
    # OPT-350m-style models project the last hidden state to word_embed_proj_dim before the LM head.
    if getattr(config, "word_embed_proj_dim", None):
        return config.word_embed_proj_dim
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.hidden_size


def _is_quantized(model: nn.Module) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or bool(
        getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    )


def _load_causal_lm(
    cls: type[AutoModelForCausalLMWithValueHead], path: str, model_args: tuple, kwargs: dict[str, Any]
) -> PreTrainedModel:
    bnb = _loading.is_bitsandbytes_request(kwargs)
    if bnb:
        _loading.require_bitsandbytes("quantization_config (bitsandbytes)")
    try:
        with _loading.quiet_value_head_keys():
            return cls.transformers_parent_class.from_pretrained(path, *model_args, **kwargs)
    except (OSError, TypeError):
        raise  # a wrong path or keyword: bitsandbytes is not the story
    except Exception as e:
        if bnb and hasattr(e, "add_note"):  # Python >= 3.11; 3.10 gets the original error alone
            e.add_note(_loading.bitsandbytes_failure_note(kwargs))
        raise


def _prepare_kbit(model: PreTrainedModel, kbit_kwargs: dict[str, Any]) -> PreTrainedModel:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, **kbit_kwargs)


def _add_adapter(model: PreTrainedModel, peft_config: Any, kbit_kwargs: dict[str, Any]) -> nn.Module:
    get_peft_model = _require_peft("peft_config").get_peft_model

    if _is_quantized(model):
        model = _prepare_kbit(model, kbit_kwargs)
    return get_peft_model(model, peft_config)


def _accept_trl_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Map TRL-layout keys (``transformer.h.0...``) onto this module's (``pretrained_model.transformer.h.0...``)."""
    own = (prefix + "pretrained_model.", prefix + _loading.V_HEAD_PREFIX)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[prefix + "pretrained_model." + key[len(prefix) :]] = state_dict.pop(key)
