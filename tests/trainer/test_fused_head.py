"""The fused LM head in the trainer (``PPOConfig.fused_lm_head``): log-probs straight from the hidden states, the
logits never built; whole steps agree with the trainer that builds them."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from trainer_utils import VOCAB, build_lm, make_batch, make_policy, make_tokenizer

from ppo_fast import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

KEYS = ("objective/kl", "objective/entropy", "ppo/loss/total", "ppo/policy/approxkl", "ppo/policy/entropy",
        "ppo/val/vpred", "ppo/returns/mean", "ppo/mean_non_score_reward")  # fmt: skip


def _policy(arch: str, bias: bool = False) -> AutoModelForCausalLMWithValueHead:
    policy = make_policy(arch, n_layer=2, seed=0)
    if bias:  # an untied head with a bias (plain nn.Linear), initialised from the seed
        base = policy.pretrained_model
        old = base.get_output_embeddings()
        head = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        base.set_output_embeddings(head)
    return policy


def _steps(fused_head: bool, arch: str, bias: bool = False, steps: int = 3, **config) -> tuple[list, PPOTrainer]:
    policy = _policy(arch, bias)
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, fused_lm_head=fused_head, seed=0, **config)
    trainer = PPOTrainer(cfg, policy, None, make_tokenizer(), num_shared_layers=1)
    out = []
    for step in range(steps):
        queries, responses, scores = make_batch(4, seed=20 + step)
        out.append(trainer.step(queries, responses, scores))
    return out, trainer


@pytest.mark.parametrize(("arch", "bias"), [("gpt2", False), ("llama", False), ("llama", True)])
def test_fused_head_steps_equal_the_logits_steps(arch, bias):
    fused, ft = _steps(True, arch, bias)
    plain, pt = _steps(False, arch, bias)
    assert ft._fused_head and ft._ref_fused_head and not pt._fused_head
    for a, b in zip(fused, plain):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for p, q in zip(ft.model.parameters(), pt.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_head_never_builds_logits():
    _, trainer = _steps(True, "llama", steps=0)
    head = trainer.model.pretrained_model.get_output_embeddings()
    shapes = []
    handle = head.register_forward_hook(
        lambda _m, _a, out: shapes.append(tuple(out.shape) if torch.is_tensor(out) else [tuple(o.shape) for o in out])
    )
    queries, responses, scores = make_batch(4, seed=0)
    trainer.step(queries, responses, scores)
    handle.remove()
    assert shapes  # the head ran, through its own module call
    flat = [s for item in shapes for s in (item if isinstance(item, list) else [item])]
    assert all(len(s) == 2 for s in flat), flat  # [b, t] log-probs (and entropies), never [b, t, V] logits
    assert all(s[-1] != VOCAB for s in flat)


def test_default_is_on_for_a_plain_head_and_off_with_a_reason(caplog):
    policy = make_policy("llama", n_layer=1)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, None, make_tokenizer())
    assert trainer._fused_head
    # A model whose config says it transforms its logits after the head.
    policy = make_policy("llama", n_layer=1)
    policy.pretrained_model.config.final_logit_softcapping = 30.0
    with caplog.at_level(logging.INFO, logger="ppo_fast.trainer.lm_head"):
        trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, None, make_tokenizer())
    assert not trainer._fused_head and "final_logit_softcapping" in caplog.text
    with pytest.raises(ValueError, match="fused_lm_head=True, but"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, fused_lm_head=True), policy, None, make_tokenizer())
    # kl_penalty="full" needs both distributions: the logits path.
    trainer = PPOTrainer(
        PPOConfig(batch_size=2, mini_batch_size=2, kl_penalty="full"),
        make_policy("llama", n_layer=1),
        None,
        make_tokenizer(),
    )
    assert not trainer._fused_head


def test_probe_catches_a_forward_that_changes_its_logits(caplog):
    class Scaled(type(build_lm("llama", n_layer=1))):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    base = build_lm("llama", n_layer=1)
    base.__class__ = Scaled
    policy = AutoModelForCausalLMWithValueHead(base)
    assert policy.lm_head_fusable() is None  # nothing in its layout says so...
    with caplog.at_level(logging.INFO, logger="ppo_fast.trainer.lm_head"):
        trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, None, make_tokenizer())
    assert not trainer._fused_head and "probe" in caplog.text  # ...the probe does


def test_forward_logprobs_checks_its_positions():
    policy = make_policy("gpt2", n_layer=1).eval()  # no dropout: the two forwards must see the same network
    ids = torch.randint(3, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="logprobs_from"):
        policy(input_ids=ids, logprobs_of=ids[:, 1:], logprobs_from=2)
    logprob, entropy, value = policy(input_ids=ids, logprobs_of=ids[:, 3:], logprobs_from=2, return_entropy=True)
    logits, _, value_ref = policy(input_ids=ids)
    expected = torch.log_softmax(logits[:, 2:5], -1).gather(-1, ids[:, 3:, None])[..., 0]
    torch.testing.assert_close(logprob, expected, rtol=1e-5, atol=1e-5)
    assert entropy.shape == (2, 3)
    torch.testing.assert_close(value, value_ref)
    with pytest.raises(ValueError, match="fused_lm_head"):
        PPOConfig(fused_lm_head="yes")


@pytest.mark.parametrize("fused_head", [True, False])
def test_bf16_model_steps(fused_head):
    """A model cast whole to bf16 (value head included): its values reach the loss in the log-probs' fp32."""
    policy = make_policy("llama", n_layer=1).to(torch.bfloat16)
    config = PPOConfig(batch_size=2, mini_batch_size=2, fused_lm_head=fused_head)
    trainer = PPOTrainer(config, policy, None, make_tokenizer())
    queries, responses, scores = make_batch(2, seed=1)
    stats = trainer.step(queries, responses, scores)
    assert trainer._fused_head == fused_head
    assert torch.isfinite(torch.tensor(stats["ppo/loss/total"]))
