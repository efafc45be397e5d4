"""``python -m ppo_fast`` (ppo_fast/_selfcheck.py): the self-check passes on this machine's CPU, finds
a reference that disagrees with its kernel, and refuses to pass without the extension."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from ppo_fast import _selfcheck, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = list(_selfcheck.CHECKS)


def _lines(text: str, kind: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.split(" ", 1)[0] == kind]


def test_module_runs_and_passes_on_cpu():
    env = dict(os.environ, PPO_FAST_REQUIRE_EXT="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "ppo_fast", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("ppo_fast", "torch", "transformers", "accelerate", "deepspeed", "bitsandbytes", "python"):
        assert re.search(rf"^{name} +\S", out, re.M), name
    assert "extension     loaded" in out
    # every registered op is listed with its CPU kernel
    for op in (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ppo_fast::")):
        assert re.search(rf"^  {re.escape(op)} +kernels: CPU", out, re.M), op
    ok = {ln.split()[1] for ln in _lines(out, "ok") if ln.split()[2] == "cpu"}
    assert ok == set(OPS), set(OPS) ^ ok
    for want in ("ppo_loss", "logprobs", "Lion8bit", "Lion", "moments_update_normalize_", "gae", "full_kl", "entropy"):
        assert want in OPS
    assert not _lines(out, "MISMATCH") and not _lines(out, "ERROR")
    assert out.rstrip().splitlines()[-1].startswith("all ok:")


def _wrong(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out + 1 if isinstance(out, torch.Tensor) else type(out)(o + 1 for o in out)

    return wrapped


@pytest.mark.parametrize("op,target", [("full_kl", "full_kl"), ("ppo_loss", "ppo_loss"), ("gae", "gae_scan")])
def test_a_wrong_reference_is_a_mismatch_of_that_op_only(monkeypatch, capsys, op, target):
    # gae_scan is used by nothing: patching it must change nothing (a control); the others are the
    # reference of exactly one check each.
    monkeypatch.setattr(reference, target, _wrong(getattr(reference, target)))
    rc = _selfcheck.main(["--device", "cpu"])
    out = capsys.readouterr().out
    mismatches = _lines(out, "MISMATCH")
    assert not _lines(out, "ERROR"), out
    if target == "gae_scan":
        assert rc == 0 and not mismatches, out
        return
    assert rc == 1, out
    assert [ln.split()[1:3] for ln in mismatches] == [[op, "cpu"]], out
    assert op not in {ln.split()[1] for ln in _lines(out, "ok")}
    assert len(_lines(out, "ok")) == len(OPS) - 1
    assert out.rstrip().splitlines()[-1].startswith("FAILED: 1 problem")


def test_an_op_that_raises_is_an_error_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("moments: broken on purpose")

    monkeypatch.setattr(reference, "moments", broken)
    rc = _selfcheck.main(["--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    errors = _lines(out, "ERROR")
    assert errors and all("broken on purpose" in ln for ln in errors), out
    assert "moments" in {ln.split()[1] for ln in errors}
    assert not _lines(out, "ok"), "--quiet prints problems only"


def test_without_the_extension_it_says_so_and_returns_2(monkeypatch, capsys):
    from ppo_fast import _ops

    monkeypatch.setattr(_ops, "HAS_EXT", False)
    monkeypatch.setattr(_ops, "EXT_ERROR", "disabled by PPO_FAST_DISABLE_EXT=1")
    assert _selfcheck.main([]) == 2
    out = capsys.readouterr().out
    assert "NOT LOADED: disabled by PPO_FAST_DISABLE_EXT=1" in out
    assert "nothing was checked" in out
    assert not _lines(out, "ok")


def test_cuda_without_a_gpu_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _selfcheck.main(["--device", "cuda"]) == 1
    assert "torch.cuda.is_available() is False" in capsys.readouterr().out


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        _selfcheck.main(["--device", "tpu"])
    assert e.value.code == 2
    assert "--device" in capsys.readouterr().err
