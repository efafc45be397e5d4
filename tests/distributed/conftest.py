"""Fixtures for the multi-process tests: one ``TORCH_EXTENSIONS_DIR`` for every launch in the test session, and
``launch``, which runs ``accelerate launch`` / ``torchrun`` / ``python`` on a worker script and fails the test with
the tail of its output when it does not exit 0.

DeepSpeed JIT-compiles a shared-memory all-reduce op (``deepspeed_shm_comm``) the first time a process joins a
DeepSpeed world on CPU: about 110 s on 2 cores. Every launch of the session shares one build directory, so the op
is compiled once per session, and by default that directory is ``build/torch_extensions/<python>-<torch>`` in the
repository (``build/`` is git-ignored), so later runs on the same checkout reuse it. ``TORCH_EXTENSIONS_DIR`` in
pytest's environment (a CI cache, say) takes precedence. The directory is also exported to pytest's own
environment for the session, so launches that build their own environment from ``os.environ`` share it as well.

Usage from a test::

    def test_something(launch, tmp_path):
        out = tmp_path / "result"
        launch("accelerate", "--use_deepspeed", "--num_processes", "2", "--deepspeed_config_file", cfg,
               WORKER, out)
        ranks = launch.records(out)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A build lock older than this belongs to a build that was killed (torch's FileBaton then waits forever).
_STALE_LOCK_S = 15 * 60
_TAIL = 4000

# Set by launchers for their children, or by a user's shell (ACCELERATE_USE_CPU=true exported, pytest run inside a
# torchrun or mpirun job): inherited, they would change what the launch under test does.
_LAUNCH_VAR_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "PMI_", "OMPI_", "MV2_")
_LAUNCH_VARS = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """The console script of the venv running pytest (``accelerate``, ``torchrun``), not one from PATH."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} not found next to {sys.executable}", pytrace=False)
    return str(path)


def _clear_stale_locks(root: Path) -> None:
    now = time.time()
    for lock in root.glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > _STALE_LOCK_S:
                lock.unlink()
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir() -> Iterator[Path]:
    """The one ``TORCH_EXTENSIONS_DIR`` of the session (see the module docstring). Also exported in pytest's own
    environment until the session ends, so a launch that does not go through ``launch`` inherits it too."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        root = Path(configured)
    else:
        # torch does not rebuild a cached op when only torch (or Python) changed: key the directory by both.
        key = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        root = REPO / "build" / "torch_extensions" / key
    root.mkdir(parents=True, exist_ok=True)
    _clear_stale_locks(root)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    try:
        yield root
    finally:
        if configured:
            os.environ["TORCH_EXTENSIONS_DIR"] = configured
        else:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)


class Launcher:
    """``launch(launcher, *args, env=None, timeout=..., check=True)`` runs, from the repository root:

    * ``"accelerate"``: ``accelerate launch --main_process_port <free> *args``
    * ``"torchrun"``: ``torchrun --master_addr 127.0.0.1 --master_port <free> *args``
    * ``"python"``: ``python *args`` (no launcher)

    The child's environment is pytest's without any launcher or accelerate variables (so ``ACCELERATE_USE_CPU``
    only where a test sets it: it would drop DeepSpeed), with the session's ``TORCH_EXTENSIONS_DIR``, an empty
    ``HF_HOME`` (a user's ``accelerate config`` default file would change what ``accelerate launch`` does) and the
    hub offline (tests build their models; nothing is downloaded). ``env`` adds to it; a value of None removes a
    variable. The whole process group is killed at ``timeout``. With ``check``, a non-zero exit fails the test
    with the command and the tail of stdout and stderr. Returns the ``subprocess.CompletedProcess``.
    """

    def __init__(self, extensions_dir: Path, hf_home: Path):
        self.extensions_dir = extensions_dir
        self.hf_home = hf_home

    def command(self, launcher: str, *args: object) -> list[str]:
        args = [str(a) for a in args]
        if launcher == "accelerate":
            return [_tool("accelerate"), "launch", "--main_process_port", str(free_port()), *args]
        if launcher == "torchrun":
            return [_tool("torchrun"), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
        if launcher == "python":
            return [sys.executable, *args]
        raise ValueError(f"launch: launcher must be 'accelerate', 'torchrun' or 'python', got {launcher!r}")

    def environment(self, env: dict[str, str | None] | None = None) -> dict[str, str]:
        child = {
            k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_VAR_PREFIXES)
        }
        child.update(
            TORCH_EXTENSIONS_DIR=str(self.extensions_dir),
            HF_HOME=str(self.hf_home),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        for k, v in (env or {}).items():
            if v is None:
                child.pop(k, None)
            else:
                child[k] = str(v)
        return child

    def __call__(
        self,
        launcher: str,
        *args: object,
        env: dict[str, str | None] | None = None,
        timeout: float = 600,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        cmd = self.command(launcher, *args)
        shown = " ".join(cmd)
        if env:
            shown = " ".join(f"{k}={v}" for k, v in env.items() if v is not None) + " " + shown
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.environment(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout kills the launcher and every rank
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"timed out after {timeout:.0f} s: {shown}\n{_tails(stdout, stderr)}", pytrace=False)
        result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            pytest.fail(f"exit {result.returncode}: {shown}\n{_tails(stdout, stderr)}", pytrace=False)
        return result

    @staticmethod
    def records(out: Path | str, ranks: int = 2) -> list[dict]:
        """The JSON records ``<out>.0`` ... ``<out>.<ranks-1>`` a worker wrote, one per rank."""
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]


def _tails(stdout: str, stderr: str) -> str:
    return f"--- stdout (tail) ---\n{stdout[-_TAIL:]}\n--- stderr (tail) ---\n{stderr[-_TAIL:]}"


@pytest.fixture(scope="session")
def launch(torch_extensions_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Launcher:
    """Runs a launcher on a worker script (see ``Launcher``); every call shares the session's extensions dir."""
    return Launcher(torch_extensions_dir, tmp_path_factory.mktemp("hf_home"))
