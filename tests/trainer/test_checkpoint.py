"""save_checkpoint / load_checkpoint: a run stopped and resumed continues exactly as the uninterrupted run
(same statistics and parameters on CPU), with every piece of state that feeds the next step restored:
model and value head, optimizer (8-bit state too), scheduler, running score moments, KL controller, RNG, step."""

from __future__ import annotations

import pytest
import torch
from trainer_utils import make_batch, make_policy, make_tokenizer

import ppo_fast
from ppo_fast import PPOConfig, PPOTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _optimizer(name, params):
    if name == "lion8bit":
        return ppo_fast.optim.Lion8bit(params, lr=1e-3, min_8bit_size=0)  # every tensor gets 8-bit momentum
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.Adam8bit(params, lr=1e-3, min_8bit_size=0)


def _build(tokenizer, optimizer_name, policy_seed=1, v_head_seed=None):
    policy = make_policy("llama", seed=policy_seed)
    if v_head_seed is not None:  # a value head initialised from another RNG state (an unseeded from_pretrained)
        g = torch.Generator().manual_seed(v_head_seed)
        with torch.no_grad():
            for p in policy.v_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    config = PPOConfig(
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        use_score_scaling=True,
        use_score_norm=True,
        target=0.01,  # the adaptive controller moves visibly
        horizon=10.0,
        seed=0,
    )
    optimizer = _optimizer(optimizer_name, policy.parameters())
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    return PPOTrainer(config, policy, None, tokenizer, optimizer=optimizer, lr_scheduler=scheduler)


def _run(trainer, steps):
    """Steps whose responses are sampled by the trainer, so the RNG state feeds every step."""
    out = []
    for s in steps:
        queries, _, scores = make_batch(4, seed=s)
        responses = trainer.generate(queries, return_prompt=False, batch_size=4, max_new_tokens=3, do_sample=True)
        stats = trainer.step(queries, responses, scores)
        out.append({k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")})
    return out


@pytest.mark.parametrize("optimizer_name", ["lion8bit", "adam8bit"])
def test_resume_continues_exactly(optimizer_name, tokenizer, tmp_path):
    straight = _build(tokenizer, optimizer_name)
    expected = _run(straight, range(4))

    first = _build(tokenizer, optimizer_name)
    _run(first, range(2))
    first.save_checkpoint(tmp_path / "ckpt")
    del first

    resumed = _build(tokenizer, optimizer_name)
    _run(resumed, [90])  # this run wandered off first: the load must undo all of it
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.current_step == 2
    got = _run(resumed, range(2, 4))
    assert resumed.current_step == 4
    for want, have in zip(expected[2:], got):
        assert want.keys() == have.keys()
        for k in want:
            assert have[k] == pytest.approx(want[k], rel=0, abs=0, nan_ok=True), k
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert straight.kl_ctl.value == resumed.kl_ctl.value != 0.2
    assert torch.equal(straight.running.state, resumed.running.state)
    assert straight.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()
    uint8 = [v for st in resumed.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert any(t.dtype == torch.uint8 for t in uint8)  # the 8-bit state came back as 8-bit


def test_load_refuses_a_different_reference_and_changes_nothing(tokenizer, tmp_path):
    trainer = _build(tokenizer, "lion8bit")
    _run(trainer, range(1))
    trainer.save_checkpoint(tmp_path / "ckpt")
    other = _build(tokenizer, "lion8bit", policy_seed=2)  # another base model: another reference
    before = [p.detach().clone() for p in other.model.parameters()]
    with pytest.raises(ValueError, match="reference model differs from the one the checkpoint was trained against"):
        other.load_checkpoint(tmp_path / "ckpt")
    assert other.current_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, other.model.parameters()))


def test_resume_with_another_initial_value_head(tokenizer, tmp_path):
    """The reference's value head is never used, so it is not part of the reference's checksum; the policy's own
    value head comes back from the checkpoint."""
    first = _build(tokenizer, "lion8bit")
    _run(first, range(1))
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = _build(tokenizer, "lion8bit", v_head_seed=5)
    resumed.load_checkpoint(tmp_path / "ckpt")
    for a, b in zip(first.model.v_head.parameters(), resumed.model.v_head.parameters()):
        assert torch.equal(a, b)


def test_load_checkpoint_bad_paths(tokenizer, tmp_path):
    trainer = PPOTrainer(PPOConfig(batch_size=2), make_policy(), None, tokenizer)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
        trainer.load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a checkpoint of this trainer"):
        trainer.load_checkpoint(tmp_path / "empty")


def test_load_refuses_another_kl_controller(tokenizer, tmp_path):
    trainer = PPOTrainer(PPOConfig(batch_size=2), make_policy(), None, tokenizer)
    trainer.step(*make_batch(2, seed=0))
    trainer.save_checkpoint(tmp_path / "ckpt")
    fixed = PPOTrainer(PPOConfig(batch_size=2, adap_kl_ctrl=False), make_policy(), None, tokenizer)
    with pytest.raises(ValueError, match="AdaptiveKLController but this trainer has a FixedKLController"):
        fixed.load_checkpoint(tmp_path / "ckpt")
    assert fixed.current_step == 0
