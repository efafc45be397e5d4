"""Every snippet of the training-customization guide (DESIGN.md section 1) runs as written, with
``trl`` replaced by ``ppo_fast`` and a tiny local model in place of a hub name, and does what it says."""

from __future__ import annotations

import pytest
import torch
from trainer_utils import build_lm, make_batch, make_policy, make_tokenizer

import ppo_fast
from ppo_fast import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
from ppo_fast.trainer import ppo_trainer

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning", "ignore:fan_in_fan_out:UserWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model_dir(tmp_path):
    """``model_dir(arch)``: a tiny policy saved with its value head (what the guide loads from the hub)."""

    def save(arch="gpt2", n_layer=2):
        make_policy(arch, n_layer=n_layer).save_pretrained(tmp_path / arch)
        return tmp_path / arch

    return save


def _steps(trainer, n, batch_size):
    return [trainer.step(*make_batch(batch_size, seed=200 + i)) for i in range(n)]


def test_condensed_snippet(model_dir, tokenizer):
    """DESIGN.md section 1's snippet: shared reference, score scaling/norm/clip, cache alias, SGD + ExponentialLR."""
    path = model_dir("llama", n_layer=4)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    model_ref = create_reference_model(model, num_shared_layers=2)
    config = PPOConfig(
        batch_size=4,
        mini_batch_size=2,
        learning_rate=1e-2,
        use_score_scaling=True,
        use_score_norm=True,
        score_clip=0.5,
        optimize_cuda_cache=True,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    trainer = PPOTrainer(config, model, model_ref, tokenizer, optimizer=optimizer, lr_scheduler=lr_scheduler)
    shared = model.pretrained_model.model.layers[0].self_attn.q_proj.weight
    before = shared.detach().clone()
    history = _steps(trainer, 3, 4)
    # The scheduler stepped once per step; the recorded rate is the one the step used.
    assert [s["ppo/learning_rate"] for s in history] == pytest.approx([1e-2, 9e-3, 8.1e-3])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**3)
    # Scaled, normalised and clipped scores.
    assert all(-0.5 <= s["ppo/mean_scores"] <= 0.5 for s in history)
    # The shared layers are the same tensors in both models, frozen, and unchanged by training.
    assert model_ref.pretrained_model.model.layers[0].self_attn.q_proj.weight is shared
    assert torch.equal(shared, before) and not shared.requires_grad
    top = model.pretrained_model.model.layers[3].self_attn.q_proj.weight
    assert not torch.equal(top, model_ref.pretrained_model.model.layers[3].self_attn.q_proj.weight)


def test_default_optimizer_is_adam_over_trainable_parameters(tokenizer):
    model = make_policy("llama", n_layer=2)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), model, None, tokenizer, num_shared_layers=1)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 1.41e-5
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert params == trainable and len(trainable) < len(list(model.parameters()))  # shared layers frozen
    # num_shared_layers reached create_reference_model: layer 0 is shared storage.
    assert (
        trainer.ref_model.pretrained_model.model.layers[0].mlp.up_proj.weight
        is model.pretrained_model.model.layers[0].mlp.up_proj.weight
    )


def test_sgd_snippet(model_dir, tokenizer):
    path = model_dir("gpt2")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    model_ref = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    ppo_config = {"batch_size": 1, "learning_rate": 1e-5}
    config = PPOConfig(**ppo_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    ppo_trainer_ = PPOTrainer(config, model, model_ref, tokenizer, optimizer=optimizer)
    before = model.v_head.summary.weight.detach().clone()
    stats = _steps(ppo_trainer_, 1, 1)[0]
    assert stats["objective/kl"] == 0.0  # the reference is the same checkpoint
    assert not torch.equal(before, model.v_head.summary.weight)


def test_adam8bit_snippet(model_dir, tokenizer):
    bnb = pytest.importorskip("bitsandbytes")
    path = model_dir("gpt2")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    model_ref = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    config = PPOConfig(batch_size=2, mini_batch_size=2, learning_rate=1e-3)
    optimizer = bnb.optim.Adam8bit(model.parameters(), lr=config.learning_rate)
    trainer = PPOTrainer(config, model, model_ref, tokenizer, optimizer=optimizer)
    _steps(trainer, 2, 2)
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # real 8-bit state


@pytest.mark.parametrize("lion", ["Lion", "Lion8bit"])
def test_lion_snippet(lion, tokenizer):
    # hidden 64: the embeddings and LM head (6144 elements) reach Lion8bit's 4096-element 8-bit threshold.
    model = AutoModelForCausalLMWithValueHead(build_lm("llama", n_layer=2, hidden_size=64, intermediate_size=128))
    model_ref = create_reference_model(model)
    config = PPOConfig(batch_size=2, mini_batch_size=2, learning_rate=1e-3 / 3)  # Adam's rate / 3, as the guide says
    Lion = getattr(ppo_fast.optim, lion)
    optimizer = Lion(filter(lambda p: p.requires_grad, model.parameters()), lr=config.learning_rate)
    trainer = PPOTrainer(config, model, model_ref, tokenizer, optimizer=optimizer)
    before = model.pretrained_model.lm_head.weight.detach().clone()
    _steps(trainer, 2, 2)
    moved = (model.pretrained_model.lm_head.weight - before).abs()
    assert moved.max() > 0
    if lion == "Lion8bit":
        assert any(s["momentum"].dtype == torch.uint8 for s in optimizer.state.values())


def test_shared_layers_snippet(model_dir, tokenizer):
    path = model_dir("gpt2", n_layer=4)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    model_ref = create_reference_model(model, num_shared_layers=3)
    ppo_config = {"batch_size": 1}
    config = PPOConfig(**ppo_config)
    trainer = PPOTrainer(config, model, model_ref, tokenizer)
    assert (
        model_ref.pretrained_model.transformer.h[2].mlp.c_fc.weight
        is model.pretrained_model.transformer.h[2].mlp.c_fc.weight
    )
    _steps(trainer, 1, 1)


def test_8bit_reference_snippet(model_dir, tokenizer):
    pytest.importorskip("bitsandbytes")
    path = model_dir("llama")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    model_ref = AutoModelForCausalLMWithValueHead.from_pretrained(path, device_map="auto", load_in_8bit=True)
    assert model_ref.is_loaded_in_8bit
    config = PPOConfig(batch_size=2, mini_batch_size=2)
    trainer = PPOTrainer(config, model, model_ref, tokenizer)
    stats = _steps(trainer, 1, 2)[0]
    # int8 reference weights: a small KL against the fp32 policy, not exactly zero.
    assert 0 < abs(stats["objective/kl"]) < 1.0


def test_peft_policy_is_its_own_reference(model_dir, tokenizer):
    peft = pytest.importorskip("peft")
    path = model_dir("llama")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path, peft_config=lora)
    config = PPOConfig(batch_size=2, mini_batch_size=2, learning_rate=1e-2)
    trainer = PPOTrainer(config, model, None, tokenizer)
    assert trainer.ref_model is None and trainer.is_peft_model
    history = _steps(trainer, 3, 2)
    assert history[0]["objective/kl"] == 0.0  # LoRA starts as the identity
    assert history[2]["objective/kl"] != 0.0  # the adapter moved; the disabled-adapter reference did not


@pytest.mark.parametrize("flag", ["optimize_cuda_cache", "optimize_device_cache"])
@pytest.mark.parametrize("value", [True, False])
def test_optimize_cuda_cache_frees_cached_memory(flag, value, tokenizer, monkeypatch):
    calls = []
    real = ppo_trainer._empty_device_cache
    monkeypatch.setattr(ppo_trainer, "_empty_device_cache", lambda device: (calls.append(device), real(device)))
    config = PPOConfig(batch_size=2, mini_batch_size=2, **{flag: value})
    trainer = PPOTrainer(config, make_policy(), None, tokenizer)
    _steps(trainer, 2, 2)
    assert len(calls) == (6 if value else 0)  # before the step, after the rollout, after the updates


def test_score_scaling_first_batch_of_one(tokenizer):
    """TRL 0.11 crashes here (use_score_scaling) and its running std of one sample is infinite."""
    config = PPOConfig(batch_size=1, mini_batch_size=1, use_score_scaling=True, use_score_norm=True, score_clip=0.5)
    trainer = PPOTrainer(config, make_policy(), None, tokenizer)
    queries, responses, _ = make_batch(1, seed=0)
    stats = trainer.step(queries, responses, [torch.tensor(3.0)])
    # one sample: std 1, so (3 - 3) / (1 + eps) = 0
    assert stats["ppo/mean_scores"] == 0.0
    stats = trainer.step(queries, responses, [torch.tensor(5.0)])
    # two samples {3, 5}: mean 4, Bessel std sqrt(2): (5 - 4) / sqrt(2) = 0.707 -> clipped to 0.5
    assert stats["ppo/mean_scores"] == pytest.approx(0.5)
    assert float(trainer.running.mean) == 4.0


def test_score_scaling_without_norm_and_clip_only(tokenizer):
    config = PPOConfig(batch_size=2, mini_batch_size=2, use_score_scaling=True)
    trainer = PPOTrainer(config, make_policy(), None, tokenizer)
    queries, responses, _ = make_batch(2, seed=0)
    stats = trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(3.0)])
    # std of {1, 3} is sqrt(2): scores / sqrt(2), mean 2 / sqrt(2)
    assert stats["ppo/mean_scores"] == pytest.approx(2 / 2**0.5, rel=1e-6)
    clip_only = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, score_clip=1.5), make_policy(), None, tokenizer)
    stats = clip_only.step(queries, responses, [torch.tensor(-4.0), torch.tensor(1.0)])
    assert stats["ppo/mean_scores"] == pytest.approx((-1.5 + 1.0) / 2)
