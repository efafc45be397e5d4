"""The launch layer under the trainer: the Accelerator it uses, a check that the launch really joined its
processes, and a way to build unsharded models under DeepSpeed ZeRO-3 (DESIGN.md section 5).

Why this exists. Without a GPU, several natural launches quietly go wrong instead of failing (measured with
accelerate 1.15, deepspeed 0.19.8, torch 2.13 CPU):

* ``torchrun --nproc_per_node 2`` or ``accelerate launch --multi_gpu`` with a plain ``Accelerator()``, and
  ``accelerate launch --use_deepspeed`` with an Accelerator made without ``InitProcessGroupKwargs(backend="gloo")``:
  torch.distributed has a world of 2, but accelerate sees ``num_processes == 1`` on every rank (rank 0 twice), so
  each process trains its own copy.
* ``accelerate launch --cpu --num_processes 2`` and a ``distributed_type: MULTI_CPU`` config use accelerate's simple
  launcher, which starts one process (more need mpirun).
* ``ACCELERATE_USE_CPU=true`` (or ``Accelerator(cpu=True)``) with DeepSpeed runs plain DDP: DeepSpeed is dropped.
* ``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])`` under torchrun without DeepSpeed joins
  the world but leaves ``distributed_type == NO``: two processes whose gradients are never averaged.

``build_accelerator`` makes the first and the last work (gloo for DeepSpeed, ``cpu=True`` for DDP), and
``check_launch`` turns every one that remains (the simple launcher, DeepSpeed dropped, an Accelerator created before
``build_accelerator``) into a RuntimeError that names a command that works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

__all__ = ["build_accelerator", "check_launch", "zero3_init_disabled"]

# World sizes set by MPI launchers (accelerate's MULTI_CPU reads the same ones).
_MPI_WORLD_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", *_MPI_WORLD_VARS)
_CONFIG_DIR = "examples/accelerate_configs"


def _env_flag(name: str) -> bool:
    # accelerate's truth values (accelerate.utils.str_to_bool), without its ValueError on junk.
    return os.environ.get(name, "").strip().lower() in ("y", "yes", "t", "true", "on", "1")


def _launcher_world_size() -> int | None:
    """The number of processes the launcher says it started (torchrun/accelerate: WORLD_SIZE; mpirun: PMI_SIZE,
    ...), or None when no launcher said."""
    for name in ("WORLD_SIZE", *_MPI_WORLD_VARS):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _deepspeed_requested(accelerator_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the launch asked for DeepSpeed: ``accelerate launch --use_deepspeed`` / a DEEPSPEED config export
    ACCELERATE_USE_DEEPSPEED=true and the config's file or stage; a DeepSpeedPlugin passed in code counts too."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return True
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if config_file and config_file.lower() != "none":
        return True
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip():
        return True
    kwargs = accelerator_kwargs or {}
    return kwargs.get("deepspeed_plugin") is not None or kwargs.get("deepspeed_plugins") is not None


def _simple_launcher_dropped_processes() -> bool:
    """True for the fingerprint of accelerate's simple launcher asked for more than one process
    (``--cpu --num_processes N``, a MULTI_CPU config, or no --multi_gpu on a machine without GPUs): it exports
    ACCELERATE_USE_CPU, ACCELERATE_MIXED_PRECISION and, only for N > 1 or several machines, MASTER_ADDR/MASTER_PORT,
    but starts a single process with no rank variables (mpirun would have set PMI_SIZE)."""
    if any(os.environ.get(name) for name in _RANK_VARS):
        return False
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ
    return launched_by_accelerate and bool(os.environ.get("MASTER_ADDR")) and bool(os.environ.get("MASTER_PORT"))


def _has_device_backend() -> bool:
    """Whether accelerate will find a device with its own collective backend (nccl, xccl, hccl, ...). Without one,
    a multi-process launch needs gloo, which accelerate only chooses by itself for ``cpu=True``."""
    if torch.cuda.is_available():
        return True
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: also XPU, NPU, HPU (out-of-tree backends)
    if api is None or not api.is_available():
        return False
    device = api.current_accelerator()
    return device is not None and device.type != "mps"  # MPS has no collectives: treat as CPU


def _state_exists() -> bool:
    return PartialState._shared_state != {} or AcceleratorState._shared_state != {}


def build_accelerator(**accelerator_kwargs: Any) -> Accelerator:
    """Create the ``accelerate.Accelerator`` the trainer uses, joined to every process the launcher started.

    ``accelerator_kwargs`` are Accelerator's own (``log_with``, ``gradient_accumulation_steps``, ``project_config``,
    ``kwargs_handlers``, ``mixed_precision``, ``deepspeed_plugin``, ...). Without a GPU and on a multi-process launch
    (launcher world > 1, or DeepSpeed asked for under a launcher) it adds what accelerate needs to join the
    processes, because accelerate only picks a CPU backend by itself for ``cpu=True``:

    * DeepSpeed: ``InitProcessGroupKwargs(backend="gloo")`` in ``kwargs_handlers``. Without it each process sees a
      world of one. An ``InitProcessGroupKwargs`` of yours is kept (its timeout, init_method) with its backend set
      to gloo when it is ``"nccl"`` (the dataclass default, e.g. ``InitProcessGroupKwargs(timeout=...)``: nccl needs
      a GPU) or None; any other backend you set is yours. ``cpu=True`` is never added here: accelerate drops
      DeepSpeed for it.
    * DDP: ``cpu=True``, unless you passed ``cpu``. accelerate then uses gloo (or MPI under mpirun); gloo alone
      would join the world but leave ``distributed_type`` NO, so gradients would never be averaged.

    Then ``check_launch`` runs on the result, so a launch that still did not join its processes (or dropped
    DeepSpeed) raises RuntimeError naming a command that works.

    Accelerate's state is a process-wide singleton. If an ``Accelerator`` (or ``PartialState``) already exists in
    this process, nothing is added: the process group, device, distributed type, mixed precision and DeepSpeed
    plugin are the first one's and cannot change (accelerate raises ValueError for a different ``cpu`` or
    ``mixed_precision``, NotImplementedError for a new ``deepspeed_plugin``, and ignores a new
    ``InitProcessGroupKwargs``). The new Accelerator shares that state, and ``check_launch`` still tells you if the
    first one was built without joining the processes; build that first one with ``build_accelerator`` instead.
    """
    kwargs = dict(accelerator_kwargs)
    if not _state_exists() and not _has_device_backend():
        world = _launcher_world_size()
        under_launcher = world is not None or bool(os.environ.get("LOCAL_RANK"))
        if _deepspeed_requested(kwargs):
            if (world or 1) > 1 or under_launcher:
                handlers = list(kwargs.get("kwargs_handlers") or [])
                if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
                    handlers.append(InitProcessGroupKwargs(backend="gloo"))
                # accelerate passes the backend on only when it differs from the default "nccl", so a handler made
                # for its timeout alone would leave DeepSpeed without a CPU backend: a world of one on every rank.
                handlers = [
                    dataclasses.replace(h, backend="gloo")
                    if isinstance(h, InitProcessGroupKwargs) and h.backend in (None, "nccl")
                    else h
                    for h in handlers
                ]
                kwargs["kwargs_handlers"] = handlers
        elif (world or 1) > 1 and "cpu" not in kwargs:
            kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    check_launch(accelerator)
    return accelerator


def _script() -> str:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.endswith(".py") else "script.py"


def _working_commands(num_processes: int) -> str:
    n, script = max(num_processes, 2), _script()
    return (
        "Launches that work:\n"
        f"  CPU, DDP over gloo:  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {n} {script}\n"
        f"  DeepSpeed ZeRO:      accelerate launch --use_deepspeed --num_processes {n} --deepspeed_config_file "
        f"ds.json {script}   (without ACCELERATE_USE_CPU; on CPU it runs over gloo)\n"
        f"  from a config:       accelerate launch --config_file {_CONFIG_DIR}/<cfg>.yaml {script}   (<cfg>: "
        "cpu_ddp, cpu_deepspeed_zero{1,2,3}, multi_gpu, deepspeed_zero{1,2,3}, multi_node)\n"
        "and create the Accelerator with ppo_fast.build_accelerator() (PPOTrainer does), before any other "
        "Accelerator in the process: without a GPU it adds the gloo process group (DeepSpeed) or cpu=True (DDP)."
    )


def check_launch(accelerator: Accelerator) -> None:
    """Raise RuntimeError if ``accelerator`` did not get the launch that was asked for.

    Checked, because each otherwise trains silently wrong (see the module docstring for the launches that do it):

    * DeepSpeed asked for (``ACCELERATE_USE_DEEPSPEED=true``, or a DeepSpeed config file or stage in accelerate's
      environment) but ``accelerator.distributed_type`` is not DEEPSPEED: ``ACCELERATE_USE_CPU=true``, ``--cpu`` or
      ``cpu=True`` made accelerate drop it.
    * The launcher's world (``WORLD_SIZE`` from torchrun/accelerate launch, ``PMI_SIZE``/... from mpirun) differs from
      ``accelerator.num_processes``: processes that each believe they are alone.
    * accelerate's simple launcher asked for several processes (``--cpu --num_processes N``, a MULTI_CPU config):
      it started only this one.
    * Several processes but ``distributed_type`` NO: joined, but gradients would never be averaged.

    The message names a command that works for the case.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            f"check_launch: accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
        )
    n = accelerator.num_processes
    dist_type = accelerator.distributed_type
    if _deepspeed_requested() and dist_type != DistributedType.DEEPSPEED:
        use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "")
        if _env_flag("ACCELERATE_USE_CPU"):
            cause = "ACCELERATE_USE_CPU=true is set in the environment"
        elif use_deepspeed.lower() != "true":
            # accelerate (state.py, accelerator.py) turns DeepSpeed on for the exact string "true" only.
            cause = f"accelerate turns DeepSpeed on only for ACCELERATE_USE_DEEPSPEED=true, and it is {use_deepspeed!r}"
        else:
            cause = "the Accelerator was created with cpu=True (or --cpu)"
        raise RuntimeError(
            "check_launch: DeepSpeed was asked for (accelerate's environment has ACCELERATE_USE_DEEPSPEED / a "
            f"DeepSpeed config), but the Accelerator runs {dist_type.value} with {n} process(es): {cause}, and "
            "accelerate then silently drops DeepSpeed. Unset ACCELERATE_USE_CPU and do not pass --cpu / cpu=True; "
            "DeepSpeed runs on CPU without them (over gloo). Use "
            f"`accelerate launch --use_deepspeed --num_processes {max(n, 2)} --deepspeed_config_file ds.json "
            f"{_script()}` or `accelerate launch --config_file {_CONFIG_DIR}/cpu_deepspeed_zero3.yaml {_script()}`.\n"
            + _working_commands(n)
        )
    world = _launcher_world_size()
    if world is not None and world != n:
        raise RuntimeError(
            f"check_launch: the launcher started {world} processes (WORLD_SIZE={world}), but this Accelerator sees "
            f"{n} (process_index {accelerator.process_index}): each process believes it is alone and would train its "
            "own unsynchronised copy. Without a GPU, accelerate joins the processes only when created with "
            "cpu=True (DDP) or InitProcessGroupKwargs(backend='gloo') (DeepSpeed), and the first Accelerator "
            "created in the process decides this for every later one (accelerate's state is a singleton).\n"
            + _working_commands(world)
        )
    if world is None and n == 1 and _simple_launcher_dropped_processes():
        raise RuntimeError(
            "check_launch: accelerate launch was asked for several processes (MASTER_ADDR/MASTER_PORT are set) but "
            "started only this one, with no WORLD_SIZE: `accelerate launch --cpu --num_processes N` and "
            "distributed_type MULTI_CPU configs use accelerate's simple launcher, which starts one process (more "
            "need mpirun). If you meant one process, unset MASTER_ADDR and MASTER_PORT.\n" + _working_commands(2)
        )
    if n > 1 and dist_type == DistributedType.NO:
        raise RuntimeError(
            f"check_launch: {n} processes are joined but the Accelerator's distributed_type is NO, so accelerate "
            "would never average their gradients. Without a GPU this is InitProcessGroupKwargs(backend='gloo') "
            "without cpu=True outside DeepSpeed; create the Accelerator with cpu=True (build_accelerator does).\n"
            + _working_commands(n)
        )


@contextlib.contextmanager
def zero3_init_disabled(accelerator: Accelerator) -> Iterator[None]:
    """Inside this context, transformers builds full, unsharded models even under DeepSpeed ZeRO-3.

    For models that stay outside DeepSpeed's engine, e.g. a reward model or pipeline each process runs whole
    (TRL's guide: ``deepspeed_plugin.zero3_init_context_manager(enable=False)``). That plugin context alone does not
    work with accelerate 1.15 + transformers 5: on entry accelerate re-registers a stage-3 ``HfDeepSpeedConfig``
    (``set_deepspeed_weakref`` does so whatever the flag), and transformers decides on ``deepspeed.zero.Init`` from
    ``is_deepspeed_zero3_enabled()``, i.e. the registered config's stage, not from the plugin's flag. So
    ``from_pretrained`` and ``from_config`` still shard. Here the plugin context is entered (its flag is what
    accelerate itself reads) and transformers' registration is lifted for the duration
    (``transformers.integrations.deepspeed.unset_hf_deepspeed_config``), then restored with
    ``set_hf_deepspeed_config`` to the object that was registered before (``plugin.dschf`` when the plugin replaced
    it), also when the body raises (the plugin context itself does not restore on exceptions; it is exited here as
    if the body succeeded, so its restore code always runs).

    Without DeepSpeed, or with a ZeRO stage below 3, nothing is sharded anyway and this is a no-op context.

    Example::

        with ppo_fast.zero3_init_disabled(trainer.accelerator):
            reward_model = AutoModelForSequenceClassification.from_pretrained(path)
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            "zero3_init_disabled: accelerator must be an accelerate.Accelerator (e.g. trainer.accelerator), "
            f"got {type(accelerator).__name__}"
        )
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or not plugin.hf_ds_config.is_zero3():
        yield
        return

    from transformers.integrations import deepspeed as hf_deepspeed

    # transformers keeps a weak reference to the active HfDeepSpeedConfig; hold the object itself so it survives.
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    previous = ref() if ref is not None else None
    previous_was_plugins = previous is not None and previous is getattr(plugin, "dschf", None)

    plugin_context = plugin.zero3_init_context_manager(enable=False)
    plugin_context.__enter__()
    try:
        hf_deepspeed.unset_hf_deepspeed_config()
        yield
    finally:
        try:
            plugin_context.__exit__(None, None, None)
        finally:
            # The plugin's restore made a fresh plugin.dschf (and registered it); keep the plugin's object when the
            # plugin's was active before, so the weak reference stays alive with the plugin.
            if previous_was_plugins and getattr(plugin, "dschf", None) is not None:
                hf_deepspeed.set_hf_deepspeed_config(plugin.dschf)
            elif previous is not None:
                hf_deepspeed.set_hf_deepspeed_config(previous)
            else:
                hf_deepspeed.unset_hf_deepspeed_config()
