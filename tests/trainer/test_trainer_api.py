"""The rest of PPOTrainer's TRL surface: early stopping, ratio_threshold, log_stats, the dataloader and
save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_utils import make_batch, make_policy, make_tokenizer

from ppo_fast import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _epochs_run(stats, responses):
    """Epochs that ran, from the per-token ratios recorded (one entry per response token and epoch)."""
    return stats["ppo/policy/ratio"].size / sum(len(r) for r in responses)


@pytest.mark.parametrize("target_kl, epochs", [(1e-6, 1), (1e6, 4)])
def test_early_stopping_after_the_first_epoch_whose_kl_passes(target_kl, epochs, tokenizer):
    policy = make_policy("llama", seed=4)
    config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=4, early_stopping=True, target_kl=target_kl)
    trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=0.3))
    queries, responses, scores = make_batch(8, seed=5)
    stats = trainer.step(queries, responses, scores)
    assert _epochs_run(stats, responses) == epochs
    if epochs == 1:  # it stopped because the last minibatch's policy KL passed 1.5 target_kl
        assert stats["ppo/policy/policykl"] > 0  # the mean over the epoch's minibatches: the first is 0


def test_without_early_stopping_every_epoch_runs(tokenizer):
    policy = make_policy("llama", seed=4)
    config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=3, target_kl=1e-6)
    trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=0.3))
    queries, responses, scores = make_batch(8, seed=5)
    assert _epochs_run(trainer.step(queries, responses, scores), responses) == 3


def test_ratio_threshold_skips_minibatches(tokenizer):
    """Every minibatch's mean ratio (1 in the first epoch) is above 0.5: nothing trains, and the step says so."""
    policy = make_policy("gpt2")
    before = [p.detach().clone() for p in policy.parameters()]
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, ratio_threshold=0.5, learning_rate=1e-2)
    trainer = PPOTrainer(config, policy, None, tokenizer)
    with pytest.warns(UserWarning, match="100% of the minibatches had a mean policy ratio above ratio_threshold=0.5"):
        stats = trainer.step(*make_batch(4, seed=0))
    assert stats["ppo/policy/skipped"] == 1.0
    assert stats["ppo/loss/total"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_log_stats_sends_stats_and_reward_summary(tokenizer, monkeypatch):
    trainer = PPOTrainer(PPOConfig(batch_size=3, mini_batch_size=3), make_policy(), None, tokenizer)
    queries, responses, scores = make_batch(3, seed=2)
    stats = trainer.step(queries, responses, scores)
    logged = []
    monkeypatch.setattr(trainer.accelerator, "log", lambda values, step=None: logged.append((values, step)))
    batch = {"query": ["a", "b", "c"], "response": ["x", "y", "z"]}
    trainer.log_stats(stats, batch, scores)
    ((values, step),) = logged
    assert step == 1
    want = torch.stack(scores)
    assert values["env/reward_mean"] == pytest.approx(float(want.mean()))
    assert values["env/reward_std"] == pytest.approx(float(want.std()))
    np.testing.assert_allclose(values["env/reward_dist"], want.numpy())
    assert values["objective/kl"] == stats["objective/kl"]
    with pytest.raises(ValueError, match=r"batch has no column\(s\) \['response'\]"):
        trainer.log_stats(stats, {"query": ["a", "b", "c"]}, scores)


def test_log_stats_to_tensorboard(tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = PPOConfig(
        batch_size=2, mini_batch_size=2, log_with="tensorboard", project_kwargs={"logging_dir": str(tmp_path)}
    )
    trainer = PPOTrainer(config, make_policy(), None, tokenizer)
    queries, responses, scores = make_batch(2, seed=2)
    for _ in range(2):
        stats = trainer.step(queries, responses, scores)
        trainer.log_stats(stats, {"query": ["a", "b"], "response": ["x", "y"]}, scores)
    trainer.accelerator.end_training()
    runs = [EventAccumulator(str(p.parent)) for p in tmp_path.rglob("events.out.tfevents.*")]
    for run in runs:
        run.Reload()
    (events,) = [run for run in runs if "env/reward_mean" in run.Tags()["scalars"]]  # the other: hparams
    scalars = events.Tags()["scalars"]
    assert {"objective/kl", "ppo/loss/total", "env/reward_mean"} <= set(scalars)
    assert [e.step for e in events.Scalars("env/reward_mean")] == [1, 2]
    assert events.Scalars("env/reward_mean")[0].value == pytest.approx(float(torch.stack(scores).mean()))


def test_dataloader_batches_and_unused_columns(tokenizer):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [[5 + i, 6 + i] for i in range(10)],
            "query": [f"q{i}" for i in range(10)],
            "review_id": list(range(10)),  # not a forward argument: dropped
        }
    )
    collate = lambda rows: {k: [r[k] for r in rows] for k in rows[0]}  # noqa: E731
    config = PPOConfig(batch_size=4, mini_batch_size=2)
    trainer = PPOTrainer(config, make_policy(), None, tokenizer, dataset=data, data_collator=collate)
    batches = list(trainer.dataloader)
    assert len(batches) == 2  # 10 samples, batches of 4, the partial one dropped
    assert set(batches[0]) == {"input_ids", "query"}
    assert all(len(b["query"]) == 4 for b in batches)
    seen = [q for b in batches for q in b["query"]]
    assert len(set(seen)) == 8
    kept = PPOTrainer(
        PPOConfig(batch_size=4, mini_batch_size=2, remove_unused_columns=False), make_policy(), None, tokenizer
    )
    assert set(next(iter(kept.prepare_dataloader(data, collate)))) == {"input_ids", "query", "review_id"}


def test_save_pretrained_round_trip(tokenizer, tmp_path):
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, learning_rate=1e-2), make_policy(), None, tokenizer)
    trainer.step(*make_batch(2, seed=0))
    trainer.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "out")
    trained = trainer.accelerator.unwrap_model(trainer.model)
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_runs_and_changes_nothing(arch, tokenizer, monkeypatch):
    """TRL trained in eval mode, which turns transformers' checkpointing off; here the blocks really are
    checkpointed in the training forward (and still without dropout: the step equals the plain one)."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    real = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    results = []
    for checkpointing in (False, True):
        policy = make_policy(arch, seed=6)
        config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, gradient_checkpointing=checkpointing)
        trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1))
        stats = trainer.step(*make_batch(4, seed=8))
        results.append(({k: v for k, v in stats.items() if isinstance(v, float) and "time" not in k}, policy))
    assert len(calls) == 2 * 2 * 2  # 2 blocks x 2 minibatches x 2 epochs, none in the rollout
    (plain, p0), (ckpt, p1) = results
    assert plain == pytest.approx(ckpt, rel=1e-6, abs=1e-7)
    for a, b in zip(p0.parameters(), p1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
