"""One rank of tests/distributed/test_launch.py. ``python launch_worker.py MODE OUT [MODEL_DIR]`` writes
``OUT.<rank>`` (JSON) for the test to read:

* ``check``: ``build_accelerator()``, then one optimizer step of a small regression with a client optimizer
  (proves the launch's DeepSpeed JSON "auto" values get filled and the processes average their gradients: each
  rank's data differ, the parameters after the step must not). Under ZeRO-3 it also builds a tiny GPT-2 by
  ``from_pretrained`` / ``from_config`` outside any context, inside the DeepSpeed plugin's
  ``zero3_init_context_manager(enable=False)`` alone and inside ``zero3_init_disabled``, and records which are
  sharded.
* ``plain_first``: a plain ``Accelerator()`` made before ``build_accelerator`` (accelerate's state is a
  singleton); records the error ``build_accelerator`` raises.
* ``build``: ``build_accelerator()`` only; records the world or the error.
"""

import json
import math
import os
import sys

import torch

from ppo_fast.trainer.distributed import build_accelerator, zero3_init_disabled


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write(out: str, rank: int, record: dict) -> None:
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f)


def _describe(model: torch.nn.Module) -> dict:
    """Whether every parameter is whole (numel equals its unsharded shape, no DeepSpeed attributes) or sharded."""
    whole, sharded = [], []
    for name, p in model.named_parameters():
        full_shape = tuple(getattr(p, "ds_shape", p.shape))
        has_ds = hasattr(p, "ds_id") or hasattr(p, "ds_status")
        (sharded if has_ds or p.numel() != math.prod(full_shape) else whole).append(name)
    return {"whole": len(whole), "sharded": len(sharded), "numel": sum(p.numel() for p in model.parameters())}


def _matches_saved(model: torch.nn.Module, model_dir: str) -> bool:
    from safetensors.torch import load_file

    saved = load_file(os.path.join(model_dir, "model.safetensors"))
    state = model.state_dict()
    return all(k in state and torch.equal(state[k], v) for k, v in saved.items())


def _zero3_models(acc, model_dir: str) -> dict:
    import transformers
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64)
    direct = transformers.GPT2LMHeadModel(cfg)  # the constructor alone: no zero.Init hook
    if acc.is_main_process:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    acc.wait_for_everyone()
    plugin = acc.state.deepspeed_plugin
    auto = transformers.AutoModelForCausalLM

    def build(how: str) -> dict:
        return _describe(auto.from_pretrained(model_dir) if how == "pretrained" else auto.from_config(cfg))

    r = {"direct": _describe(direct), "full_numel": sum(p.numel() for p in direct.parameters())}
    r["zero3_enabled_before"] = is_deepspeed_zero3_enabled()
    for how in ("pretrained", "config"):
        r[f"outside_{how}"] = build(how)
        with plugin.zero3_init_context_manager(enable=False):
            r["zero3_enabled_in_plugin_ctx"] = is_deepspeed_zero3_enabled()
            r[f"plugin_ctx_{how}"] = build(how)
        with zero3_init_disabled(acc):
            r["zero3_enabled_in_disabled"] = is_deepspeed_zero3_enabled()
            r["init_flag_in_disabled"] = plugin.zero3_init_flag
            model = auto.from_pretrained(model_dir) if how == "pretrained" else auto.from_config(cfg)
            r[f"disabled_{how}"] = _describe(model)
        if how == "pretrained":
            r["disabled_matches_saved"] = _matches_saved(model, model_dir)
            # An unsharded model runs alone on each rank (a reward model's use): no collectives needed.
            with torch.no_grad():
                r["disabled_forward_ok"] = bool(torch.isfinite(model(torch.arange(8)[None]).logits).all())
    r["zero3_enabled_after"] = is_deepspeed_zero3_enabled()
    r["init_flag_after"] = plugin.zero3_init_flag
    # State comes back when the body raises, too.
    try:
        with zero3_init_disabled(acc):
            raise KeyError("boom")
    except KeyError:
        pass
    r["zero3_enabled_after_raise"] = is_deepspeed_zero3_enabled()
    r["init_flag_after_raise"] = plugin.zero3_init_flag
    r["sharded_after_raise"] = _describe(auto.from_config(cfg))
    return r


def _train_step(acc) -> dict:
    from accelerate.utils import DistributedType

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        # No dataloader goes through prepare (as in the trainer): the JSON's "auto" micro batch needs a number.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 4
    model, optimizer = acc.prepare(model, optimizer)
    g = torch.Generator().manual_seed(100 + acc.process_index)  # different data on each rank
    x = torch.randn(4, 16, generator=g)
    loss = model(x).pow(2).mean()
    acc.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    params = list(acc.unwrap_model(model).parameters())
    if acc.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            flat = torch.cat([p.detach().flatten().double() for p in params])
    else:
        flat = torch.cat([p.detach().flatten().double() for p in params])
    record = {"loss": loss.item(), "param_sum": flat.sum().item(), "param_abs": flat.abs().sum().item()}
    if plugin is not None:
        cfg = plugin.deepspeed_config
        record["gradient_clipping"] = cfg.get("gradient_clipping")
        record["zero_allow_untested_optimizer"] = cfg.get("zero_allow_untested_optimizer")
        record["bf16"] = cfg.get("bf16", {}).get("enabled")
    return record


def main(mode: str, out: str, model_dir: str | None = None) -> None:
    if mode == "plain_first":
        from accelerate import Accelerator

        Accelerator()  # the user's own, before build_accelerator
    try:
        acc = build_accelerator()
    except RuntimeError as e:
        _write(out, _rank(), {"error": str(e)})
        return
    record = {
        "world": acc.num_processes,
        "rank": acc.process_index,
        "distributed_type": str(acc.distributed_type.value),
    }
    if mode == "check":
        record.update(_train_step(acc))
        plugin = acc.state.deepspeed_plugin
        record["zero_stage"] = plugin.zero_stage if plugin is not None else 0
        if plugin is not None and plugin.zero_stage == 3:
            record["zero3"] = _zero3_models(acc, model_dir)
    _write(out, acc.process_index, record)


if __name__ == "__main__":
    main(*sys.argv[1:])
