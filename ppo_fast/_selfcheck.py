"""``python -m ppo_fast``: versions, the extension's state, and every public op run once per device
against the eager reference on small seeded inputs, forward and backward. Exit status: 0 when all
agree, 1 on any mismatch or error, 2 when the compiled extension is not loaded (the reference
compared with itself proves nothing).

fp32 outputs must match the reference to the op tests' tolerance (rtol 1e-5, atol 1e-5 x
max(1, max|ref|)). bf16 and fp16 follow the FlashAttention rule of the op tests: the fused error is
at most twice the eager low-precision error, both against the reference run in fp64 on the CPU on
the same (rounded) inputs. Lion has no fp64 path; its low-precision parameters may differ by one
rounding of the parameter dtype.

Every comparison goes through ``ppo_fast.functional`` (``use_fused=True`` against ``False``) or the
optimizers' ``fused=`` switch, so a check follows the ops' documented semantics as they evolve; the
inputs are finite.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from collections.abc import Callable

import torch

PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "bitsandbytes")
SEED = 1234
FP32_TOL = 1e-5
LOWP = (torch.bfloat16, torch.float16)
# Lion rounds each parameter once to its dtype after an fp32 step: one ulp of that dtype.
LOWP_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}


def _version(dist: str) -> str:
    # Distribution metadata only: importing deepspeed or transformers costs seconds and may print.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    except Exception as e:  # a broken install must not stop the check
        return f"unknown ({type(e).__name__}: {e})"


def versions() -> list[tuple[str, str]]:
    import ppo_fast

    rows = [("ppo_fast", ppo_fast.__version__)]
    for name in PACKAGES:
        v = torch.__version__ if name == "torch" else _version(name)
        if name == "torch":
            v += f" (CUDA {torch.version.cuda})"
        rows.append((name, v))
    rows.append(("python", sys.version.split()[0]))
    return rows


def registered_ops() -> dict[str, list[str]]:
    """Every ``ppo_fast::`` op the dispatcher knows, with the backend keys that have a kernel."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ppo_fast::"))
    return {n: [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(n, k)] for n in names}


# ------------------------------------------------------------------------------------------------
# Inputs: drawn in fp64 on the CPU from one seeded generator, rounded to the dtype under test, then
# converted to the compute dtype on the device. The fp64 truth of a bf16 check sees the bf16 values.


class Inputs:
    def __init__(self, device: torch.device, dtype: torch.dtype, compute: torch.dtype):
        self.g = torch.Generator().manual_seed(SEED)
        self.device, self.dtype, self.compute = device, dtype, compute

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).to(device=self.device, dtype=self.compute)

    def randn(self, *shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return self._out(torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale + shift)

    def uniform(self, *shape, low: float, high: float) -> torch.Tensor:
        return self._out(torch.rand(*shape, generator=self.g, dtype=torch.float64) * (high - low) + low)

    def mask(self, B: int, T: int) -> torch.Tensor:
        """Right-padded response mask; row 0 is full, the others at least one token long."""
        lens = torch.randint(1, T + 1, (B,), generator=self.g)
        lens[0] = T
        return (torch.arange(T)[None, :] < lens[:, None]).to(device=self.device, dtype=self.compute)

    def labels(self, B: int, T: int, V: int) -> torch.Tensor:
        return torch.randint(0, V, (B, T), generator=self.g).to(self.device)


Run = Callable[[bool, Inputs], dict[str, torch.Tensor]]
CHECKS: dict[str, Run] = {}


def check(name: str):
    def register(fn: Run) -> Run:
        CHECKS[name] = fn
        return fn

    return register


def _F():
    from ppo_fast import functional

    return functional


B, T, V = 3, 37, 101


def _rollout(x: Inputs):
    scores = x.randn(B, scale=2.0)
    logprobs = x.uniform(B, T, low=-4.0, high=-0.1)
    ref = logprobs + x.randn(B, T, scale=0.1)
    values = x.randn(B, T)
    return scores, logprobs, ref, values, x.mask(B, T)


@check("compute_rewards")
def _(fused, x):
    scores, logprobs, ref, _, mask = _rollout(x)
    out = {}
    for mode in ("kl", "abs", "mse", "k3"):
        r, ns, kl = _F().compute_rewards(scores, logprobs, ref, mask, 0.2, mode, use_fused=fused)
        out |= {f"{mode}/rewards": r, f"{mode}/non_score": ns, f"{mode}/kl": kl}
    return out


@check("gae")
def _(fused, x):
    _, _, _, values, mask = _rollout(x)
    rewards = x.randn(B, T, scale=0.5)
    out = {}
    for carry in (False, True):
        adv, ret = _F().gae(values, rewards, mask, 0.99, 0.95, carry_masked=carry, use_fused=fused)
        out |= {f"carry={carry}/advantages": adv, f"carry={carry}/returns": ret}
    return out


@check("masked_whiten")
def _(fused, x):
    _, _, _, values, mask = _rollout(x)
    out = {}
    for shift in (True, False):
        out[f"shift_mean={shift}"] = _F().masked_whiten(values * 3 + 1, mask, shift, use_fused=fused)
    return out


@check("compute_advantages")
def _(fused, x):
    _, _, _, values, mask = _rollout(x)
    rewards = x.randn(B, T, scale=0.5)
    out = {}
    for whiten in (False, True):
        adv, ret = _F().compute_advantages(values, rewards, mask, 1.0, 0.95, whiten_rewards=whiten, use_fused=fused)
        out |= {f"whiten={whiten}/advantages": adv, f"whiten={whiten}/returns": ret}
    return out


@check("rollout_advantages")
def _(fused, x):
    scores, logprobs, ref, values, mask = _rollout(x)
    r = _F().rollout_advantages(scores, logprobs, ref, values, mask, 0.1, "kl", 1.0, 0.95, use_fused=fused)
    return dict(r._asdict())


@check("ppo_loss")
def _(fused, x):
    _, old, ref, old_values, mask = _rollout(x)
    logprobs = (old + x.randn(B, T, scale=0.15)).requires_grad_()
    vpreds = (old_values + x.randn(B, T, scale=0.3)).requires_grad_()
    advantages, returns = x.randn(B, T), x.randn(B, T)
    out = {}
    for agg, kl_coef, dual, high in (("token_mean", 0.0, None, None), ("seq_mean_token_mean", 0.05, 3.0, 0.28)):
        loss, stats = _F().ppo_loss(
            logprobs, vpreds, old, old_values, advantages, returns, mask, ref,
            kl_coef=kl_coef, dual_clip=dual, aggregation=agg, cliprange_high=high, use_fused=fused,
        )  # fmt: skip
        d_logprobs, d_vpreds = torch.autograd.grad(loss, (logprobs, vpreds))
        out |= {f"{agg}/loss": loss, f"{agg}/stats": stats["_vector"]}
        out |= {f"{agg}/grad_logprobs": d_logprobs, f"{agg}/grad_vpreds": d_vpreds}
    return out


@check("group_advantages")
def _(fused, x):
    from ppo_fast._modes import GROUP_ESTIMATORS

    scores = x.randn(60, scale=2.0, shift=0.5)
    out = {}
    for estimator in GROUP_ESTIMATORS:
        for n in (1, 4, 12):
            out[f"{estimator}/n={n}"] = _F().group_advantages(scores, n, estimator, use_fused=fused)
    return out


@check("gelu_tanh")
def _(fused, x):
    h = x.randn(B, T, 24, scale=3.0).requires_grad_()
    w = x.randn(B, T, 24)
    out = _F().gelu_tanh(h, use_fused=fused)
    (grad,) = torch.autograd.grad((out * w).sum(), h)
    return {"out": out, "grad_x": grad}


def _logits(x: Inputs):
    logits = x.randn(B, T, V, scale=2.0)
    return logits, x.labels(B, T, V)


@check("logprobs")
def _(fused, x):
    logits, labels = _logits(x)
    logits.requires_grad_()
    w_lp, w_ent = x.randn(B, T), x.randn(B, T)
    lp, ent = _F().logprobs_from_logits(logits, labels, 0.7, return_entropy=True, use_fused=fused)
    (grad,) = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), logits)
    return {"logprob": lp, "entropy": ent, "grad_logits": grad}


@check("logprobs_inplace_backward")
def _(fused, x):
    # The fused-only in-place backward against the reference's autograd gradient.
    logits, labels = _logits(x)
    w = x.randn(B, T)
    if not fused:
        logits.requires_grad_()
        lp = _F().logprobs_from_logits(logits, labels, use_fused=False)
        (grad,) = torch.autograd.grad((lp * w).sum(), logits)
        return {"logprob": lp, "grad_logits": grad}
    leaf = logits.clone().requires_grad_()
    work = leaf * 1  # a non-leaf whose storage the backward may overwrite
    lp = _F().logprobs_from_logits(work, labels, inplace_backward=True, use_fused=True)
    (grad,) = torch.autograd.grad((lp * w).sum(), leaf)
    return {"logprob": lp, "grad_logits": grad}


@check("entropy")
def _(fused, x):
    logits, _ = _logits(x)
    return {"entropy": _F().entropy_from_logits(logits, 1.3, use_fused=fused)}


@check("full_kl")
def _(fused, x):
    logits, _ = _logits(x)
    ref_logits = logits + x.randn(B, T, V, scale=0.5)
    return {"kl": _F().full_kl(logits, ref_logits, 0.9, use_fused=fused)}


@check("linear_logprobs")
def _(fused, x):
    # hidden[:, :-1] as the trainer passes it (its rows gathered a chunk at a time), with a bias, in
    # chunks of 16 of the 111 rows; gradients of all three inputs from both outputs.
    hidden = x.randn(B, T + 1, 24).requires_grad_()
    weight, bias = x.randn(V, 24, scale=0.6).requires_grad_(), x.randn(V).requires_grad_()
    labels, w_lp, w_ent = x.labels(B, T, V), x.randn(B, T), x.randn(B, T)
    lp, ent = _F().linear_logprobs(
        hidden[:, :-1], weight, labels, bias, temperature=0.8, return_entropy=True, chunk_size=16, use_fused=fused
    )
    grads = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), (hidden, weight, bias))
    return {"logprob": lp, "entropy": ent} | dict(zip(("grad_hidden", "grad_weight", "grad_bias"), grads))


def _state(x: Inputs) -> torch.Tensor:
    data = torch.randn(40, generator=x.g, dtype=torch.float64) * 2 + 0.5
    s = torch.stack([torch.tensor(40.0, dtype=torch.float64), data.mean(), ((data - data.mean()) ** 2).sum()])
    return torch.cat([s, torch.tensor([0.0], dtype=torch.float64)]).to(x.device)


@check("moments")
def _(fused, x):
    v = x.randn(5, 41, scale=3.0, shift=1.0)
    mask = x.mask(5, 41)
    return {"all": _F().moments(v, use_fused=fused), "masked": _F().moments(v, mask, use_fused=fused)}


@check("moments_merge_")
def _(fused, x):
    state = _state(x)
    batches = torch.stack([_F().moments(x.randn(n, scale=2.0), use_fused=False).double() for n in (7, 1, 30)])
    return {"state": _F().moments_merge_(state, batches.to(state.device), use_fused=fused)}


@check("moments_normalize")
def _(fused, x):
    state = _state(x)
    v, mask = x.randn(5, 41, scale=3.0), x.mask(5, 41)
    out = {}
    for scale, center, clip in ((True, False, None), (True, True, 0.5), (False, True, 1.0)):
        y = _F().moments_normalize(v, mask, state, scale=scale, center=center, clip=clip, use_fused=fused)
        out[f"scale={scale},center={center},clip={clip}"] = y
    return out


@check("moments_update_normalize_")
def _(fused, x):
    state = _state(x)
    v, mask = x.randn(5, 41, scale=3.0, shift=-1.0), x.mask(5, 41)
    y, batch = _F().moments_update_normalize_(state, v, mask, center=True, clip=2.0, use_fused=fused)
    return {"out": y, "batch": batch, "state": state}


def _lion_params(x: Inputs):
    # One tensor large enough for 8-bit state (>= 4096 elements, not a multiple of the 256-block), one small.
    return [x.randn(65, 77, scale=0.5), x.randn(300)], [x.randn(65, 77), x.randn(300)], [x.randn(65, 77), x.randn(300)]


def _lion_run(cls, fused: bool, x: Inputs) -> dict[str, torch.Tensor]:
    params, g1, g2 = _lion_params(x)
    params = [torch.nn.Parameter(p) for p in params]
    opt = cls(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=fused)
    out = {}
    for step, grads in enumerate((g1, g2), 1):  # two steps: the second reads the stored momentum
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, p in enumerate(params):
            out[f"step{step}/param{i}"] = p.detach().clone()
            st = opt.state[p]
            m = st["momentum"]
            if m.dtype == torch.uint8:
                from ppo_fast import reference

                m = reference.dequantize_blockwise(m, st["absmax"])
            out[f"step{step}/momentum{i}"] = m.clone()
    return out


@check("Lion")
def _(fused, x):
    from ppo_fast.optim import Lion

    return _lion_run(Lion, fused, x)


@check("Lion8bit")
def _(fused, x):
    from ppo_fast.optim import Lion8bit

    return _lion_run(Lion8bit, fused, x)


NO_FP64 = {"Lion", "Lion8bit"}  # the optimizers take fp32, bf16 and fp16 parameters only


# ------------------------------------------------------------------------------------------------
# Comparison


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def compare(name: str, run: Run, device: torch.device, dtype: torch.dtype) -> tuple[str, str | None]:
    """(the fused outputs' max error, as text, and None) or (that, what differed)."""
    fused = run(True, Inputs(device, dtype, dtype))
    eager = run(False, Inputs(device, dtype, dtype))
    if fused.keys() != eager.keys():
        return "-", f"outputs {sorted(fused)} vs reference {sorted(eager)}"
    lowp = dtype in LOWP
    truth = None
    if lowp and name not in NO_FP64:
        truth = run(False, Inputs(torch.device("cpu"), dtype, torch.float64))
    worst, worst_ref = 0.0, 0.0
    for key, f in fused.items():
        e = eager[key]
        if f.shape != e.shape or f.dtype != e.dtype:
            what = f"{f.dtype}{list(f.shape)} vs reference {e.dtype}{list(e.shape)}"
            return "-", f"{key} ({dtype_name(dtype)}): {what}"
        f64, e64 = _as64(f), _as64(e)
        if not torch.isfinite(f64).all() or not torch.isfinite(e64).all():
            return "-", f"{key} ({dtype_name(dtype)}): non-finite output on finite inputs"
        if truth is not None:
            t64 = _as64(truth[key])
            scale = max(1.0, t64.abs().max().item())
            fused_err, eager_err = (f64 - t64).abs().max().item(), (e64 - t64).abs().max().item()
            worst, worst_ref = max(worst, fused_err), max(worst_ref, eager_err)
            if fused_err > 2 * eager_err + FP32_TOL * scale:
                return f"{fused_err:.2g}", (
                    f"{key} ({dtype_name(dtype)}): fused error {fused_err:.3g} > 2 x reference error {eager_err:.3g}"
                )
            continue
        err = (f64 - e64).abs()
        scale = max(1.0, e64.abs().max().item())
        tol = FP32_TOL * scale + max(FP32_TOL, LOWP_ULP.get(dtype, 0.0)) * e64.abs()
        worst = max(worst, err.max().item() if err.numel() else 0.0)
        bad = err > tol
        if bad.any():
            i = int(bad.reshape(-1).nonzero()[0])
            return f"{worst:.2g}", (
                f"{key} ({dtype_name(dtype)}): {int(bad.sum())} of {err.numel()} differ, first at flat index {i}: "
                f"fused {f64.reshape(-1)[i].item():.7g} vs reference {e64.reshape(-1)[i].item():.7g}"
            )
    if truth is not None:  # low precision: both errors are against the fp64 truth
        return f"{worst:.2g} ({dtype_name(dtype)}, reference {worst_ref:.2g})", None
    return f"{worst:.2g} ({dtype_name(dtype)})", None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def run_checks(devices: list[torch.device], say: Callable[[str], None], quiet: bool) -> int:
    failures = 0
    for device in devices:
        for name, fn in CHECKS.items():
            errs, problem = [], None
            try:
                for dtype in dtypes_for(device):
                    err, problem = compare(name, fn, device, dtype)
                    errs.append(err)
                    if problem:
                        break
            except Exception as e:
                failures += 1
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                say(f"ERROR {name} {device.type} {type(e).__name__}: {first}")
                continue
            if problem:
                failures += 1
                say(f"MISMATCH {name} {device.type} {problem}")
            elif not quiet:
                say(f"ok  {name}  {device.type}  max_err={', '.join(errs)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ppo_fast",
        description="Check the compiled ppo_fast ops against the eager reference on every available device.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="default: all available")
    parser.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    args = parser.parse_args(argv)
    say = print
    t0 = time.perf_counter()
    from ppo_fast import _ops

    if not args.quiet:
        for name, v in versions():
            say(f"{name:<13} {v}")
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        say("ERROR --device cuda: torch.cuda.is_available() is False")
        return 1
    devices = [torch.device("cpu")] if args.device != "cuda" else []
    if args.device == "cuda" or (args.device == "all" and has_cuda):
        devices.append(torch.device("cuda"))

    if not _ops.HAS_EXT:
        say(f"extension     NOT LOADED: {_ops.EXT_ERROR or 'no reason recorded'}")
        say(
            "ppo_fast runs on the eager reference only; nothing was checked. Build the extension "
            "(`pip install --no-build-isolation -e .`) and run `python -m ppo_fast` again."
        )
        return 2
    import ppo_fast._C as ext

    if not args.quiet:
        say(f"extension     loaded ({ext.__file__})")
        say(f"devices       {', '.join(d.type for d in devices)}")
    failures = 0
    keys = {d.type: d.type.upper() for d in devices}
    ops = registered_ops()
    if not ops:
        say("ERROR the extension loaded but registers no ppo_fast:: op")
        failures += 1
    for op, have in ops.items():
        missing = [k for k in keys.values() if k not in have]
        if not args.quiet:
            say(f"  {op:<36} kernels: {' '.join(have) or 'none'}")
        for key in missing:
            failures += 1
            say(f"ERROR {op} {key.lower()} no {key} kernel registered")

    failures += run_checks(devices, say, args.quiet)
    took = time.perf_counter() - t0
    checked = len(CHECKS) * len(devices)
    if failures:
        say(f"FAILED: {failures} problem(s) in {checked} op/device checks ({took:.1f} s)")
        return 1
    say(f"all ok: {checked} op/device checks, fused == reference ({took:.1f} s)")
    return 0
