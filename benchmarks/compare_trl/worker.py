"""One measurement in one process: PPO steps of one library on one workload, or the model's floor.

    python worker.py --lib {trl,ppo_fast} --workload N --steps S [--warmup W] [--curve] [--init FILE]
    python worker.py --floor --workload N --steps S [--warmup W] [--init FILE]      # plain torch + transformers
    python worker.py --lib ppo_fast --profile --workload N [--warmup W]             # where the step's time goes

Runs in the environment of the library it measures (TRL's venv with transformers 4.46.3, or ppo_fast's with
transformers 5) and prints one JSON line on stdout (everything else goes to stderr): per-step process CPU
time (``time.process_time``) and wall time, the peak RSS (VmHWM, reset after setup), the reward mean per
step, a digest of the initial weights and the versions. ``run.py`` launches these, alternating libraries.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # workloads.py; benchmarks/_common.py (torch only: runs in both venvs)
import workloads as W  # noqa: E402
from _common import reset_peak_rss, status_mb  # noqa: E402

STAT_KEYS = (
    "objective/kl",
    "objective/entropy",
    "ppo/mean_scores",
    "ppo/loss/total",
    "ppo/loss/value",
    "ppo/policy/clipfrac",
    "ppo/returns/mean",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- process facts
def _git_commit(path: str) -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "ppo_fast", "csrc"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions(lib: str | None) -> dict[str, Any]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import accelerate

        out["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    if lib == "trl":
        import trl

        out["trl"] = trl.__version__
    if lib == "ppo_fast":
        import ppo_fast

        out["ppo_fast"] = getattr(ppo_fast, "__version__", "?")
        out["ppo_fast_file"] = ppo_fast.__file__
        out["ppo_fast_commit"] = _git_commit(ppo_fast.__file__)
        out["ppo_fast_ext"] = bool(getattr(ppo_fast._ops, "HAS_EXT", False))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: str) -> dict[str, float | None]:
    out = {"peak_rss_mb": status_mb("VmHWM"), "rss_mb": status_mb("VmRSS")}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _reset_peaks(device: str) -> bool:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return reset_peak_rss()


# ---------------------------------------------------------------------------------------------- libraries
def _trl_running_moments_fix(trainer) -> str:
    """TRL 0.10/0.11's ``use_score_scaling`` crashes on the first ``step()``: ``RunningMoments.update`` stores
    ``mean``/``std`` as Python floats (``.item()``) and ``step`` then calls ``self.running.std.to(...)``
    ("'float' object has no attribute 'to'"). The fix keeps TRL's own update and formulas: after each update
    the two floats become a float subclass whose ``.to(dtype, device)`` returns the tensor ``step`` expects
    (the float's value, cast as TRL's ``.to`` would)."""
    from trl.trainer.utils import RunningMoments

    class _Scalar(float):
        def to(self, dtype=None, device=None):
            return torch.tensor(float(self), dtype=torch.float64).to(device=device, dtype=dtype)

    class _RunningMoments(RunningMoments):
        def update(self, xs):
            out = super().update(xs)
            self.mean, self.std = _Scalar(self.mean), _Scalar(self.std)
            return out

    old = trainer.running
    trainer.running = _RunningMoments(old.accelerator)
    return "trainer.running replaced by a RunningMoments subclass whose mean/std floats have .to()"


def _library(name: str) -> SimpleNamespace:
    if name == "trl":
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model

        def ref(model):
            return create_reference_model(model, num_shared_layers=W.SHARED_LAYERS)

    elif name == "ppo_fast":
        from ppo_fast import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model

        def ref(model):
            # share_tied_embeddings=True: GPT-2's tied embedding/LM head is shared and frozen, as TRL does,
            # so both libraries train the same parameters (ppo_fast's default keeps the LM head trainable).
            return create_reference_model(model, num_shared_layers=W.SHARED_LAYERS, share_tied_embeddings=True)

    else:
        raise ValueError(f"--lib must be trl or ppo_fast, got {name!r}")
    return SimpleNamespace(
        name=name, ValueHead=AutoModelForCausalLMWithValueHead, PPOConfig=PPOConfig, PPOTrainer=PPOTrainer, ref=ref
    )


def build_trainer(args, w: W.Workload) -> tuple[Any, dict[str, Any]]:
    lib = _library(args.lib)
    device, dtype = args.device, DTYPES[args.dtype]
    lm = W.build_lm(w, args.init)
    model = lib.ValueHead.from_pretrained(lm)  # a model instance: both libraries accept it
    model.v_head.load_state_dict(W.value_head_state(args.init))
    # The digest before any cast: a bf16 run holds rounded weights, the same on both sides.
    info: dict[str, Any] = {"digest": W.model_digest(model.pretrained_model, model.v_head, args.init)}
    # --dtype casts the LM only; the value head stays fp32, as from_pretrained(..., dtype=bf16) leaves it.
    model.pretrained_model.to(dtype=dtype)
    model.to(device)
    info["optimize_cuda_cache"] = not args.no_optimize_cache
    ref = lib.ref(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    info["trainable"] = {"tensors": len(trainable), "elements": sum(p.numel() for p in trainable)}
    info["attn_implementation"] = getattr(lm.config, "_attn_implementation", None)
    optimizer = torch.optim.SGD(trainable, lr=W.LR, momentum=W.MOMENTUM)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, W.LR_GAMMA)
    extra = {"accelerator_kwargs": {"cpu": True}} if device == "cpu" and torch.cuda.is_available() else {}
    config = lib.PPOConfig(
        batch_size=w.batch,
        mini_batch_size=w.mini_batch,
        gradient_accumulation_steps=1,
        ppo_epochs=w.ppo_epochs,
        learning_rate=W.LR,
        use_score_scaling=True,
        use_score_norm=True,
        score_clip=0.5,
        optimize_cuda_cache=not args.no_optimize_cache,
        seed=W.SEED,
        **extra,
    )
    trainer = lib.PPOTrainer(
        config=config,
        model=model,
        ref_model=ref,
        tokenizer=W.make_tokenizer(w.vocab),
        optimizer=optimizer,
        lr_scheduler=scheduler,
    )
    if args.lib == "trl":
        info["workaround"] = _trl_running_moments_fix(trainer)
    if args.lib == "ppo_fast":
        info["fused"] = bool(trainer.use_fused)
    return trainer, info


def _stat(stats: dict[str, Any], key: str) -> float | None:
    if key not in stats:
        return None
    try:
        v = stats[key]
        return float(v.mean()) if hasattr(v, "mean") else float(v)
    except (TypeError, ValueError):
        return None


def _mean(xs: list[torch.Tensor]) -> float:
    return float(torch.stack(xs).double().mean())


def _step(trainer, queries, responses, scores, device: str) -> tuple[dict[str, Any], float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    stats = trainer.step(queries, responses, scores)
    _sync(device)
    return stats, time.process_time() - c0, time.perf_counter() - t0


def _generate(trainer, w: W.Workload, queries: list[torch.Tensor]) -> list[torch.Tensor]:
    out = trainer.generate(queries, return_prompt=False, batch_size=w.batch, **W.generation_kwargs(w))
    out = [r.cpu() for r in out]
    bad = [len(r) for r in out if len(r) != w.response_len]
    if bad:
        raise RuntimeError(f"generation gave responses of lengths {bad[:5]}, expected {w.response_len}")
    return out


def run_steps(args, w: W.Workload) -> dict[str, Any]:
    t = time.perf_counter()
    trainer, info = build_trainer(args, w)
    device = args.device
    fixed_q, fixed_r = W.make_queries(w), W.make_responses(w)
    fixed_s = W.reward(fixed_r)
    info["setup_s"] = time.perf_counter() - t
    info["rss_setup_mb"] = status_mb("VmRSS")
    info["peak_reset"] = _reset_peaks(device)
    steps, first = [], None
    total = args.warmup + args.steps
    for i in range(total):
        if args.curve:
            queries = W.make_queries(w, step=i)
            c0, t0 = time.process_time(), time.perf_counter()
            responses = _generate(trainer, w, queries)
            _sync(device)
            gen = {"gen_cpu_s": time.process_time() - c0, "gen_wall_s": time.perf_counter() - t0}
            scores = W.reward(responses)
        else:
            queries, responses, scores, gen = fixed_q, fixed_r, fixed_s, {}
        stats, cpu, wall = _step(trainer, queries, responses, scores, device)
        row = {"cpu_s": cpu, "wall_s": wall, "reward_mean": _mean(scores), **gen}
        row["stats"] = {k: _stat(stats, k) for k in STAT_KEYS}
        if first is None:
            first = row["stats"]
        if i >= args.warmup:
            steps.append(row)
        print(f"[{args.lib}] step {i + 1}/{total}: cpu {cpu:.3f} s wall {wall:.3f} s", file=sys.stderr)
    info.update(_peak_mb(device))
    info["first_step_stats"] = first
    info["steps"] = steps
    return info


# ---------------------------------------------------------------------------------------------- floor
def run_floor(args, w: W.Workload) -> dict[str, Any]:
    """The model's bare cost (workloads.floor_work), with the parameters the trainers freeze frozen."""
    device, dtype = args.device, DTYPES[args.dtype]
    lm = W.build_lm(w, args.init)
    v_head = W.ValueHead(lm.config.hidden_size)
    v_head.load_state_dict(W.value_head_state(args.init))
    info: dict[str, Any] = {"digest": W.model_digest(lm, v_head, args.init)}
    lm.to(device=device, dtype=dtype)
    v_head.to(device)  # fp32, as the trainers' value heads
    frozen = set(W.frozen_prefix(lm))
    for name, p in lm.named_parameters():
        p.requires_grad_(name not in frozen)
    trainable = [p for p in list(lm.parameters()) + list(v_head.parameters()) if p.requires_grad]
    info["trainable"] = {"tensors": len(trainable), "elements": sum(p.numel() for p in trainable)}
    info["attn_implementation"] = getattr(lm.config, "_attn_implementation", None)
    ids = W.floor_inputs(w, device)
    info["rss_setup_mb"] = status_mb("VmRSS")
    info["peak_reset"] = _reset_peaks(device)
    steps = []
    for i in range(args.warmup + args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        W.floor_work(w, lm, v_head, ids)
        _sync(device)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if i >= args.warmup:
            steps.append({"cpu_s": cpu, "wall_s": wall})
        print(f"[floor] rep {i + 1}: cpu {cpu:.3f} s wall {wall:.3f} s", file=sys.stderr)
    info.update(_peak_mb(device))
    info["steps"] = steps
    return info


# ---------------------------------------------------------------------------------------------- profile
PROFILE_REGIONS = (
    # (label, module, attribute): wrapped in a record_function while profiling, when present
    ("rollout (glue)", "ppo_fast.trainer.rollout", "forward"),
    ("advantages (rewards, GAE, whitening)", "ppo_fast.trainer.rollout", "advantages"),
    ("stats", "ppo_fast.trainer.stats", "step_stats"),
    ("empty_device_cache (gc.collect)", "ppo_fast.trainer.ppo_trainer", "_empty_device_cache"),
    ("input checks + padding", "ppo_fast.trainer.rollout", "check_step_inputs"),
    ("input checks + padding", "ppo_fast.trainer.rollout", "build_inputs"),
)
OP_CATEGORIES = (  # innermost wins; matched on the profiler event's name
    ("log-probs (fused op, fwd+bwd)", ("ppo_fast::logprobs",)),
    ("PPO loss (fused op, fwd+bwd)", ("ppo_fast::ppo_loss",)),
    ("advantages (rewards, GAE, whitening)", ("ppo_fast::rollout_advantages", "ppo_fast::gae", "ppo_fast::compute")),
    ("score scaling (moments)", ("ppo_fast::moments",)),
    ("optimizer step", ("Optimizer.step#",)),
    ("optimizer zero_grad", ("Optimizer.zero_grad#",)),
)
SYNC_NAMES = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def _wrap(obj: Any, attr: str, label: str) -> Any | None:
    fn = getattr(obj, attr, None)
    if fn is None or not callable(fn):
        return None

    def wrapped(*a, **k):
        with torch.profiler.record_function("harness::" + label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)
    return fn


def run_profile(args, w: W.Workload) -> dict[str, Any]:
    """One profiled ``step`` (after ``--warmup`` plain ones): its host time partitioned into exclusive
    categories (each profiler event's self time goes to its innermost labelled ancestor), plus gc pauses
    (``gc.callbacks``) and host synchronisations (``.item()``-style reads; device syncs on CUDA)."""
    import importlib

    from torch.profiler import ProfilerActivity, profile

    if args.lib != "ppo_fast":
        raise SystemExit("--profile measures ppo_fast only")
    trainer, info = build_trainer(args, w)
    queries, responses = W.make_queries(w), W.make_responses(w)
    scores = W.reward(responses)
    for _ in range(args.warmup):
        _step(trainer, queries, responses, scores, args.device)
    patched = []
    for label, mod, attr in PROFILE_REGIONS:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if _wrap(m, attr, label) is not None:
            patched.append(f"{mod}.{attr}")
    for label, obj, attr in (
        ("model forward", trainer.model, "forward"),
        ("model forward", trainer.ref_model, "forward"),
        ("backward (model + fused ops)", trainer.accelerator, "backward"),
        ("score scaling (moments)", trainer.running, "update_normalize"),
    ):
        if obj is not None and _wrap(obj, attr, label) is not None:
            patched.append(f"{type(obj).__name__}.{attr}")
    gc_time = [0.0, 0, 0.0]  # wall s, collections, CPU s
    gc_start = [0.0, 0.0]

    def on_gc(phase, _info):
        if phase == "start":
            gc_start[:] = [time.perf_counter(), time.process_time()]
        else:
            gc_time[0] += time.perf_counter() - gc_start[0]
            gc_time[1] += 1
            gc_time[2] += time.process_time() - gc_start[1]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    gc.callbacks.append(on_gc)
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            with torch.profiler.record_function("harness::step"):
                _, cpu, wall = _step(trainer, queries, responses, scores, args.device)
    finally:
        gc.callbacks.remove(on_gc)
    info.update(_categorise(prof.events(), wall))
    info["replay"] = replay_kernels(prof.events(), args.device, DTYPES[args.dtype])
    info.update(
        {
            "cpu_s": cpu,
            "wall_s": wall,
            "gc_s": gc_time[0],
            "gc_collections": gc_time[1],
            "gc_cpu_s": gc_time[2],
            "patched": patched,
        }
    )
    return info


def _categorise(events, wall: float) -> dict[str, Any]:
    main = [e for e in events if e.name == "harness::step"]
    if not main:
        return {"breakdown": [], "note": "no step event in the profile"}
    step = main[0]
    thread = step.thread

    def label_of(e) -> str | None:
        if e.name.startswith("harness::") and e.name != "harness::step":
            return e.name[len("harness::") :]
        for label, prefixes in OP_CATEGORIES:
            if e.name.startswith(prefixes):
                return label
        return None

    totals: dict[str, float] = {}
    syncs = [0, 0.0]

    def visit(e, label):
        own = label_of(e)
        label = own or label
        child_us = sum(c.cpu_time_total for c in e.cpu_children if c.thread == thread)
        self_us = max(e.cpu_time_total - child_us, 0.0)
        key = label or ("Python between ops (trainer glue)" if e is step else "torch ops outside the regions")
        totals[key] = totals.get(key, 0.0) + self_us
        if e.name.startswith(SYNC_NAMES):
            syncs[0] += 1
            syncs[1] += e.cpu_time_total
        for c in e.cpu_children:
            if c.thread == thread:
                visit(c, label)

    visit(step, None)
    profiled_s = step.cpu_time_total / 1e6
    rows = sorted(((k, v / 1e6) for k, v in totals.items()), key=lambda kv: -kv[1])
    return {
        "breakdown": [{"category": k, "s": s, "share": s / profiled_s if profiled_s else None} for k, s in rows],
        "profiled_step_s": profiled_s,
        "host_syncs": {"count": syncs[0], "s": syncs[1] / 1e6},
    }


# ---------------------------------------------------------------------------------------------- kernel replay
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTN_FWD = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)


def _gemm_flop(name: str, shapes: list) -> float | None:
    """2 M N K (times the batch) from a GEMM event's input shapes; None for shapes it does not know."""
    a, b = (shapes[1], shapes[2]) if name in ("aten::addmm", "aten::baddbmm") else (shapes[0], shapes[1])
    if len(a) != len(b) or len(a) not in (2, 3) or a[-1] != b[-2]:
        return None
    return 2.0 * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]


def _timed(fn, device: str, reps: int) -> float:
    """Best of ``reps`` calls after one warm-up: process CPU time on the CPU, synchronised wall time on a GPU."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        c = clock()
        fn()
        _sync(device)
        best = min(best, clock() - c)
    return best


def _time_gemm(name: str, shapes: list, device: str, dtype: torch.dtype, reps: int) -> float:
    fn = {"aten::mm": torch.mm, "aten::bmm": torch.bmm, "aten::addmm": torch.addmm, "aten::baddbmm": torch.baddbmm}
    ops = [torch.randn(*s, device=device, dtype=dtype) for s in shapes]
    return _timed(lambda: fn[name](*ops), device, reps)


def _time_attention(q, k, v, causal: bool, backward: bool, device: str, dtype: torch.dtype, reps: int):
    import torch.nn.functional as F

    qt, kt, vt = (torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in (q, k, v))

    def fwd():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    tf = _timed(fwd, device, reps)
    if not backward:  # a shape the step only ran forward (the rollout's no-grad passes)
        return tf, 0.0
    out = fwd()
    grad = torch.randn_like(out)
    tb = _timed(lambda: torch.autograd.grad(out, (qt, kt, vt), grad, retain_graph=True), device, reps)
    return tf, tb


def replay_kernels(events, device: str, dtype: torch.dtype, reps: int = 5) -> dict[str, Any]:
    """The step's GEMMs and attention calls, each shape re-timed alone (fresh contiguous operands, best of
    ``reps``) and multiplied by its count: what those kernels cost with nothing else in the step, and the rate
    they reach. The same core's rate on one large square GEMM is the practical bound to read the rate against."""
    gemms: dict[tuple, int] = {}
    attn: dict[tuple, list[int]] = {}  # (q, k, v shapes, causal) -> [forward calls, backward calls]

    def visit(e, under_attention: bool) -> None:
        name, shapes = e.name, [list(s) for s in (e.input_shapes or [])]
        if name in GEMM_OPS and not under_attention and _gemm_flop(name, shapes):
            key = (name, *map(tuple, shapes[: 3 if name in ("aten::addmm", "aten::baddbmm") else 2]))
            gemms[key] = gemms.get(key, 0) + 1
        is_fwd = name in ATTN_FWD
        is_bwd = "scaled_dot_product" in name and name.endswith("_backward")
        if (is_fwd or is_bwd) and len(shapes) >= 4:
            qkv = shapes[1:4] if is_bwd else shapes[0:3]
            at = 7 if is_bwd else 4  # is_causal's place in the forward's / backward's arguments
            concrete = list(getattr(e, "concrete_inputs", None) or [])
            causal = bool(concrete[at]) if len(concrete) > at else True
            attn.setdefault((*map(tuple, qkv), causal), [0, 0])[1 if is_bwd else 0] += 1
        for c in e.cpu_children:
            visit(c, under_attention or is_fwd or is_bwd)

    for e in events:
        if e.name == "harness::step":
            visit(e, False)
            break
    gemm_s = gemm_flop = 0.0
    rows = []
    for (name, *shapes), n in gemms.items():
        s, fl = _time_gemm(name, shapes, device, dtype, reps), _gemm_flop(name, shapes)
        gemm_s, gemm_flop = gemm_s + n * s, gemm_flop + n * fl
        rows.append({"op": name, "shapes": shapes, "calls": n, "ms": 1e3 * s, "gflops": fl / s / 1e9})
    attn_s = attn_flop = 0.0
    for (q, k, v, causal), (nf, nb) in attn.items():
        tf, tb = _time_attention(q, k, v, causal, nb > 0, device, dtype, reps)
        # QK^T and PV (4 b h Tq Tk d), halved under a causal mask; the backward does twice the forward's
        fl = 4.0 * q[0] * q[1] * q[2] * k[2] * q[3] * (0.5 if causal else 1.0)
        attn_s, attn_flop = attn_s + nf * tf + nb * tb, attn_flop + (nf + 2 * nb) * fl
        rows.append(
            {
                "op": "attention" + (" (causal)" if causal else ""),
                "shapes": [q, k, v],
                "calls": [nf, nb],
                "ms": [1e3 * tf, 1e3 * tb],
                "gflops": [fl / tf / 1e9, 2 * fl / tb / 1e9 if tb else None],
            }
        )
    square = (2048, 2048)
    peak = 2.0 * 2048**3 / _time_gemm("aten::mm", [square, square], device, dtype, reps) / 1e9
    return {
        "gemm_s": gemm_s,
        "gemm_gflop": gemm_flop / 1e9,
        "gemm_calls": sum(gemms.values()),
        "attention_s": attn_s,
        "attention_gflop": attn_flop / 1e9,
        "attention_calls": [sum(v[0] for v in attn.values()), sum(v[1] for v in attn.values())],
        "square_gemm_gflops": peak,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", choices=("trl", "ppo_fast"), help="the library to measure (not with --floor)")
    p.add_argument("--workload", type=int, required=True, help=f"one of {sorted(W.WORKLOADS)} (workloads.py)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: the workload's)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    p.add_argument("--ppo-epochs", type=int, default=None, help="override the workload's ppo_epochs (4)")
    p.add_argument("--init", required=True, help="the initial weights (safetensors from workloads.save_init)")
    p.add_argument("--curve", action="store_true", help="responses generated by the current policy each step")
    p.add_argument("--floor", action="store_true", help="the model's bare forward/backward cost, no trainer")
    p.add_argument("--profile", action="store_true", help="ppo_fast: break one step's time down")
    p.add_argument(
        "--no-optimize-cache",
        action="store_true",
        help="PPOConfig(optimize_cuda_cache=False) (default True; a no-op in TRL 0.11.4, gc.collect + empty_cache "
        "between phases in ppo_fast)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = p.parse_args(argv)
    if args.floor == bool(args.lib):
        p.error("give exactly one of --lib and --floor")
    if sum((args.curve, args.floor, args.profile)) > 1:
        p.error("--curve, --floor and --profile are separate runs")
    if args.warmup < 0 or (args.steps is not None and args.steps < 1):
        p.error("--warmup must be >= 0 and --steps >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if not os.path.isfile(args.init):
        p.error(f"--init: no such file {args.init!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    w = W.get(args.workload, args.ppo_epochs)
    if args.steps is None:
        args.steps = w.steps
    mode = "floor" if args.floor else "profile" if args.profile else "curve" if args.curve else "time"
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints must not mix with the JSON line
        if args.floor:
            result = run_floor(args, w)
        elif args.profile:
            result = run_profile(args, w)
        else:
            result = run_steps(args, w)
        versions = _versions(args.lib)
    head = {
        "lib": "floor" if args.floor else args.lib,
        "mode": mode,
        "workload": args.workload,
        "spec": dataclasses.asdict(w),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "versions": versions,
    }
    print(json.dumps({**head, **result}), flush=True)


if __name__ == "__main__":
    main()
