"""The frozen trunk: the bottom of the policy whose output is the same in every forward pass of a step.

``create_reference_model(model, num_shared_layers=N)`` freezes the policy's embeddings and first N blocks and
shares them with the reference. Their output then depends only on the token ids and the attention mask, which a
step fixes: the rollout forward of the policy computes it, and the reference forward (whose bottom blocks are the
same parameters) and every minibatch forward of the PPO epochs take it instead of running those blocks again. On
a 4-block model with 2 shared, that is half of the reference forward and half of every training forward (the
backward already stopped at the first trainable block).

It is exact: the same blocks on the same rows in eval mode (no dropout) give the same activations; only the
grouping of rows into batches differs, as it already does between the rollout chunks and the shuffled
minibatches. It applies when every parameter that runs before block N is frozen in the policy (a trainable
tied embedding, a LoRA adapter in a bottom block or a trainable position table each rule it out, and it then
covers fewer blocks or none) and, for the reference, as far as it holds the policy's own parameter tensors.
Not under DeepSpeed ZeRO-3 or FSDP, whose parameters live partitioned between forwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ppo_fast.models.reference_model import _POST_BLOCK_MODULES, _find_blocks
from ppo_fast.models.value_head import hf_model

__all__ = ["FrozenTrunk"]

_log = logging.getLogger(__name__)


def _bottom(model: nn.Module) -> tuple[list[nn.Module], nn.ModuleList] | None:
    """What runs before the blocks (the embeddings) and the blocks of a value-head model, or None if its layout is
    not one ``create_reference_model`` knows."""
    base = hf_model(model.pretrained_model)
    try:
        path, blocks = _find_blocks(base, None)
    except ValueError:
        return None
    parent_path, _, blocks_name = path.rpartition(".")
    before = []
    for name, child in base.get_submodule(parent_path).named_children():
        if name == blocks_name:
            break
        if name not in _POST_BLOCK_MODULES:
            before.append(child)
    return before, blocks


def _tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


class FrozenTrunk:
    """Which bottom blocks of the policy (``depth``) and of the reference (``ref_depth``) can be computed once per
    step, and the means to do it: ``capture`` during the policy's rollout forward, ``replay`` in the others."""

    def __init__(self, policy: nn.Module, ref: nn.Module | None, *, enabled: bool = True, partitioned: bool = False):
        self.depth = self.ref_depth = 0
        self.blocks: nn.ModuleList | None = None
        self.ref_blocks: nn.ModuleList | None = None
        if not enabled or partitioned:
            return
        bottom = _bottom(policy)
        if bottom is None:
            return
        before, blocks = bottom
        if any(p.requires_grad for m in before for p in m.parameters()):
            return  # trainable embeddings: every forward sees new ones
        depth = 0
        while depth < len(blocks) and not any(p.requires_grad for p in blocks[depth].parameters()):
            depth += 1
        self.depth, self.blocks = depth, blocks
        if ref is not None and depth:
            ref_bottom = _bottom(ref)
            if ref_bottom is not None and type(ref_bottom[1]) is type(blocks):
                ref_before, ref_blocks = ref_bottom
                if len(ref_before) == len(before) and _same(_tensors(ref_before), _tensors(before)):
                    ref_depth = 0
                    while ref_depth < min(depth, len(ref_blocks)) and _same(
                        _tensors([ref_blocks[ref_depth]]), _tensors([blocks[ref_depth]])
                    ):
                        ref_depth += 1
                    self.ref_depth, self.ref_blocks = ref_depth, ref_blocks
        if self.depth:
            _log.info(
                "PPOTrainer: the policy's embeddings and first %d block(s) are frozen: computed once per step "
                "(the reference reuses %d)",
                self.depth,
                self.ref_depth,
            )

    def __bool__(self) -> bool:
        return self.depth > 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        """Inside: the policy's forward records the output of its first ``depth`` and ``ref_depth`` blocks (a dict
        keyed by the number of blocks, filled when the forward runs). A block that returns anything but the hidden
        states (a tuple, as some older layouts do) turns the reuse off, with a log line."""
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        for n in {self.depth, self.ref_depth} - {0}:

            def hook(_module: nn.Module, _args: Any, output: Any, n: int = n) -> None:
                if isinstance(output, torch.Tensor):
                    outputs[n] = output.detach()
                elif self.depth:
                    _log.info(
                        "PPOTrainer: a block returns %s, not a tensor: frozen blocks run every time", type(output)
                    )
                    self.depth = self.ref_depth = 0

            handles.append(self.blocks[n - 1].register_forward_hook(hook))
        try:
            yield outputs
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    @contextlib.contextmanager
    def replay(blocks: nn.ModuleList | None, depth: int, hidden: torch.Tensor | None) -> Iterator[None]:
        """Inside: the first ``depth`` of ``blocks`` return ``hidden`` instead of running (the ones below the last
        return it too; nothing reads their output but the next replayed block, which ignores it)."""
        if not depth or hidden is None:
            yield
            return

        def forward(*_args: Any, **_kwargs: Any) -> torch.Tensor:
            return hidden

        for block in blocks[:depth]:
            block.forward = forward
        try:
            yield
        finally:
            for block in blocks[:depth]:
                del block.forward


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
