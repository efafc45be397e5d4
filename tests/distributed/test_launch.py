"""The launch layer (ppo_fast/trainer/distributed.py) for real: two processes on CPU under ``accelerate launch``
and ``torchrun``, plain DDP over gloo and DeepSpeed ZeRO-1/2/3 over gloo, the launches that used to run silently
wrong turned into errors, and ``zero3_init_disabled`` under ZeRO-3 (DESIGN.md section 5).

Each launch runs tests/distributed/launch_worker.py, whose ranks write what they saw to ``<out>.<rank>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "launch_worker.py"
CONFIGS = "examples/accelerate_configs"
# Clipping lives in a JSON DeepSpeed config (accelerate's YAML drops gradient_clipping 0.0). Below the mean
# gradient's norm (~1), so clipping changes the step.
CLIP = 0.25
# launch_worker.py's check_timeout mode: InitProcessGroupKwargs(timeout=321 s), its backend left at the default.
PG_TIMEOUT_S = 321.0
# torch's default for a gloo group (torch.distributed.constants.default_pg_timeout), which DeepSpeed passes on.
DEFAULT_PG_TIMEOUT_S = 1800.0
# Far above float32 rounding of one SGD step, far below what another gradient would change.
TOL = 1e-5


def _assert_one_averaged_step(ranks: list[dict]) -> None:
    """Both ranks hold the same parameters after the step, which is the step with the gradient averaged over both
    ranks' (different) data, clipped as configured, and not the step a rank's own gradient would give."""
    assert ranks[0]["params"] == ranks[1]["params"]
    for r in ranks:
        assert r["diff_averaged"] < TOL, r["diff_averaged"]
        assert r["diff_own"] > 100 * TOL, r["diff_own"]


def _check_world(ranks: list[dict], distributed_type: str) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert (r["world"], r["torch_world"], r["distributed_type"]) == (2, 2, distributed_type), r


# --- plain DDP over gloo ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    ["multi_gpu_flag", "cpu_ddp_yaml", "torchrun"],
)
def test_ddp_two_processes(launch, tmp_path, how):
    out = tmp_path / "out"
    if how == "multi_gpu_flag":
        launch(
            "accelerate",
            "--multi_gpu",
            "--num_processes",
            "2",
            WORKER,
            "check",
            out,
            env={"ACCELERATE_USE_CPU": "true"},
        )
    elif how == "cpu_ddp_yaml":
        launch("accelerate", "--config_file", f"{CONFIGS}/cpu_ddp.yaml", WORKER, "check", out)
    else:
        # Also with a process-group handler made for its timeout alone (backend left at the default "nccl").
        launch("torchrun", "--nproc_per_node", "2", WORKER, "check_timeout", out)
    ranks = launch.records(out)
    # accelerate with cpu=True and WORLD_SIZE 2 reports MULTI_CPU (its DDP over gloo), whichever launcher.
    _check_world(ranks, "MULTI_CPU")
    timeout = PG_TIMEOUT_S if how == "torchrun" else DEFAULT_PG_TIMEOUT_S
    for r in ranks:
        assert r["gradient_clipping"] is None  # no DeepSpeed: nothing clips
        assert r["pg_timeout_s"] == timeout
    _assert_one_averaged_step(ranks)


# --- DeepSpeed ZeRO over gloo ----------------------------------------------------------------------------------


def _ds_json(tmp_path: Path, stage: int) -> Path:
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": stage},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 1,
                "zero_allow_untested_optimizer": True,
                "gradient_clipping": CLIP,
            }
        )
    )
    return path


def _check_zero3_models(z: dict) -> None:
    full = z["full_numel"]
    sharded = {"whole": 0, "sharded": z["direct"]["whole"], "numel": 0}
    whole = {"whole": z["direct"]["whole"], "sharded": 0, "numel": full}
    assert z["direct"] == whole  # a bare constructor is never sharded
    assert z["zero3_enabled_before"] is True
    # Outside any context, from_pretrained and from_config build zero.Init-sharded models.
    assert z["outside_pretrained"] == sharded
    assert z["outside_config"] == sharded
    # The plugin's zero3_init_context_manager(enable=False) alone: transformers still sees ZeRO-3 and still shards.
    assert z["zero3_enabled_in_plugin_ctx"] is True
    assert z["plugin_ctx_pretrained"] == sharded
    assert z["plugin_ctx_config"] == sharded
    # zero3_init_disabled: full models on every rank, the saved weights, each rank running forwards on its own.
    assert z["zero3_enabled_in_disabled"] is False
    assert z["init_flag_in_disabled"] is False
    assert z["disabled_pretrained"] == whole
    assert z["disabled_config"] == whole
    assert z["disabled_matches_saved"] is True
    # State restored afterwards, also when the body raised (and the exception still propagated).
    assert (z["zero3_enabled_after"], z["init_flag_after"]) == (True, True)
    assert z["zero3_enabled_in_raising"] is False
    assert z["raise_propagated"] is True
    assert (z["zero3_enabled_after_raise"], z["init_flag_after_raise"]) == (True, True)
    assert z["after_raise_config"] == sharded


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("how", ["deepspeed_config_file", "yaml"])
def test_deepspeed_two_processes(launch, tmp_path, stage, how):
    out, model_dir = tmp_path / "out", tmp_path / "gpt2"
    if how == "deepspeed_config_file":
        args = ["--use_deepspeed", "--num_processes", "2", "--deepspeed_config_file", _ds_json(tmp_path, stage)]
        # With a process-group handler made for its timeout alone: build_accelerator still gives it gloo.
        mode, clipping, timeout = "check_timeout", CLIP, PG_TIMEOUT_S
    else:
        # ds_zero{N}.json says "auto": accelerate fills gradient_clipping with 1.0.
        args = ["--config_file", f"{CONFIGS}/cpu_deepspeed_zero{stage}.yaml"]
        mode, clipping, timeout = "check", 1.0, DEFAULT_PG_TIMEOUT_S
    launch("accelerate", *args, WORKER, mode, out, model_dir)
    ranks = launch.records(out)
    _check_world(ranks, "DEEPSPEED")
    for r in ranks:
        assert r["zero_stage"] == stage
        assert r["gradient_clipping"] == clipping
        assert r["zero_allow_untested_optimizer"] is True
        assert r["pg_timeout_s"] == timeout
    _assert_one_averaged_step(ranks)
    if clipping < ranks[0]["mean_grad_norm"]:
        for r in ranks:  # the clipping was applied, not just configured
            assert r["diff_averaged_unclipped"] > 100 * TOL, r
    if stage == 3:
        for r in ranks:
            _check_zero3_models(r["zero3"])
        assert [r["zero3"]["disabled_forwards"] for r in ranks] == [1, 2]


# --- launches that would run silently wrong -------------------------------------------------------------------


@pytest.mark.slow
def test_cpu_flag_starts_one_process_and_raises(launch, tmp_path):
    out = tmp_path / "out"
    proc = launch("accelerate", "--cpu", "--num_processes", "2", WORKER, "build", out, check=False)
    assert proc.returncode != 0
    assert not Path(f"{out}.1").exists()  # accelerate's simple launcher started a single process
    error = launch.records(out, ranks=1)[0]["error"]
    assert "started only this one" in error
    assert "simple launcher" in error
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch_worker.py" in error
    assert "RuntimeError: check_launch:" in proc.stderr  # the script fails loudly, not only our record


@pytest.mark.slow
def test_deepspeed_with_use_cpu_raises(launch, tmp_path):
    out = tmp_path / "out"
    proc = launch(
        "accelerate",
        "--use_deepspeed",
        "--num_processes",
        "2",
        "--deepspeed_config_file",
        _ds_json(tmp_path, 2),
        WORKER,
        "build",
        out,
        env={"ACCELERATE_USE_CPU": "true"},
        check=False,
    )
    assert proc.returncode != 0
    for r in launch.records(out):
        error = r["error"]
        assert "DeepSpeed was asked for" in error
        assert "ACCELERATE_USE_CPU=true is set in the environment" in error
        assert "silently drops DeepSpeed" in error
        assert "accelerate launch --use_deepspeed --num_processes 2 --deepspeed_config_file ds.json" in error
        assert f"{CONFIGS}/cpu_deepspeed_zero3.yaml" in error


@pytest.mark.slow
def test_plain_accelerator_first_raises(launch, tmp_path):
    out = tmp_path / "out"
    proc = launch("torchrun", "--nproc_per_node", "2", WORKER, "plain_first", out, check=False)
    assert proc.returncode != 0
    for r in launch.records(out):
        error = r["error"]
        assert "the launcher started 2 processes (WORLD_SIZE=2), but this Accelerator sees 1" in error
        assert "first Accelerator" in error
        assert "ppo_fast.build_accelerator()" in error
        assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch_worker.py" in error


def test_one_process_without_launcher(launch, tmp_path):
    out = tmp_path / "out"
    launch("python", WORKER, "build", out)
    (r,) = launch.records(out, ranks=1)
    assert (r["world"], r["rank"], r["torch_world"], r["distributed_type"]) == (1, 0, 1, "NO")


def test_use_deepspeed_other_than_true_raises(launch, tmp_path):
    # accelerate turns DeepSpeed on for ACCELERATE_USE_DEEPSPEED=true only; "1" would silently run without it.
    out = tmp_path / "out"
    proc = launch("python", WORKER, "build", out, env={"ACCELERATE_USE_DEEPSPEED": "1"}, check=False)
    assert proc.returncode != 0
    (r,) = launch.records(out, ranks=1)
    assert "DeepSpeed was asked for" in r["error"]
    assert "only for ACCELERATE_USE_DEEPSPEED=true, and it is '1'" in r["error"]
