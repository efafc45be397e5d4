"""PPOTrainer for real with two processes on CPU: DDP over gloo and DeepSpeed ZeRO-1/2/3 over gloo, each
launched with the repository's accelerate configs exactly as a user would (``accelerate launch --config_file
examples/accelerate_configs/<cfg>.yaml script.py``). Each launch runs tests/distributed/trainer_worker.py,
which records what the assertions below check."""

from __future__ import annotations

import math
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "trainer_worker.py")
CONFIGS = os.path.join(ROOT, "examples", "accelerate_configs")
LAUNCHES = {
    "ddp": "cpu_ddp.yaml",
    "zero1": "cpu_deepspeed_zero1.yaml",
    "zero2": "cpu_deepspeed_zero2.yaml",
    "zero3": "cpu_deepspeed_zero3.yaml",
}


@pytest.fixture(scope="module")
def single(launch, tmp_path_factory):
    """The same global batch in one process, without a launcher."""
    out = tmp_path_factory.mktemp("single") / "r"
    launch("python", WORKER, out)
    (record,) = launch.records(out, 1)
    assert record["world"] == 1 and record["distributed_type"] == "NO"
    return record


@pytest.fixture(scope="module", params=list(LAUNCHES))
def launched(request, launch, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    launch("accelerate", "--config_file", os.path.join(CONFIGS, LAUNCHES[request.param]), WORKER, work / "r", work)
    return request.param, work, launch.records(work / "r", 2)


def test_joined_with_the_asked_backend(launched):
    name, _, ranks = launched
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["num_processes"] == 2 for r in ranks)
    want = "MULTI_CPU" if name == "ddp" else "DEEPSPEED"
    assert all(r["distributed_type"] == want for r in ranks)
    assert all(r["zero_stage"] == (0 if name == "ddp" else int(name[-1])) for r in ranks)


def test_two_processes_match_one_process_on_the_global_batch(launched, single):
    """Global whitening, all-gathered score moments, gradient averaging, all-reduced KL for the controller and
    DeepSpeed clipping at max_grad_norm: two halves of the batch train as the whole batch does."""
    _, _, ranks = launched
    for step, want in enumerate(single["steps"]):
        got0, got1 = ranks[0]["steps"][step], ranks[1]["steps"][step]
        assert got0 == got1, step  # every rank reports the same statistics and holds the same parameters
        assert got0["params"] == pytest.approx(want["params"], rel=1e-8)
        for key, value in want["stats"].items():
            assert got0["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)


def test_grpo_two_processes_match_one_process(launched, single):
    """A value-free estimator under DDP: each rank holds one whole group (batch_size per process is a multiple of
    group_size), so its advantages are the one-process ones; the frozen value head needs no gradient from DDP."""
    name, _, ranks = launched
    if name != "ddp":
        assert all("grpo" not in r for r in ranks)
        return
    for step, want in enumerate(single["grpo"]["steps"]):
        got0, got1 = ranks[0]["grpo"]["steps"][step], ranks[1]["grpo"]["steps"][step]
        assert got0 == got1, step
        assert got0["params"] == pytest.approx(want["params"], rel=1e-8)
        for key, value in want["stats"].items():
            assert got0["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    for r in (*ranks, single):
        assert r["grpo"]["value_head_moved"] is False and r["grpo"]["value_stats"] == []


def test_8bit_client_optimizers(launched):
    _, _, ranks = launched
    for name in ("adam8bit", "lion8bit"):
        r0, r1 = ranks[0]["optimizers"][name], ranks[1]["optimizers"][name]
        assert r0["after"] == r1["after"], name  # identical parameters on both ranks
        assert r0["loss"] == r1["loss"] and r0["responses_len_mean"] == r1["responses_len_mean"], name
        assert r0["responses_len_mean"] == 63 / 8  # the lengths of both ranks' ragged rows, gathered
        assert r0["after"] != r0["before"], name  # and they trained
        assert "torch.uint8" in r0["state_dtypes"] and "torch.uint8" in r1["state_dtypes"], name


def test_early_stopping_is_one_decision_for_all_ranks(launched):
    _, _, ranks = launched
    decisions = [r["early_stop"] for r in ranks]
    assert decisions[0] == decisions[1]
    assert decisions[0]["alone_would_stop"] is False  # rank 1's KL alone (2.0 > 1.5) would have stopped it
    assert decisions[0]["mean_stops"] is True  # mean 1.95 > 1.5: both stop
    assert decisions[0]["epochs_run"] == int(decisions[0]["epochs_run"])


def test_zero3_reference_generation_reward_model_and_checkpoint(launched, launch, tmp_path):
    name, work, ranks = launched
    if name != "zero3":
        assert all("zero3" not in r for r in ranks)
        return
    z0, z1 = ranks[0]["zero3"], ranks[1]["zero3"]
    # The reference is sharded: each rank holds about half of it.
    assert z0["ref_local_numel"] + z1["ref_local_numel"] >= z0["ref_full_numel"] > 1.8 * z0["ref_local_numel"]
    # One gather for the whole generate call (one batch), and the same greedy responses on both ranks.
    assert z0["generate_gathers"] == z1["generate_gathers"] == 1
    assert z0["responses"] == z1["responses"]
    # The reward model built inside zero3_init_disabled is whole on every rank and runs alone.
    assert not z0["reward_sharded"] and not z1["reward_sharded"]
    assert z0["reward_numel"] == z1["reward_numel"] > 10000
    assert z0["reward_forward_ok"] and z1["reward_forward_ok"]

    # Resumed under the same launch, DeepSpeed's own load (through safe_load) restores the state at the save.
    for z in (z0, z1):
        native = z["native_resume"]
        assert native["moved"] != z["params_at_save"]
        assert native["params"] == pytest.approx(z["params_at_save"], rel=1e-12)
        assert native["current_step"] == z["steps_at_save"] and native["kl_coef"] == z["kl_coef_at_save"]

    # The ZeRO-3 checkpoint and save_pretrained load in one process without DeepSpeed.
    out = tmp_path / "load"
    launch("python", WORKER, out, work, "load")
    (loaded,) = launch.records(out, 1)
    assert loaded["current_step"] == z0["steps_at_save"] == 3
    assert loaded["params"] == pytest.approx(z0["params_at_save"], rel=1e-12)
    assert loaded["final_params"] == pytest.approx(z0["params_at_save"], rel=1e-12)
    assert loaded["kl_coef"] == z0["kl_coef_at_save"] != 0.2  # the adaptive controller moved and came back
    assert loaded["running_count"] == 24  # 3 steps of 8 scores, all-gathered
    assert any("optimizer state (partitioned by DeepSpeed)" in w for w in loaded["warnings"])
    assert math.isfinite(loaded["next_step_loss"])  # training continues after the load
