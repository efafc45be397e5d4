"""Lion8bit as DeepSpeed's client optimizer, for real: two processes over gloo, ZeRO stages 1-3
(DeepSpeed hands the optimizer flat fp32 partitions; each rank's gets 8-bit momentum)."""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "zero_lion_worker.py"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lion8bit_under_zero(launch, tmp_path, stage):
    config = tmp_path / "ds.json"
    # Clipping lives in the JSON: accelerate's YAML drops gradient_clipping 0.0 (DESIGN.md section 5).
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": stage},
                "train_micro_batch_size_per_gpu": 8,
                "gradient_accumulation_steps": 1,
                "zero_allow_untested_optimizer": True,
                "gradient_clipping": 1.0,
            }
        )
    )
    out = tmp_path / "result.json"
    # The session's launcher (tests/distributed/conftest.py): shared TORCH_EXTENSIONS_DIR, no ACCELERATE_USE_CPU
    # (it would drop DeepSpeed), a free port.
    launch("accelerate", "--use_deepspeed", "--num_processes", "2", "--deepspeed_config_file", config, WORKER, out)
    ranks = launch.records(out)
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["last"] < 0.7 * r["first"], r  # it learns
        assert r["momentum_dtypes"] == ["torch.uint8"], r  # the flat partition got 8-bit state
    # Both ranks end with the same full parameters.
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    assert ranks[0]["param_abs"] == ranks[1]["param_abs"]
