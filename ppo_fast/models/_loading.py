"""Checkpoint plumbing for the value-head model: legacy quantization keywords, value-head files, quiet loads.

Private: ``AutoModelForCausalLMWithValueHead.from_pretrained`` / ``save_pretrained`` are the public face.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

# The value head's own file, written next to a PEFT adapter (whose directory holds no full model to put
# the head into). A full model keeps the head inside its own weights file, under the `v_head.` prefix, as
# TRL 0.11 does, so TRL can load our checkpoints and we can load TRL's.
VALUE_HEAD_FILE = "value_head.safetensors"
V_HEAD_PREFIX = "v_head."

# Hub/cache keywords of `from_pretrained` that also locate the value head's file.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")

# `prepare_model_for_kbit_training`'s options, which TRL 0.11 took through `from_pretrained` for a quantized
# model that gets a PEFT adapter. They are not `from_pretrained` keywords, so they never reach transformers.
KBIT_TRAINING_KWARGS = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*([A-Z]+)\s*\|")


def translate_legacy_quantization(kwargs: dict[str, Any]) -> None:
    """Turn transformers 4's ``load_in_8bit=True`` / ``load_in_4bit=True`` into a ``BitsAndBytesConfig``, in place.

    transformers 5 removed these keywords (``from_pretrained(..., load_in_8bit=True)`` is a TypeError there),
    but TRL's guide uses them. As transformers 4 did, the other ``BitsAndBytesConfig`` options given as
    keywords (``llm_int8_threshold``, ``bnb_4bit_compute_dtype``, ...) go into the config too. Raises before
    changing ``kwargs`` when the request is contradictory or bitsandbytes is missing.
    """
    load_in_8bit = kwargs.get("load_in_8bit", False)
    load_in_4bit = kwargs.get("load_in_4bit", False)
    for name, value in (("load_in_8bit", load_in_8bit), ("load_in_4bit", load_in_4bit)):
        if not isinstance(value, bool):
            raise TypeError(f"from_pretrained: {name} must be a bool, got {value!r}")
    if load_in_8bit and load_in_4bit:
        raise ValueError("from_pretrained: load_in_8bit=True and load_in_4bit=True cannot be used together")
    if not (load_in_8bit or load_in_4bit):
        kwargs.pop("load_in_8bit", None)
        kwargs.pop("load_in_4bit", None)
        return
    flag = "load_in_8bit" if load_in_8bit else "load_in_4bit"
    if kwargs.get("quantization_config") is not None:
        raise ValueError(
            f"from_pretrained: pass either {flag}=True or quantization_config, not both "
            f"(put the {flag} setting into the BitsAndBytesConfig)"
        )
    require_bitsandbytes(flag)

    from transformers import BitsAndBytesConfig

    options = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    bnb_kwargs = {k: kwargs.pop(k) for k in options if k in kwargs}
    bnb_kwargs.update(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    kwargs["quantization_config"] = BitsAndBytesConfig(**bnb_kwargs)


def require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"from_pretrained: {what} needs bitsandbytes, which is not installed. {_bnb_alternatives()}")


def is_bitsandbytes_request(kwargs: dict[str, Any]) -> bool:
    config = kwargs.get("quantization_config")
    if config is None:
        return False
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def bitsandbytes_failure_note(kwargs: dict[str, Any]) -> str:
    """Why a bitsandbytes load failed and what to use instead; attached to the original exception."""
    try:
        from importlib.metadata import version

        bnb = f"bitsandbytes {version('bitsandbytes')}"
    except Exception:  # noqa: BLE001  (any failure here just means we cannot name the version)
        bnb = "bitsandbytes"
    device = "CUDA" if torch.cuda.is_available() else "CPU (no CUDA device visible)"
    return (
        f"ppo_fast: this model was being loaded quantized by {bnb} on {device} "
        f"(quantization_config={kwargs.get('quantization_config')!r}). bitsandbytes could not quantize it here: "
        f"check that its build supports this device and model. {_bnb_alternatives()}"
    )


def _bnb_alternatives() -> str:
    return (
        "Install it with `pip install 'ppo_fast[bnb]'` (bitsandbytes >= 0.50 runs int8 on CPU as well as CUDA), "
        "or do without 8 bits: load the reference in half precision "
        "(`from_pretrained(path, dtype=torch.bfloat16)`) or share the policy's layers "
        "(`create_reference_model(model, num_shared_layers=N)`)."
    )


def split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def _resolve(path: str, filename: str, hub_kwargs: dict[str, Any]) -> str | None:
    """Local path of ``filename`` in a directory or hub repo, or None where it does not exist or cannot be had."""
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    try:
        return cached_file(
            path,
            filename,
            _raise_exceptions_for_gated_repo=False,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError:
        return None


def is_peft_checkpoint(path: str, hub_kwargs: dict[str, Any]) -> bool:
    return _resolve(path, "adapter_config.json", hub_kwargs) is not None


def load_value_head_state(path: str, hub_kwargs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The value head's tensors saved with a checkpoint (keys without the ``v_head.`` prefix), or None.

    Looks in our PEFT-side file, else in the checkpoint's weights: the first of safetensors, sharded
    safetensors, TRL's older ``pytorch_model.bin`` (sharded or not) that exists, which is the one transformers
    loaded (so nothing new is downloaded for a hub model). Reads only the ``v_head.*`` tensors.
    """
    file = _resolve(path, VALUE_HEAD_FILE, hub_kwargs)
    if file is not None:
        return _read_v_head(file) or None
    for weights, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        file = _resolve(path, weights, hub_kwargs)
        if file is not None:
            return _read_v_head(file) or None
        index_file = _resolve(path, index, hub_kwargs)
        if index_file is not None:
            with open(index_file) as f:
                weight_map = json.load(f).get("weight_map", {})
            state: dict[str, torch.Tensor] = {}
            for shard in sorted({shard for key, shard in weight_map.items() if key.startswith(V_HEAD_PREFIX)}):
                shard_file = _resolve(path, shard, hub_kwargs)
                if shard_file is not None:
                    state.update(_read_v_head(shard_file))
            return state or None
    return None


def _read_v_head(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if k.startswith(V_HEAD_PREFIX)]  # noqa: SIM118  (safe_open has no __iter__)
            return {k[len(V_HEAD_PREFIX) :]: f.get_tensor(k) for k in keys}
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return {k[len(V_HEAD_PREFIX) :]: v.clone() for k, v in state.items() if k.startswith(V_HEAD_PREFIX)}


def save_value_head(directory: str, v_head_state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {f"{V_HEAD_PREFIX}{k}": v.detach().to("cpu").contiguous() for k, v in v_head_state.items()}
    save_file(tensors, os.path.join(directory, VALUE_HEAD_FILE), metadata={"format": "pt"})


class _DropValueHeadReport(logging.Filter):
    """Drops transformers' load report when the only keys it lists are our ``v_head.*`` ones (UNEXPECTED).

    The wrapped causal LM does not know the value head, so loading our own checkpoint would always print a
    warning table about it. Any other key in the report (missing, mismatched, ...) keeps the whole report,
    and a report whose layout we do not recognise passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = _ANSI.sub("", record.getMessage())
        except Exception:  # noqa: BLE001  (never break logging)
            return True
        if "LOAD REPORT" not in message:
            return True
        rows = [m.groups() for m in map(_REPORT_ROW.match, message.splitlines()) if m and m.group(1) != "Key"]
        only_v_head = rows and all(k.startswith(V_HEAD_PREFIX) and status == "UNEXPECTED" for k, status in rows)
        return not only_v_head


@contextlib.contextmanager
def quiet_value_head_keys() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    flt = _DropValueHeadReport()
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)
