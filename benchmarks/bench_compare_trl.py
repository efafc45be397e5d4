"""Smoke run of ``benchmarks/compare_trl`` (ppo_fast vs TRL 0.11.4 whole steps, the floor, the reward curve).

``run.py --smoke``: workload 0 (a 3-layer GPT-2 of width 32, B=4, response 8), one step per library, the
model's floor, a 2-step reward curve with generated responses. TRL runs when its venv is present
(``PPO_FAST_TRL_VENV`` or ``benchmarks/compare_trl/.venv-trl``), or after building it when
``PPO_FAST_COMPARE_TRL_SETUP=1``; otherwise only the ppo_fast side runs, and a warning says so. The real
comparison is ``python benchmarks/compare_trl/run.py`` (see its README).

    PPO_FAST_BENCH_SHAPES=smoke pytest benchmarks/bench_compare_trl.py -q --benchmark-disable
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

import ppo_fast

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARE = os.path.join(HERE, "compare_trl")
sys.path.insert(0, COMPARE)
import workloads as W  # noqa: E402


def _trl_venv() -> tuple[str | None, str]:
    venv = os.environ.get("PPO_FAST_TRL_VENV") or os.path.join(COMPARE, ".venv-trl")
    if os.path.exists(os.path.join(venv, "bin", "python")):
        return venv, f"TRL venv {venv}"
    if os.environ.get("PPO_FAST_COMPARE_TRL_SETUP") == "1":
        env = dict(os.environ, PPO_FAST_PYTHON=sys.executable)
        subprocess.run(["bash", os.path.join(COMPARE, "setup_trl_venv.sh"), venv], check=True, env=env)
        return venv, f"TRL venv {venv} (built now)"
    return None, (
        f"no TRL venv at {venv}: ran the ppo_fast side only (set PPO_FAST_TRL_VENV, or "
        "PPO_FAST_COMPARE_TRL_SETUP=1 to build it)"
    )


def _records(results: dict, lib: str, mode: str) -> list[dict]:
    return [r for r in results["records"] if r.get("lib") == lib and r.get("mode") == mode]


@pytest.mark.slow
def test_compare_trl_smoke(benchmark, tmp_path):
    venv, how = _trl_venv()
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, os.path.join(COMPARE, "run.py"), "--smoke", "--out", str(out)]
    cmd += ["--libs", "trl,ppo_fast", "--trl-venv", venv] if venv else ["--libs", "ppo_fast"]
    # The workers import the ppo_fast this process imported.
    root = os.path.dirname(os.path.dirname(os.path.abspath(ppo_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))

    def run():
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    proc = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert not [r for r in results["records"] if "error" in r], proc.stderr[-3000:]
    digest = results["init_digests"]["0"]

    w = W.get(0)
    responses = W.make_responses(w)
    # The reward, written out: fraction of each response's ids divisible by 8, averaged over the batch.
    expected = sum(sum(1 for t in r.tolist() if t % 8 == 0) / len(r) for r in responses) / len(responses)

    (pf,) = _records(results, "ppo_fast", "time")
    assert pf["fused"] and pf["versions"]["ppo_fast_ext"]
    assert pf["digest"] == digest
    assert len(pf["steps"]) == 1 and pf["steps"][0]["cpu_s"] > 0 and pf["steps"][0]["wall_s"] > 0
    assert pf["steps"][0]["reward_mean"] == pytest.approx(expected, abs=1e-12)
    assert pf["peak_rss_mb"] >= pf["rss_setup_mb"] > 0
    (floor,) = _records(results, "floor", "floor")
    assert floor["digest"] == digest and floor["trainable"] == pf["trainable"]
    (curve,) = _records(results, "ppo_fast", "curve")
    assert len(curve["steps"]) == 2 and all(0.0 <= s["reward_mean"] <= 1.0 for s in curve["steps"])
    assert "| 0 | smoke gpt2-tiny" in proc.stdout
    benchmark.extra_info["trl"] = how

    if venv is None:
        warnings.warn(how, stacklevel=1)
        print(how)
        return
    (trl,) = _records(results, "trl", "time")
    assert trl["versions"]["trl"] == "0.11.4"
    assert trl["digest"] == digest and trl["trainable"] == pf["trainable"]
    assert trl["steps"][0]["reward_mean"] == pytest.approx(expected, abs=1e-12)
    # Same weights, same batch: the first rollout's statistics agree across libraries (transformers 4.46 vs 5).
    t, p = trl["first_step_stats"], pf["first_step_stats"]
    assert p["objective/entropy"] == pytest.approx(t["objective/entropy"], rel=1e-4)
    assert p["ppo/mean_scores"] == pytest.approx(t["ppo/mean_scores"], abs=1e-6)
    assert p["ppo/returns/mean"] == pytest.approx(t["ppo/returns/mean"], rel=1e-3, abs=1e-5)
    assert p["objective/kl"] == t["objective/kl"] == 0.0  # the reference starts as the policy
    (trl_curve,) = _records(results, "trl", "curve")
    assert len(trl_curve["steps"]) == 2


def test_replay_kernels_counts_and_flops():
    """``--profile``'s kernel replay: every GEMM and attention call of the profiled step is found once (none
    inside the attention kernels counted as GEMMs), grouped by shape, and its FLOPs are 2 M N K."""
    import torch
    import torch.nn.functional as F
    import worker

    a, b, bias = torch.randn(24, 16), torch.randn(16, 8), torch.randn(8)
    x, y = torch.randn(3, 5, 7), torch.randn(3, 7, 2)
    q = torch.randn(2, 2, 12, 4, requires_grad=True)
    p = torch.randn(1, 2, 6, 4)  # forward only, as the rollout's no-grad passes
    outside = torch.randn(9, 9)
    with torch.profiler.profile(record_shapes=True) as prof:
        outside @ outside  # outside the step: not counted
        with torch.profiler.record_function("harness::step"):
            for _ in range(3):
                torch.mm(a, b)
            torch.addmm(bias, a, b)
            torch.addmm(bias, a, b)
            torch.bmm(x, y)
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            F.scaled_dot_product_attention(p, p, p, is_causal=True)
    rp = worker.replay_kernels(prof.events(), "cpu", torch.float32, reps=1)
    calls = {(r["op"], tuple(map(tuple, r["shapes"]))): r["calls"] for r in rp["rows"]}
    assert calls == {
        ("aten::mm", ((24, 16), (16, 8))): 3,
        ("aten::addmm", ((8,), (24, 16), (16, 8))): 2,
        ("aten::bmm", ((3, 5, 7), (3, 7, 2))): 1,
        ("attention (causal)", ((2, 2, 12, 4),) * 3): [2, 1],
        ("attention (causal)", ((1, 2, 6, 4),) * 3): [1, 0],
    }
    assert rp["gemm_calls"] == 6 and rp["attention_calls"] == [3, 1]
    assert rp["gemm_gflop"] * 1e9 == pytest.approx(5 * 2 * 24 * 16 * 8 + 2 * 3 * 5 * 7 * 2)
    # QK^T and PV, 4 b h T T d halved by the causal mask; forward once per call, twice over per backward
    assert rp["attention_gflop"] * 1e9 == pytest.approx(
        (2 + 2 * 1) * 4 * 2 * 2 * 12 * 12 * 4 * 0.5 + 1 * 4 * 1 * 2 * 6 * 6 * 4 * 0.5
    )
    # a shape the step never ran backward through is timed forward only
    (fwd_only,) = [row for row in rp["rows"] if row["calls"] == [1, 0]]
    assert fwd_only["ms"][0] > 0 and fwd_only["ms"][1] == 0.0 and fwd_only["gflops"][1] is None
    assert rp["gemm_s"] > 0 and rp["attention_s"] > 0 and rp["square_gemm_gflops"] > 0
    assert all(r["gflops"] > 0 for r in rp["rows"] if r["op"].startswith("aten::"))
