"""``PPOTrainer.generate``: responses of the policy (and of the reference) to a PPO step's queries.

A list of queries is generated in left-padded batches (every row continues at the end), with ``max_new_tokens``
drawn per batch from the length sampler, and each response is cut after its first EOS. Under ZeRO-3 the sharded
parameters are gathered once per ``generate`` call instead of once per generated token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType

if TYPE_CHECKING:  # the trainer imports this module: the functions below only take one
    from ppo_fast.models import AutoModelForCausalLMWithValueHead
    from ppo_fast.trainer.ppo_trainer import PPOTrainer


def generate(
    trainer: PPOTrainer,
    query_tensor: Any,
    length_sampler: Callable[[], int] | None,
    batch_size: int,
    return_prompt: bool,
    generate_ref_response: bool,
    generation_kwargs: dict[str, Any],
) -> Any:
    """``PPOTrainer.generate``, under ``torch.no_grad``."""
    if batch_size < 1:
        raise ValueError(f"PPOTrainer.generate: batch_size must be >= 1, got {batch_size}")
    generation_kwargs.setdefault("pad_token_id", trainer._pad_id)
    ref = None
    if generate_ref_response:
        ref = trainer.model if trainer.is_peft_model else trainer.ref_model
    if isinstance(query_tensor, (list, tuple)):
        for i, q in enumerate(query_tensor):
            if not isinstance(q, torch.Tensor) or q.dim() != 1 or q.numel() < 1:
                raise ValueError(f"PPOTrainer.generate: query_tensor[{i}] must be a non-empty 1-D tensor of token ids")
        out = _generate_batched(
            trainer, trainer.model, query_tensor, length_sampler, batch_size, return_prompt, generation_kwargs
        )
        if ref is not None:
            with _reference_generation(trainer):
                ref_out = _generate_batched(
                    trainer, ref, query_tensor, length_sampler, batch_size, return_prompt, generation_kwargs
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
    ids = query_tensor.to(trainer.current_device)[None]
    with _unwrapped_for_generation(trainer, trainer.model) as m:
        response = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generation_kwargs)
    if not return_prompt:
        response = response[:, ids.shape[1] :]
    if ref is not None:
        with _reference_generation(trainer), _unwrapped_for_generation(trainer, ref) as m:
            ref_response = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generation_kwargs)
        if not return_prompt:
            ref_response = ref_response[:, ids.shape[1] :]
        return response, ref_response
    return response


@contextlib.contextmanager
def _unwrapped_for_generation(trainer: PPOTrainer, model: Any) -> Iterator[AutoModelForCausalLMWithValueHead]:
    """The bare module; under ZeRO-3 its parameters are gathered once for the whole ``generate``
    call instead of once per generated token."""
    unwrapped = trainer.accelerator.unwrap_model(model)
    if (
        trainer.accelerator.distributed_type == DistributedType.DEEPSPEED
        and getattr(model, "zero_optimization_stage", lambda: 0)() == 3
    ):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
    else:
        yield unwrapped


def _reference_generation(trainer: PPOTrainer) -> contextlib.AbstractContextManager:
    """The reference of a PEFT policy is the policy with its adapter disabled; any other is its own module."""
    if trainer.is_peft_model:
        return trainer.accelerator.unwrap_model(trainer.model).disable_adapter()
    return contextlib.nullcontext()


def _generate_batched(
    trainer: PPOTrainer,
    model: Any,
    queries: Sequence[torch.Tensor],
    length_sampler: Callable[[], int] | None,
    batch_size: int,
    return_prompt: bool,
    generation_kwargs: dict[str, Any],
) -> list[torch.Tensor]:
    """``queries`` in left-padded batches of ``batch_size``; each output without padding, cut after its first EOS."""
    outputs = []
    eos = getattr(trainer.tokenizer, "eos_token_id", None)
    device = trainer.current_device
    for i in range(0, len(queries), batch_size):
        if length_sampler is not None:
            generation_kwargs["max_new_tokens"] = length_sampler()
        batch = [q.to(device) for q in queries[i : i + batch_size]]
        width = max(len(q) for q in batch)
        ids = torch.full((len(batch), width), trainer._pad_id, dtype=torch.long, device=device)
        am = torch.zeros_like(ids)
        for j, q in enumerate(batch):  # left padding: generation continues every row at the end
            ids[j, width - len(q) :] = q
            am[j, width - len(q) :] = 1
        with _unwrapped_for_generation(trainer, model) as m:
            generations = m.generate(input_ids=ids, attention_mask=am, **generation_kwargs)
        for q, generation in zip(batch, generations):
            output = generation[width - len(q) :]
            prompt_len = len(q) if return_prompt else 0
            if not return_prompt:
                output = output[len(q) :]
            if eos is not None:
                output = _cut_after_eos(output, eos, prompt_len)
            outputs.append(output)
    return outputs


def _cut_after_eos(output: torch.Tensor, eos: int, prompt_len: int) -> torch.Tensor:
    """``output`` up to and including the first EOS after its ``prompt_len`` prompt tokens (whole if none)."""
    hits = (output[prompt_len:] == eos).nonzero()
    if len(hits):
        return output[: int(hits[0, 0]) + prompt_len + 1]  # keep the EOS
    return output
