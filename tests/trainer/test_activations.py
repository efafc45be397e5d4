"""Fused activations (``PPOConfig.fused_activations``): GPT-2's seven-op ``gelu_new`` runs as one op
(``ppo_fast::gelu_tanh`` with the fused kernels, torch's ``gelu(approximate="tanh")`` without); the function is
the same (checked against the formula in fp64), the model's outputs and gradients are the same up to rounding,
and whole steps agree with the unswapped trainer."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from trainer_utils import make_batch, make_policy, make_tokenizer
from transformers.activations import FastGELUActivation, NewGELUActivation

from ppo_fast import PPOConfig, PPOTrainer, create_reference_model
from ppo_fast.trainer.activations import FusedGELUTanh, fuse_activations

KEYS = ("objective/kl", "objective/entropy", "ppo/loss/total", "ppo/policy/approxkl", "ppo/val/vpred",
        "ppo/returns/mean", "ppo/mean_non_score_reward")  # fmt: skip


def _gelu_tanh_fp64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _acts(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if "GELU" in type(m).__name__]


@pytest.mark.parametrize("use_fused", [True, False], ids=["ppo_fast_op", "torch_op"])
@pytest.mark.parametrize("old", [NewGELUActivation, FastGELUActivation])
def test_fused_module_is_the_same_function(old, use_fused):
    fused = copy.deepcopy(torch.nn.Sequential(old()))
    assert fuse_activations(fused, use_fused=use_fused) == 1
    assert isinstance(fused[0], FusedGELUTanh) and fused[0].use_fused is use_fused
    x = torch.cat([torch.linspace(-20, 20, 100_001), torch.randn(10_000) * 3])
    truth = _gelu_tanh_fp64(x)
    err_old = (old()(x).double() - truth).abs().max().item()
    err_fused = (fused(x).double() - truth).abs().max().item()
    assert err_fused <= max(2 * err_old, 1e-6), (err_fused, err_old)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -1e30, 1e30, 0.0, -0.0])
    torch.testing.assert_close(fused(special), old()(special), equal_nan=True)
    # The gradient: torch's fused backward and autograd through the seven ops, both against the fp64 formula's.
    xg = torch.linspace(-8, 8, 4001, requires_grad=True)
    (g_fused,) = torch.autograd.grad(fused(xg).sum(), xg)
    (g_old,) = torch.autograd.grad(old()(xg).sum(), xg)
    x64 = xg.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(_gelu_tanh_fp64(x64).sum(), x64)
    err_old = (g_old.double() - g64).abs().max().item()
    err_fused = (g_fused.double() - g64).abs().max().item()
    assert err_fused <= max(2 * err_old, 2e-6), (err_fused, err_old)


def test_swap_covers_policy_and_reference_once_and_keeps_outputs():
    policy = make_policy("gpt2", n_layer=3).eval()
    ref = create_reference_model(policy, num_shared_layers=1)
    plain = copy.deepcopy(policy)
    assert _acts(policy).count("NewGELUActivation") == 3
    # 3 in each (the reference's shared block holds the policy's tensors in its own modules); a module reached
    # twice is replaced once.
    assert fuse_activations(policy, ref, policy, use_fused=True) == 6
    assert set(_acts(policy) + _acts(ref)) == {"FusedGELUTanh"}
    assert fuse_activations(policy, ref, use_fused=True) == 0  # idempotent
    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    logits, _, value = policy(input_ids=ids)
    logits_p, _, value_p = plain(input_ids=ids)
    torch.testing.assert_close(logits, logits_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value, value_p, rtol=1e-5, atol=1e-5)
    (logits.logsumexp(-1).sum() + value.sum()).backward()
    (logits_p.logsumexp(-1).sum() + value_p.sum()).backward()
    for (name, p), q in zip(policy.named_parameters(), plain.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def _steps(fused: bool, kernels: bool, steps: int = 3) -> tuple[list[dict], PPOTrainer]:
    policy = make_policy("gpt2", n_layer=2, seed=0)
    cfg = PPOConfig(
        batch_size=4, mini_batch_size=2, ppo_epochs=2, fused_activations=fused, use_fused_kernels=kernels, seed=0
    )
    trainer = PPOTrainer(cfg, policy, None, make_tokenizer(), num_shared_layers=1)
    out = []
    for step in range(steps):
        queries, responses, scores = make_batch(4, seed=40 + step)
        out.append(trainer.step(queries, responses, scores))
    return out, trainer


@pytest.mark.parametrize("kernels", [True, False], ids=["fused_kernels", "eager_kernels"])
def test_trainer_steps_agree_with_the_model_as_written(caplog, kernels):
    with caplog.at_level(logging.INFO, logger="ppo_fast.trainer.activations"):
        fused, ft = _steps(True, kernels)
    plain, pt = _steps(False, kernels)
    assert "gelu_new" in caplog.text and ("ppo_fast::gelu_tanh" in caplog.text) is kernels
    swapped = [m for m in [*ft.model.modules(), *ft.ref_model.modules()] if isinstance(m, FusedGELUTanh)]
    assert len(swapped) == 4 and all(m.use_fused is kernels for m in swapped)  # the trainer's kernels choose
    assert "NewGELUActivation" not in _acts(ft.model) + _acts(ft.ref_model)
    assert _acts(pt.model).count("NewGELUActivation") == 2  # off: the model as the user built it
    for a, b in zip(fused, plain):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for p, q in zip(ft.model.parameters(), pt.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_the_module_runs_the_op_it_names():
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(1)) * 4
    x[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    assert torch.equal(FusedGELUTanh(True)(x).nan_to_num(7.0), torch.ops.ppo_fast.gelu_tanh(x).nan_to_num(7.0))
    torch_op = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.equal(FusedGELUTanh(False)(x).nan_to_num(7.0), torch_op.nan_to_num(7.0))
    assert not list(FusedGELUTanh(True).parameters()) and "use_fused=True" in repr(FusedGELUTanh(True))
    # The op's backward is the op's own: the gradient is ppo_fast::gelu_tanh_backward's, bit for bit.
    xg = x[1:].clone().requires_grad_()
    w = torch.randn_like(xg)
    (g,) = torch.autograd.grad(FusedGELUTanh(True)(xg), xg, w)
    assert torch.equal(g, torch.ops.ppo_fast.gelu_tanh_backward(w, xg.detach()))
    with pytest.raises(TypeError, match="use_fused must be a bool"):
        fuse_activations(torch.nn.Sequential(NewGELUActivation()), use_fused=1)


def test_a_constructor_that_raises_leaves_the_model_alone():
    policy = make_policy("gpt2", n_layer=1)
    policy.pretrained_model.config.final_logit_softcapping = 30.0  # the fused head must refuse this model
    with pytest.raises(ValueError, match="fused_lm_head=True"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, fused_lm_head=True), policy, None, make_tokenizer())
    assert _acts(policy) == ["NewGELUActivation"]


def test_config_checks_the_flag():
    with pytest.raises(ValueError, match="fused_activations must be a bool"):
        PPOConfig(fused_activations="yes")
