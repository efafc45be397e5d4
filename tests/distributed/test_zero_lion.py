"""Lion8bit as DeepSpeed's client optimizer, for real: two processes over gloo, ZeRO stages 1-3
(DeepSpeed hands the optimizer flat fp32 partitions; each rank's gets 8-bit momentum)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lion8bit_under_zero(tmp_path, stage):
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
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would drop DeepSpeed
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    cmd = [launcher, "launch", "--use_deepspeed", "--num_processes", "2", "--deepspeed_config_file", str(config)]
    cmd += ["--main_process_port", str(_free_port()), os.path.join(HERE, "zero_lion_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["last"] < 0.7 * r["first"], r  # it learns
        assert r["momentum_dtypes"] == ["torch.uint8"], r  # the flat partition got 8-bit state
    # Both ranks end with the same full parameters.
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    assert ranks[0]["param_abs"] == ranks[1]["param_abs"]
