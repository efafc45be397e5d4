"""Checkpoint files that cannot run code, tear, or load half-way.

* Nothing is unpickled with ``weights_only=False``: every pickle in a checkpoint (``.bin``, ``.pt``, ``.pkl``, ...)
  is read by :func:`safe_load`, which allows tensors, plain Python data, the numpy types of accelerate's RNG states
  and the two plain-data classes of DeepSpeed's ZeRO optimizer files; anything else is refused with an error that
  names the file. The trainer's own state is JSON and safetensors.
* A checkpoint is written into a hidden sibling directory (``.<name>.partial``), fsynced, given a manifest (every
  file's size and SHA-256) and only then renamed into place; an existing checkpoint of that name is swapped out in
  one ``renameat2(RENAME_EXCHANGE)`` where the file system has it (else two renames) and deleted afterwards. A
  directory with a manifest is complete: :func:`is_complete` is how ``latest`` picks one.
* :func:`verify_manifest` refuses a missing, truncated or altered file before anything is loaded.
* :func:`save_trainer` and :func:`load_trainer` are ``PPOTrainer.save_checkpoint`` and ``load_checkpoint``: what a
  checkpoint holds and where, and a load that reads and checks every file before it changes anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # the trainer imports this module: the functions below only take one
    from ppo_fast.trainer.ppo_trainer import PPOTrainer

__all__ = ["MANIFEST", "PICKLE_SUFFIXES", "is_complete", "safe_load", "verify_manifest"]

MANIFEST = "ppo_fast_manifest.json"
# Files that torch, accelerate or DeepSpeed unpickle; every one in a checkpoint is checked with safe_load.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 1 << 22


def _safe_globals() -> list[Any]:
    """Globals a checkpoint may name besides torch's own: numpy arrays and dtypes (accelerate's RNG states, the
    same list accelerate allows) and DeepSpeed's ZeRO stage enum and loss scaler (plain data in its optimizer
    files)."""
    import codecs

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 pickles name numpy._core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    if hasattr(np, "dtypes"):
        allowed += [np.dtypes.UInt32DType, np.dtypes.Int64DType, np.dtypes.Float64DType]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler]
    return allowed


def safe_load(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with the globals above allowed; a file holding any other object
    (a pickle that would run code on load) or one that cannot be read raises ``ValueError`` naming it."""
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint file {path} holds objects other than tensors and plain data; refused (it is loaded with "
            f"weights_only=True, so it cannot run code): {first}"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"checkpoint file {path} cannot be read: {e}") from None


# ---------------------------------------------------------------------------------------------- manifest
def _files(directory: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(directory: str) -> None:
    files = {rel: {"size": os.path.getsize(os.path.join(directory, rel))} for rel in _files(directory)}
    for rel, entry in files.items():
        entry["sha256"] = _sha256(os.path.join(directory, rel))
    _write_json_durably(os.path.join(directory, MANIFEST), {"format": 1, "files": files})


def _write_json_durably(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a finished checkpoint (its manifest, written last, is there). Cheap: it reads no
    other file; ``load_checkpoint`` verifies every file against the manifest."""
    return os.path.isfile(os.path.join(os.fspath(directory), MANIFEST))


def verify_manifest(directory: str | os.PathLike, *, who: str = "load_checkpoint") -> list[str]:
    """Check every file the manifest lists: present, of its size, of its SHA-256. Returns the listed paths
    (relative, ``/``-separated). Raises ``ValueError`` naming the first file that differs."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(
            f"{who}: {directory} has no {MANIFEST}: the checkpoint is incomplete (its save was interrupted) or was "
            "not written by save_checkpoint"
        )
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        entries = [(str(rel), int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{who}: {path} is not a valid manifest ({type(e).__name__}: {e})") from None
    for rel, size, digest in entries:
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise ValueError(f"{who}: {path} lists a path outside the checkpoint: {rel!r}")
        full = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(full):
            raise ValueError(f"{who}: checkpoint file {full} is missing (the manifest lists it)")
        actual = os.path.getsize(full)
        if actual != size:
            raise ValueError(f"{who}: checkpoint file {full} has {actual} bytes but was written with {size}")
        if _sha256(full) != digest:
            raise ValueError(f"{who}: checkpoint file {full} differs from what was written (SHA-256 mismatch)")
    return [rel for rel, _, _ in entries]


def check_pickles(directory: str | os.PathLike, files: Iterable[str]) -> None:
    """``safe_load`` every pickle among ``files`` (memory-mapped where torch can, so large tensors are not read)."""
    directory = os.fspath(directory)
    for rel in files:
        if rel.endswith(PICKLE_SUFFIXES):
            path = os.path.join(directory, *rel.split("/"))
            try:
                safe_load(path, mmap=True)
            except ValueError as e:
                if "mmap" not in str(e):  # a legacy (non-zip) pickle cannot be memory-mapped: read it whole
                    raise
                safe_load(path)


# ---------------------------------------------------------------------------------------------- writing
def _fsync_tree(directory: str) -> None:
    """Flush every file and directory under ``directory`` (and itself) to stable storage."""
    for root, _dirs, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the files themselves are flushed
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def staging_path(final: str) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}.partial")


def begin(final: str) -> str:
    """Create (afresh) the staging directory of ``final``; the writer process calls it."""
    stage = staging_path(final)
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    return stage


def publish(stage: str, final: str) -> None:
    """Manifest the staged checkpoint and move it into place; the previous checkpoint at ``final`` stays until the
    new one is there. The writer process calls it, after every process has flushed its files."""
    _write_manifest(stage)
    _fsync_tree(stage)
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    if not os.path.exists(final):
        os.rename(stage, final)
    elif _exchange(stage, final):
        shutil.rmtree(stage)  # the previous checkpoint, now under the staging name
    else:
        old = os.path.join(parent, f".{os.path.basename(final)}.previous")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(stage, final)
        shutil.rmtree(old)
    _fsync_dir(parent)


def flush(stage: str) -> None:
    """Each process flushes the files it wrote (all of them: fsync of a clean file costs nothing)."""
    _fsync_tree(stage)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)


def read_json(path: str, *, who: str = "load_checkpoint") -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{who}: checkpoint file {path} cannot be read as JSON ({e})") from None


# ---------------------------------------------------------------------------------------------- the trainer's
# PPOTrainer.save_checkpoint / load_checkpoint: what goes where in a checkpoint, and the validate-then-apply load.
_PRETRAINED_DIR = "pretrained"  # the consolidated policy inside a checkpoint
_CHECKPOINT_META = "ppo_fast_checkpoint.json"
_TRAINER_STATE = "trainer_state.json"  # step, KL controller, reference checksum
_RUNNING_MOMENTS = "running_moments.safetensors"
_LR_SCHEDULER = "lr_scheduler.pt"
_USER_STATE = "user_state.json"


def save_trainer(trainer: PPOTrainer, checkpoint_dir: str | os.PathLike, user_state: dict[str, Any] | None) -> None:
    """``PPOTrainer.save_checkpoint``: stage everything, flush it, then publish it in one rename."""
    checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    if user_state is not None:
        if not isinstance(user_state, dict):
            raise TypeError(
                f"PPOTrainer.save_checkpoint: user_state must be a dict or None, got {type(user_state).__name__}"
            )
        try:
            json.dumps(user_state, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"PPOTrainer.save_checkpoint: user_state must be JSON-serialisable ({e})") from None
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise ValueError(f"PPOTrainer.save_checkpoint: checkpoint_dir {checkpoint_dir} is a file")
    checksum = trainer._checkpoint_state.reference_checksum()  # collective under ZeRO-3
    writer = trainer.accelerator.is_main_process
    stage = staging_path(checkpoint_dir)
    if writer:
        begin(checkpoint_dir)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.save_state(stage, safe_serialization=False)
    trainer.save_pretrained(os.path.join(stage, _PRETRAINED_DIR))
    if writer:
        from safetensors.torch import save_file

        state = trainer._checkpoint_state.state_dict()
        state["reference_checksum"] = checksum
        write_json(os.path.join(stage, _TRAINER_STATE), state)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in trainer.running.state_dict().items()},
            os.path.join(stage, _RUNNING_MOMENTS),
        )
        if trainer.lr_scheduler is not None:
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(stage, _LR_SCHEDULER))
        if user_state is not None:
            write_json(os.path.join(stage, _USER_STATE), user_state)
        write_json(os.path.join(stage, _CHECKPOINT_META), _layout(trainer))
    flush(stage)  # every process: the files it wrote are on disk before the manifest says so
    trainer.accelerator.wait_for_everyone()
    if writer:
        publish(stage, checkpoint_dir)
    trainer.accelerator.wait_for_everyone()


def _layout(trainer: PPOTrainer) -> dict[str, Any]:
    from accelerate.utils import DistributedType

    return {
        "format": "deepspeed" if trainer.accelerator.distributed_type == DistributedType.DEEPSPEED else "accelerate",
        "num_processes": trainer.accelerator.num_processes,
        "zero_stage": getattr(trainer.model, "zero_optimization_stage", lambda: 0)(),
        "current_step": trainer.current_step,
        "lr_scheduler": trainer.lr_scheduler is not None,
    }


def load_trainer(trainer: PPOTrainer, checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``PPOTrainer.load_checkpoint``: read and check every file, then apply them all."""
    who = "PPOTrainer.load_checkpoint"
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"{who}: no checkpoint directory at {checkpoint_dir}")
    meta_path = os.path.join(checkpoint_dir, _CHECKPOINT_META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{who}: {checkpoint_dir} is not a checkpoint of this trainer (no {_CHECKPOINT_META}); write one "
            "with save_checkpoint"
        )
    files = verify_manifest(checkpoint_dir, who=who)
    check_pickles(checkpoint_dir, files)

    def path(name: str) -> str:
        return os.path.join(checkpoint_dir, name)

    saved_layout = read_json(meta_path, who=who)
    here = _layout(trainer)
    if not isinstance(saved_layout, dict) or not {"format", "num_processes", "zero_stage"} <= saved_layout.keys():
        raise ValueError(f"{who}: {meta_path} is not a ppo_fast checkpoint layout")
    if bool(saved_layout.get("lr_scheduler")) != (trainer.lr_scheduler is not None):
        raise ValueError(
            f"{who}: the checkpoint was written {'with' if saved_layout.get('lr_scheduler') else 'without'} an "
            f"lr_scheduler and this trainer has {'one' if trainer.lr_scheduler is not None else 'none'}"
        )
    trainer_state = read_json(path(_TRAINER_STATE), who=who)
    trainer._checkpoint_state.check_compatible(trainer_state, check_reference=True)
    running = _read_running_moments(trainer, path(_RUNNING_MOMENTS))
    scheduler = safe_load(path(_LR_SCHEDULER)) if trainer.lr_scheduler is not None else None
    user_state = read_json(path(_USER_STATE), who=who) if os.path.isfile(path(_USER_STATE)) else None

    native = saved_layout["format"] == here["format"] and (
        here["format"] == "accelerate"
        or (saved_layout["num_processes"], saved_layout["zero_stage"]) == (here["num_processes"], here["zero_stage"])
    )
    if native and here["format"] == "accelerate":
        loaded = _read_accelerate_state(trainer, checkpoint_dir)
    elif native:  # DeepSpeed reads its own files, through safe_load (the checks above already passed)
        loaded = None
    elif here["format"] == "deepspeed":
        raise ValueError(
            f"{who}: the checkpoint was written by {saved_layout['num_processes']} process(es) "
            f"({saved_layout['format']}, ZeRO stage {saved_layout['zero_stage']}) and this trainer runs DeepSpeed "
            f"ZeRO-{here['zero_stage']} on {here['num_processes']}; resume with the original launch, or start "
            f"from the consolidated policy in {path(_PRETRAINED_DIR)}"
        )
    else:  # DeepSpeed's partitioned checkpoint in a run without DeepSpeed: the consolidated policy
        loaded = {"model": _read_pretrained(trainer, path(_PRETRAINED_DIR))}

    # -- everything is read and checked; from here on the state changes
    if loaded is None:
        with _safe_deepspeed_loads(trainer.model):
            trainer.accelerator.load_state(checkpoint_dir)
    elif "optimizer" in loaded:
        _apply_accelerate_state(trainer, loaded)
    else:
        with torch.no_grad():
            trainer.accelerator.unwrap_model(trainer.model).load_state_dict(loaded["model"])
    trainer.running.load_state_dict(running)
    if scheduler is not None:
        trainer.lr_scheduler.load_state_dict(scheduler)
    trainer._checkpoint_state.load_state_dict(trainer_state)
    if not native:
        warnings.warn(
            f"{who}: {checkpoint_dir} was written under DeepSpeed ZeRO-{saved_layout['zero_stage']} by "
            f"{saved_layout['num_processes']} processes; restored the policy, scheduler, running moments, KL "
            "controller and step count; the optimizer state (partitioned by DeepSpeed) and the RNG states start "
            "afresh",
            UserWarning,
            stacklevel=3,
        )
    return user_state


def _read_running_moments(trainer: PPOTrainer, path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"PPOTrainer.load_checkpoint: checkpoint file {path} cannot be read ({e})") from None
    _check_tensors_like(state, trainer.running.state_dict(), path, "running moments")
    if not torch.isfinite(state["state"]).all() or state["state"][0] < 0:
        raise ValueError(f"PPOTrainer.load_checkpoint: {path} holds invalid running moments {state['state']}")
    return state


def _read_pretrained(trainer: PPOTrainer, directory: str) -> dict[str, torch.Tensor]:
    """The consolidated policy's state dict, checked against this trainer's model."""
    from ppo_fast.models import AutoModelForCausalLMWithValueHead

    pretrained = AutoModelForCausalLMWithValueHead.from_pretrained(directory)
    state = pretrained.state_dict()
    del pretrained
    _check_tensors_like(state, trainer.accelerator.unwrap_model(trainer.model).state_dict(), directory, "model")
    return state


def _read_accelerate_state(trainer: PPOTrainer, checkpoint_dir: str) -> dict[str, Any]:
    """Read and check what ``accelerator.save_state`` wrote for this process (model, optimizer, RNG, scaler),
    without applying any of it."""
    who = "PPOTrainer.load_checkpoint"
    acc = trainer.accelerator
    if len(acc._models) != 1 or len(acc._optimizers) != 1:
        raise ValueError(
            f"{who}: expected one prepared model and optimizer, found {len(acc._models)} and {len(acc._optimizers)}"
        )
    model_path = os.path.join(checkpoint_dir, "pytorch_model.bin")
    model = safe_load(model_path, mmap=True)
    _check_tensors_like(model, acc._models[0].state_dict(), model_path, "model")
    opt_path = os.path.join(checkpoint_dir, "optimizer.bin")
    if not os.path.isfile(opt_path):
        raise ValueError(f"{who}: checkpoint file {opt_path} is missing")
    optimizer = safe_load(opt_path)
    _check_optimizer_state(optimizer, trainer.optimizer.state_dict(), opt_path)
    rng_path = os.path.join(checkpoint_dir, f"random_states_{acc.process_index}.pkl")
    if not os.path.isfile(rng_path):
        raise ValueError(f"{who}: checkpoint file {rng_path} is missing (this process's RNG states)")
    rng = safe_load(rng_path)
    _check_rng_states(rng, rng_path)
    scaler_path = os.path.join(checkpoint_dir, "scaler.pt")
    scaler = None
    if acc.scaler is not None:
        if not os.path.isfile(scaler_path):
            raise ValueError(f"{who}: checkpoint file {scaler_path} is missing (this run scales fp16 losses)")
        scaler = safe_load(scaler_path)
    custom = []  # objects the user registered with accelerator.register_for_checkpointing
    for i in range(len(acc._custom_objects)):
        custom_path = os.path.join(checkpoint_dir, f"custom_checkpoint_{i}.pkl")
        if not os.path.isfile(custom_path):
            raise ValueError(f"{who}: checkpoint file {custom_path} is missing (a registered object's state)")
        custom.append(safe_load(custom_path))
    return {"model": model, "optimizer": optimizer, "rng": rng, "scaler": scaler, "custom": custom}


def _apply_accelerate_state(trainer: PPOTrainer, loaded: dict[str, Any]) -> None:
    """What ``accelerator.load_state`` does for one model and optimizer, from state read and checked by
    ``_read_accelerate_state``. The optimizer goes first: its own ``load_state_dict`` checks before it changes."""
    acc = trainer.accelerator
    acc._optimizers[0].load_state_dict(loaded["optimizer"])
    acc._models[0].load_state_dict(loaded["model"])
    if loaded["scaler"] is not None:
        acc.scaler.load_state_dict(loaded["scaler"])
    rng = loaded["rng"]
    random.setstate(rng["random_state"])
    np.random.set_state(rng["numpy_random_seed"])
    torch.set_rng_state(rng["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in rng:
        torch.cuda.set_rng_state_all(rng["torch_cuda_manual_seed"])
    if "step" in rng:
        acc.step = int(rng["step"])
    for obj, state in zip(acc._custom_objects, loaded["custom"]):
        obj.load_state_dict(state)


def _check_tensors_like(state: Any, expected: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``state`` has exactly ``expected``'s keys, each a tensor of the same shape (and dtype class)."""
    who = "PPOTrainer.load_checkpoint"
    if not isinstance(state, dict):
        raise ValueError(f"{who}: {path} does not hold a {what} state dict (found {type(state).__name__})")
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"{who}: {path} does not match this trainer's {what}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for k, want in expected.items():
        have = state[k]
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            shape = tuple(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise ValueError(f"{who}: {path}: {what} entry {k!r} is {shape}, this trainer's is {tuple(want.shape)}")
        if have.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ValueError(f"{who}: {path}: {what} entry {k!r} has dtype {have.dtype}, this trainer's {want.dtype}")


def _check_optimizer_state(state: Any, current: dict[str, Any], path: str) -> None:
    """The saved optimizer state fits this optimizer: same groups with the same number of parameters, per-parameter
    states for parameters that exist, tensors only where this optimizer (if it has stepped) has tensors of the same
    shape. The optimizer's own ``load_state_dict`` checks the rest before it changes anything."""
    who = "PPOTrainer.load_checkpoint"
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("param_groups"), list)
        or not isinstance(state.get("state"), dict)
    ):
        raise ValueError(f"{who}: {path} does not hold an optimizer state dict")
    groups, now = state["param_groups"], current["param_groups"]
    if len(groups) != len(now) or any(
        not isinstance(g, dict) or len(g.get("params", ())) != len(c["params"]) for g, c in zip(groups, now)
    ):
        raise ValueError(
            f"{who}: {path} holds an optimizer of {[len(g.get('params', ())) for g in groups]} parameters per group, "
            f"this trainer's has {[len(c['params']) for c in now]}"
        )
    ids = {i for g in groups for i in g["params"]}
    for pid, entry in state["state"].items():
        if pid not in ids or not isinstance(entry, dict):
            raise ValueError(f"{who}: {path} holds a state for parameter {pid!r}, which no group lists")
    by_saved = {i: c for g, cg in zip(groups, now) for i, c in zip(g["params"], cg["params"])}
    for pid, entry in state["state"].items():
        mine = current["state"].get(by_saved[pid])
        if mine is None:
            continue
        for key, value in entry.items():
            ref = mine.get(key)
            if isinstance(ref, torch.Tensor) and (not isinstance(value, torch.Tensor) or value.shape != ref.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{who}: {path}: optimizer state {key!r} of parameter {pid} is {shape}, this optimizer's is "
                    f"{tuple(ref.shape)}"
                )


def _check_rng_states(rng: Any, path: str) -> None:
    who = "PPOTrainer.load_checkpoint"
    keys = ("random_state", "numpy_random_seed", "torch_manual_seed")
    if not isinstance(rng, dict) or any(k not in rng for k in keys):
        raise ValueError(f"{who}: {path} does not hold RNG states (expected keys {list(keys)})")
    t = rng["torch_manual_seed"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        raise ValueError(f"{who}: {path}: torch_manual_seed is not a torch RNG state")
    probe_py, probe_np = random.Random(), np.random.RandomState()
    try:  # on throwaway generators: a malformed state raises here, not half-way through the load
        probe_py.setstate(rng["random_state"])
        probe_np.set_state(rng["numpy_random_seed"])
        torch.Generator().set_state(t)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{who}: {path} holds a malformed RNG state ({e})") from None


@contextlib.contextmanager
def _safe_deepspeed_loads(engine: Any) -> Iterator[None]:
    """DeepSpeed's checkpoint engine unpickles with ``weights_only=False``; while it loads this trainer's
    checkpoint, it reads through ``safe_load`` instead."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield
        return
    original = ce.load

    def load(path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


class TrainerState:
    """The trainer's own counters, saved as JSON: KL controller, step count and the reference's checksum."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_step": self.trainer.current_step,
            "kl_ctl": self.trainer.kl_ctl.state_dict(),
            "kl_ctl_type": type(self.trainer.kl_ctl).__name__,
            "reference_checksum": None,  # filled by save_checkpoint (a collective under ZeRO-3)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_compatible(state, check_reference=False)  # load_checkpoint checked it, on every process
        self.trainer.current_step = int(state["current_step"])
        self.trainer.kl_ctl.load_state_dict(state["kl_ctl"])

    def reference_checksum(self) -> list[float] | None:
        """Sum and absolute sum (fp64) of the reference's weights but its (unused) value head; None for a PEFT
        policy (its reference is the base model, saved with the policy). Under ZeRO-3 each rank sums the valid part
        of its own shard and the sums are all-reduced (a collective: every process calls this)."""
        ref = self.trainer.ref_model
        if ref is None:
            return None
        total = torch.zeros(2, dtype=torch.float64, device=self.trainer.current_device)
        sharded = False
        rank = self.trainer.accelerator.process_index
        for name, p in ref.named_parameters():
            if "v_head" in name.split("."):  # unused by the reference, and initialised from the global RNG
                continue
            if hasattr(p, "ds_tensor"):  # this rank's flat shard; its tail past the parameter is padding
                sharded = True
                part = p.ds_tensor.numel()
                valid = max(0, min(part, p.ds_numel - rank * part))
                data = p.ds_tensor.detach().reshape(-1)[:valid]
            else:
                data = p.detach()
            data = data.to(total.device, torch.float64)
            total += torch.stack([data.sum(), data.abs().sum()])
        if sharded:  # the shards' valid parts are disjoint, so their sums add up to the whole's
            total = self.trainer.accelerator.reduce(total, reduction="sum")
        return total.cpu().tolist()

    def check_compatible(self, state: Any, *, check_reference: bool) -> None:
        """Raise (before anything is applied) unless ``state`` is a well-formed trainer state of this trainer."""
        if not isinstance(state, dict):
            raise ValueError(f"PPOTrainer.load_checkpoint: the trainer state {_TRAINER_STATE} is not a JSON object")
        kind = state.get("kl_ctl_type")
        if kind is not None and kind != type(self.trainer.kl_ctl).__name__:
            raise ValueError(
                f"PPOTrainer.load_checkpoint: the checkpoint was written with a {kind} but this trainer has a "
                f"{type(self.trainer.kl_ctl).__name__} (config.adap_kl_ctrl differs)"
            )
        kl_keys = self.trainer.kl_ctl.state_dict().keys()
        if (
            isinstance(state.get("current_step"), bool)
            or not isinstance(state.get("current_step"), int)
            or state["current_step"] < 0
            or not isinstance(state.get("kl_ctl"), dict)
            or state["kl_ctl"].keys() != kl_keys
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in state["kl_ctl"].values())
        ):
            raise ValueError(
                f"PPOTrainer.load_checkpoint: the trainer state {_TRAINER_STATE} is malformed (expected a "
                f"non-negative current_step and a kl_ctl with finite {sorted(kl_keys)}); got {state!r:.200}"
            )
        saved = state.get("reference_checksum")
        if not check_reference or saved is None:  # None: a PEFT policy's reference, or written by save_state alone
            return
        now = self.reference_checksum()
        if now is None or not all(abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1.0) for a, b in zip(saved, now)):
            raise ValueError(
                "PPOTrainer.load_checkpoint: this trainer's reference model differs from the one the checkpoint was "
                f"trained against (weight checksums {now} vs {saved}); build the trainer from the same base model "
                "(and num_shared_layers) as the original run, then load the checkpoint"
            )
