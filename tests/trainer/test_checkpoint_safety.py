"""A checkpoint cannot run code, tear or load half-way, and a step that fails changes nothing.

The attacker here may rewrite the manifest too (it is only a checksum list): a pickle that would run code is refused
by what it holds, not by its checksum. Each refused load is checked to leave the trainer exactly as it was: weights,
optimizer state, running moments, KL controller, step count and the global RNG."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from trainer_utils import make_batch, make_policy, make_tokenizer

import ppo_fast
from ppo_fast import PPOConfig, PPOTrainer
from ppo_fast.trainer import checkpoint as ckpt


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _build(tokenizer, arch="gpt2"):
    config = PPOConfig(batch_size=2, mini_batch_size=1, use_score_scaling=True, use_score_norm=True, seed=0)
    policy = make_policy(arch, seed=1)
    optimizer = ppo_fast.optim.Lion8bit(policy.parameters(), lr=1e-3, min_8bit_size=0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    return PPOTrainer(config, policy, None, tokenizer, optimizer=optimizer, lr_scheduler=scheduler)


def _snapshot(trainer):
    """Everything a load or a step could change, copied."""
    return {
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "optimizer": {
            k: v.clone() for st in trainer.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)
        },
        "running": trainer.running.state.clone(),
        "kl": trainer.kl_ctl.value,
        "step": trainer.current_step,
        "lr": trainer.lr_scheduler.get_last_lr(),
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(trainer, before):
    after = _snapshot(trainer)
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for k in before["optimizer"]:
        assert torch.equal(before["optimizer"][k], after["optimizer"][k]), k
    assert torch.equal(before["running"], after["running"])
    assert (before["kl"], before["step"], before["lr"]) == (after["kl"], after["step"], after["lr"])
    assert torch.equal(before["rng"], after["rng"])


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A checkpoint after two steps, and the trainer state it holds."""
    trainer = _build(tokenizer)
    for s in range(2):
        trainer.step(*make_batch(2, seed=s))
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    trainer.save_checkpoint(directory, user_state={"samples_seen": 4, "note": "x"})
    return directory, _snapshot(trainer)


@pytest.fixture
def fresh(tokenizer):
    """A trainer that has run one step of its own (so it has state a bad load could clobber)."""
    trainer = _build(tokenizer)
    trainer.step(*make_batch(2, seed=7))
    return trainer


def _copy(saved, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(saved[0], directory)
    return directory


class _Payload:
    """Unpickling it runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_round_trips_with_user_state(saved, fresh):
    directory, state = saved
    assert fresh.load_checkpoint(directory) == {"samples_seen": 4, "note": "x"}
    assert fresh.current_step == state["step"] == 2
    for a, b in zip(state["params"], fresh.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.running.state, state["running"])
    assert sorted(os.listdir(directory.parent)) == ["ckpt"]  # nothing staged is left behind


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "optimizer.bin", "random_states_0.pkl", "lr_scheduler.pt", "custom_checkpoint_0.pkl"]
)
def test_a_pickle_that_runs_code_is_refused_and_never_runs(name, saved, fresh, tmp_path):
    directory = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    with open(directory / name, "wb") as f:
        pickle.dump({"state": _Payload(str(marker))}, f, protocol=2)
    torch.save({"x": _Payload(str(marker))}, directory / "zip_payload.pt")  # torch's zip format too
    ckpt._write_manifest(str(directory))  # the attacker rewrote the manifest
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"holds objects other than tensors and plain data; refused"):
        fresh.load_checkpoint(directory)
    assert not marker.exists()
    _assert_unchanged(fresh, before)
    os.remove(directory / name)  # the torch-zip payload alone is refused as well
    ckpt._write_manifest(str(directory))
    with pytest.raises(ValueError, match=r"zip_payload\.pt holds objects other than tensors"):
        fresh.load_checkpoint(directory)
    assert not marker.exists()


def test_safe_load_refuses_payloads_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save([_Payload(str(marker))], path)
    with pytest.raises(ValueError, match=r"evil\.pt holds objects other than tensors"):
        ckpt.safe_load(path)
    assert not marker.exists()
    torch.save({"w": torch.arange(3.0), "n": 2, "s": "ok"}, path)
    assert torch.equal(ckpt.safe_load(path)["w"], torch.arange(3.0))


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("flip", r"optimizer\.bin differs from what was written \(SHA-256"),
        ("truncate", r"optimizer\.bin has \d+ bytes but was written with \d+"),
        ("delete", r"optimizer\.bin is missing"),
        ("no_manifest", r"has no ppo_fast_manifest\.json: the checkpoint is incomplete"),
    ],
)
def test_a_damaged_file_is_refused_before_anything_changes(tamper, message, saved, fresh, tmp_path):
    directory = _copy(saved, tmp_path)
    target = directory / "optimizer.bin"
    data = bytearray(target.read_bytes())
    if tamper == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif tamper == "truncate":
        target.write_bytes(bytes(data[:-100]))
    elif tamper == "delete":
        target.unlink()
    else:
        (directory / ckpt.MANIFEST).unlink()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        fresh.load_checkpoint(directory)
    _assert_unchanged(fresh, before)


def test_a_missing_optimizer_with_a_rewritten_manifest_leaves_the_weights(saved, fresh, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / "optimizer.bin").unlink()
    ckpt._write_manifest(str(directory))
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"optimizer\.bin is missing"):
        fresh.load_checkpoint(directory)
    _assert_unchanged(fresh, before)


def test_a_truncated_rng_file_is_refused_not_ignored(saved, fresh, tmp_path):
    directory = _copy(saved, tmp_path)
    rng = directory / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    ckpt._write_manifest(str(directory))  # consistent manifest: only the content is wrong
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"random_states_0\.pkl cannot be read"):
        fresh.load_checkpoint(directory)
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["state"].pop(next(iter(s["state"]))) and None, None),  # fewer states: allowed (never stepped)
        (lambda s: s["param_groups"][0]["params"].pop(), r"parameters per group"),
        (
            lambda s: s["state"][0].__setitem__("momentum", torch.zeros(3, dtype=torch.uint8)),
            r"optimizer state 'momentum' of parameter 0 is \(3,\)",
        ),
    ],
)
def test_an_optimizer_state_that_does_not_fit_is_refused_before_the_weights_change(
    edit, message, saved, fresh, tmp_path
):
    directory = _copy(saved, tmp_path)
    state = torch.load(directory / "optimizer.bin", weights_only=True)
    edit(state)
    torch.save(state, directory / "optimizer.bin")
    ckpt._write_manifest(str(directory))
    if message is None:
        fresh.load_checkpoint(directory)
        return
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        fresh.load_checkpoint(directory)
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("trainer_state.json", '{"current_step": -1}', r"trainer_state\.json is malformed"),
        ("trainer_state.json", "{not json", r"trainer_state\.json cannot be read as JSON"),
        ("running_moments.safetensors", b"\x00" * 16, r"running_moments\.safetensors cannot be read"),
    ],
)
def test_a_malformed_trainer_file_is_refused(name, content, message, saved, fresh, tmp_path):
    directory = _copy(saved, tmp_path)
    target = directory / name
    target.write_bytes(content.encode() if isinstance(content, str) else content)
    ckpt._write_manifest(str(directory))
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        fresh.load_checkpoint(directory)
    _assert_unchanged(fresh, before)


def test_a_model_of_another_shape_is_refused_before_anything_changes(saved, tokenizer, tmp_path):
    """The reference checksum is what normally catches another model; here it is rewritten to match, so the shape
    check must."""
    directory = _copy(saved, tmp_path)
    other = _build(tokenizer, arch="llama")
    state = json.loads((directory / "trainer_state.json").read_text())
    state["reference_checksum"] = other._checkpoint_state.reference_checksum()
    (directory / "trainer_state.json").write_text(json.dumps(state))
    ckpt._write_manifest(str(directory))
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin does not match this trainer's model"):
        other.load_checkpoint(directory)
    _assert_unchanged(other, before)


def test_a_crash_while_overwriting_keeps_the_previous_checkpoint(tokenizer, tmp_path, monkeypatch):
    trainer = _build(tokenizer)
    trainer.step(*make_batch(2, seed=0))
    directory = tmp_path / "ckpt"
    trainer.save_checkpoint(directory)
    at_save = _snapshot(trainer)
    trainer.step(*make_batch(2, seed=1))

    real_save, calls = torch.save, []

    def crash_on_second_file(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("f"))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(directory)
    monkeypatch.undo()
    assert len(calls) == 2  # the model was written, the optimizer was not

    from_disk = _build(tokenizer)
    from_disk.load_checkpoint(directory)  # still the first save, whole
    assert from_disk.current_step == 1
    for a, b in zip(at_save["params"], from_disk.model.parameters()):
        assert torch.equal(a, b)
    for k, v in at_save["optimizer"].items():
        got = {k2: v2 for st in from_disk.optimizer.state.values() for k2, v2 in st.items() if torch.is_tensor(v2)}
        assert torch.equal(got[k], v), k
    assert torch.equal(from_disk.running.state, at_save["running"])

    trainer.save_checkpoint(directory)  # the next save replaces it and clears the staging directory
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    again = _build(tokenizer)
    again.load_checkpoint(directory)
    assert again.current_step == 2


def test_overwrite_without_an_atomic_exchange_still_replaces_whole(tokenizer, tmp_path, monkeypatch):
    trainer = _build(tokenizer)
    directory = tmp_path / "ckpt"
    trainer.save_checkpoint(directory)
    trainer.step(*make_batch(2, seed=0))
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    trainer.save_checkpoint(directory)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    again = _build(tokenizer)
    again.load_checkpoint(directory)
    assert again.current_step == 1


def test_save_checkpoint_argument_checks(tokenizer, tmp_path):
    trainer = _build(tokenizer)
    with pytest.raises(TypeError, match="user_state must be JSON-serialisable"):
        trainer.save_checkpoint(tmp_path / "a", user_state={"x": object()})
    with pytest.raises(TypeError, match="user_state must be a dict or None"):
        trainer.save_checkpoint(tmp_path / "a", user_state=[1])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir .* is a file"):
        trainer.save_checkpoint(tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("arch, limit_name", [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_a_step_longer_than_the_model_changes_nothing(arch, limit_name, tokenizer):
    trainer = _build(tokenizer, arch=arch)
    trainer.step(*make_batch(2, seed=0))
    queries, responses, scores = make_batch(2, seed=1)
    limit = getattr(trainer.model.pretrained_model.config, limit_name)
    queries[1] = torch.randint(3, 50, (limit - len(responses[1]) + 1,))
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match=rf"queries\[1\] and responses\[1\] hold .* at most {limit} positions"):
        trainer.step(queries, responses, scores)
    _assert_unchanged(trainer, before)
    queries[1] = queries[1][1:]  # exactly the limit runs
    trainer.step(queries, responses, scores)


def test_objects_registered_with_the_accelerator_come_back_through_safe_load(tokenizer, tmp_path):
    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": torch.tensor(self.n)}

        def load_state_dict(self, state):
            self.n = int(state["n"])

    trainer, counter = _build(tokenizer), Counter()
    trainer.accelerator.register_for_checkpointing(counter)
    counter.n = 5
    trainer.save_checkpoint(tmp_path / "ckpt")
    counter.n = 9
    trainer.load_checkpoint(tmp_path / "ckpt")
    assert counter.n == 5
