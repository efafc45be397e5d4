"""Tests of log-probabilities and entropy from logits: ppo_fast::logprobs, ppo_fast::logprobs_backward
and ppo_fast::full_kl (csrc/include/ppo_fast/logprobs.h, csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu),
through ``ppo_fast.functional`` (logprobs_from_logits, entropy_from_logits, full_kl) and ``torch.ops``.

Ground truth is ``ppo_fast.reference`` run on float64 copies of the logits, gradients by autograd;
transcriptions of TRL 0.11's helpers (log_softmax + gather, entropy_from_logits, the 'full' KL
penalty) check the reference's semantics. Every value (log-prob, entropy, lse, KL; elementwise) and
every gradient (max over the tensor) must satisfy

    fused error <= 2 x eager error + 1e-5 x scale

with both errors against the float64 reference, ``eager`` being the reference run on the same
logits in their own dtype (fp32 arithmetic inside, as TRL's helpers in fp32), and scale
max(1, |ref|) for values and max |ref| for gradients. For bf16/fp16 logits this is the
FlashAttention rule; for fp32 it is "tight" (1e-5 relative), unless the eager fp32 computation is
itself worse on an ill-conditioned input, in which case the fused op must be no worse than twice it.

Logits are N(0, 3^2) (an LLM-like spread) unless a test says otherwise.
"""

from __future__ import annotations

import math

import _helpers as H
import pytest
import torch
from _cuda_checks import cuda_kernels, without_host_sync

from ppo_fast import functional as F
from ppo_fast import reference as R

ops = torch.ops.ppo_fast

TOL = H.FLOOR  # relative floor of the rule above (1e-5)
SCALE = 3.0  # std of the logits
# (B, T, V): T in {1, 7, 1031}, B in {1, 3}, vocabularies 1, 7, 1000, GPT-2's 50257 and Qwen2's
# 152064 (few rows for the big ones so the CPU suite stays fast).
SHAPES = [
    (1, 1, 1),
    (3, 7, 1),
    (1, 1, 7),
    (3, 7, 7),
    (3, 1031, 7),
    (2, 9, 1000),
    (2, 3, 50257),
    (1, 3, 152064),
]
FLOWS = ("logprob", "entropy", "both")


# ------------------------------------------------------------------------------------------------
# Inputs and routes


def make_logits(rand, B, T, V, dtype=torch.float32, device="cpu", scale=SCALE, shift=0.0):
    return (rand.randn(B, T, V, dtype=torch.float64, scale=scale) + shift).to(device=device, dtype=dtype)


def make_labels(rand, B, T, V, device="cpu"):
    return rand.randint(0, V, (B, T)).to(device)


def make_grads(rand, B, T, flow, device="cpu"):
    """Upstream gradients (fp64, cast later) into logprob and/or entropy; None where nothing flows."""
    g_lp = rand.randn(B, T, dtype=torch.float64, device=device)
    g_h = rand.randn(B, T, dtype=torch.float64, device=device)
    return (g_lp if flow != "entropy" else None), (g_h if flow != "logprob" else None)


def run(route, logits, labels, temperature=1.0):
    """(logprob, entropy, lse) through ``route``: 'ops' (torch.ops.ppo_fast.logprobs), 'fused' /
    'eager' (functional.logprobs_from_logits, use_fused True / False; no lse), 'ref' (the reference
    on the logits as given) or 'ref64' (the reference on float64 copies)."""
    if route == "ops":
        return ops.logprobs(logits, labels, temperature)
    if route == "ref":
        return R.logprobs(logits, labels, temperature)
    if route == "ref64":
        return R.logprobs(logits.double(), labels, temperature)
    lp, h = F.logprobs_from_logits(logits, labels, temperature, return_entropy=True, use_fused=route == "fused")
    return lp, h, None


def forward_backward(route, logits, labels, temperature, g_lp, g_h):
    """Forward through ``route`` from a fresh leaf copy of ``logits`` (float64 for 'ref64'), then
    backward of sum(logprob * g_lp) + sum(entropy * g_h). Returns (logprob, entropy, d_logits)."""
    x = logits.detach().clone()
    if route == "ref64":
        x, route = x.double(), "ref"
    x.requires_grad_()
    lp, h, _ = run(route, x, labels, temperature)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp * g_lp.to(lp.dtype)).sum()
    if g_h is not None:
        loss = loss + (h * g_h.to(h.dtype)).sum()
    loss.backward()
    return lp.detach(), h.detach(), x.grad


def _err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    x, ref = x.double(), ref.double()
    return torch.where(x == ref, 0.0, (x - ref).abs())  # equal infinities are no error


def check_rule(what, out, ref, eager, elementwise=True, extra=None):
    """The rule of the module docstring. Non-finite reference entries must be matched exactly.
    ``extra``: an additional absolute allowance (scalar or elementwise)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    fe, ee = _err(out, ref), _err(eager, ref)
    r = ref.double()
    finite = torch.isfinite(r)
    if elementwise:
        bound = H.flash_bound(ee, r.abs().clamp(min=1.0))
    else:
        fe, ee = fe.max(), ee.max()
        bound = H.flash_bound(ee, r[finite].abs().max().clamp(min=1e-30))
    if extra is not None:
        bound = bound + extra
    if elementwise:
        bound = torch.where(finite, bound, 0.0)
    bad = ~(fe <= bound)  # NaN counts as bad
    if bad.any():
        i = int(torch.where(bad, fe.nan_to_num(math.inf), -1.0).flatten().argmax())
        raise AssertionError(
            f"{what} ({out.dtype} out, {eager.dtype} eager): fused error {fe.flatten()[i].item():.3g} > "
            f"2 x eager error {ee.flatten()[i].item():.3g} + {TOL:g} x scale (bound {bound.flatten()[i].item():.3g}) "
            f"at {int(bad.sum())} of {bad.numel()} entries; "
            + (f"ref {r.flatten()[i].item():.6g}" if elementwise else f"max |ref| {r[finite].abs().max().item():.3g}")
        )


def check_values(logits, labels, temperature=1.0, extra=None):
    """logprob, entropy and lse of torch.ops against the fp64 reference by the rule; the functional
    fused route is bit-identical to torch.ops. Returns the torch.ops outputs."""
    out = run("ops", logits, labels, temperature)
    ref = run("ref64", logits, labels, temperature)
    eager = run("ref", logits, labels, temperature)
    failures = []
    for name, o, r, e in zip(("logprob", "entropy", "lse"), out, ref, eager, strict=True):
        try:
            check_rule(name, o, r, e, extra=None if extra is None else extra.get(name))
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)
    fused = run("fused", logits, labels, temperature)
    assert torch.equal(fused[0], out[0]) and torch.equal(fused[1], out[1])
    B, T = logits.shape[:2]
    for t in out:
        assert t.dtype == torch.float32 and t.shape == (B, T) and t.device == logits.device
    return out


def check_gradients(logits, labels, temperature, g_lp, g_h, extra=None):
    """d_logits of the fused route (functional and torch.ops: bit-identical) against the fp64
    reference's autograd by the rule. Returns the fused gradient."""
    fused = forward_backward("fused", logits, labels, temperature, g_lp, g_h)
    direct = forward_backward("ops", logits, labels, temperature, g_lp, g_h)
    for f, d in zip(fused, direct, strict=True):
        assert torch.equal(f, d)
    ref = forward_backward("ref64", logits, labels, temperature, g_lp, g_h)
    eager = forward_backward("eager", logits, labels, temperature, g_lp, g_h)
    grad = fused[2]
    assert grad.dtype == logits.dtype and grad.shape == logits.shape and grad.device == logits.device
    assert torch.isfinite(grad).all()
    check_rule("d_logits", grad, ref[2], eager[2], elementwise=False, extra=extra)
    return grad


# ------------------------------------------------------------------------------------------------
# Against the reference: values and gradients


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_values(device, rand, shape, dtype):
    B, T, V = shape
    x = make_logits(rand, B, T, V, dtype, device)
    y = make_labels(rand, B, T, V, device)
    lp, h, lse = check_values(x, y)
    assert (lp <= 0).all() and (h >= 0).all() and (h <= math.log(V) + 1e-4).all()
    if V == 1:
        assert (lp == 0).all() and (h == 0).all()


# every flow on the small vocabularies, both flows together on the big ones (CPU time)
GRAD_CASES = [(shape, flow) for shape in SHAPES for flow in FLOWS if shape[2] <= 1000 or flow == "both"]


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape,flow", GRAD_CASES, ids=[f"{H.ids(s)}-{f}" for s, f in GRAD_CASES])
def test_gradients(device, rand, shape, dtype, flow):
    """Gradient w.r.t. the logits from logprob only, entropy only and both."""
    B, T, V = shape
    x = make_logits(rand, B, T, V, dtype, device)
    y = make_labels(rand, B, T, V, device)
    g_lp, g_h = make_grads(rand, B, T, flow, device)
    grad = check_gradients(x, y, 1.0, g_lp, g_h)
    if V == 1:
        assert (grad == 0).all()  # a one-token vocabulary: logprob and entropy are constant


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.3, 4.0])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_temperature(device, rand, dtype, temperature):
    B, T, V = 3, 11, 257
    x = make_logits(rand, B, T, V, dtype, device)
    y = make_labels(rand, B, T, V, device)
    lp, h, _ = check_values(x, y, temperature)
    for flow in FLOWS:
        g_lp, g_h = make_grads(rand, B, T, flow, device)
        check_gradients(x, y, temperature, g_lp, g_h)
    # the temperature divides the logits: same as scaling them by hand (fp64 to keep it exact)
    ref = R.logprobs(x.double() / temperature, y, 1.0)
    torch.testing.assert_close(lp.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), ref[1], rtol=1e-5, atol=1e-5)


def test_int32_labels(device, rand):
    x = make_logits(rand, 3, 7, 101, torch.float32, device)
    y = make_labels(rand, 3, 7, 101, device)
    for route in ("ops", "fused", "eager"):
        a, b = run(route, x, y), run(route, x, y.int())
        for p, q in zip(a, b, strict=True):
            assert (p is None and q is None) or torch.equal(p, q)
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    assert torch.equal(
        forward_backward("fused", x, y, 1.0, g_lp, g_h)[2], forward_backward("fused", x, y.int(), 1.0, g_lp, g_h)[2]
    )


# ------------------------------------------------------------------------------------------------
# Extreme logits


def _extreme(kind, rand, B, T, V, dtype, device):
    base = rand.randn(B, T, V, dtype=torch.float64)
    if kind == "shift+1e4":
        x = base + 1e4
    elif kind == "shift-1e4":
        x = base - 1e4
    elif kind == "spread1e4":  # nearly one-hot rows: entropy ~ 0, log-probs ~ 0 or ~ -1e4
        x = base * 1e4
    elif kind == "halves":  # half of each row at +1e4, half at -1e4
        x = base + torch.where(torch.arange(V) < V // 2, 1e4, -1e4)
    else:
        raise ValueError(kind)
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["shift+1e4", "shift-1e4", "spread1e4", "halves"])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_extreme_logits_finite(device, rand, dtype, kind, temperature):
    """Logits of +-1e4 (z up to 2e4 with temperature 0.5): no overflow, no NaN, bounds hold, the
    gradients are finite, and the log-probs are right up to the fp32 rounding of lse itself."""
    B, T, V = 2, 5, 1000
    x = _extreme(kind, rand, B, T, V, dtype, device)
    y = make_labels(rand, B, T, V, device)
    lp, h, lse = run("ops", x, y, temperature)
    ref = run("ref64", x, y, temperature)
    for name, t in (("logprob", lp), ("entropy", h), ("lse", lse)):
        assert torch.isfinite(t).all(), name
    assert (lp <= 0).all()
    assert (h >= -1e-4).all() and (h <= math.log(V) + 1e-3).all()
    lse_ulp = ref[2].abs() * 2.0**-22  # one fp32 rounding of lse, with room
    assert (_err(lp, ref[0]) <= 1e-4 * ref[0].abs().clamp(min=1) + lse_ulp).all()
    assert (_err(lse, ref[2]) <= lse_ulp).all()
    if kind == "spread1e4":  # (nearly) one-hot rows, or a few exact ties in low precision
        assert (_err(h, ref[1]) <= 1e-4 + lse_ulp).all()
    for flow in FLOWS:
        g_lp, g_h = make_grads(rand, B, T, flow, device)
        _, _, grad = forward_backward("fused", x, y, temperature, g_lp, g_h)
        assert torch.isfinite(grad).all(), flow


SHIFTED = [
    (torch.float32, 7, -1e4),
    (torch.float32, 7, 1e4),
    (torch.float32, 50257, -1e4),
    (torch.float32, 50257, -80.0),
    (torch.float32, 50257, 1e4),
    (torch.bfloat16, 7, 1e4),
    (torch.bfloat16, 50257, -80.0),
]


@pytest.mark.parametrize("dtype,V,shift", SHIFTED, ids=[f"{H.ids(d)}-{v}-{s:g}" for d, v, s in SHIFTED])
def test_shifted_rows_accuracy(device, rand, dtype, V, shift):
    """Logits far from 0 (GPT-2's sit around -80; +-1e4 as the extreme), N(shift, 3^2). Entropy is
    lse - E[z], two numbers near ``shift``: it must lose no more to cancellation than twice the eager
    fp32 computation (the rule). log-prob and lse get one fp32 rounding of lse on top (lse is an fp32
    output of size |shift|); the gradients, computed from that lse, the same relative allowance."""
    B, T = 2, 3
    x = make_logits(rand, B, T, V, dtype, device, shift=shift)
    y = make_labels(rand, B, T, V, device)
    lse_ulp = R.logprobs(x.double(), y)[2].abs() * 2.0**-22
    check_values(x, y, extra={"logprob": lse_ulp, "lse": lse_ulp})
    g_lp, g_h = make_grads(rand, B, T, "both", device)
    ref = forward_backward("ref64", x, y, 1.0, g_lp, g_h)[2]
    check_gradients(x, y, 1.0, g_lp, g_h, extra=ref.abs().max() * lse_ulp.max())


# ------------------------------------------------------------------------------------------------
# Masked vocabulary (-inf logits)


def _masked(rand, B, T, V, dtype, device, frac=0.5):
    """Logits with about ``frac`` of the vocabulary at -inf, a finite entry in every row; row 0
    token 0 has a single finite entry (its label). Labels at finite entries."""
    x = rand.randn(B, T, V, dtype=torch.float64, scale=SCALE)
    masked = torch.rand(B, T, V, generator=rand.gen) < frac
    y = rand.randint(0, V, (B, T))
    masked.scatter_(2, y[..., None], False)
    masked[0, 0] = True
    masked[0, 0, y[0, 0]] = False
    x = x.masked_fill(masked, -math.inf)
    return x.to(device=device, dtype=dtype), y.to(device), masked.to(device)


@pytest.mark.parametrize("V", [7, 1000])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_masked_vocabulary(device, rand, dtype, V):
    B, T = 3, 7
    x, y, masked = _masked(rand, B, T, V, dtype, device)
    for temperature in (1.0, 0.8):
        lp, h, _ = check_values(x, y, temperature)
        assert torch.isfinite(lp).all() and torch.isfinite(h).all()
        assert lp[0, 0] == 0 and h[0, 0] == 0  # one finite entry: certain
        for flow in FLOWS:
            g_lp, g_h = make_grads(rand, B, T, flow, device)
            grad = check_gradients(x, y, temperature, g_lp, g_h)
            assert (grad[masked] == 0).all(), f"{flow}: nonzero gradient at -inf logits"


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_label_at_masked_entry(device, rand, dtype):
    """A label at a -inf logit has probability 0: logprob -inf on every route; entropy unaffected."""
    B, T, V = 3, 7, 50
    x, y, masked = _masked(rand, B, T, V, dtype, device)
    bad = torch.zeros(B, T, dtype=torch.bool, device=device)
    bad[1, 2] = bad[2, 6] = True
    for b, t in bad.nonzero().tolist():
        y[b, t] = int(masked[b, t].nonzero()[0])
    ref = run("ref64", x, y)
    assert (ref[0][bad] == -math.inf).all()
    for route in ("ops", "fused", "eager"):
        lp, h, _ = run(route, x, y)
        assert (lp[bad] == -math.inf).all(), route
        assert torch.isfinite(lp[~bad]).all() and torch.isfinite(h).all(), route
    check_values(x, y)


# ------------------------------------------------------------------------------------------------
# Layouts: sliced logits are read in place; a non-contiguous vocabulary still works


def _allocated(fn, device):
    """Bytes allocated while ``fn`` runs: on CPU the sum of every allocation the profiler sees, on
    CUDA the peak above what was allocated before. Returns (bytes, what fn returned)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    total = sum(max(0, e.self_cpu_memory_usage) for e in prof.events() if e.name.startswith("aten::"))
    return total, out


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_sliced_logits(device, rand, dtype):
    """logits[:, :-1] (the usual shift for next-token labels) and other views with a contiguous
    vocabulary: bit-identical to the contiguous copy, values, gradients and full_kl alike."""
    B, T, V = 3, 9, 517
    base = make_logits(rand, B, T + 1, V, dtype, device)
    wide = make_logits(rand, B, T, V + 5, dtype, device)
    tall = make_logits(rand, 2 * B, T, V, dtype, device)
    y = make_labels(rand, B, T, V, device)
    g_lp, g_h = make_grads(rand, B, T, "both", device)
    views = {
        "[:, :-1]": (base, lambda b: b[:, :-1]),
        "[:, 1:]": (base, lambda b: b[:, 1:]),
        "[..., :V]": (wide, lambda b: b[..., :V]),
        "[::2]": (tall, lambda b: b[::2]),
    }
    for name, (src, view) in views.items():
        x = view(src)
        assert not x.is_contiguous() and x.stride(2) == 1, name
        xc = x.contiguous()
        for p, q in zip(run("ops", x, y), run("ops", xc, y), strict=True):
            assert torch.equal(p, q), name
        leaf = src.detach().clone().requires_grad_()
        lp, h, _ = run("fused", view(leaf), y)
        ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
        grad_c = forward_backward("fused", xc, y, 1.0, g_lp, g_h)[2]
        assert torch.equal(view(leaf.grad), grad_c), name
        outside = torch.ones_like(leaf, dtype=torch.bool)
        view(outside).fill_(False)
        assert (leaf.grad[outside] == 0).all(), name
        assert torch.equal(ops.full_kl(x, view(src.flip(0)), 1.0), ops.full_kl(xc, view(src.flip(0)).contiguous(), 1.0))
    check_values(base[:, :-1], y)


def test_sliced_logits_not_copied(device, rand):
    """logits[:, :-1] is read in place: the forward and full_kl allocate only their [B, T] outputs,
    the backward only the gradient. (A transposed vocabulary is copied: that shows the measurement
    sees a copy.)"""
    B, T, V = 4, 64, 1000
    base = make_logits(rand, B, T + 1, V, torch.float32, device)
    x = base[:, :-1]
    y = make_labels(rand, B, T, V, device)
    nbytes = B * T * V * 4
    small = 16 * B * T * 4
    lp, h, lse = ops.logprobs(x, y, 1.0)
    fwd, _ = _allocated(lambda: ops.logprobs(x, y, 1.0), device)
    assert fwd <= small, f"forward allocated {fwd} bytes for logits of {nbytes}"
    g = torch.ones(B, T, device=device)
    bwd, grad = _allocated(lambda: ops.logprobs_backward(g, g, x, y, lse, h, 1.0), device)
    assert grad.shape == (B, T, V)
    assert bwd <= nbytes + small, f"backward allocated {bwd} bytes; the gradient is {nbytes}"
    kl, _ = _allocated(lambda: ops.full_kl(x, base[:, 1:], 1.0), device)
    assert kl <= small, f"full_kl allocated {kl} bytes for logits of {nbytes}"
    xt = make_logits(rand, B, V, T, torch.float32, device).transpose(1, 2)
    copied, _ = _allocated(lambda: ops.logprobs(xt, y, 1.0), device)
    assert copied >= nbytes


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_vocab_not_contiguous(device, rand, dtype):
    """A vocabulary that is not the last-contiguous dimension (a transposed view, an expanded one):
    correct results, equal to the contiguous copy's."""
    B, T, V = 3, 7, 301
    src = make_logits(rand, B, V, T, dtype, device)
    x = src.transpose(1, 2)
    assert x.stride(2) != 1
    y = make_labels(rand, B, T, V, device)
    for p, q in zip(run("ops", x, y), run("ops", x.contiguous(), y), strict=True):
        assert torch.equal(p, q)
    g_lp, g_h = make_grads(rand, B, T, "both", device)
    leaf = src.detach().clone().requires_grad_()
    lp, h, _ = run("fused", leaf.transpose(1, 2), y)
    ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
    assert torch.equal(leaf.grad.transpose(1, 2), forward_backward("fused", x.contiguous(), y, 1.0, g_lp, g_h)[2])
    ref = make_logits(rand, B, V, T, dtype, device).transpose(1, 2)
    assert torch.equal(ops.full_kl(x, ref, 1.0), ops.full_kl(x.contiguous(), ref.contiguous(), 1.0))
    # an expanded vocabulary (stride 0): the uniform distribution, log-prob -log V and entropy log V
    u = make_logits(rand, B, T, 1, dtype, device).expand(B, T, V)
    lp, h, _ = run("ops", u, y)
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(V)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, torch.full_like(h, math.log(V)), rtol=1e-6, atol=1e-6)


def test_non_contiguous_labels(device, rand):
    x = make_logits(rand, 3, 7, 50, torch.float32, device)
    y = make_labels(rand, 3, 14, 50, device)[:, ::2]
    assert not y.is_contiguous()
    for p, q in zip(run("ops", x, y), run("ops", x, y.contiguous()), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------
# inplace_backward: the gradient written into the logits' own storage


def _head(rand, B, T, D, V, dtype, device):
    hidden = rand.randn(B, T + 1, D, dtype=dtype, device=device)
    w = rand.randn(D, V, dtype=dtype, device=device, scale=0.5)
    return hidden, w


def _head_step(hidden, w, labels, flow, inplace, sliced=True, g=None):
    """logits = hidden @ w (not a leaf, as from an LM head); returns (w.grad, logits after backward)."""
    w = w.detach().clone().requires_grad_()
    logits = hidden @ w
    x = logits[:, :-1] if sliced else logits
    lp, h = F.logprobs_from_logits(x, labels, 0.9, return_entropy=True, validate=False, inplace_backward=inplace)
    g = torch.ones_like(lp) if g is None else g
    loss = {"logprob": (lp * g).sum(), "entropy": h.sum(), "both": (lp * g).sum() + h.sum()}[flow]
    loss.backward()
    return w.grad, logits.detach()


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_inplace_backward(device, rand, dtype, flow):
    """inplace_backward=True: the same gradients, bit for bit, sliced logits or not; the logits
    buffer holds the gradient afterwards."""
    B, T, D, V = 3, 9, 16, 301
    hidden, w = _head(rand, B, T, D, V, dtype, device)
    g = rand.randn(B, T, device=device)
    for sliced in (True, False):
        labels = make_labels(rand, B, T if sliced else T + 1, V, device)
        gg = g if sliced else torch.cat([g, g[:, :1]], 1)
        want, before = _head_step(hidden, w, labels, flow, False, sliced, gg)
        got, after = _head_step(hidden, w, labels, flow, True, sliced, gg)
        assert torch.equal(got, want), (flow, sliced)
        x = before[:, :-1] if sliced else before
        gl, gh = (
            (gg.double() if flow != "entropy" else None),
            (torch.ones_like(gg.double()) if flow != "logprob" else None),
        )
        grad = forward_backward("fused", x, labels, 0.9, gl, gh)[2]
        assert torch.equal((after[:, :-1] if sliced else after), grad), (flow, sliced)


def test_inplace_backward_allocates_no_gradient_buffer(device, rand):
    """The point of inplace_backward: the backward allocates no second [B, T, V] tensor (contiguous
    logits; a slice's own backward would allocate the full-size gradient of its base)."""
    B, T, D, V = 4, 64, 8, 1000
    hidden, w = _head(rand, B, T, D, V, torch.float32, device)
    labels = make_labels(rand, B, T + 1, V, device)
    nbytes = B * (T + 1) * V * 4
    for inplace in (True, False, True):  # the first is a warm-up (allocator, library workspaces)
        w_ = w.detach().clone().requires_grad_()
        lp, h = F.logprobs_from_logits(
            hidden @ w_, labels, return_entropy=True, validate=False, inplace_backward=inplace
        )
        loss = lp.sum() + h.sum()
        used, _ = _allocated(loss.backward, device)
        if inplace:
            assert used < nbytes // 2, f"inplace backward allocated {used} bytes; logits are {nbytes}"
        else:
            assert used >= nbytes  # the measurement sees the out-of-place gradient


def test_inplace_backward_errors(device, rand):
    x = make_logits(rand, 2, 3, 11, torch.float32, device)
    y = make_labels(rand, 2, 3, 11, device)
    with pytest.raises(RuntimeError, match=r"^logprobs: inplace_backward needs the fused op"):
        F.logprobs_from_logits(x, y, inplace_backward=True, use_fused=False)
    # a vocabulary that is not contiguous cannot take its gradient in place
    src = make_logits(rand, 2, 11, 3, torch.float32, device).requires_grad_()
    with pytest.raises(
        RuntimeError, match=r"logits must have a contiguous last dimension to take its gradient in place"
    ):
        lp = F.logprobs_from_logits(src.transpose(1, 2) * 1.0, y, inplace_backward=True)
        lp.sum().backward()


def test_opcheck_logprobs_backward_inplace(device, rand):
    for x, y, t in _opcheck_inputs(rand, device):
        if x.stride(2) != 1:
            continue
        _, h, lse = ops.logprobs(x, y, t)
        B, T = y.shape
        g_lp, g_h = (rand.randn(B, T, device=device) for _ in range(2))
        torch.library.opcheck(ops.logprobs_backward_.default, (x.clone(), g_lp, g_h, y, lse, h, t))
        torch.library.opcheck(ops.logprobs_backward_.default, (x.clone(), g_lp, None, y, lse, h, t))
        out = x.clone()
        ops.logprobs_backward_(out, g_lp, g_h, y, lse, h, t)
        assert torch.equal(out, ops.logprobs_backward(g_lp, g_h, x, y, lse, h, t))


# ------------------------------------------------------------------------------------------------
# full_kl


def trl_full_kl(logits, ref_logits, temperature=1.0):
    """TRL 0.11's kl_penalty='full' on full-vocabulary log-probs, in float64."""
    logprob = torch.log_softmax(logits.double() / temperature, dim=-1)
    ref_logprob = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    return torch.nn.functional.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)


def check_full_kl(x, r, temperature=1.0):
    out = ops.full_kl(x, r, temperature)
    B, T = x.shape[:2]
    assert out.dtype == torch.float32 and out.shape == (B, T) and out.device == x.device
    assert torch.equal(F.full_kl(x, r, temperature, use_fused=True), out)
    ref = R.full_kl(x.double(), r.double(), temperature)
    eager = F.full_kl(x, r, temperature, use_fused=False)
    check_rule("full_kl", out, ref, eager)
    return out, ref


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 7), (3, 1031, 7), (2, 9, 1000), (2, 3, 50257)], ids=H.ids)
def test_full_kl(device, rand, shape, dtype, temperature):
    B, T, V = shape
    x = make_logits(rand, B, T, V, dtype, device)
    r = (x.double() + rand.randn(B, T, V, dtype=torch.float64, device=device)).to(dtype)
    out, ref = check_full_kl(x, r, temperature)
    trl = trl_full_kl(x, r, temperature)
    torch.testing.assert_close(ref.double(), trl, rtol=1e-10, atol=1e-12)
    assert (out >= 0).all()
    if V == 1:
        assert (out == 0).all()


def test_full_kl_equal_logits(device, rand):
    """KL of a distribution with itself is exactly 0 (equal tensors, copies, masked entries, every
    dtype), and >= 0 (within rounding) for nearly equal ones."""
    for dtype in H.DTYPES:
        x = make_logits(rand, 3, 7, 1000, dtype, device)
        assert (ops.full_kl(x, x, 1.0) == 0).all()
        assert (ops.full_kl(x, x.clone(), 0.7) == 0).all()
        xm, _, _ = _masked(rand, 3, 7, 100, dtype, device)
        assert (ops.full_kl(xm, xm.clone(), 1.0) == 0).all()
    x = make_logits(rand, 4, 9, 1000, torch.float32, device)
    near = x + 1e-3 * rand.randn(4, 9, 1000, device=device)
    kl, _ = check_full_kl(x, near)
    assert (kl >= -TOL).all()  # the rule's floor: lse_r - lse_z is a difference of fp32 numbers of size ~10


def test_full_kl_masked(device, rand):
    """Tokens the policy excludes (-inf) add nothing; a token the policy allows but the reference
    excludes makes the KL infinite, as the reference says."""
    B, T, V = 3, 7, 100
    x, _, masked = _masked(rand, B, T, V, torch.float32, device)
    r = make_logits(rand, B, T, V, torch.float32, device)
    out, _ = check_full_kl(x, r)
    assert torch.isfinite(out).all() and (out >= 0).all()
    r2 = r.clone()
    r2[1, 3] = r2[1, 3].masked_fill(~masked[1, 3], -math.inf)  # the reference excludes all the policy allows
    r2[2, 0, int((~masked[2, 0]).nonzero()[0])] = -math.inf
    out2, ref2 = check_full_kl(x, r2)
    assert out2[1, 3] == math.inf and out2[2, 0] == math.inf
    assert torch.isfinite(out2[0]).all()
    assert (ref2[1, 3] == math.inf) and (ref2[2, 0] == math.inf)


@pytest.mark.parametrize("kind", ["shift+1e4", "spread1e4", "halves"])
def test_full_kl_extreme(device, rand, kind):
    x = _extreme(kind, rand, 2, 5, 1000, torch.float32, device)
    r = _extreme(kind, rand, 2, 5, 1000, torch.float32, device)
    for temperature in (1.0, 0.5):
        out = ops.full_kl(x, r, temperature)
        ref = R.full_kl(x.double(), r.double(), temperature)
        assert torch.isfinite(out).all()
        # KL = sum p (z - r) - lse_z + lse_r: each lse an fp32 number of size |z|
        zmax = torch.maximum(x.double().abs().amax(-1), r.double().abs().amax(-1)) / temperature
        assert (_err(out, ref) <= 1e-5 * ref.abs().clamp(min=1) + zmax * 2.0**-20).all()


def test_full_kl_not_differentiable(rand):
    x = make_logits(rand, 2, 3, 10).requires_grad_()
    r = make_logits(rand, 2, 3, 10).requires_grad_()
    for use_fused in (True, False):
        assert not F.full_kl(x, r, use_fused=use_fused).requires_grad


# ------------------------------------------------------------------------------------------------
# TRL's helpers, return types


def trl_logprobs_from_logits(logits, labels):
    """trl.core.logprobs_from_logits (gather=True)."""
    logp = torch.nn.functional.log_softmax(logits, dim=2)
    return torch.gather(logp, 2, labels.unsqueeze(2)).squeeze(-1)


def trl_entropy_from_logits(logits):
    """trl.core.entropy_from_logits."""
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, axis=-1) - torch.sum(pd * logits, axis=-1)


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_trl_parity(device, rand, dtype):
    """logprobs_from_logits and entropy_from_logits against TRL's formulas (in fp64 on the same
    logits; TRL divides the logits by the temperature beforehand)."""
    B, T, V = 3, 17, 1000
    x = make_logits(rand, B, T, V, dtype, device)
    y = make_labels(rand, B, T, V, device)
    for temperature in (1.0, 0.7):
        z = x.double() / temperature
        want_lp, want_h = trl_logprobs_from_logits(z, y), trl_entropy_from_logits(z)
        for use_fused in (True, False):
            lp = F.logprobs_from_logits(x, y, temperature, use_fused=use_fused)
            h = F.entropy_from_logits(x, temperature, use_fused=use_fused)
            # semantics here; accuracy is test_values' business
            torch.testing.assert_close(lp.double(), want_lp, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(h.double(), want_h, rtol=1e-4, atol=1e-4)
            lp2, h2 = F.logprobs_from_logits(x, y, temperature, return_entropy=True, use_fused=use_fused)
            assert torch.equal(lp2, lp) and torch.equal(h2, h)


def test_return_types(device, rand):
    B, T, V = 2, 5, 33
    y = make_labels(rand, B, T, V, device)
    for dtype in H.DTYPES:
        x = make_logits(rand, B, T, V, dtype, device)
        for use_fused in (True, False):
            kw = dict(use_fused=use_fused)
            lp = F.logprobs_from_logits(x, y, **kw)
            assert isinstance(lp, torch.Tensor)
            both = F.logprobs_from_logits(x, y, return_entropy=True, **kw)
            assert isinstance(both, tuple) and len(both) == 2
            h = F.entropy_from_logits(x, **kw)
            kl = F.full_kl(x, x.flip(0), **kw)
            for t in (lp, *both, h, kl):
                assert isinstance(t, torch.Tensor)
                assert t.dtype == torch.float32 and t.shape == (B, T) and t.device == device, (dtype, use_fused)
                assert not t.requires_grad
            xg = x.clone().requires_grad_()
            lp, h = F.logprobs_from_logits(xg, y, return_entropy=True, **kw)
            assert lp.requires_grad and h.requires_grad
    x = make_logits(rand, B, T, V, torch.float32, device).requires_grad_()
    lp, h, lse = ops.logprobs(x, y, 1.0)
    assert lp.requires_grad and h.requires_grad and not lse.requires_grad  # lse is saved, not a result


def test_float64_logits_route_agreement(rand):
    """fp64 logits (CPU): both routes return the same dtype, and values within fp32 accuracy."""
    B, T, V = 3, 7, 100
    x = make_logits(rand, B, T, V, torch.float64)
    y = make_labels(rand, B, T, V)
    fused = F.logprobs_from_logits(x, y, return_entropy=True, use_fused=True)
    eager = F.logprobs_from_logits(x, y, return_entropy=True, use_fused=False)
    kl_f = F.full_kl(x, x.flip(0), use_fused=True)
    kl_e = F.full_kl(x, x.flip(0), use_fused=False)
    for name, f, e in (("logprob", fused[0], eager[0]), ("entropy", fused[1], eager[1]), ("kl", kl_f, kl_e)):
        assert f.dtype == e.dtype, f"{name}: use_fused=True gives {f.dtype}, use_fused=False gives {e.dtype}"
        torch.testing.assert_close(f.double(), e.double(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Determinism


def _everything(x, y, r, g_lp, g_h):
    return (
        *run("ops", x, y, 0.9),
        forward_backward("fused", x, y, 0.9, g_lp, g_h)[2],
        forward_backward("fused", x, y, 0.9, g_lp, None)[2],
        ops.full_kl(x, r, 0.9),
    )


def test_deterministic(device, rand):
    B, T, V = 4, 33, 5003
    for dtype in (torch.float32, torch.bfloat16):
        x = make_logits(rand, B, T, V, dtype, device)
        r = make_logits(rand, B, T, V, dtype, device)
        y = make_labels(rand, B, T, V, device)
        g_lp, g_h = make_grads(rand, B, T, "both", device)
        first = _everything(x, y, r, g_lp, g_h)
        for _ in range(2):
            for p, q in zip(_everything(x, y, r, g_lp, g_h), first, strict=True):
                assert torch.equal(p, q)


def test_cpu_thread_count_independent(rand):
    B, T, V = 8, 65, 3001
    x = make_logits(rand, B, T, V)
    r = make_logits(rand, B, T, V)
    y = make_labels(rand, B, T, V)
    g_lp, g_h = make_grads(rand, B, T, "both")
    one, many = H.at_thread_counts(lambda: _everything(x, y, r, g_lp, g_h))
    for p, q in zip(one, many, strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_inputs(rand, device):
    """(logits, labels, temperature) covering dtypes, V = 1, int32 labels, a sliced view, -inf."""
    x = make_logits(rand, 3, 7, 11, torch.float32, device)
    y = make_labels(rand, 3, 7, 11, device)
    base = make_logits(rand, 2, 6, 33, torch.bfloat16, device)
    xm, ym, _ = _masked(rand, 2, 3, 9, torch.float32, device)
    cases = [
        (x, y, 0.8),
        (x, y.int(), 1.0),
        (base[:, :-1], make_labels(rand, 2, 5, 33, device), 1.0),
        (make_logits(rand, 1, 1, 1, torch.float16, device), torch.zeros(1, 1, dtype=torch.long, device=device), 1.3),
        (xm, ym, 1.0),
    ]
    if device.type == "cpu":
        cases.append((make_logits(rand, 2, 3, 5, torch.float64), make_labels(rand, 2, 3, 5), 1.0))
    return cases


def test_opcheck_logprobs(device, rand):
    for x, y, t in _opcheck_inputs(rand, device):
        torch.library.opcheck(ops.logprobs.default, (x, y, t))
        # with gradients: the autograd registration and the backward under aot_dispatch
        torch.library.opcheck(ops.logprobs.default, (x.detach().clone().requires_grad_(), y, t))


def test_opcheck_logprobs_backward(device, rand):
    for x, y, t in _opcheck_inputs(rand, device):
        _, h, lse = ops.logprobs(x, y, t)
        B, T = y.shape
        g_lp, g_h = (rand.randn(B, T, device=device) for _ in range(2))
        torch.library.opcheck(ops.logprobs_backward.default, (g_lp, g_h, x, y, lse, h, t))
        torch.library.opcheck(ops.logprobs_backward.default, (g_lp, None, x, y, lse, h, t))


def test_opcheck_full_kl(device, rand):
    for x, _, t in _opcheck_inputs(rand, device):
        r = (x.double() + rand.randn(*x.shape, dtype=torch.float64, device=device)).to(x.dtype)
        torch.library.opcheck(ops.full_kl.default, (x, r, t))
        torch.library.opcheck(ops.full_kl.default, (x, x.clone(), t))


def _lm_step(w, bias, hidden, labels, mask):
    """A tiny LM head around the op: logits from 'parameters', log-probs and entropy (no validation:
    no host synchronisation, no graph break), a loss of both."""
    logits = hidden @ w + bias
    lp, h = F.logprobs_from_logits(logits[:, :-1], labels, 0.7, return_entropy=True, validate=False)
    loss = -(lp * mask).sum() / mask.sum() - 0.01 * (h * mask).mean()
    return loss, lp, h


def _lm_inputs(rand, device, B=3, T=9, D=8, V=37):
    hidden = rand.randn(B, T + 1, D, device=device)
    labels = make_labels(rand, B, T, V, device)
    mask = rand.mask(B, T, "right", dtype=torch.float32, device=device)
    w = rand.randn(D, V, device=device, scale=0.5)
    bias = rand.randn(V, device=device)
    return w, bias, hidden, labels, mask


def _compare_compiled(compiled, args, rtol, atol):
    results = []
    for fn in (compiled, _lm_step):
        w, bias = (a.detach().clone().requires_grad_() for a in args[:2])
        loss, lp, h = fn(w, bias, *args[2:])
        loss.backward()
        results.append((loss.detach(), lp.detach(), h.detach(), w.grad, bias.grad))
    for c, e in zip(*results, strict=True):
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol)
    assert results[0][3].abs().max() > 0 and results[0][4].abs().max() > 0


def test_compile_fullgraph(device, rand, dynamo_reset):
    """One graph (no break) through functional.logprobs_from_logits with backward (aot_eager traces the
    fake kernels and the registered autograd)."""
    compiled = torch.compile(_lm_step, fullgraph=True, backend="aot_eager")
    _compare_compiled(compiled, _lm_inputs(rand, device), rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_inplace_backward(device, rand, dynamo_reset):
    def step(w, bias, hidden, labels, mask):
        logits = hidden @ w + bias
        lp = F.logprobs_from_logits(logits[:, :-1], labels, 0.7, validate=False, inplace_backward=True)
        return -(lp * mask).sum() / mask.sum(), lp, lp

    args = _lm_inputs(rand, device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step, _lm_step):
        w, bias = (a.detach().clone().requires_grad_() for a in args[:2])
        loss, lp, _ = fn(w, bias, *args[2:])
        if fn is _lm_step:  # the same loss without the entropy term, out of place
            loss = -(lp * args[4]).sum() / args[4].sum()
        loss.backward()
        results.append((loss.detach(), lp.detach(), w.grad, bias.grad))
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(results[1], results[2], strict=True):
        assert torch.equal(a, b)


def test_compile_inductor(rand, dynamo_reset):
    """The default backend on a small CPU input, forward and backward."""
    compiled = torch.compile(_lm_step, fullgraph=True)
    _compare_compiled(compiled, _lm_inputs(rand, torch.device("cpu")), rtol=1e-5, atol=1e-6)


def test_compile_full_kl_and_entropy(device, rand, dynamo_reset):
    def fn(x, r):
        return F.full_kl(x, r, 0.9), F.entropy_from_logits(x, 0.9)

    x = make_logits(rand, 2, 5, 40, torch.float32, device)
    r = make_logits(rand, 2, 5, 40, torch.float32, device)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for c, e in zip(compiled(x, r), fn(x, r), strict=True):
        assert torch.equal(c, e)


# ------------------------------------------------------------------------------------------------
# Bad inputs: the op and the argument named, one message from every route (C++ included)


def _functional(op, args, use_fused):
    """``op`` 'logprobs' (args: logits, labels, temperature) or 'full_kl' (logits, ref_logits,
    temperature) through functional (logprobs_from_logits with the entropy, full_kl)."""
    if op == "logprobs":
        return F.logprobs_from_logits(*args, return_entropy=True, use_fused=use_fused)
    return F.full_kl(*args, use_fused=use_fused)


call = H.routes(_functional)


def _bad_cases():
    def lp(**changes):
        def build(rand, device):
            a = dict(
                logits=make_logits(rand, 3, 7, 11, torch.float32, device),
                labels=make_labels(rand, 3, 7, 11, device),
                temperature=1.0,
            )
            a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})
            return "logprobs", (a["logits"], a["labels"], a["temperature"])

        return build

    def kl(**changes):
        def build(rand, device):
            a = dict(
                logits=make_logits(rand, 3, 7, 11, torch.float32, device),
                ref_logits=make_logits(rand, 3, 7, 11, torch.float32, device),
                temperature=1.0,
            )
            a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})
            return "full_kl", (a["logits"], a["ref_logits"], a["temperature"])

        return build

    float_msg = r"must be a floating-point tensor \(float32, bfloat16, float16 or float64\), got "
    cases = {
        "labels-shape": (
            lp(labels=lambda a: a["labels"][:, :5]),
            r"logprobs: labels must be \[B, T\] = \[3, 7\] to match logits \[3, 7, 11\], got \[3, 5\]",
        ),
        "labels-rows": (lp(labels=lambda a: a["labels"][:2]), r"logprobs: labels must be \[B, T\] = .*got \[2, 7\]"),
        "labels-3d": (lp(labels=lambda a: a["labels"][..., None]), r"logprobs: labels must be .*got \[3, 7, 1\]"),
        "labels-1d": (lp(labels=lambda a: a["labels"][0]), r"logprobs: labels must be .*got \[7\]"),
        "labels-float": (
            lp(labels=lambda a: a["labels"].float()),
            r"logprobs: labels must be int64 or int32, got torch.float32",
        ),
        "labels-bool": (
            lp(labels=lambda a: a["labels"] > 0),
            r"logprobs: labels must be int64 or int32, got torch.bool",
        ),
        "logits-2d": (
            lp(logits=lambda a: a["logits"][0]),
            r"logprobs: logits must be 3-D \[B, T, V\], got shape \[7, 11\]",
        ),
        "logits-4d": (
            lp(logits=lambda a: a["logits"][None]),
            r"logprobs: logits must be 3-D \[B, T, V\], got shape \[1, 3, 7, 11\]",
        ),
        "logits-int": (lp(logits=lambda a: a["logits"].long()), r"logprobs: logits " + float_msg + "torch.int64"),
        "logits-complex": (
            lp(logits=lambda a: a["logits"].to(torch.complex64)),
            r"logprobs: logits " + float_msg + "torch.complex64",
        ),
        "empty-B": (
            lp(logits=lambda a: a["logits"][:0], labels=lambda a: a["labels"][:0]),
            r"logprobs: logits is empty \(shape \[0, 7, 11\]\); an empty batch has nothing to do",
        ),
        "empty-T": (
            lp(logits=lambda a: a["logits"][:, :0], labels=lambda a: a["labels"][:, :0]),
            r"logprobs: logits is empty \(shape \[3, 0, 11\]\)",
        ),
        "empty-V": (lp(logits=lambda a: a["logits"][..., :0]), r"logprobs: logits is empty \(shape \[3, 7, 0\]\)"),
        "temperature-0": (lp(temperature=0.0), r"logprobs: temperature must be finite and > 0, got 0"),
        "temperature-neg": (lp(temperature=-1.5), r"logprobs: temperature must be finite and > 0, got -1.5"),
        "temperature-nan": (lp(temperature=math.nan), r"logprobs: temperature must be finite and > 0, got nan"),
        "temperature-inf": (lp(temperature=math.inf), r"logprobs: temperature must be finite and > 0, got inf"),
        "temperature--inf": (lp(temperature=-math.inf), r"logprobs: temperature must be finite and > 0, got -inf"),
        # two problems: every route reports the same (first) one
        "temperature-and-logits-2d": (
            lp(temperature=0.0, logits=lambda a: a["logits"][0]),
            r"logprobs: (temperature must be|logits must be 3-D)",
        ),
        "logits-int-and-labels-float": (
            lp(logits=lambda a: a["logits"].long(), labels=lambda a: a["labels"].float()),
            r"logprobs: (logits must be a floating|labels must be int64)",
        ),
        "kl-shape": (
            kl(ref_logits=lambda a: a["ref_logits"][:, :5]),
            r"full_kl: ref_logits must have the shape of logits \[3, 7, 11\], got \[3, 5, 11\]",
        ),
        "kl-vocab": (
            kl(ref_logits=lambda a: a["ref_logits"][..., :10]),
            r"full_kl: ref_logits must have the shape of logits \[3, 7, 11\], got \[3, 7, 10\]",
        ),
        "kl-dtype": (
            kl(ref_logits=lambda a: a["ref_logits"].double()),
            r"full_kl: ref_logits must have the dtype of logits \(torch.float32\), got torch.float64",
        ),
        "kl-dtype-bf16": (
            kl(logits=lambda a: a["logits"].bfloat16()),
            r"full_kl: ref_logits must have the dtype of logits \(torch.bfloat16\), got torch.float32",
        ),
        "kl-ref-2d": (
            kl(ref_logits=lambda a: a["ref_logits"][0]),
            r"full_kl: ref_logits must be 3-D \[B, T, V\], got shape \[7, 11\]",
        ),
        "kl-logits-2d": (kl(logits=lambda a: a["logits"][0]), r"full_kl: logits must be 3-D \[B, T, V\]"),
        "kl-ref-int": (
            kl(ref_logits=lambda a: a["ref_logits"].int()),
            r"full_kl: ref_logits " + float_msg + "torch.int32",
        ),
        "kl-empty": (
            kl(logits=lambda a: a["logits"][:0], ref_logits=lambda a: a["ref_logits"][:0]),
            r"full_kl: logits is empty \(shape \[0, 7, 11\]\)",
        ),
        "kl-temperature": (kl(temperature=0.0), r"full_kl: temperature must be finite and > 0, got 0"),
        "kl-temperature-nan": (kl(temperature=math.nan), r"full_kl: temperature must be finite and > 0, got nan"),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, rand, case):
    build, match = BAD[case]
    op, args = build(rand, device)
    H.assert_same_error(op, match, lambda route: call(op, route, *args))


def test_entropy_from_logits_bad_inputs(device, rand):
    x = make_logits(rand, 3, 7, 11, torch.float32, device)
    for bad, match in (
        (x[0], r"logits must be 3-D \[B, T, V\], got shape \[7, 11\]"),
        (x.long(), r"logits must be a floating-point tensor"),
        (x[:0], r"logits is empty"),
    ):
        msgs = []
        for use_fused in (True, False):
            with pytest.raises(RuntimeError, match=match) as info:
                F.entropy_from_logits(bad, use_fused=use_fused)
            msgs.append(str(info.value).splitlines()[0])
        assert msgs[0] == msgs[1]
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0, got 0"):
        F.entropy_from_logits(x, 0.0)


def test_labels_out_of_range(device, rand):
    """validate=True (the default) refuses labels outside [0, V) naming the positions, on both routes;
    the first eight are listed, the rest counted."""
    B, T, V = 3, 7, 11
    x = make_logits(rand, B, T, V, torch.float32, device)
    y = make_labels(rand, B, T, V, device)
    y[0, 6], y[1, 2], y[2, 0] = V, -1, V + 100
    msgs = []
    for use_fused in (True, False):
        with pytest.raises(RuntimeError) as info:
            F.logprobs_from_logits(x, y, use_fused=use_fused)
        msgs.append(str(info.value).splitlines()[0])
        with pytest.raises(RuntimeError, match="out of range"):
            F.logprobs_from_logits(x, y, return_entropy=True, use_fused=use_fused)
    assert msgs[0] == msgs[1]
    assert msgs[0] == "logprobs: labels must be in [0, V) = [0, 11); out of range at (0, 6), (1, 2), (2, 0)"
    y_all = torch.full((B, T), V, device=device)
    with pytest.raises(RuntimeError) as info:
        F.logprobs_from_logits(x, y_all)
    msg = str(info.value)
    assert "out of range at (0, 0), (0, 1)," in msg and msg.endswith(f"and {B * T - 8} more"), msg
    # the labels do not enter the entropy: entropy_from_logits has nothing to validate
    assert torch.isfinite(F.entropy_from_logits(x)).all()


def test_labels_out_of_range_unvalidated_give_nan(device, rand):
    """validate=False (no host synchronisation) on the fused route, and torch.ops directly: an
    out-of-range label gives a NaN log-prob at its position, never a wild read; every other output,
    and the backward, are as with in-range labels."""
    B, T, V = 3, 7, 11
    x = make_logits(rand, B, T, V, torch.float32, device)
    y = make_labels(rand, B, T, V, device)
    bad = torch.zeros(B, T, dtype=torch.bool, device=device)
    bad[0, 6] = bad[1, 2] = bad[2, 0] = True
    yb = y.clone()
    yb[0, 6], yb[1, 2], yb[2, 0] = V, -1, 1 << 40
    good = run("ops", x, y)
    for lp, h in (
        ops.logprobs(x, yb, 1.0)[:2],
        F.logprobs_from_logits(x, yb, return_entropy=True, validate=False, use_fused=True),
    ):
        assert lp[bad].isnan().all()
        assert torch.equal(lp[~bad], good[0][~bad]) and torch.equal(h, good[1])
    xg = x.clone().requires_grad_()
    lp, h = F.logprobs_from_logits(xg, yb, return_entropy=True, validate=False, use_fused=True)
    (lp.nan_to_num().sum() + h.sum()).backward()
    assert torch.isfinite(xg.grad).all()
    g_lp = torch.ones(B, T, dtype=torch.float64, device=device)
    g_h = torch.ones(B, T, dtype=torch.float64, device=device)
    want = forward_backward("fused", x, y, 1.0, g_lp, g_h)[2]
    assert torch.equal(xg.grad[~bad], want[~bad])


def test_tensors_on_different_devices(device, rand):
    """One tensor on another device (meta on a CPU-only machine, where the op routes to its fake
    kernel; cuda vs cpu where a GPU is present): the op, the tensor and both devices are named."""
    x = make_logits(rand, 3, 7, 11, torch.float32, device)
    y = make_labels(rand, 3, 7, 11, device)
    r = make_logits(rand, 3, 7, 11, torch.float32, device)
    cases = [
        ("logprobs", (x, H.other_device(y), 1.0), "labels", "logits"),
        ("logprobs", (H.other_device(x), y, 1.0), "labels", "logits"),
        ("full_kl", (x, H.other_device(r), 1.0), "ref_logits", "logits"),
        ("full_kl", (H.other_device(x), r, 1.0), "ref_logits", "logits"),
    ]
    for op, args, name, ref_name in cases:
        msgs = H.assert_device_error(op, name, ref_name, lambda route, op=op, args=args: call(op, route, *args))
        assert msgs[0] == msgs[1] == msgs[2]


def _first_line_of_error(fn, *args):
    try:
        fn(*args)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return "no error"


def test_backward_checks_match_fake(rand):
    """ppo_fast::logprobs_backward checks its [B, T] inputs, logprobs_backward_ also that the logits'
    vocabulary is contiguous; their fake kernels (which torch.compile and opcheck trace, and which
    serve meta tensors) must refuse the same calls with the same message."""
    B, T, V = 3, 7, 11
    x = make_logits(rand, B, T, V)
    y = make_labels(rand, B, T, V)
    _, h, lse = ops.logprobs(x, y, 1.0)
    g = torch.ones(B, T)
    short = torch.ones(B, T - 2)
    xv = x.transpose(1, 2).contiguous().transpose(1, 2)  # the vocabulary not contiguous
    cases = [
        (ops.logprobs_backward, (short, g, x, y, lse, h, 1.0), "logprobs_backward: grad_logprob must be [B, T]"),
        (ops.logprobs_backward, (g, short, x, y, lse, h, 1.0), "logprobs_backward: grad_entropy must be [B, T]"),
        (ops.logprobs_backward, (g, g, x, y, short, h, 1.0), "logprobs_backward: lse must be [B, T]"),
        (ops.logprobs_backward, (g, None, x, y, lse, short, 1.0), "logprobs_backward: entropy must be [B, T]"),
        (ops.logprobs_backward_, (x.clone(), short, g, y, lse, h, 1.0), "logprobs_backward_: grad_logprob must be"),
        (
            ops.logprobs_backward_,
            (xv, g, g, y, lse, h, 1.0),
            "logprobs_backward_: logits must have a contiguous last dimension to take its gradient in place",
        ),
    ]
    mismatches = []
    for fn, args, want in cases:
        msgs = {}
        for dev in ("cpu", "meta"):
            moved = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
            msgs[dev] = _first_line_of_error(fn, *moved)
        assert msgs["cpu"].startswith(want), msgs["cpu"]
        if msgs["meta"] != msgs["cpu"]:
            mismatches.append(f"{want}...: cpu {msgs['cpu']!r}, meta (fake) {msgs['meta']!r}")
    assert not mismatches, "\n".join(mismatches)


# ------------------------------------------------------------------------------------------------
# CUDA only: a large vocabulary, no host synchronisation, launch count, memory


@pytest.mark.cuda
def test_cuda_large(rand):
    """B=4, T=256, V=128000 bf16 (a Llama-3-sized vocabulary) against the fp64 reference."""
    B, T, V = 4, 256, 128000
    x = make_logits(rand, B, T, V, torch.bfloat16, "cuda")
    y = make_labels(rand, B, T, V, "cuda")
    check_values(x, y)
    g_lp, g_h = make_grads(rand, B, T, "both", "cuda")
    check_gradients(x, y, 1.0, g_lp, g_h)
    r = (x.double() + rand.randn(B, T, V, dtype=torch.float64, device="cuda")).to(torch.bfloat16)
    check_full_kl(x, r)


@pytest.mark.cuda
def test_cuda_float64_rejected(rand):
    x = make_logits(rand, 2, 3, 5, torch.float64, "cuda")
    y = make_labels(rand, 2, 3, 5, "cuda")
    fused, eager = (H.error_line(call, "logprobs", route, x, y, 1.0) for route in ("fused", "eager"))
    assert fused == eager
    assert fused.startswith("logprobs: CUDA tensors must be float32, bfloat16 or float16"), fused
    with pytest.raises(RuntimeError, match="logprobs"):
        ops.logprobs(x, y, 1.0)


def _cuda_case(rand, B=8, T=512, V=32000):
    x = make_logits(rand, B, T + 1, V, torch.bfloat16, "cuda")[:, :-1]
    y = make_labels(rand, B, T, V, "cuda")
    w = rand.randn(B, T, device="cuda")
    return x, y, w


@pytest.mark.cuda
def test_cuda_no_host_sync(rand):
    """Forward and backward with validate=False never wait for the host."""
    x0, y, w = _cuda_case(rand)
    x = x0.detach().clone().requires_grad_()
    for flow in FLOWS:

        def step(flow=flow):
            x.grad = None
            lp, h = F.logprobs_from_logits(x, y, 0.9, return_entropy=True, validate=False)
            loss = {"logprob": (lp * w).sum(), "entropy": h.mean(), "both": (lp * w).sum() + h.mean()}[flow]
            loss.backward()
            return F.full_kl(x.detach(), x0, 0.9)

        kl = without_host_sync(step, check_warm_up=True)
        assert torch.isfinite(x.grad).all() and torch.isfinite(kl).all()


@pytest.mark.cuda
def test_cuda_launch_count(rand):
    """Forward one kernel launch, backward one, full_kl one. Every kernel on the device in the
    profiled region counts, whatever its name (memcpy/memset are listed in the message, not counted)."""
    x, y, w = _cuda_case(rand)
    fwd, events = cuda_kernels(lambda: ops.logprobs(x, y, 0.9))
    assert len(fwd) == 1, ("forward", events)
    fwd, events = cuda_kernels(lambda: F.logprobs_from_logits(x, y, 0.9, return_entropy=True, validate=False))
    assert len(fwd) == 1, ("functional forward", events)
    _, h, lse = ops.logprobs(x, y, 0.9)
    g = w.float().contiguous()
    bwd, events = cuda_kernels(lambda: ops.logprobs_backward(g, g, x, y, lse, h, 0.9))
    assert len(bwd) == 1, ("backward", events)
    bwd, events = cuda_kernels(lambda: ops.logprobs_backward(g, None, x, y, lse, h, 0.9))
    assert len(bwd) == 1, ("backward, logprob only", events)
    r = x.flip(0)
    kl, events = cuda_kernels(lambda: ops.full_kl(x, r, 0.9))
    assert len(kl) == 1, ("full_kl", events)


@pytest.mark.cuda
def test_cuda_peak_memory(rand):
    """Forward + backward (the gradient into a leaf's .grad) allocate at most the gradient's size plus
    10% of the logits: no [B, T, V] temporary."""
    x0, y, w = _cuda_case(rand)
    x = x0.contiguous().requires_grad_()
    nbytes = x.numel() * x.element_size()

    def step():
        lp, h = F.logprobs_from_logits(x, y, 0.9, return_entropy=True, validate=False)
        ((lp * w).sum() + h.mean()).backward()

    step()  # warm-up
    x.grad = None
    extra, _ = _allocated(step, torch.device("cuda"))
    assert x.grad is not None
    assert extra <= 1.1 * nbytes, f"forward+backward allocated {extra} bytes at peak; logits are {nbytes}"


# ------------------------------------------------------------------------------------------------
# Non-finite logits: a row holding a NaN or a +inf, or only -inf, has no distribution, so its
# logprob, entropy, lse and full KL are NaN and so is its whole gradient row (log_softmax's own
# arithmetic); a -inf elsewhere is a token of probability 0 and the row stays finite.

NONFINITE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Each row kind: (fill of the row, the row has a distribution).
ROW_KINDS = ("clean", "nan_label", "nan_other", "pos_inf", "neg_inf", "all_neg_inf", "nan_among_neg_inf", "mixed_inf")


def _nonfinite_logits(rand, V, dtype, device):
    """One row of each kind of ROW_KINDS (T = len(ROW_KINDS), B = 2 with the second batch row the
    clean logits), labels 0 everywhere, and the [B, T] mask of rows without a distribution, decided
    from the construction (independently of any softmax)."""
    T = len(ROW_KINDS)
    x = rand.randn(2, T, V, dtype=torch.float64, scale=SCALE)
    labels = torch.zeros(2, T, dtype=torch.long)
    bad = torch.zeros(2, T, dtype=torch.bool)
    for t, kind in enumerate(ROW_KINDS):
        row = x[0, t]
        if kind == "nan_label":
            row[0] = math.nan
        elif kind == "nan_other":
            row[V - 1] = math.nan
        elif kind == "pos_inf":
            row[V // 2] = math.inf
        elif kind == "neg_inf":
            row[V - 1] = -math.inf  # the label (0) keeps a finite logit when V > 1
        elif kind == "all_neg_inf":
            row[:] = -math.inf
        elif kind == "nan_among_neg_inf":
            row[:] = -math.inf  # on the GPU some threads see only NaN and -inf
            row[V - 1] = math.nan
        elif kind == "mixed_inf":
            row[0], row[V - 1] = math.inf, -math.inf
        bad[0, t] = kind not in ("clean", "neg_inf") or (kind == "neg_inf" and V == 1)
    return x.to(device=device, dtype=dtype), labels.to(device), bad.to(device)


def _check_nonfinite(what, out, ref, bad):
    """NaN exactly on the rows without a distribution, and the fused == eager values elsewhere."""
    assert torch.equal(out.isnan(), bad), (
        f"{what}: NaN at {out.isnan().nonzero().tolist()}, expected {bad.nonzero().tolist()}"
    )
    assert torch.equal(ref.isnan(), bad), f"{what} (reference): NaN pattern differs"
    torch.testing.assert_close(out.double(), ref.double().to(out.dtype).double(), equal_nan=True, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", NONFINITE_DTYPES, ids=H.ids)
@pytest.mark.parametrize("V", [1, 7, 1000])
def test_nonfinite_logits_values(device, rand, dtype, V, temperature):
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("fp64 logits are a CPU (gradcheck) dtype")
    x, labels, bad = _nonfinite_logits(rand, V, dtype, device)
    out = ops.logprobs(x, labels, temperature)
    ref = R.logprobs(x.double(), labels, temperature)
    eager = R.logprobs(x, labels, temperature)
    for name, o, r, e in zip(("logprob", "entropy", "lse"), out, ref, eager, strict=True):
        _check_nonfinite(name, o, r, bad)
        assert torch.equal(e.isnan(), bad), f"{name} (eager, {dtype}): NaN pattern differs"
    # The public routes agree with the op, fused and eager alike (NaN in the same places).
    for fused in (True, False):
        lp, h = F.logprobs_from_logits(x, labels, temperature, return_entropy=True, use_fused=fused)
        torch.testing.assert_close(lp, out[0], equal_nan=True, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(h, out[1], equal_nan=True, rtol=2e-2, atol=2e-2)
        lp_only = F.logprobs_from_logits(x, labels, temperature, use_fused=fused)
        assert torch.equal(lp_only.isnan(), bad)
        assert torch.equal(F.entropy_from_logits(x, temperature, use_fused=fused).isnan(), bad)
    # Rows with a distribution are unaffected by their neighbours: as computed alone.
    good = ~bad
    alone = ops.logprobs(x[1:], labels[1:], temperature)
    assert torch.equal(out[0][1:], alone[0]) and torch.equal(out[1][1:], alone[1])
    assert good[1].all()


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("dtype", NONFINITE_DTYPES, ids=H.ids)
@pytest.mark.parametrize("V", [7, 1000])
def test_nonfinite_logits_gradients(device, rand, dtype, V, flow, inplace):
    """The gradient row of a row without a distribution is NaN in every entry (its -inf entries
    too, and where the upstream gradient is 0), fused as eager; other rows match the reference."""
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("fp64 logits are a CPU (gradcheck) dtype")
    x, labels, bad = _nonfinite_logits(rand, V, dtype, device)
    g_lp, g_h = make_grads(rand, *x.shape[:2], flow, device)
    if g_lp is not None:
        g_lp[0, 1] = 0.0  # a zero upstream gradient does not clean a NaN row
    grads = {}
    for route in ("fused", "eager", "ref64"):
        if inplace and route == "fused":
            leaf = x.detach().clone().requires_grad_()
            y = leaf * 1  # a non-leaf buffer whose storage the backward may overwrite
            lp, h = F.logprobs_from_logits(y, labels, return_entropy=True, inplace_backward=True)
            loss = (lp * g_lp.to(lp.dtype)).sum() if g_lp is not None else 0.0
            loss = loss + ((h * g_h.to(h.dtype)).sum() if g_h is not None else 0.0)
            loss.backward()
            grads[route] = leaf.grad
        else:
            grads[route] = forward_backward(route, x, labels, 1.0, g_lp, g_h)[2]
    rows = bad[..., None].expand_as(x)
    for route, g in grads.items():
        assert torch.equal(g.isnan(), rows), (
            f"{route}: NaN gradient pattern differs from the rows without a distribution"
        )
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    scale = grads["ref64"][~rows].abs().max().item()
    for route in ("fused", "eager"):
        err = (grads[route][~rows].double() - grads["ref64"][~rows]).abs().max().item()
        assert err <= tol * scale + 1e-6, f"{route}: gradient error {err:.3g} on rows with a distribution"


@pytest.mark.parametrize("dtype", NONFINITE_DTYPES, ids=H.ids)
@pytest.mark.parametrize("V", [7, 1000])
def test_nonfinite_full_kl(device, rand, dtype, V):
    """KL is NaN where either model's row has no distribution; a token the policy allows and the
    reference excludes makes it +inf; a token the policy excludes adds nothing."""
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("fp64 logits are a CPU (gradcheck) dtype")
    x, _, bad = _nonfinite_logits(rand, V, dtype, device)
    clean = (x.double() + rand.randn(*x.shape, dtype=torch.float64, device=device)).to(dtype)
    clean[0] = clean[1, 0]  # finite everywhere
    for policy, ref_logits, expect_nan in ((x, clean, bad), (clean, x, bad)):
        out = ops.full_kl(policy, ref_logits, 1.0)
        ref = R.full_kl(policy.double(), ref_logits.double())
        eager = F.full_kl(policy, ref_logits, use_fused=False)
        assert torch.equal(out.isnan(), expect_nan), f"fused NaN at {out.isnan().nonzero().tolist()}"
        assert torch.equal(ref.isnan(), expect_nan) and torch.equal(eager.isnan(), expect_nan)
        torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    # The policy's -inf row ("neg_inf") excludes a token: finite KL; as the reference it makes KL +inf.
    t = ROW_KINDS.index("neg_inf")
    assert math.isfinite(ops.full_kl(x, clean, 1.0)[0, t].item())
    assert ops.full_kl(clean, x, 1.0)[0, t].item() == math.inf
    assert R.full_kl(clean.double(), x.double())[0, t] == math.inf
