"""One rank of tests/distributed/test_trainer_distributed.py: PPOTrainer under whatever launch started it
(none, DDP over gloo, DeepSpeed ZeRO-1/2/3 over gloo). ``python trainer_worker.py OUT [WORK_DIR]`` writes
``OUT.<rank>`` (JSON).

The global batch is fixed (8 rows, equal lengths, so each rank's token mean weighs as much as in one process):
with N processes rank r trains rows [r * 8 / N, (r + 1) * 8 / N). With SGD, global advantage whitening and one
minibatch per epoch, N processes and one process compute the same losses and parameters.

Recorded per rank: the stats of each step (parity run), a checksum of the full parameters after it, and:
* ``optimizers``: Adam8bit and Lion8bit trainers run two steps each on ragged responses, longer on rank 1
  (parameters and statistics must agree across ranks);
* ``early_stop``: the all-reduced early-stopping rule fed a different policy KL on each rank, and a real step
  with early_stopping=True (epochs run);
* ``grpo`` (one process and DDP only): a value-free run (GRPO, groups of 4, so each of two ranks holds one whole
  group; GSPO's sequence ratio, clip-higher), its stats and parameters, and whether the value head moved;
* ZeRO-3: the reference's local parameter count (sharded, not replicated), generation with gathered
  parameters (GatheredParameters entries per ``generate``), a reward model built inside
  ``zero3_init_disabled`` (full on every rank), a checkpoint and ``save_pretrained`` under WORK_DIR.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from _workers import shut_down

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trainer"))
from trainer_utils import build_lm, make_tokenizer  # noqa: E402

import ppo_fast  # noqa: E402
from ppo_fast import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

GLOBAL_BATCH = 8
PARITY_KEYS = (
    "ppo/loss/total",
    "ppo/loss/policy",
    "ppo/loss/value",
    "ppo/policy/approxkl",
    "ppo/policy/policykl",
    "ppo/policy/clipfrac",
    "ppo/val/clipfrac",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "ppo/mean_scores",
    "ppo/mean_non_score_reward",
)


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _global_batch(step: int, ragged: bool = False):
    """Equal lengths (parity runs), or ragged ones that differ between the ranks' halves (padded across ranks)."""
    g = torch.Generator().manual_seed(1000 + step)

    def length(base: int, i: int) -> int:
        return base + (i % 3 + 4 * (i >= GLOBAL_BATCH // 2) if ragged else 0)

    queries = [torch.randint(3, 96, (length(4, i),), generator=g) for i in range(GLOBAL_BATCH)]
    responses = [torch.randint(3, 96, (length(5, i),), generator=g) for i in range(GLOBAL_BATCH)]
    scores = [torch.randn((), generator=g) for _ in range(GLOBAL_BATCH)]
    return queries, responses, scores


def _local(batch, rank: int, world: int):
    n = GLOBAL_BATCH // world
    return tuple(list(part[rank * n : (rank + 1) * n]) for part in batch)


def _policy(seed: int = 0, hidden: int = 32) -> AutoModelForCausalLMWithValueHead:
    return AutoModelForCausalLMWithValueHead(build_lm("llama", n_layer=2, seed=seed, hidden_size=hidden))


def _full_params(trainer: PPOTrainer) -> list[float]:
    """fp64 sum and absolute sum of the policy's full parameters (gathered under ZeRO-3)."""
    params = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    ctx = torch.no_grad()
    if getattr(trainer.model, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    with ctx:
        flat = torch.cat([p.detach().double().flatten() for p in params])
        return [flat.sum().item(), flat.abs().sum().item()]


def _scalars(stats: dict) -> dict:
    return {k: float(stats[k]) for k in PARITY_KEYS}


def parity(tokenizer, rank: int, world: int, steps: int = 3) -> tuple[dict, PPOTrainer]:
    policy = _policy()
    config = PPOConfig(
        batch_size=GLOBAL_BATCH // world,
        mini_batch_size=GLOBAL_BATCH // world,
        ppo_epochs=2,
        learning_rate=0.05,
        use_score_scaling=True,
        use_score_norm=True,
        advantage_whitening="global",
        max_grad_norm=0.05,  # active (the gradient norms are larger): DeepSpeed must clip where one process does
        target=0.01,  # the adaptive controller moves with the all-reduced KL
        horizon=20.0,
        seed=0,
    )
    optimizer = torch.optim.SGD(policy.parameters(), lr=config.learning_rate)
    trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=optimizer)
    history = []
    for s in range(steps):
        stats = trainer.step(*_local(_global_batch(s), rank, world))
        history.append({"stats": _scalars(stats), "params": _full_params(trainer)})
    record = {"steps": history, "distributed_type": trainer.accelerator.distributed_type.value}
    record["num_processes"] = trainer.accelerator.num_processes
    return record, trainer


def grpo_parity(tokenizer, rank: int, world: int, steps: int = 2) -> dict:
    policy = _policy(seed=3)
    v_head = [p.detach().clone() for p in policy.v_head.parameters()]
    config = PPOConfig(
        batch_size=GLOBAL_BATCH // world,
        mini_batch_size=GLOBAL_BATCH // world,
        ppo_epochs=2,
        learning_rate=0.05,
        advantage_estimator="grpo",
        group_size=4,
        importance_sampling_level="sequence",
        cliprange_high=0.28,
        seed=0,
    )
    trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=0.05))
    keys = [k for k in PARITY_KEYS if k not in ("ppo/loss/value", "ppo/val/clipfrac")]
    history = []
    for s in range(steps):
        stats = trainer.step(*_local(_global_batch(30 + s), rank, world))
        history.append({"stats": {k: float(stats[k]) for k in keys}, "params": _full_params(trainer)})
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    moved = any(not torch.equal(p, q) for p, q in zip(unwrapped.v_head.parameters(), v_head))
    return {"steps": history, "value_head_moved": moved, "value_stats": sorted(k for k in stats if "/val/" in k)}


def optimizers(tokenizer, rank: int, world: int) -> dict:
    import bitsandbytes as bnb

    out = {}
    for name in ("adam8bit", "lion8bit"):
        policy = _policy(seed=1, hidden=64)  # 6144-element embeddings: 8-bit state where the partition is large
        params = [p for p in policy.parameters() if p.requires_grad]
        if name == "adam8bit":
            optimizer = bnb.optim.Adam8bit(params, lr=1e-3)
        else:
            optimizer = ppo_fast.optim.Lion8bit(params, lr=3e-4)
        config = PPOConfig(batch_size=GLOBAL_BATCH // world, mini_batch_size=2, ppo_epochs=2, seed=0)
        trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=optimizer)
        before = _full_params(trainer)
        for s in range(2):
            stats = trainer.step(*_local(_global_batch(10 + s, ragged=True), rank, world))
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        while hasattr(inner, "optimizer") and not isinstance(inner, (bnb.optim.Adam8bit, ppo_fast.optim.Lion8bit)):
            inner = inner.optimizer  # DeepSpeed's ZeRO wrappers hold the client optimizer inside
        dtypes = sorted({str(v.dtype) for st in inner.state.values() for v in st.values() if torch.is_tensor(v)})
        out[name] = {
            "before": before,
            "after": _full_params(trainer),
            "loss": float(stats["ppo/loss/total"]),
            "responses_len_mean": float(stats["tokens/responses_len_mean"]),
            "state_dtypes": dtypes,
        }
    return out


def early_stop(tokenizer, rank: int, world: int) -> dict:
    policy = _policy(seed=2)
    config = PPOConfig(
        batch_size=GLOBAL_BATCH // world, mini_batch_size=2, ppo_epochs=4, early_stopping=True, target_kl=1.0
    )
    trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=0.3))
    # 1.5 * target_kl = 1.5. Rank 1 alone would stop at 2.0 and 3.9; the means are 1.0 and 1.95.
    decisions = {
        "alone_would_stop": trainer._early_stop(torch.tensor(0.0 if rank == 0 else 2.0)),
        "mean_stops": trainer._early_stop(torch.tensor(0.0 if rank == 0 else 3.9)),
    }
    queries, responses, scores = _local(_global_batch(20), rank, world)
    stats = trainer.step(queries, responses, scores)
    n_tokens = sum(len(r) for r in responses) * world
    decisions["epochs_run"] = stats["ppo/policy/ratio"].size / n_tokens
    return decisions


def zero3(tokenizer, trainer: PPOTrainer, work_dir: str, rank: int, world: int) -> dict:
    import deepspeed
    import transformers

    out = {}
    ref_local = sum(getattr(p, "ds_tensor", p).numel() for p in trainer.ref_model.parameters())
    ref_full = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.ref_model.parameters())
    out["ref_local_numel"], out["ref_full_numel"] = ref_local, ref_full

    entries = []
    real = deepspeed.zero.GatheredParameters

    class Counting(real):
        def __enter__(self):
            entries.append(1)
            return super().__enter__()

    deepspeed.zero.GatheredParameters = Counting
    try:
        queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12, 13])]
        responses = trainer.generate(queries, batch_size=4, return_prompt=False, max_new_tokens=6, do_sample=False)
    finally:
        deepspeed.zero.GatheredParameters = real
    out["generate_gathers"] = len(entries)
    out["responses"] = [r.tolist() for r in responses]

    # The guide's reward model under ZeRO-3, built with ppo_fast's context: whole on every rank.
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=64, num_labels=1, bos_token_id=1, eos_token_id=2
    )
    with ppo_fast.zero3_init_disabled(trainer.accelerator):
        reward = transformers.AutoModelForSequenceClassification.from_config(cfg)
    out["reward_sharded"] = any(hasattr(p, "ds_id") for p in reward.parameters())
    out["reward_numel"] = sum(p.numel() for p in reward.parameters())
    with torch.no_grad():
        out["reward_forward_ok"] = bool(torch.isfinite(reward(torch.arange(6)[None]).logits).all())

    trainer.save_checkpoint(os.path.join(work_dir, "ckpt"))
    trainer.save_pretrained(os.path.join(work_dir, "final"))
    out["params_at_save"] = _full_params(trainer)
    out["steps_at_save"] = trainer.current_step
    out["kl_coef_at_save"] = trainer.kl_ctl.value
    # Wander off one step, then resume natively: DeepSpeed reads its partitioned files through safe_load.
    trainer.step(*_local(_global_batch(7), rank, world))
    moved = _full_params(trainer)
    trainer.load_checkpoint(os.path.join(work_dir, "ckpt"))
    out["native_resume"] = {
        "moved": moved,
        "params": _full_params(trainer),
        "current_step": trainer.current_step,
        "kl_coef": trainer.kl_ctl.value,
    }
    return out


def load_alone(tokenizer, work_dir: str) -> dict:
    """One process, no DeepSpeed: resume from the ZeRO-3 checkpoint and load the ZeRO-3 save_pretrained."""
    import warnings

    _, trainer = parity(tokenizer, 0, 1, steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.load_checkpoint(os.path.join(work_dir, "ckpt"))
    out = {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
        "params": _full_params(trainer),
        "current_step": trainer.current_step,
        "kl_coef": trainer.kl_ctl.value,
        "running_count": float(trainer.running.state[0]),
    }
    stats = trainer.step(*_global_batch(3))
    out["next_step_loss"] = float(stats["ppo/loss/total"])
    final = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(work_dir, "final"))
    flat = torch.cat([p.detach().double().flatten() for p in final.parameters()])
    out["final_params"] = [flat.sum().item(), flat.abs().sum().item()]
    return out


def main(out: str, work_dir: str | None = None, mode: str = "train") -> None:
    rank, world = _world()
    tokenizer = make_tokenizer()
    if mode == "load":
        with open(f"{out}.{rank}", "w") as f:
            json.dump(load_alone(tokenizer, work_dir), f)
        return
    record, trainer = parity(tokenizer, rank, world)
    record["rank"], record["world"] = rank, world
    if world > 1:
        record["optimizers"] = optimizers(tokenizer, rank, world)
        record["early_stop"] = early_stop(tokenizer, rank, world)
        stage = getattr(trainer.model, "zero_optimization_stage", lambda: 0)()
        record["zero_stage"] = stage
        if stage == 3:
            record["zero3"] = zero3(tokenizer, trainer, work_dir, rank, world)
    if world == 1 or record["zero_stage"] == 0:
        record["grpo"] = grpo_parity(tokenizer, rank, world)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f)
    shut_down(trainer.accelerator)


if __name__ == "__main__":
    main(*sys.argv[1:])
