"""ppo_fast against TRL 0.11.4: whole PPO steps side by side, and the model's floor.

    python benchmarks/compare_trl/run.py [--workloads 1,2,3] [--reps 3] [--steps 10,5,3] [--trl-venv PATH]
        [--setup-trl] [--smoke] [--curve-steps 60] [--floor ppo_fast|both|none] [--profile]
        [--device cpu|cuda] [--dtype fp32|bf16]

Run it with the Python of the ppo_fast environment (whatever ``ppo_fast`` that Python imports, e.g. through
PYTHONPATH, is what gets measured). TRL runs in its own venv (transformers 4.46.3), made by
``setup_trl_venv.sh`` (``--setup-trl`` runs it when the venv is missing). Each measurement is a fresh worker
process (``worker.py``), launched alternately trl, ppo_fast, trl, ppo_fast, ... so that machine noise hits
both. Prints a markdown table (median step CPU and wall time per side, the ratio TRL / ppo_fast, peak RSS,
reward first/last step, the floor and step / floor) and writes every worker's JSON to a results file.
See README.md in this folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TRL_VENV = os.path.join(HERE, ".venv-trl")
sys.path.insert(0, HERE)
import workloads as W  # noqa: E402

CPU_WORKLOADS, GPU_WORKLOADS, SMOKE_WORKLOADS = (1, 2, 3), (6,), (0,)
QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def trl_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def setup_trl_venv(venv: str, ppo_fast_python: str) -> float:
    """Creates (or reuses) the TRL venv with setup_trl_venv.sh; returns the seconds it took."""
    t = time.perf_counter()
    env = dict(os.environ, PPO_FAST_PYTHON=ppo_fast_python)
    subprocess.run(["bash", os.path.join(HERE, "setup_trl_venv.sh"), venv], check=True, env=env)
    return time.perf_counter() - t


def _parse_per_workload(text: str | None, workloads: list[int], name: str) -> dict[int, int]:
    """``"5"`` (every workload) or ``"10,5,3"`` (one per workload, in order) or ``"4=2,5=2"``."""
    if text is None:
        return {}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            return {int(k): int(v) for k, v in (p.split("=", 1) for p in parts)}
        values = [int(p) for p in parts]
    except ValueError:
        raise SystemExit(f"{name}: expected N, N,N,... or W=N,W=N, got {text!r}") from None
    if len(values) == 1:
        return dict.fromkeys(workloads, values[0])
    if len(values) != len(workloads):
        raise SystemExit(f"{name}: {len(values)} values for {len(workloads)} workloads")
    return dict(zip(workloads, values))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=None, help="comma list (default 1,2,3; 6 with --device cuda; 0 with --smoke)")
    p.add_argument("--reps", type=int, default=3, help="worker runs per library and workload (default 3)")
    p.add_argument(
        "--steps", default=None, help="measured steps per run: N, or one per workload (default: workloads.py)"
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps at the start of each run (default 1)")
    p.add_argument("--ppo-epochs", default=None, help="override ppo_epochs: N or W=N,... (default 4)")
    p.add_argument("--libs", default="trl,ppo_fast", help="trl,ppo_fast (default) or one of them")
    p.add_argument("--trl-venv", default=os.environ.get("PPO_FAST_TRL_VENV", DEFAULT_TRL_VENV))
    p.add_argument("--setup-trl", action="store_true", help="create the TRL venv when it is missing")
    p.add_argument("--ppo-fast-python", default=sys.executable, help="Python of the ppo_fast side (default: this)")
    p.add_argument("--smoke", action="store_true", help="workload 0, one step, one rep, a 2-step curve (CI)")
    p.add_argument("--curve-steps", type=int, default=0, help="reward curve with generated responses (0: none)")
    p.add_argument("--curve-workload", type=int, default=None, help="workload of the curve (default: the first)")
    p.add_argument("--floor", choices=("ppo_fast", "both", "none"), default="ppo_fast", help="whose venv runs it")
    p.add_argument("--profile", action="store_true", help="also break a ppo_fast step down (torch.profiler)")
    p.add_argument(
        "--optimize-cache",
        choices=("on", "off"),
        default="on",
        help="PPOConfig(optimize_cuda_cache=...) on both sides (default on; a no-op in TRL 0.11.4)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="fp32 (cpu) / bf16 (cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker before it is stopped")
    p.add_argument("--out", default=None, help="results JSON (default results/compare_<time>.json here)")
    p.add_argument("--report", default=None, metavar="FILE", help="print the tables of a results JSON; run nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.workloads = args.workloads or ",".join(map(str, SMOKE_WORKLOADS))
        args.reps, args.warmup = 1, 0
        args.steps = args.steps or "1"
        args.curve_steps = args.curve_steps or 2
    default = GPU_WORKLOADS if args.device == "cuda" else CPU_WORKLOADS
    try:
        args.workloads = [int(x) for x in (args.workloads or ",".join(map(str, default))).split(",") if x.strip()]
    except ValueError:
        p.error(f"--workloads: expected a comma list of numbers, got {args.workloads!r}")
    for wl in args.workloads:
        if wl not in W.WORKLOADS:
            p.error(f"--workloads: {wl} is not one of {sorted(W.WORKLOADS)}")
    args.libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    if not args.libs or any(x not in ("trl", "ppo_fast") for x in args.libs) or len(set(args.libs)) != len(args.libs):
        p.error(f"--libs: expected trl and/or ppo_fast, got {args.libs}")
    if args.reps < 1 or args.warmup < 0 or args.curve_steps < 0 or args.threads < 1:
        p.error("--reps and --threads must be >= 1, --warmup and --curve-steps >= 0")
    args.steps = _parse_per_workload(args.steps, args.workloads, "--steps")
    args.ppo_epochs = _parse_per_workload(args.ppo_epochs, args.workloads, "--ppo-epochs")
    if any(v < 1 for v in list(args.steps.values()) + list(args.ppo_epochs.values())):
        p.error("--steps and --ppo-epochs must be >= 1")
    if args.curve_workload is None:
        args.curve_workload = args.workloads[0]
    if args.curve_workload not in W.WORKLOADS:
        p.error(f"--curve-workload: {args.curve_workload} is not one of {sorted(W.WORKLOADS)}")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


# ---------------------------------------------------------------------------------------------- workers
class Runner:
    def __init__(self, args: argparse.Namespace, out_path: str):
        self.args = args
        self.out_path = out_path
        self.init_dir = tempfile.mkdtemp(prefix="compare_trl_")
        self.inits: dict[int, str] = {}
        self.digests: dict[int, str] = {}
        self.records: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}

    def close(self) -> None:
        shutil.rmtree(self.init_dir, ignore_errors=True)

    def init_file(self, wl: int) -> str:
        if wl not in self.inits:
            path = os.path.join(self.init_dir, f"workload{wl}.safetensors")
            self.digests[wl] = W.save_init(W.get(wl), path)
            self.inits[wl] = path
        return self.inits[wl]

    def python(self, lib: str) -> str:
        return trl_python(self.args.trl_venv) if lib == "trl" else self.args.ppo_fast_python

    def env(self, lib: str) -> dict[str, str]:
        env = dict(os.environ, **QUIET_ENV)
        if lib == "trl":  # TRL's venv must not import anything from this checkout's path
            env.pop("PYTHONPATH", None)
        return env

    def launch(self, lib: str, wl: int, mode: str, steps: int | None = None, warmup: int | None = None) -> dict:
        """One worker process; its JSON line, or a record of the failure."""
        a = self.args
        py_lib = "ppo_fast" if lib == "floor" else lib
        floor_venv = lib == "floor-trl"
        if floor_venv:
            py_lib = "trl"
        cmd = [self.python(py_lib), os.path.join(HERE, "worker.py"), "--workload", str(wl)]
        cmd += ["--floor"] if lib.startswith("floor") else ["--lib", lib]
        cmd += ["--init", self.init_file(wl), "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads)]
        cmd += ["--warmup", str(a.warmup if warmup is None else warmup)]
        if steps is not None:
            cmd += ["--steps", str(steps)]
        elif wl in a.steps:
            cmd += ["--steps", str(a.steps[wl])]
        if wl in a.ppo_epochs:
            cmd += ["--ppo-epochs", str(a.ppo_epochs[wl])]
        if mode in ("curve", "profile"):
            cmd += [f"--{mode}"]
        if a.optimize_cache == "off" and not lib.startswith("floor"):
            cmd += ["--no-optimize-cache"]
        label = f"workload {wl} {lib} {mode}"
        print(f"[run] {label}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=self.env(py_lib), timeout=a.timeout, cwd=REPO
            )
        except subprocess.TimeoutExpired:
            rec = {"lib": lib, "workload": wl, "mode": mode, "error": f"timed out after {a.timeout} s"}
        else:
            rec = _last_json(proc.stdout)
            if proc.returncode != 0 or rec is None:
                tail = (proc.stderr or "").strip().splitlines()[-15:]
                rec = {"lib": lib, "workload": wl, "mode": mode, "error": f"exit {proc.returncode}", "stderr": tail}
        if lib == "floor-trl" and "error" not in rec:
            rec["lib"] = "floor-trl"
        rec["process_s"] = time.perf_counter() - t
        rec["loadavg_after"] = _loadavg()
        if "error" in rec:
            print(f"[run] {label} FAILED: {rec['error']}\n  " + "\n  ".join(rec.get("stderr", [])), file=sys.stderr)
        else:
            cpu = [s["cpu_s"] for s in rec.get("steps", [])] or [rec.get("cpu_s", float("nan"))]
            print(f"[run] {label}: median CPU {statistics.median(cpu):.3f} s per step", file=sys.stderr, flush=True)
        self.records.append(rec)
        self.save()
        return rec

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.out_path) or ".", exist_ok=True)
        tmp = self.out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "init_digests": self.digests, "records": self.records}, f, indent=1)
        os.replace(tmp, self.out_path)


def _last_json(stdout: str) -> dict | None:
    for line in reversed((stdout or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- report
def _ok(recs, **match) -> list[dict]:
    return [r for r in recs if "error" not in r and all(r.get(k) == v for k, v in match.items())]


def _median(recs: list[dict], key: str) -> float | None:
    xs = [s[key] for r in recs for s in r.get("steps", []) if s.get(key) is not None]
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def _peak(recs: list[dict]) -> str:
    peaks = [(r.get("peak_rss_mb"), r.get("rss_setup_mb")) for r in recs if r.get("peak_rss_mb") is not None]
    if not peaks:
        return "—"
    peak, setup = max(peaks, key=lambda p: p[0])
    if recs[0].get("device") == "cuda":
        cuda = max((r.get("cuda_peak_mb") or 0) for r in recs)
        return f"{cuda:.0f} (GPU)"
    return f"{peak:.0f} (+{peak - (setup or 0):.0f})"


def _reward_span(recs: list[dict]) -> str:
    if not recs:
        return "—"
    steps = recs[0].get("steps", [])
    if not steps:
        return "—"
    return f"{steps[0]['reward_mean']:.3f}→{steps[-1]['reward_mean']:.3f}"


def report(runner: Runner) -> str:
    a, recs = runner.args, runner.records
    lines = []
    meta = runner.meta
    lines.append(
        f"ppo_fast {meta.get('ppo_fast_commit') or '?'} ({meta.get('ppo_fast_file') or '?'}) vs TRL "
        f"{meta.get('trl') or '—'}; {a.device} {a.dtype}, {a.threads} thread(s) per worker, {a.reps} rep(s), "
        f"warm-up {a.warmup}, optimize_cuda_cache {a.optimize_cache}; "
        f"load before {meta.get('loadavg_before')}, after {meta.get('loadavg_after') or _loadavg()}"
    )
    lines.append("")
    head = (
        "| # | workload | TRL CPU s | ppo_fast CPU s | TRL/ppo_fast CPU | TRL wall s | ppo_fast wall s "
        "| TRL/ppo_fast wall | peak RSS MB TRL (+step) | ppo_fast (+step) | reward first→last TRL | ppo_fast "
        "| floor CPU s | step/floor TRL | ppo_fast |"
    )
    lines += [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    notes = []
    for wl in a.workloads:
        w = W.get(wl, a.ppo_epochs.get(wl))
        trl, pf = _ok(recs, lib="trl", workload=wl, mode="time"), _ok(recs, lib="ppo_fast", workload=wl, mode="time")
        floor = _ok(recs, lib="floor", workload=wl, mode="floor")
        floor_trl = _ok(recs, lib="floor-trl", workload=wl, mode="floor")
        curve = {lib: _ok(recs, lib=lib, workload=wl, mode="curve") for lib in ("trl", "ppo_fast")}
        tc, pc = _median(trl, "cpu_s"), _median(pf, "cpu_s")
        tw, pw = _median(trl, "wall_s"), _median(pf, "wall_s")
        fc = _median(floor, "cpu_s")
        ftc = _median(floor_trl, "cpu_s") if floor_trl else fc
        floor_cell = _fmt(fc) + (f" (TRL venv {_fmt(ftc)})" if floor_trl else "")
        rew_t = _reward_span(curve["trl"] or trl)
        rew_p = _reward_span(curve["ppo_fast"] or pf)
        lines.append(
            f"| {wl} | {w.describe()} | {_fmt(tc)} | {_fmt(pc)} | {_ratio(tc, pc)} | {_fmt(tw)} | {_fmt(pw)} "
            f"| {_ratio(tw, pw)} | {_peak(trl)} | {_peak(pf)} | {rew_t} | {rew_p} | {floor_cell} "
            f"| {_ratio(tc, ftc)} | {_ratio(pc, fc)} |"
        )
        notes += _checks(runner, wl, trl + pf + floor + floor_trl + curve["trl"] + curve["ppo_fast"])
    lines.append("")
    lines.append(
        "CPU = process CPU time (time.process_time) per step, wall = wall-clock, medians over all measured steps "
        "of all reps; peak RSS = VmHWM during the run's steps (+ above the RSS after setup); floor = the model's "
        "bare forward/backward work of one step (transformers 5 unless `--floor both`, where TRL's ratio uses its "
        "own transformers 4.46.3 floor); reward = fraction of response tokens divisible by 8 (fixed responses in "
        "the timing runs; the curve's when one ran)."
    )
    failed = [r for r in recs if "error" in r]
    for r in failed:
        notes.append(f"FAILED: workload {r['workload']} {r['lib']} {r['mode']}: {r['error']}")
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    curve_table = _curve_table(runner)
    if curve_table:
        lines += ["", *curve_table]
    for r in _ok(recs, mode="profile"):
        lines += ["", *_profile_table(runner, r)]
    return "\n".join(lines)


def _checks(runner: Runner, wl: int, recs: list[dict]) -> list[str]:
    """Same initial weights, same trainable parameters, and the first step's rollout statistics."""
    out = []
    digests = {r.get("digest") for r in recs} | {runner.digests.get(wl)}
    if len(digests) > 1:
        out.append(f"workload {wl}: INITIAL WEIGHTS DIFFER between runs: {sorted(map(str, digests))}")
    trainable = {json.dumps(r.get("trainable"), sort_keys=True) for r in recs if r.get("trainable")}
    if len(trainable) > 1:
        out.append(f"workload {wl}: trainable parameters differ: {sorted(trainable)}")
    first = {r["lib"]: r.get("first_step_stats") or {} for r in recs if r.get("mode") == "time"}
    if "trl" in first and "ppo_fast" in first and first["trl"] and first["ppo_fast"]:
        parts = []
        for key in ("objective/entropy", "ppo/mean_scores", "ppo/returns/mean"):
            t, p = first["trl"].get(key), first["ppo_fast"].get(key)
            if t is not None and p is not None:
                parts.append(f"{key} {t:.6g} vs {p:.6g}")
        if parts:
            out.append(f"workload {wl} first step, TRL vs ppo_fast: " + "; ".join(parts))
    fused = {r.get("fused") for r in recs if r.get("lib") == "ppo_fast"}
    if False in fused:
        out.append(f"workload {wl}: ppo_fast ran WITHOUT the fused kernels (extension not loaded?)")
    return out


def _curve_table(runner: Runner) -> list[str]:
    recs = {lib: _ok(runner.records, lib=lib, mode="curve") for lib in ("trl", "ppo_fast")}
    if not any(recs.values()):
        return []
    n = max(len(r[0]["steps"]) for r in recs.values() if r)
    marks = sorted({1, n, *range(5, n + 1, 5)} if n > 5 else set(range(1, n + 1)))
    lines = [f"Reward curve (workload {runner.args.curve_workload}, responses sampled from the policy each step):", ""]
    lines += [
        "| step | " + " | ".join(str(m) for m in marks) + " | mean first 5 | mean last 5 | gen CPU s | step CPU s |"
    ]
    lines += ["|" + "|".join(["---"] * (len(marks) + 5)) + "|"]
    for lib in ("trl", "ppo_fast"):
        if not recs[lib]:
            continue
        steps = recs[lib][0]["steps"]
        rw = [s["reward_mean"] for s in steps]
        cells = [f"{rw[m - 1]:.3f}" if m <= len(rw) else "—" for m in marks]
        first5, last5 = statistics.mean(rw[:5]), statistics.mean(rw[-5:])
        gen = statistics.median(s.get("gen_cpu_s", 0.0) for s in steps)
        cpu = statistics.median(s["cpu_s"] for s in steps)
        lines.append(f"| {lib} | " + " | ".join(cells) + f" | {first5:.3f} | {last5:.3f} | {gen:.3f} | {cpu:.3f} |")
    return lines


def _profile_table(runner: Runner, rec: dict) -> list[str]:
    wl = rec["workload"]
    floor = _median(_ok(runner.records, lib="floor", workload=wl, mode="floor"), "cpu_s")
    step = rec.get("profiled_step_s") or rec.get("wall_s")
    cpu = rec.get("cpu_s") or 0.0
    lines = [
        f"Where a ppo_fast step's time goes (workload {wl}, one step under torch.profiler: {step:.3f} s wall, "
        f"{cpu:.3f} s CPU). Shares of the host wall time; the CPU column spreads the step's CPU time by those "
        "shares (a shared machine stretches wall time):",
        "",
        "| category | wall ms | share | ≈ CPU ms |",
        "|---|---|---|---|",
    ]
    for row in rec.get("breakdown", []):
        share = row["share"] or 0.0
        lines.append(f"| {row['category']} | {row['s'] * 1e3:.1f} | {100 * share:.1f}% | {share * cpu * 1e3:.1f} |")
    lines.append("")
    lines.append(
        f"gc: {rec.get('gc_collections')} collections, {1e3 * rec.get('gc_s', 0):.1f} ms wall"
        + (f" ({1e3 * rec['gc_cpu_s']:.1f} ms CPU)" if rec.get("gc_cpu_s") is not None else "")
        + f" in all; host syncs "
        f"(item/_local_scalar_dense, device syncs): {rec.get('host_syncs', {}).get('count')} calls, "
        f"{1e3 * rec.get('host_syncs', {}).get('s', 0):.2f} ms."
    )
    if floor:
        lines.append(
            f"Floor (CPU, median of its runs): {floor * 1e3:.1f} ms; this step's CPU time minus the floor: "
            f"{(cpu - floor) * 1e3:.1f} ms."
        )
    lines += _replay_lines(runner, rec)
    return lines


def _replay_lines(runner: Runner, rec: dict) -> list[str]:
    """The profiled step's GEMMs and attention re-timed alone (worker.replay_kernels): the kernels' share of
    the step, their rate against one large square GEMM on the same core, and the TRL / ppo_fast ratio the
    step would have if it were those kernels and nothing else."""
    rp = rec.get("replay")
    if not rp or not rp["gemm_calls"]:
        return []
    wl, cpu = rec["workload"], rec.get("cpu_s") or 0.0
    pf = _median(_ok(runner.records, lib="ppo_fast", workload=wl, mode="time"), "cpu_s") or cpu
    trl = _median(_ok(runner.records, lib="trl", workload=wl, mode="time"), "cpu_s")
    kern = rp["gemm_s"] + rp["attention_s"]
    nf, nb = rp["attention_calls"]
    lines = [
        "",
        f"The same step's kernels re-timed alone (each shape on fresh operands, best of 5, times its count): "
        f"{rp['gemm_calls']} GEMMs, {rp['gemm_gflop']:.0f} GFLOP in {rp['gemm_s']:.2f} s "
        f"({rp['gemm_gflop'] / rp['gemm_s']:.1f} GFLOP/s; one 2048^3 GEMM on this core: "
        f"{rp['square_gemm_gflops']:.1f} GFLOP/s)"
        + (
            f"; attention {nf} forward + {nb} backward calls, {rp['attention_gflop']:.0f} GFLOP in "
            f"{rp['attention_s']:.2f} s ({rp['attention_gflop'] / rp['attention_s']:.1f} GFLOP/s)"
            if rp["attention_s"]
            else ""
        )
        + f". Together {kern:.2f} s, {100 * kern / pf:.0f}% of the step's median {pf:.3f} s CPU"
        + (f"; with nothing else in the step, TRL / ppo_fast would be {trl / kern:.2f}x." if trl else "."),
        "",
        "| kernel | shapes | calls | ms each | GFLOP/s |",
        "|---|---|---|---|---|",
    ]

    def cell(x, spec):
        return " / ".join(_fmt(v, spec) for v in x) if isinstance(x, list) else _fmt(x, spec)

    def total_ms(r):
        calls, ms = (r["calls"], r["ms"]) if isinstance(r["calls"], list) else ([r["calls"]], [r["ms"]])
        return sum(c * m for c, m in zip(calls, ms))

    for r in sorted(rp["rows"], key=total_ms, reverse=True)[:12]:
        shapes = " x ".join(str(list(s)) for s in r["shapes"])
        lines.append(
            f"| {r['op']} | {shapes} | {cell(r['calls'], 'd')} | {cell(r['ms'], '.2f')} | {cell(r['gflops'], '.1f')} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------- main
def rerender(path: str) -> str:
    with open(path) as f:
        saved = json.load(f)
    runner = Runner(parse(saved["meta"]["argv"]), path)
    runner.close()
    runner.meta, runner.records = saved["meta"], saved["records"]
    runner.digests = {int(k): v for k, v in saved["init_digests"].items()}
    return report(runner)


def main(argv=None) -> int:
    args = parse(argv)
    if args.report:
        print(rerender(args.report))
        return 0
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or os.path.join(HERE, "results", f"compare_{stamp}.json")
    if "trl" in args.libs and not os.path.exists(trl_python(args.trl_venv)):
        if args.setup_trl or os.environ.get("PPO_FAST_COMPARE_TRL_SETUP") == "1":
            print(f"[run] creating the TRL venv at {args.trl_venv}", file=sys.stderr)
            print(
                f"[run] TRL venv ready in {setup_trl_venv(args.trl_venv, args.ppo_fast_python):.0f} s", file=sys.stderr
            )
        else:
            print(
                f"no TRL venv at {args.trl_venv}: create it with `bash {os.path.join(HERE, 'setup_trl_venv.sh')} "
                f"{args.trl_venv}` (or pass --setup-trl, --trl-venv PATH, or --libs ppo_fast)",
                file=sys.stderr,
            )
            return 2
    runner = Runner(args, out)
    runner.meta = {
        "started": stamp,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_before": _loadavg(),
        "trl_venv": args.trl_venv if "trl" in args.libs else None,
    }
    try:
        for wl in args.workloads:
            for _ in range(args.reps):
                for lib in args.libs:  # trl, ppo_fast, trl, ppo_fast, ...
                    runner.launch(lib, wl, "time")
                if args.floor in ("ppo_fast", "both"):
                    runner.launch("floor", wl, "floor")
                if args.floor == "both" and "trl" in args.libs:
                    runner.launch("floor-trl", wl, "floor")
        if args.curve_steps:
            for lib in args.libs:
                runner.launch(lib, args.curve_workload, "curve", steps=args.curve_steps, warmup=0)
        if args.profile and "ppo_fast" in args.libs:
            for wl in args.workloads:
                runner.launch("ppo_fast", wl, "profile")
        for r in runner.records:
            v = r.get("versions") or {}
            if r.get("lib") == "ppo_fast" and v:
                runner.meta.update(
                    ppo_fast_commit=v.get("ppo_fast_commit"), ppo_fast_file=v.get("ppo_fast_file"),
                    ppo_fast_transformers=v.get("transformers"), torch=v.get("torch"),
                )  # fmt: skip
            if r.get("lib") == "trl" and v:
                runner.meta.update(trl=v.get("trl"), trl_transformers=v.get("transformers"))
        runner.meta["loadavg_after"] = _loadavg()
        text = report(runner)
        runner.meta["table"] = text
        runner.save()
        print(text)
        print(f"\nraw results: {out}")
    finally:
        runner.close()
    return 1 if any("error" in r for r in runner.records) else 0


if __name__ == "__main__":
    sys.exit(main())
