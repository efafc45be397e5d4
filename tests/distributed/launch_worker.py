"""One rank of tests/distributed/test_launch.py. ``python launch_worker.py MODE OUT [MODEL_DIR]`` writes
``OUT.<rank>`` (JSON) for the test to read:

* ``check``: ``build_accelerator()``, then one SGD step of a small regression with a client optimizer (the launch's
  DeepSpeed JSON "auto" values get filled). Each rank's data differ; the rank records its parameters after the
  step and how far they are from the step computed here by hand with the gradient averaged over both ranks' data,
  and with its own gradient alone (both clipped to the DeepSpeed config's ``gradient_clipping`` as DeepSpeed does).
  Under ZeRO-3 it also builds a tiny GPT-2 by ``from_pretrained`` / ``from_config`` outside any context, inside the
  DeepSpeed plugin's ``zero3_init_context_manager(enable=False)`` alone and inside ``zero3_init_disabled``, and
  records which are sharded.
* ``check_timeout``: as ``check``, with ``build_accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=...)])``
  (a handler for its timeout alone, whose backend is the dataclass default "nccl").
* ``plain_first``: a plain ``Accelerator()`` made before ``build_accelerator`` (accelerate's state is a
  singleton), then as ``build``.
* ``build``: ``build_accelerator()`` only; records the world.

When ``build_accelerator`` raises, the rank records the message under ``error`` and exits with the error, as a
user's script would.
"""

import copy
import json
import math
import os
import sys
from datetime import timedelta

import torch
from _workers import shut_down

from ppo_fast.trainer.distributed import build_accelerator, zero3_init_disabled

LR = 0.5
PG_TIMEOUT_S = 321


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

    def build(how: str) -> torch.nn.Module:
        return auto.from_pretrained(model_dir) if how == "pretrained" else auto.from_config(cfg)

    r = {"direct": _describe(direct), "full_numel": sum(p.numel() for p in direct.parameters())}
    r["zero3_enabled_before"] = is_deepspeed_zero3_enabled()
    for how in ("pretrained", "config"):
        r[f"outside_{how}"] = _describe(build(how))
        with plugin.zero3_init_context_manager(enable=False):
            r["zero3_enabled_in_plugin_ctx"] = is_deepspeed_zero3_enabled()
            r[f"plugin_ctx_{how}"] = _describe(build(how))
        with zero3_init_disabled(acc):
            r["zero3_enabled_in_disabled"] = is_deepspeed_zero3_enabled()
            r["init_flag_in_disabled"] = plugin.zero3_init_flag
            model = build(how)
        r[f"disabled_{how}"] = _describe(model)
        if how == "pretrained":
            r["disabled_matches_saved"] = _matches_saved(model, model_dir)
            # An unsharded model runs alone on each rank (a reward model's use): the ranks run different numbers of
            # forwards, which a sharded model (a parameter all-gather per forward) could not.
            # (A sharded one outside the engine fails at once, "'weight' must be 2-D": recorded, for the test.)
            try:
                with torch.no_grad():
                    ok = [
                        bool(torch.isfinite(model(torch.arange(8)[None]).logits).all())
                        for _ in range(1 + acc.process_index)
                    ]
                r["disabled_forwards"] = len(ok) if all(ok) else "non-finite logits"
            except RuntimeError as e:
                r["disabled_forwards"] = f"{type(e).__name__}: {e}"
    r["zero3_enabled_after"] = is_deepspeed_zero3_enabled()
    r["init_flag_after"] = plugin.zero3_init_flag
    # State comes back when the body raises, too.
    try:
        with zero3_init_disabled(acc):
            r["zero3_enabled_in_raising"] = is_deepspeed_zero3_enabled()
            raise KeyError("boom")
    except KeyError:
        r["raise_propagated"] = True
    r["zero3_enabled_after_raise"] = is_deepspeed_zero3_enabled()
    r["init_flag_after_raise"] = plugin.zero3_init_flag
    r["after_raise_config"] = _describe(auto.from_config(cfg))
    return r


def _clip(grads: list[torch.Tensor], max_norm: float | None) -> tuple[list[torch.Tensor], float]:
    """DeepSpeed's clipping (zero/stage_1_and_2.py and stage3.py, ``unscale_and_clip_grads``): divide by
    ``max(1, (norm + 1e-6) / max_norm)``, norm the global L2 norm."""
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    if not max_norm:
        return grads, norm
    scale = max(1.0, (norm + 1e-6) / max_norm)
    return [g / scale for g in grads], norm


def _train_step(acc) -> dict:
    from accelerate.utils import DistributedType

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    reference = copy.deepcopy(model).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        # No dataloader goes through prepare (as in the trainer): the JSON's "auto" micro batch needs a number.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 4
    model, optimizer = acc.prepare(model, optimizer)
    # Different data on each rank.
    xs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + r)) for r in range(acc.num_processes)]
    loss = model(xs[acc.process_index]).pow(2).mean()
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

    # The step by hand, in fp64: each rank's gradient, their mean, clipped as DeepSpeed clips.
    clipping = plugin.deepspeed_config.get("gradient_clipping") if plugin is not None else None
    per_rank = []
    for x in xs:
        reference.zero_grad()
        reference(x.double()).pow(2).mean().backward()
        per_rank.append([p.grad.clone() for p in reference.parameters()])
    start = torch.cat([p.detach().flatten() for p in reference.parameters()])

    def stepped(grads: list[torch.Tensor]) -> torch.Tensor:
        return start - LR * torch.cat([g.flatten() for g in grads])

    mean = [torch.stack(gs).mean(0) for gs in zip(*per_rank)]
    clipped_mean, mean_norm = _clip(mean, clipping)
    clipped_own, _ = _clip(per_rank[acc.process_index], clipping)
    record = {
        "loss": loss.item(),
        "params": flat.tolist(),
        "mean_grad_norm": mean_norm,
        "gradient_clipping": clipping,
        "diff_averaged": (flat - stepped(clipped_mean)).abs().max().item(),
        "diff_averaged_unclipped": (flat - stepped(mean)).abs().max().item(),
        "diff_own": (flat - stepped(clipped_own)).abs().max().item(),
    }
    if plugin is not None:
        cfg = plugin.deepspeed_config
        record["zero_allow_untested_optimizer"] = cfg.get("zero_allow_untested_optimizer")
        record["bf16"] = cfg.get("bf16", {}).get("enabled")
    return record


def main(mode: str, out: str, model_dir: str | None = None) -> None:
    if mode == "plain_first":
        from accelerate import Accelerator

        Accelerator()  # the user's own, before build_accelerator
    kwargs = {}
    if mode == "check_timeout":
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(seconds=PG_TIMEOUT_S))]
    try:
        acc = build_accelerator(**kwargs)
    except RuntimeError as e:
        _write(out, _rank(), {"error": str(e)})
        raise
    record = {
        "world": acc.num_processes,
        "rank": acc.process_index,
        "distributed_type": str(acc.distributed_type.value),
        "torch_world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    }
    if torch.distributed.is_initialized():
        group = torch.distributed.distributed_c10d._get_default_group()
        record["pg_timeout_s"] = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    if mode in ("check", "check_timeout"):
        record.update(_train_step(acc))
        plugin = acc.state.deepspeed_plugin
        record["zero_stage"] = plugin.zero_stage if plugin is not None else 0
        if plugin is not None and plugin.zero_stage == 3:
            record["zero3"] = _zero3_models(acc, model_dir)
    _write(out, acc.process_index, record)
    shut_down(acc)


if __name__ == "__main__":
    main(*sys.argv[1:])
