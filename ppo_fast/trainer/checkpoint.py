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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterable
from typing import Any

import torch

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

    import numpy as np

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
