"""Tests of the fused LM-head log-prob op: ppo_fast::linear_logprobs and ppo_fast::linear_logprobs_backward
(csrc/include/ppo_fast/linear_logprobs.h, csrc/host/linear_logprobs.cpp), through
``ppo_fast.functional.linear_logprobs`` and ``torch.ops``.

Ground truth is written here in float64: ``z = (h @ W.T + b) / temperature``, ``log_softmax(z)``
gathered at the labels, the entropy ``-sum p log p``, gradients by autograd. fp32 inputs: values
within 1e-5 x max(1, |truth|), gradients within 1e-4 of the largest truth gradient. bf16/fp16: the
FlashAttention rule, the fused error at most twice the error of the eager reference
(``use_fused=False``: the whole logits in the inputs' dtype, as an ``nn.Linear`` head makes them,
then fp32) on the same inputs, both against the float64 truth of those inputs.

Logits are about N(0, 3^2) (h ~ N(0, 1), W ~ N(0, 9 / H)): an LLM-like spread.
"""

from __future__ import annotations

import math

import _helpers as H
import pytest
import torch

from ppo_fast import functional as F

ops = torch.ops.ppo_fast

VALUE_TOL = 1e-5  # fp32 values, relative to max(1, |truth|)
GRAD_TOL = 1e-4  # fp32 gradients, relative to the largest truth gradient
FLOWS = ("logprob", "entropy", "both")


# ------------------------------------------------------------------------------------------------
# Inputs, the float64 truth and the routes


def make_inputs(rand, B, T, H_, V, dtype=torch.float32, device="cpu", bias=True):
    """(hidden [B, T, H], weight [V, H], labels [B, T], bias [V] or None), drawn in fp64 then rounded."""
    hidden = rand.randn(B, T, H_, dtype=dtype, device=device)
    weight = rand.randn(V, H_, dtype=dtype, device=device, scale=3.0 / math.sqrt(H_))
    labels = rand.randint(0, V, (B, T)).to(device)
    b = rand.randn(V, dtype=dtype, device=device) if bias else None
    return hidden, weight, labels, b


def make_grads(rand, B, T, flow, device="cpu"):
    """Upstream gradients (fp64) into logprob and/or entropy; None where nothing flows."""
    g_lp, g_h = (rand.randn(B, T, dtype=torch.float64, device=device) for _ in range(2))
    return (g_lp if flow != "entropy" else None), (g_h if flow != "logprob" else None)


def _loss(lp, ent, g_lp, g_h):
    loss = 0.0
    if g_lp is not None:
        loss = loss + (lp * g_lp.to(lp.dtype)).sum()
    if g_h is not None:
        loss = loss + (ent * g_h.to(ent.dtype)).sum()
    return loss


def truth(hidden, weight, labels, bias, temperature=1.0, g_lp=None, g_h=None):
    """The float64 truth, written plainly: (logprob, entropy, [d hidden, d weight, d bias or None])."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    h, w = leaves
    z = h @ w.T
    if b is not None:
        z = z + b
    logp = torch.log_softmax(z / temperature, dim=-1)
    lp = logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if g_lp is None and g_h is None:
        return lp.detach(), ent.detach(), None
    wrt = leaves + ([b] if b is not None else [])
    grads = list(torch.autograd.grad(_loss(lp, ent, g_lp, g_h), wrt)) + ([None] if b is None else [])
    return lp.detach(), ent.detach(), grads


def run(hidden, weight, labels, bias, temperature=1.0, g_lp=None, g_h=None, *, use_fused=True, **kw):
    """functional.linear_logprobs from fresh leaf copies: (logprob, entropy, [d hidden, d weight, d bias])
    (gradients only when g_lp or g_h is given). ``hidden`` keeps its strides (a clone would not)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    lp, ent = F.linear_logprobs(
        h, w, labels, b, temperature=temperature, return_entropy=True, use_fused=use_fused, **kw
    )
    if g_lp is None and g_h is None:
        return lp.detach(), ent.detach(), None
    wrt = [h, w] + ([b] if b is not None else [])
    grads = list(torch.autograd.grad(_loss(lp, ent, g_lp, g_h), wrt)) + ([None] if b is None else [])
    return lp.detach(), ent.detach(), grads


def assert_values_close(what, got, want):
    assert got.shape == want.shape and got.dtype == torch.float32, (what, got.shape, got.dtype)
    err = (got.double() - want).abs()
    bound = VALUE_TOL * want.abs().clamp(min=1.0)
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g}"


def assert_grads_close(got, want):
    for name, g, w in zip(("d_hidden", "d_weight", "d_bias"), got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape, (name, g.shape, w.shape)
        err, scale = H.max_err(g, w), w.abs().max().item()
        assert err <= GRAD_TOL * scale, f"{name}: max error {err:.3g} vs {GRAD_TOL} x {scale:.3g}"


def check_fp32(hidden, weight, labels, bias, temperature=1.0, g_lp=None, g_h=None, **kw):
    want = truth(hidden, weight, labels, bias, temperature, g_lp, g_h)
    got = run(hidden, weight, labels, bias, temperature, g_lp, g_h, **kw)
    assert_values_close("logprob", got[0], want[0])
    assert_values_close("entropy", got[1], want[1])
    if want[2] is not None:
        assert_grads_close(got[2], want[2])
    return got


# ------------------------------------------------------------------------------------------------
# Against the float64 truth: values, gradients, chunks, shapes


SHAPES = [(1, 1), (1, 7), (3, 1), (3, 7)]  # (B, T)
CHUNKS = ["1", "7", "exact", "larger", "default"]


def chunk_of(kind, N):
    return {"1": 1, "7": 7, "exact": N if N < 3 else N // 3, "larger": 2 * N + 3, "default": None}[kind]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES, ids=H.ids)
def test_values_and_gradients(device, rand, shape, chunk):
    """fp32 with a bias: log-prob, entropy and the three gradients (from both outputs) for one-row and
    several-row chunks, a chunk that divides N (N = 21: 7 rows, three chunks), one larger than N and
    the default."""
    B, T = shape
    hidden, weight, labels, bias = make_inputs(rand, B, T, 24, 50, device=device)
    g_lp, g_h = make_grads(rand, B, T, "both", device)
    lp, ent, _ = check_fp32(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=chunk_of(chunk, B * T))
    assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(50) + 1e-5).all()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("flow", FLOWS)
def test_gradient_flows(device, rand, flow, bias):
    """Gradients from the log-prob only, the entropy only and both; without a bias there is no d bias."""
    hidden, weight, labels, b = make_inputs(rand, 3, 7, 16, 37, device=device, bias=bias)
    g_lp, g_h = make_grads(rand, 3, 7, flow, device)
    check_fp32(hidden, weight, labels, b, 1.0, g_lp, g_h, chunk_size=4)


@pytest.mark.parametrize("temperature", [0.5, 1.3, 4.0])
def test_temperature(device, rand, temperature):
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    check_fp32(hidden, weight, labels, bias, temperature, g_lp, g_h, chunk_size=5)


def _sliced(x):  # the trainer's call: hidden[:, :-1] of a [B, T + 1, H] tensor
    wide = torch.cat([x, torch.full_like(x[:, :1], float("nan"))], dim=1)
    return wide[:, :-1]


LAYOUTS = {"sliced": _sliced, "strided-H": H.strided, "transposed": H.transposed}


@pytest.mark.parametrize("chunk", [1, 5, 16, None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_hidden(device, rand, layout, chunk):
    """hidden[:, :-1] (its rows do not flatten to [N, H]: a chunk's rows are gathered, parts of
    sequences and whole ones), a hidden whose H is strided, and one with B and T swapped in memory.
    The NaN next to the sliced rows must never be read. T = 7: chunks of 5 and 16 cut sequences."""
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    view = LAYOUTS[layout](hidden)
    assert torch.equal(view, hidden) and not view.is_contiguous()
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    lp, ent, grads = check_fp32(view, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=chunk)
    # the same numbers as from the contiguous copy, up to the GEMMs' rounding
    lp_c, ent_c, grads_c = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=chunk)
    torch.testing.assert_close(lp, lp_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads_c[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", H.LOWP, ids=H.ids)
@pytest.mark.parametrize("chunk", [8, None])
def test_low_precision(device, rand, dtype, chunk):
    """bf16/fp16 by the FlashAttention rule, values and gradients. Chunks of 8 rows with V = 300,
    H = 64 also take d weight in slabs of 37 vocabulary rows (no larger than the logits block)."""
    B, T = 3, 7
    hidden, weight, labels, bias = make_inputs(rand, B, T, 64, 300, dtype, device)
    g_lp, g_h = make_grads(rand, B, T, "both", device)
    want = truth(hidden, weight, labels, bias, 1.0, g_lp, g_h)
    got = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=chunk)
    eager = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, use_fused=False)
    for i, what in enumerate(("logprob", "entropy")):
        assert got[i].dtype == eager[i].dtype == torch.float32
        H.assert_flash_rule(got[i], eager[i], want[i], f"{what} ")
    for name, g, e, w in zip(("d_hidden", "d_weight", "d_bias"), got[2], eager[2], want[2], strict=True):
        assert g.dtype == dtype, name
        H.assert_flash_rule(g, e, w, f"{name} ")


def test_float64_gradcheck(rand):
    """fp64 (CPU): gradcheck of all three inputs through both outputs, in chunks of 2 rows."""
    hidden, weight, labels, bias = make_inputs(rand, 2, 3, 4, 5, torch.float64)
    g = torch.tensor([0.3, -1.1], dtype=torch.float64)

    def fn(h, w, b):
        lp, ent = F.linear_logprobs(h, w, labels, b, temperature=0.8, return_entropy=True, chunk_size=2)
        return lp * g[0] + ent * g[1]

    args = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(fn, args)


# ------------------------------------------------------------------------------------------------
# The contract with logprobs_from_logits and the autograd plumbing


def test_swaps_for_logprobs_from_logits(device, rand):
    """Same return convention as logprobs_from_logits (a tensor, or (logprob, entropy) with
    return_entropy), the same numbers as it gives on the LM head's logits, and int32 labels alike."""
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    for use_fused in (True, False):
        lp = F.linear_logprobs(hidden, weight, labels, bias, temperature=0.7, use_fused=use_fused)
        assert isinstance(lp, torch.Tensor) and lp.shape == (3, 7) and lp.dtype == torch.float32
        both = F.linear_logprobs(
            hidden, weight, labels.int(), bias, temperature=0.7, return_entropy=True, use_fused=use_fused
        )
        want = F.logprobs_from_logits(logits, labels, 0.7, return_entropy=True, use_fused=use_fused)
        assert isinstance(both, tuple) and len(both) == 2
        for got, ref in zip(both, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp, both[0], rtol=0, atol=0)


def test_only_needed_gradients(device, rand):
    """A frozen head (weight and bias without requires_grad) gets no gradient and the hidden states'
    gradient is unchanged; the backward op leaves the outputs its mask excludes empty."""
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    full = run(hidden, weight, labels, bias, 1.0, g_lp, g_h)
    h = hidden.clone().requires_grad_()
    lp, ent = F.linear_logprobs(h, weight, labels, bias, return_entropy=True)
    (d_hidden,) = torch.autograd.grad(_loss(lp, ent, g_lp, g_h), [h])
    assert torch.equal(d_hidden, full[2][0])
    lp, ent, lse = ops.linear_logprobs(hidden, weight, labels, bias, 1.0, None)
    g1, g2 = g_lp.float(), g_h.float()
    for mask in ([True, False, False], [False, True, True], [False, False, True]):
        out = ops.linear_logprobs_backward(g1, g2, hidden, weight, labels, bias, lse, ent, 1.0, None, mask)
        for want, got, on in zip(full[2], out, mask, strict=True):
            if on:
                assert torch.equal(got, want)
            else:
                assert got.shape == (0,)
    out = ops.linear_logprobs_backward(g1, g2, hidden, weight, labels, None, lse, ent, 1.0, None, [True] * 3)
    assert out[2].shape == (0,)  # no bias, no d bias


def test_one_chunk_keeps_its_logits(device, rand):
    """When every row fits one chunk and a backward will run, the logits are kept from the forward (the logprobs
    op's graph) instead of recomputed: the same values and gradients as the chunked op, NaN for NaN; without a
    gradient to compute, or over several chunks, the op runs."""
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    hidden[1, 4, 0] = float("inf")
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    kept = run(hidden, weight, labels, bias, 1.0, g_lp, g_h)  # the default chunk holds all 21 rows
    chunked = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=8)
    for a, b in zip(kept[:2] + tuple(kept[2]), chunked[:2] + tuple(chunked[2]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
    h = hidden.clone().requires_grad_()
    assert "linear_logprobs" not in F.linear_logprobs(h, weight, labels, bias).grad_fn.name()
    assert "linear_logprobs" in F.linear_logprobs(h, weight, labels, bias, chunk_size=20).grad_fn.name()
    with torch.no_grad():
        assert not F._one_chunk_with_grad(h, weight, bias, None)
    assert not F._one_chunk_with_grad(hidden, weight, bias, None)  # nothing requires grad
    assert F._one_chunk_with_grad(hidden, weight.clone().requires_grad_(), bias, None)
    # linear_logprobs.h's default: the rows whose logits fill 64 MiB, at least 256.
    big_v = torch.empty(1 << 16, 16, device=device)  # 256 KiB of logits per row: 256 rows
    assert F._one_chunk_with_grad(torch.empty(1, 256, 16, device=device, requires_grad=True), big_v, None, None)
    assert not F._one_chunk_with_grad(torch.empty(1, 257, 16, device=device, requires_grad=True), big_v, None, None)


def test_deterministic(device, rand):
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    a, b = (run(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=4) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


# ------------------------------------------------------------------------------------------------
# Non-finite hidden states and labels


def test_nonfinite_hidden(device, rand):
    """NaN and +-inf in hidden: a row whose logits hold a NaN or a +inf has no distribution, so its
    log-prob, entropy and gradient row are NaN, and d weight / d bias (sums over all rows) too; the
    fused op agrees with the eager reference value for value, NaN for NaN."""
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 37, device=device)
    hidden[0, 2, 3] = float("nan")
    hidden[1, 4, 0] = float("inf")
    hidden[2, 6, 5] = float("-inf")
    g_lp, g_h = make_grads(rand, 3, 7, "both", device)
    got = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=4)
    want = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, use_fused=False)
    bad = torch.zeros(3, 7, dtype=torch.bool, device=device)
    bad[0, 2] = bad[1, 4] = bad[2, 6] = True
    for g, w in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[0][bad].isnan().all() and got[0][~bad].isfinite().all()
    assert got[2][0][bad].isnan().all() and got[2][0][~bad].isfinite().all()
    assert got[2][1].isnan().all() and got[2][2].isnan().all()


def test_labels_out_of_range(device, rand):
    """validate=True (the default) refuses labels outside [0, V) naming the positions, on both routes;
    validate=False gives a NaN log-prob there and leaves everything else as with in-range labels."""
    hidden, weight, labels, bias = make_inputs(rand, 3, 7, 16, 11, device=device)
    bad_labels = labels.clone()
    bad_labels[0, 6], bad_labels[1, 2], bad_labels[2, 0] = 11, -1, 111
    msgs = []
    for use_fused in (True, False):
        with pytest.raises(RuntimeError) as info:
            F.linear_logprobs(hidden, weight, bad_labels, bias, use_fused=use_fused)
        msgs.append(str(info.value).splitlines()[0])
    assert msgs[0] == msgs[1]
    assert msgs[0] == "linear_logprobs: labels must be in [0, V) = [0, 11); out of range at (0, 6), (1, 2), (2, 0)"
    lp, ent = F.linear_logprobs(hidden, weight, bad_labels, bias, return_entropy=True, validate=False)
    good_lp, good_ent = F.linear_logprobs(hidden, weight, labels, bias, return_entropy=True)
    out = bad_labels != labels
    assert lp[out].isnan().all() and torch.equal(lp[~out], good_lp[~out]) and torch.equal(ent, good_ent)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_inputs(rand, device):
    """(hidden, weight, labels, bias, temperature, chunk_size): fp32 with a bias in chunks; a sliced
    bf16 hidden with int32 labels, no bias and the default chunk; fp64 on the CPU."""
    h, w, y, b = make_inputs(rand, 3, 7, 8, 11, device=device)
    hs, ws, ys, _ = make_inputs(rand, 2, 6, 8, 13, torch.bfloat16, device, bias=False)
    cases = [(h, w, y, b, 0.8, 4), (_sliced(hs), ws, ys.int(), None, 1.0, None)]
    if device.type == "cpu":
        cases.append(make_inputs(rand, 2, 3, 4, 5, torch.float64) + (1.3, 2))
    return cases


def test_opcheck_linear_logprobs(device, rand):
    for h, w, y, b, t, c in _opcheck_inputs(rand, device):
        torch.library.opcheck(ops.linear_logprobs.default, (h, w, y, b, t, c))
        # with gradients: the autograd registration and the backward under aot_dispatch
        grad = [x if x is None else x.detach().clone().requires_grad_() for x in (h, w, b)]
        torch.library.opcheck(ops.linear_logprobs.default, (grad[0], grad[1], y, grad[2], t, c))


def test_opcheck_linear_logprobs_backward(device, rand):
    for h, w, y, b, t, c in _opcheck_inputs(rand, device):
        _, ent, lse = ops.linear_logprobs(h, w, y, b, t, c)
        g_lp, g_h = (rand.randn(*y.shape, device=device) for _ in range(2))
        op = ops.linear_logprobs_backward.default
        torch.library.opcheck(op, (g_lp, g_h, h, w, y, b, lse, ent, t, c, [True, True, True]))
        torch.library.opcheck(op, (g_lp, None, h, w, y, b, lse, ent, t, c, [True, False, False]))


def _lm_step(hidden, w, b, labels, mask):
    """The trainer's use: log-probs and entropy of the next tokens from the last hidden states of a
    sequence one longer (no validation: no host synchronisation, no graph break), a loss of both."""
    lp, ent = F.linear_logprobs(
        hidden[:, :-1], w, labels, b, temperature=0.7, return_entropy=True, chunk_size=8, validate=False
    )
    loss = -(lp * mask).sum() / mask.sum() - 0.01 * (ent * mask).mean()
    return loss, lp, ent


def test_compile_fullgraph(device, rand, dynamo_reset):
    """One graph (no break) through functional.linear_logprobs with its backward (aot_eager traces the
    fake kernels and the registered autograd), the same numbers as without compiling."""
    hidden, w, labels, b = make_inputs(rand, 3, 10, 8, 37, device=device)
    labels, mask = labels[:, :-1], rand.mask(3, 9, "right", dtype=torch.float32, device=device)
    compiled = torch.compile(_lm_step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, _lm_step):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, w, b)]
        loss, lp, ent = fn(leaves[0], leaves[1], leaves[2], labels, mask)
        loss.backward()
        results.append([loss.detach(), lp.detach(), ent.detach()] + [t.grad for t in leaves])
    for c, e in zip(*results, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    assert all(g.abs().max() > 0 for g in results[0][3:])


# ------------------------------------------------------------------------------------------------
# Bad inputs: the op and the argument named, one message from every route (C++ included)


def _functional(op, args, use_fused):
    hidden, weight, labels, bias, temperature, chunk_size = args
    return F.linear_logprobs(
        hidden, weight, labels, bias, temperature=temperature, chunk_size=chunk_size, use_fused=use_fused
    )


call = H.routes(_functional)


def _bad(**changes):
    def build(rand, device):
        h, w, y, b = make_inputs(rand, 3, 7, 8, 11, device=device)
        a = dict(hidden=h, weight=w, labels=y, bias=b, temperature=1.0, chunk_size=None)
        a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})
        return tuple(a[k] for k in ("hidden", "weight", "labels", "bias", "temperature", "chunk_size"))

    return build


FLOAT_MSG = r"must be a floating-point tensor \(float32, bfloat16, float16 or float64\), got "
BAD = {
    "hidden-2d": (_bad(hidden=lambda a: a["hidden"][0]), r"hidden must be 3-D \[B, T, H\], got shape \[7, 8\]"),
    "hidden-4d": (
        _bad(hidden=lambda a: a["hidden"][None]),
        r"hidden must be 3-D \[B, T, H\], got shape \[1, 3, 7, 8\]",
    ),
    "hidden-int": (_bad(hidden=lambda a: a["hidden"].long()), "hidden " + FLOAT_MSG + "torch.int64"),
    "hidden-empty-B": (
        _bad(hidden=lambda a: a["hidden"][:0], labels=lambda a: a["labels"][:0]),
        r"hidden is empty \(shape \[0, 7, 8\]\); an empty batch has nothing to do",
    ),
    "hidden-empty-H": (
        _bad(hidden=lambda a: a["hidden"][..., :0], weight=lambda a: a["weight"][:, :0]),
        r"hidden is empty \(shape \[3, 7, 0\]\)",
    ),
    "weight-1d": (_bad(weight=lambda a: a["weight"][0]), r"weight must be 2-D \[V, H\], got shape \[8\]"),
    "weight-3d": (_bad(weight=lambda a: a["weight"][None]), r"weight must be 2-D \[V, H\], got shape \[1, 11, 8\]"),
    "weight-H": (
        _bad(weight=lambda a: a["weight"][:, :5]),
        r"weight must be \[V, H\] with H = 8 \(the last dimension of hidden\), got \[11, 5\]",
    ),
    "weight-transposed": (
        _bad(weight=lambda a: a["weight"].T),
        r"weight must be \[V, H\] with H = 8 \(the last dimension of hidden\), got \[8, 11\]",
    ),
    "weight-dtype": (
        _bad(weight=lambda a: a["weight"].double()),
        r"weight must have the dtype of hidden \(torch.float32\), got torch.float64",
    ),
    "weight-empty-V": (_bad(weight=lambda a: a["weight"][:0], bias=None), r"weight is empty \(shape \[0, 8\]\)"),
    "bias-dtype": (
        _bad(bias=lambda a: a["bias"].bfloat16()),
        r"bias must have the dtype of weight \(torch.float32\), got torch.bfloat16",
    ),
    "bias-shape": (
        _bad(bias=lambda a: a["bias"][:5]),
        r"bias must be \[V\] = \[11\] to match weight \[11, 8\], got \[5\]",
    ),
    "bias-2d": (_bad(bias=lambda a: a["bias"][None]), r"bias must be \[V\] = \[11\] to match .*got \[1, 11\]"),
    "labels-shape": (
        _bad(labels=lambda a: a["labels"][:, :5]),
        r"labels must be \[B, T\] = \[3, 7\] to match hidden \[3, 7, 8\], got \[3, 5\]",
    ),
    "labels-3d": (_bad(labels=lambda a: a["labels"][..., None]), r"labels must be \[B, T\] = .*got \[3, 7, 1\]"),
    "labels-float": (_bad(labels=lambda a: a["labels"].float()), r"labels must be int64 or int32, got torch.float32"),
    "temperature-0": (_bad(temperature=0.0), r"temperature must be finite and > 0, got 0"),
    "temperature-nan": (_bad(temperature=math.nan), r"temperature must be finite and > 0, got nan"),
    "temperature-inf": (_bad(temperature=math.inf), r"temperature must be finite and > 0, got inf"),
    "chunk-0": (_bad(chunk_size=0), r"chunk_size must be >= 1 \(or None for the default\), got 0"),
    "chunk-neg": (_bad(chunk_size=-4), r"chunk_size must be >= 1 \(or None for the default\), got -4"),
    # two problems: every route reports the same (first) one
    "temperature-and-hidden": (_bad(temperature=-1.0, hidden=lambda a: a["hidden"][0]), r"temperature must be"),
    "weight-and-labels": (
        _bad(weight=lambda a: a["weight"][:, :5], labels=lambda a: a["labels"].float()),
        r"weight must be \[V, H\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, rand, case):
    build, match = BAD[case]
    args = build(rand, device)
    H.assert_same_error(
        "linear_logprobs", "linear_logprobs: " + match, lambda route: call("linear_logprobs", route, *args)
    )


@pytest.mark.parametrize("chunk_size", [2.5, "8"], ids=["float", "str"])
def test_bad_chunk_size_type(device, rand, chunk_size):
    """A chunk_size that is not an int: functional says so on both routes; torch.ops' schema refuses it."""
    args = _bad(chunk_size=chunk_size)(rand, device)
    H.assert_same_error(
        "linear_logprobs",
        r"linear_logprobs: chunk_size must be an int >= 1 \(or None for the default\), got ",
        lambda route: call("linear_logprobs", route, *args),
        mirrored=False,
    )
    # a bool is an int to the schema (True is 1), not to functional
    args = _bad(chunk_size=True)(rand, device)
    msgs = {H.error_line(call, "linear_logprobs", route, *args) for route in ("fused", "eager")}
    assert msgs == {"linear_logprobs: chunk_size must be an int >= 1 (or None for the default), got True"}


def test_bad_input_changes_nothing(device, rand):
    """A refused call leaves its inputs and their gradients as they were."""
    h, w, y, b = make_inputs(rand, 3, 7, 8, 11, device=device)
    w.requires_grad_()
    w.grad = torch.ones_like(w)
    before = [t.detach().clone() for t in (h, w, y, b)]
    with pytest.raises(RuntimeError, match="labels must be in"):
        F.linear_logprobs(h, w, torch.full_like(y, 11), b)
    with pytest.raises(RuntimeError, match="chunk_size"):
        F.linear_logprobs(h, w, y, b, chunk_size=0)
    assert all(torch.equal(x, z) for x, z in zip(before, (h, w, y, b), strict=True))
    assert torch.equal(w.grad, torch.ones_like(w))


def test_tensors_on_different_devices(device, rand):
    """One tensor on another device (meta on a CPU-only machine, where the op routes to its fake
    kernel; cuda vs cpu where a GPU is present): the op, the tensor and both devices are named."""
    h, w, y, b = make_inputs(rand, 3, 7, 8, 11, device=device)
    cases = [
        ((h, H.other_device(w), y, b, 1.0, None), "weight"),
        ((h, w, y, H.other_device(b), 1.0, None), "bias"),
        ((h, w, H.other_device(y), b, 1.0, None), "labels"),
    ]
    for args, name in cases:
        msgs = H.assert_device_error(
            "linear_logprobs", name, "hidden", lambda route, args=args: call("linear_logprobs", route, *args)
        )
        assert msgs[0] == msgs[1] == msgs[2]


def _first_line_of_error(fn, *args):
    try:
        fn(*args)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return "no error"


def test_backward_checks_match_fake(rand):
    """ppo_fast::linear_logprobs_backward checks its [B, T] inputs; its fake kernel (which torch.compile
    and opcheck trace, and which serves meta tensors) refuses the same calls with the same message."""
    h, w, y, b = make_inputs(rand, 3, 7, 8, 11)
    _, ent, lse = ops.linear_logprobs(h, w, y, b, 1.0, None)
    g, short = torch.ones(3, 7), torch.ones(3, 5)
    mask = [True, True, True]
    cases = [
        ((short, g, h, w, y, b, lse, ent, 1.0, None, mask), "grad_logprob must be [B, T] = [3, 7], got [3, 5]"),
        ((g, short, h, w, y, b, lse, ent, 1.0, None, mask), "grad_entropy must be [B, T] = [3, 7], got [3, 5]"),
        ((g, g, h, w, y, b, short, ent, 1.0, None, mask), "lse must be [B, T]"),
        ((g, None, h, w, y, b, lse, short, 1.0, None, mask), "entropy must be [B, T]"),
        ((g, g, h, w[:, :4], y, b, lse, ent, 1.0, None, mask), "weight must be [V, H] with H = 8"),
        ((g, g, h, w, y, b, lse, ent, 1.0, 0, mask), "chunk_size must be >= 1"),
    ]
    for args, want in cases:
        msgs = {}
        for dev in ("cpu", "meta"):
            moved = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
            msgs[dev] = _first_line_of_error(ops.linear_logprobs_backward, *moved)
        assert msgs["cpu"].startswith("linear_logprobs_backward: " + want), msgs["cpu"]
        assert msgs["meta"] == msgs["cpu"], msgs


# ------------------------------------------------------------------------------------------------
# CUDA only: an LLM-sized vocabulary


@pytest.mark.cuda
def test_cuda_large(rand):
    """B=4, T=129 (sliced to 128), H=512, V=32000 bf16, several chunks, against the fp64 truth by the
    FlashAttention rule."""
    B, T = 4, 128
    hidden, weight, labels, bias = make_inputs(rand, B, T + 1, 512, 32000, torch.bfloat16, "cuda")
    hidden, labels = hidden[:, :-1], labels[:, :-1]
    g_lp, g_h = make_grads(rand, B, T, "both", "cuda")
    want = truth(hidden, weight, labels, bias, 1.0, g_lp, g_h)
    got = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, chunk_size=100)
    eager = run(hidden, weight, labels, bias, 1.0, g_lp, g_h, use_fused=False)
    for i in range(2):
        H.assert_flash_rule(got[i], eager[i], want[i])
    for g, e, w in zip(got[2], eager[2], want[2], strict=True):
        H.assert_flash_rule(g, e, w)
