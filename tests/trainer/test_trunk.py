"""The frozen trunk (``PPOConfig.cache_frozen_trunk``): the policy's frozen bottom blocks run once per step, and the
reference forward and the minibatch forwards reuse their output. Whole steps must equal the trainer that recomputes
them, and the blocks must really run fewer times."""

from __future__ import annotations

import pytest
import torch
from trainer_utils import make_batch, make_policy, make_tokenizer

from ppo_fast import PPOConfig, PPOTrainer, create_reference_model


def _trainer(cache: bool, arch: str = "gpt2", shared: int = 2, **ref_kwargs) -> PPOTrainer:
    policy = make_policy(arch, n_layer=4, seed=0)
    ref = create_reference_model(policy, num_shared_layers=shared, **ref_kwargs)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, cache_frozen_trunk=cache, seed=0)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    return PPOTrainer(config, policy, ref, make_tokenizer(), optimizer=optimizer)


def _blocks(trainer: PPOTrainer, model) -> torch.nn.ModuleList:
    base = model.pretrained_model
    return base.transformer.h if hasattr(base, "transformer") else base.model.layers


def _run(trainer: PPOTrainer, steps: int = 3) -> list[dict]:
    out = []
    for step in range(steps):
        queries, responses, scores = make_batch(4, seed=10 + step)
        out.append(trainer.step(queries, responses, scores))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reused_trunk_gives_the_same_steps(arch):
    cached = _trainer(True, arch)  # each trainer seeds the RNG (minibatch shuffles): run each right after
    assert (cached._trunk.depth, cached._trunk.ref_depth) == (2, 2)
    cached_stats = _run(cached)
    plain = _trainer(False, arch)
    assert plain._trunk.depth == 0
    for a, b in zip(cached_stats, _run(plain)):
        for key in ("objective/kl", "ppo/loss/total", "ppo/policy/approxkl", "ppo/val/vpred", "ppo/returns/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    for p, q in zip(cached.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_forward_counts_of_the_trunk_blocks():
    """A replayed block does not run its own forward: count its attention module, which only a real forward calls."""
    trainer = _trainer(True)
    counts = {}
    handles = []
    for name, model in (("policy", trainer.model), ("ref", trainer.ref_model)):
        for i, block in enumerate(_blocks(trainer, model)):
            counts[(name, i)] = 0

            def pre(_m, _a, key=(name, i)):
                counts[key] += 1

            handles.append(block.attn.register_forward_pre_hook(pre))
    _run(trainer, steps=1)
    for h in handles:
        h.remove()
    assert [counts[("policy", i)] for i in range(4)] == [2, 2, 6, 6]  # trunk: the rollout only
    assert [counts[("ref", i)] for i in range(4)] == [0, 0, 2, 2]  # the reference reuses the policy's trunk


def test_no_trunk_when_the_bottom_trains():
    # A tied embedding kept trainable changes every forward: nothing can be reused.
    trainer = _trainer(True, share_tied_embeddings=False)
    assert trainer._trunk.depth == 0
    _run(trainer, steps=1)
    # Fewer shared blocks: the trunk is as deep as the frozen prefix.
    trainer = _trainer(True, shared=1)
    assert (trainer._trunk.depth, trainer._trunk.ref_depth) == (1, 1)


def test_reference_without_the_policys_tensors_recomputes():
    policy = make_policy("gpt2", n_layer=4, seed=0)
    ref = create_reference_model(make_policy("gpt2", n_layer=4, seed=1))  # another model: nothing shared
    for p in list(policy.pretrained_model.transformer.h[:2].parameters()) + list(
        policy.pretrained_model.transformer.wpe.parameters()
    ):
        p.requires_grad_(False)
    policy.pretrained_model.transformer.wte.weight.requires_grad_(False)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1)
    trainer = PPOTrainer(config, policy, ref, make_tokenizer())
    assert (trainer._trunk.depth, trainer._trunk.ref_depth) == (2, 0)
    _run(trainer, steps=1)


def test_config_flag_is_checked():
    with pytest.raises(ValueError, match="cache_frozen_trunk"):
        PPOConfig(cache_frozen_trunk="yes")
