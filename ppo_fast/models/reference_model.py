"""``create_reference_model``: a frozen PPO reference that really shares the policy's bottom layers.

TRL 0.11 deep-copied the whole model and only *froze* the "shared" layers, so a reference cost a full
copy whatever ``num_shared_layers`` said. Here the shared parameters are the same ``nn.Parameter``
objects in both models (one storage, ``data_ptr()`` identical); only the rest is copied.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

import torch
from torch import nn

from ppo_fast.models.value_head import AutoModelForCausalLMWithValueHead, hf_model

_log = logging.getLogger(__name__)

# Where each family keeps its transformer blocks (an nn.ModuleList), relative to the transformers model.
# The `{layer}` patterns are TRL 0.11's LAYER_PATTERNS; `pattern=` takes the same form for other models.
_BLOCK_LAYOUTS = (
    ("transformer.h", "GPT-2, GPT-J, GPT-Neo, BLOOM, Falcon, CodeGen"),
    ("model.layers", "Llama, Mistral, Mixtral, Qwen2/Qwen3, Gemma, Phi-3 and other Llama-style models"),
    ("gpt_neox.layers", "GPT-NeoX, Pythia"),
    ("model.decoder.layers", "OPT"),
)
LAYER_PATTERNS = tuple(f"{path}.{{layer}}" for path, _ in _BLOCK_LAYOUTS)
SUPPORTED_ARCHITECTURES = tuple(f"{path}.{{layer}} ({families})" for path, families in _BLOCK_LAYOUTS)

# Modules that some models register *before* their block list but run *after* it (OPT registers its final
# layer norm and output projection first). Only what runs before the blocks is shared with the reference.
_POST_BLOCK_MODULES = frozenset({"ln_f", "norm", "final_layer_norm", "final_layernorm", "project_out"})


def create_reference_model(
    model: AutoModelForCausalLMWithValueHead,
    num_shared_layers: int | None = None,
    pattern: str | None = None,
    *,
    share_tied_embeddings: bool = True,
) -> AutoModelForCausalLMWithValueHead:
    """A frozen, eval-mode copy of ``model`` to compute PPO's reference log-probabilities.

    Args:
        model: the policy, an :class:`AutoModelForCausalLMWithValueHead`.
        num_shared_layers: None copies the whole model (nothing shared). ``N`` in ``[0, number of blocks]``
            shares the input embeddings (everything the model runs before its first block: token and position
            embeddings, an embedding layer norm or projection) and the first ``N`` transformer blocks: the
            reference holds the *same* parameter tensors as the policy, so they cost no memory, and they are
            frozen (``requires_grad=False``) in the policy too, which therefore trains only the blocks above
            them, the final norm, the LM head and the value head. Everything else is copied.
        pattern: where the blocks are, for a model outside the supported layouts: ``"<path to the blocks'
            ModuleList>.{layer}"``, e.g. ``"transformer.h.{layer}"`` (TRL's form; a leading
            ``pretrained_model.`` is ignored). Only used with ``num_shared_layers``.
        share_tied_embeddings: how to treat an input embedding that is *tied* to the output (LM head), as in
            GPT-2, when the embeddings are shared. True (the default, TRL 0.11's behaviour) shares it like the
            rest, which freezes the policy's LM head with it; a log line says so. It is also the cheaper step:
            no gradient for the [V, H] head, and the frozen embeddings and shared blocks give the same
            activations in every forward of a step, which the trainer then computes once (measured on a 1M GPT-2,
            B16, response 32: 0.58 s -> 0.50 s per step before that reuse). False keeps the policy's LM head
            trainable: the reference gets its own frozen copy of the tied matrix (still tied to its own head).
    Returns:
        the reference: every parameter ``requires_grad=False``, in eval mode (the policy's mode is left
        alone; the two models are separate modules that hold some of the same parameters).

    Notes:
        * Supported layouts: ``LAYER_PATTERNS`` (GPT-2 / GPT-J / GPT-Neo / BLOOM / Falcon, Llama-style
          models, GPT-NeoX, OPT); other models raise ValueError unless ``pattern`` is given.
        * Move or cast the policy *before* creating the reference: ``policy.to(device)`` afterwards moves the
          shared layers of both models (they are the same tensors) but not the reference's copies.
        * Under DeepSpeed ZeRO-3 the policy's parameters are partitioned, which would empty the shared
          layers of the reference: sharing raises there; load the reference with ``from_pretrained`` instead.
        * A policy with a PEFT (LoRA) adapter needs no reference copy at all: its frozen base model is the
          reference, run with ``with policy.disable_adapter(): ...``. A copy made here would keep the
          adapter, as TRL's did.
        * Argument errors are raised before anything changes.
    """
    if not isinstance(model, AutoModelForCausalLMWithValueHead):
        raise TypeError(
            "create_reference_model: model must be an AutoModelForCausalLMWithValueHead, "
            f"got {type(model).__name__}; wrap it with AutoModelForCausalLMWithValueHead.from_pretrained(model)"
        )
    if num_shared_layers is not None and (
        isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, int)
    ):
        raise TypeError(f"create_reference_model: num_shared_layers must be an int or None, got {num_shared_layers!r}")
    if pattern is not None:
        if num_shared_layers is None:
            raise ValueError("create_reference_model: pattern only applies together with num_shared_layers")
        if not isinstance(pattern, str):
            raise TypeError(f"create_reference_model: pattern must be a str, got {type(pattern).__name__}")
    if not isinstance(share_tied_embeddings, bool):
        raise TypeError(f"create_reference_model: share_tied_embeddings must be a bool, got {share_tied_embeddings!r}")
    _refuse_zero3(model, num_shared_layers)

    shared: list[torch.Tensor] = []
    if num_shared_layers is not None:
        shared_modules = _shared_modules(model, num_shared_layers, pattern)
        shared, tied = _shared_tensors(model, shared_modules, share_tied_embeddings)
        if tied and share_tied_embeddings:
            _log.warning(
                "create_reference_model: the input embedding is tied to the LM head; sharing it (as TRL did) freezes "
                "the policy's LM head. Pass share_tied_embeddings=False to train the LM head."
            )
    # Deep-copy with the shared tensors pre-seeded in the memo: deepcopy returns those very objects instead of
    # copying them, so the reference's modules are new (own train/eval flags, hooks) but hold the same tensors.
    ref = copy.deepcopy(model, memo={id(t): t for t in shared})
    for t in shared:
        if isinstance(t, nn.Parameter):
            t.requires_grad_(False)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of parameter storage held by ``modules`` together, each storage counted once.

    ``parameter_bytes(policy, ref)`` against ``2 * parameter_bytes(policy)`` is what a shared reference saves.
    """
    storages: dict[tuple[str, int], int] = {}
    for p in itertools.chain.from_iterable(m.parameters() for m in modules):
        storage = p.untyped_storage()
        key = (str(p.device), storage.data_ptr())
        storages[key] = max(storages.get(key, 0), storage.nbytes())
    return sum(storages.values())


def _refuse_zero3(model: nn.Module, num_shared_layers: int | None) -> None:
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "create_reference_model: the model's parameters are partitioned by DeepSpeed ZeRO-3 and cannot be "
            "copied or shared; load the reference with AutoModelForCausalLMWithValueHead.from_pretrained and let "
            "the trainer shard it"
        )
    if num_shared_layers is not None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "create_reference_model: num_shared_layers cannot be used under DeepSpeed ZeRO-3, which partitions "
                "the policy's parameters and so would empty the reference's shared layers; use "
                "num_shared_layers=None or load the reference with from_pretrained"
            )


def _shared_modules(model: AutoModelForCausalLMWithValueHead, num_shared_layers: int, pattern: str | None) -> list:
    base = hf_model(model.pretrained_model)
    path, blocks = _find_blocks(base, pattern)
    if not 0 <= num_shared_layers <= len(blocks):
        raise ValueError(
            f"create_reference_model: num_shared_layers must be between 0 and {len(blocks)} "
            f"({type(base).__name__} has {len(blocks)} transformer blocks at {path}), got {num_shared_layers}"
        )
    parent_path, _, blocks_name = path.rpartition(".")
    parent = base.get_submodule(parent_path)
    before_blocks = []
    for name, child in parent.named_children():
        if name == blocks_name:
            break
        if name not in _POST_BLOCK_MODULES:
            before_blocks.append(child)
    return before_blocks + list(blocks[:num_shared_layers])


def _find_blocks(base: nn.Module, pattern: str | None) -> tuple[str, nn.ModuleList]:
    if pattern is not None:
        suffix = ".{layer}"
        if not pattern.endswith(suffix) or len(pattern) == len(suffix):
            raise ValueError(
                "create_reference_model: pattern must be '<path to the blocks>.{layer}', "
                f"e.g. 'transformer.h.{{layer}}', got {pattern!r}"
            )
        path = pattern[: -len(suffix)]
        for prefix in ("pretrained_model.", "base_model.model."):
            path = path.removeprefix(prefix)
        blocks = _module_list(base, path)
        if blocks is None:
            raise ValueError(
                f"create_reference_model: pattern {pattern!r} names no non-empty ModuleList in "
                f"{type(base).__name__}; module lists it has: {_module_lists(base)}"
            )
        return path, blocks
    for path, _ in _BLOCK_LAYOUTS:
        blocks = _module_list(base, path)
        if blocks is not None:
            return path, blocks
    raise ValueError(
        f"create_reference_model: cannot find the transformer blocks of {type(base).__name__} "
        f"(model_type {getattr(base.config, 'model_type', None)!r}). Supported layouts: "
        f"{'; '.join(SUPPORTED_ARCHITECTURES)}. For another model pass pattern='<path to its blocks>.{{layer}}' "
        f"(module lists in this model: {_module_lists(base)})"
    )


def _module_list(base: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        module = base.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.ModuleList) and len(module) > 0 else None


def _module_lists(base: nn.Module) -> list[str]:
    return [name for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0][:8]


def _shared_tensors(
    model: nn.Module, shared_modules: list[nn.Module], share_tied_embeddings: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters (and buffers) of ``shared_modules``, less those tied to a module outside them unless asked; and
    those tied ones."""
    params: dict[int, Any] = {}
    for module in shared_modules:
        for t in itertools.chain(module.parameters(), module.buffers()):
            params[id(t)] = t
    inside = {id(m) for module in shared_modules for m in module.modules()}
    tied: dict[int, torch.Tensor] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:
            continue
        for _, p in module.named_parameters(recurse=False):
            if id(p) in params:
                tied[id(p)] = p  # also used by a module that is not shared (GPT-2's LM head)
    if not share_tied_embeddings:
        for key in tied:
            params.pop(key)  # copy it instead
    return list(params.values()), list(tied.values())
