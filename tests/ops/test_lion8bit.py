"""Tests of the fused Lion step with 8-bit blockwise momentum: ppo_fast::lion8bit_step_
(csrc/include/ppo_fast/lion8bit.h, csrc/cpu/lion8bit.cpp, csrc/cuda/lion8bit.cu), through
``ppo_fast.functional.lion8bit_step_`` and ``torch.ops.ppo_fast``.

Ground truth is ``ppo_fast.reference.lion8bit_step_``, whose fp32 arithmetic is the kernels' own
(separately rounded multiplies and adds, in the same order), so every result is compared bit for
bit: parameters, momentum codes, absmax, fp32 momentum. The reference's quantiser is checked against
a brute-force nearest-code search and bitsandbytes' code table. The optimizers built on the op are
tested in tests/optim/test_lion.py.
"""

from __future__ import annotations

import re

import _helpers as H
import pytest
import torch

from ppo_fast import functional as F
from ppo_fast import reference as R

ops = torch.ops.ppo_fast

# Sizes around the block (256) and the 8-bit threshold (4096), and a large odd one.
SIZES = [1, 7, 255, 256, 257, 4095, 4096, 4097, 278011]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)


# ------------------------------------------------------------------------------------------------
# Inputs


def make_case(rand, specs, device="cpu", m_scale=0.1):
    """Lists (params, grads, momentum, absmax) from specs of (shape, dtype, quantized). The momentum
    starts nonzero: random values quantised (8-bit) or random fp32."""
    params, grads, momentum, absmax = [], [], [], []
    for shape, dtype, quantized in specs:
        shape = (shape,) if isinstance(shape, int) else shape
        params.append(rand.randn(*shape, dtype=dtype, device=device))
        grads.append(rand.randn(*shape, dtype=dtype, device=device))
        m = rand.randn(*shape, scale=m_scale)
        if quantized:
            codes, am = R.quantize_blockwise(m)
            momentum.append(codes.to(device))
            absmax.append(am.to(device))
        else:
            momentum.append(m.to(device))
            absmax.append(torch.empty(0, device=device))
    return params, grads, momentum, absmax


def clone(case):
    return tuple([t.clone() for t in ts] for ts in case)


def run(route, case, *, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, stochastic_rounding=False, seed=0):
    """Runs one step on a copy of ``case`` through ``route`` (ops: the registered op directly;
    fused / eager: functional) and returns the copy."""
    c = clone(case)
    if route == "ops":
        ops.lion8bit_step_(*c, lr, beta1, beta2, weight_decay, stochastic_rounding, seed)
    elif route == "reference":
        R.lion8bit_step_(*c, lr, beta1, beta2, weight_decay, stochastic_rounding, seed)
    else:
        F.lion8bit_step_(
            *c,
            lr,
            beta1,
            beta2,
            weight_decay,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            use_fused=route == "fused",
        )
    return c


def assert_identical(got, want):
    for kind, gs, ws in zip(("params", "grads", "momentum", "absmax"), got, want, strict=True):
        for i, (g, w) in enumerate(zip(gs, ws, strict=True)):
            g, w = (t.to_dense() if t.is_sparse else t for t in (g, w))
            assert g.dtype == w.dtype and g.shape == w.shape, (kind, i)
            same = (g == w) | (g.isnan() & w.isnan()) if g.is_floating_point() else g == w
            bad = (~same).sum().item()
            assert bad == 0, f"{kind}[{i}]: {bad} of {g.numel()} differ"


# ------------------------------------------------------------------------------------------------
# The quantiser (reference) and the code table


def test_dynamic_code():
    code = R.dynamic_code()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code[1:] > code[:-1]), "ascending, no duplicates"
    assert code[R.LION8BIT_ZERO_CODE] == 0 and code[255] == 1
    pos, neg = code[128:255], code[:127].flip(0)
    assert torch.equal(neg, -pos), "negative codes mirror the positive ones (1.0 has no mirror)"
    # 7 decades of exponent, 2**i fractions in decade i.
    assert code[128].item() == pytest.approx(0.55e-6) and code[254].item() == pytest.approx(1 - 0.9 / 128)


def test_dynamic_code_matches_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(R.dynamic_code(), bnb_f.create_dynamic_map(signed=True))


def _brute_force_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest code of each x / absmax among the codes of its own sign (ties to the smaller
    magnitude); 0 for 0."""
    code = R.dynamic_code().double()
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % 256)).view(-1, 256).float()
    absmax = blocks.abs().amax(1, keepdim=True)
    s = (blocks * torch.where(absmax > 0, 1.0 / absmax, 0.0)).double().reshape(-1, 1)
    dist = (s - code[None, :]).abs()
    same_sign = torch.sign(code)[None, :] == torch.sign(s)
    dist = torch.where(same_sign, dist, float("inf"))
    # ties: the smaller magnitude (positive side: lower index; negative side: higher index)
    order = torch.where(s > 0, torch.arange(256.0)[None, :], -torch.arange(256.0)[None, :])
    best = (dist == dist.min(dim=1, keepdim=True).values) * 1e6 - order
    return best.argmax(dim=1).to(torch.uint8)[: x.numel()]


def test_quantize_is_sign_preserving_nearest(rand):
    # Magnitudes over 12 decades (many below the smallest code), both signs, exact zeros.
    x = rand.randn(20000).sign() * 10 ** rand.uniform(20000, low=-12, high=0)
    x[::97] = 0
    x[5120:5376] = 0  # an all-zero block (block 20)
    codes, absmax = R.quantize_blockwise(x)
    assert torch.equal(codes, _brute_force_codes(x))
    assert torch.equal(absmax, torch.nn.functional.pad(x, (0, -x.numel() % 256)).view(-1, 256).abs().amax(1))
    deq = R.dequantize_blockwise(codes, absmax)
    assert torch.equal(torch.sign(deq), torch.sign(x)), "every nonzero value keeps its sign, zeros stay zero"
    assert (codes[5120:5376] == R.LION8BIT_ZERO_CODE).all() and absmax[20] == 0


def test_quantize_thresholds():
    """On a threshold (the fp32 midpoint of two magnitudes) the smaller magnitude wins; one ulp
    above it, the larger; -0 is 0; the block's absmax itself is code 255 (+1) or 0 (-0.993)."""
    mag = R.dynamic_code()[128:]
    thr = (mag[:-1] + mag[1:]) / 2
    k = torch.arange(127)
    for sign in (1.0, -1.0):
        x = torch.zeros(256)
        x[:127] = sign * thr
        x[127:254] = sign * torch.nextafter(thr, torch.tensor(2.0))
        x[254] = sign * 1.0  # absmax 1: x / absmax is exact
        x[255] = -0.0
        codes, absmax = R.quantize_blockwise(x)
        assert absmax.item() == 1.0
        if sign > 0:
            want_lo, want_hi, top = 128 + k, 129 + k, 255
        else:
            want_lo, want_hi, top = 126 - k, (125 - k).clamp(min=0), 0
        assert torch.equal(codes[:127].long(), want_lo)
        assert torch.equal(codes[127:254].long(), want_hi)
        assert codes[254] == top and codes[255] == R.LION8BIT_ZERO_CODE


def test_dequantize_roundtrip_error(rand):
    x = rand.randn(100000)
    codes, absmax = R.quantize_blockwise(x)
    err = (R.dequantize_blockwise(codes, absmax) - x).abs() / absmax.repeat_interleave(256)[: x.numel()]
    # the largest gap of the map is between 0.9930 and 1 (0.007) or 0.9 / 64 in the top decade
    assert err.max() <= 0.9 / 128 + 1e-6
    assert err.mean() < 3.5e-3  # 2.8e-3 measured on normal data


# ------------------------------------------------------------------------------------------------
# The fused op against the reference, bit for bit


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("quantized", [True, False], ids=["8bit", "fp32state"])
def test_against_reference(device, rand, dtype, size, quantized):
    case = make_case(rand, [(size, dtype, quantized)], device)
    want = run("reference", case)
    assert_identical(run("ops", case), want)
    assert_identical(run("fused", case), want)
    assert_identical(run("eager", case), want)


@pytest.mark.parametrize("hyper", [dict(), dict(weight_decay=0.0), dict(beta1=0.0, beta2=1.0), dict(lr=0.0)])
def test_hyperparameters(device, rand, hyper):
    specs = [(4097, torch.float32, True), ((3, 1031), torch.bfloat16, True), (300, torch.float16, False)]
    case = make_case(rand, specs, device)
    h = dict(HYPER, **hyper)
    assert_identical(run("ops", case, **h), run("reference", case, **h))


def test_mixed_list_one_call(device, rand):
    """Every dtype, both state kinds, odd sizes, 2-D and 1-D shapes, in one call (one CUDA launch)."""
    specs = [
        (278011, torch.float32, True),
        (4095, torch.bfloat16, False),
        ((64, 67), torch.float16, True),
        (4097, torch.bfloat16, True),
        (1, torch.float32, False),
        ((5, 1000), torch.float32, True),
        (0, torch.float32, False),
        (513, torch.float16, False),
    ]
    case = make_case(rand, specs, device)
    for sr in (False, True):
        assert_identical(
            run("ops", case, stochastic_rounding=sr, seed=7), run("reference", case, stochastic_rounding=sr, seed=7)
        )


def test_update_semantics(rand):
    """The step's definition, from the dequantised momentum (fp64 formula, fp32 state kept)."""
    case = make_case(rand, [(5000, torch.float32, True), (700, torch.float32, False)])
    out = run("ops", case, lr=0.01, beta1=0.8, beta2=0.95, weight_decay=0.5)
    for i in range(2):
        p, g = case[0][i].double(), case[1][i].double()
        m = R.dequantize_blockwise(case[2][i], case[3][i]).double() if i == 0 else case[2][i].double()
        want_p = p * (1 - 0.01 * 0.5) - 0.01 * torch.sign(0.8 * m + 0.2 * g)
        torch.testing.assert_close(out[0][i].double(), want_p, rtol=0, atol=2e-6)
        want_m = 0.95 * m + 0.05 * g
        got_m = R.dequantize_blockwise(out[2][i], out[3][i]).double() if i == 0 else out[2][i].double()
        scale = out[3][i].repeat_interleave(256)[:5000].double() if i == 0 else 1.0
        assert ((got_m - want_m).abs() <= 0.9 / 128 * scale + 1e-7).all()


def test_sign_preservation(device, rand):
    """With beta2 = 0 the new momentum is the gradient itself: over 14 decades of magnitude, most of
    them below the smallest code, every nonzero entry keeps its sign and zeros stay zero."""
    n = 65536
    g = rand.randn(n).sign() * 10 ** rand.uniform(n, low=-14, high=0)
    g[::101] = 0
    g[1024:1280] *= 1e-30  # a block of tiny values (its absmax is tiny too)
    case = (
        [torch.zeros(n, device=device)],
        [g.to(device)],
        [torch.full((n,), R.LION8BIT_ZERO_CODE, dtype=torch.uint8, device=device)],
        [torch.zeros(n // 256, device=device)],
    )
    out = run("ops", case, beta2=0.0, weight_decay=0.0)
    assert_identical(out, run("reference", case, beta2=0.0, weight_decay=0.0))
    m = R.dequantize_blockwise(out[2][0].cpu(), out[3][0].cpu())
    assert torch.equal(torch.sign(m), torch.sign(g))
    assert torch.equal(out[2][0].cpu(), _brute_force_codes(g)), "nearest code of the same sign"


def test_zero_block_and_nonfinite_gradients(device, rand):
    """An all-zero block stays at the zero code with absmax 0; a NaN and an inf gradient element
    leave every absmax finite (the max over the finite momentum values), as in the reference."""
    n = 4096
    g = rand.randn(n)
    g[:256] = 0
    g[1000] = float("nan")
    g[3000] = float("inf")
    case = (
        [rand.randn(n, device=device)],
        [g.to(device)],
        [torch.full((n,), R.LION8BIT_ZERO_CODE, dtype=torch.uint8, device=device)],
        [torch.zeros(n // 256, device=device)],
    )
    out = run("ops", case)
    assert_identical(out, run("reference", case))
    codes, absmax = out[2][0].cpu(), out[3][0].cpu()
    assert (codes[:256] == R.LION8BIT_ZERO_CODE).all() and absmax[0] == 0
    assert torch.isfinite(absmax).all() and (absmax[1:] > 0).all()


def _masked_lion(p, g, m, lr, beta1, beta2, weight_decay):
    """fp32 Lion in the kernels' order, written out here, for the elements whose gradient is finite;
    the others keep p and m. Returns (p, m) fp32, flat."""
    p, g, m = p.reshape(-1).float(), g.reshape(-1).float(), m.reshape(-1).float()
    ok = torch.isfinite(g)
    g = torch.where(ok, g, 0.0)
    new_p = p * (1.0 - lr * weight_decay) - lr * torch.sign(m * beta1 + g * (1.0 - beta1))
    new_m = m * beta2 + g * (1.0 - beta2)
    return torch.where(ok, new_p, p), torch.where(ok, new_m, m)


NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("quantized", [True, False], ids=["8bit", "fp32state"])
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("bad", list(NONFINITE))
def test_nonfinite_gradient_element(device, rand, bad, dtype, quantized):
    """A NaN / +inf / -inf gradient element in the middle of a block: its parameter and momentum stay
    as they were (no weight decay either), the other 255 elements of the block (and every other
    block) take the fp32 Lion step, the absmax stays finite, the block keeps moving in later steps,
    and fused and reference agree bit for bit."""
    n, j = 1024, 256 + 100  # block 1, element 100
    h = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
    case = make_case(rand, [(n, dtype, quantized)], device)
    case[0][0].mul_(0.5)  # |p| < 2: a 1e-2 step moves a bf16 / fp16 parameter by at least one ulp
    case[1][0][j] = NONFINITE[bad]
    for step in range(4):
        if step > 0:  # later steps: finite gradients
            case[1][0].copy_(rand.randn(n, dtype=dtype, device=device))
        out = run("ops", case, **h)
        assert_identical(out, run("reference", case, **h))
        assert_identical(run("fused", case, **h), out)
        assert_identical(run("eager", case, **h), out)
        if dtype == torch.bfloat16:  # stochastic rounding leaves an untouched bf16 parameter exact
            sr = run("ops", case, stochastic_rounding=True, seed=5, **h)
            assert_identical(sr, run("reference", case, stochastic_rounding=True, seed=5, **h))
            assert sr[0][0][j] == case[0][0][j] or step > 0

        p0, g0, m0 = case[0][0].cpu(), case[1][0].cpu(), case[2][0].cpu()
        m0 = R.dequantize_blockwise(m0, case[3][0].cpu()) if quantized else m0
        want_p, want_m = _masked_lion(p0, g0, m0, **h)
        p1 = out[0][0].cpu()
        assert torch.equal(p1, want_p.to(dtype)), "every parameter as the masked fp32 step"
        if quantized:
            codes, absmax = out[2][0].cpu(), out[3][0].cpu()
            want_codes, want_absmax = R.quantize_blockwise(want_m)
            assert torch.isfinite(absmax).all() and torch.equal(absmax, want_absmax)
            assert torch.equal(codes, want_codes), "momentum requantised from the masked fp32 step"
        else:
            assert torch.equal(out[2][0].cpu(), want_m)
        if step == 0:
            assert p1[j].item() == p0[j].item(), "the bad element's parameter is untouched"
            got_m = R.dequantize_blockwise(out[2][0].cpu(), out[3][0].cpu()) if quantized else out[2][0].cpu()
            if quantized:  # its momentum keeps its value, requantised against the block's new absmax
                assert (got_m[j] - m0[j]).abs() <= 0.9 / 128 * out[3][0][1].item()
                assert torch.sign(got_m[j]) == torch.sign(m0[j])
            else:
                assert got_m[j].item() == m0[j].item()
        block = slice(256, 512)
        others = torch.ones(n, dtype=torch.bool)
        others[j] = step > 0
        moved = p1 != p0
        assert moved[block][others[block]].all(), f"step {step}: the block keeps stepping"
        case = out


def test_quantize_nonfinite_values():
    """The quantiser's absmax is the max over a block's finite values: +-inf take the code of +-1
    (+-absmax), NaN the zero code, and the finite values of the block quantise as without them."""
    x = torch.linspace(-0.5, 0.25, 512)
    y = x.clone()
    y[[3, 300]] = float("inf")
    y[[7, 301]] = float("-inf")
    y[[9, 302]] = float("nan")
    codes, absmax = R.quantize_blockwise(y)
    want_codes, want_absmax = R.quantize_blockwise(torch.where(y.isfinite(), y, 0.0))
    assert torch.equal(absmax, want_absmax) and torch.isfinite(absmax).all()
    finite = y.isfinite()
    assert torch.equal(codes[finite], want_codes[finite])
    assert (codes[[3, 300]] == 255).all() and (codes[[7, 301]] == 0).all()
    assert (codes[[9, 302]] == R.LION8BIT_ZERO_CODE).all()


def test_nonfinite_absmax_input(device, rand):
    """A block handed to the op with a NaN or inf absmax (a corrupt state: the optimizers refuse to
    load one) dequantises to non-finite momentum; the new absmax ignores it, so the block comes back
    finite, with the reference's bits."""
    case = make_case(rand, [(1024, torch.float32, True)], device)
    case[3][0][1] = float("nan")
    case[3][0][2] = float("inf")
    out = run("ops", case)
    assert_identical(out, run("reference", case))
    assert torch.isfinite(out[3][0]).all()


def test_stochastic_rounding(device, rand):
    """bf16 weights at 1 (ulp 2^-7) with lr 1e-3: rounding to nearest loses every step; stochastic
    rounding moves them by lr per step on average. Matches the reference bit for bit, depends on the
    seed, and leaves fp32 and fp16 parameters alone."""
    n, steps, lr = 8192, 20, 1e-3
    outs = {}
    for sr in (False, True):
        p = torch.ones(n, dtype=torch.bfloat16, device=device)
        m = torch.full((n,), R.LION8BIT_ZERO_CODE, dtype=torch.uint8, device=device)
        a = torch.zeros(n // 256, device=device)
        g = torch.ones(n, dtype=torch.bfloat16, device=device)
        for step in range(steps):
            case = ([p], [g], [m], [a])
            got = run("ops", case, lr=lr, weight_decay=0.0, stochastic_rounding=sr, seed=step)
            assert_identical(got, run("reference", case, lr=lr, weight_decay=0.0, stochastic_rounding=sr, seed=step))
            (p,), _, (m,), (a,) = got
        outs[sr] = p.float().cpu()
    assert (outs[False] == 1).all()
    assert outs[True].mean().item() == pytest.approx(1 - steps * lr, abs=1e-3)
    case = make_case(rand, [(4097, torch.bfloat16, True)], device)
    assert not torch.equal(
        run("ops", case, stochastic_rounding=True, seed=1)[0][0],
        run("ops", case, stochastic_rounding=True, seed=2)[0][0],
    )
    for dtype in (torch.float32, torch.float16):
        case = make_case(rand, [(4097, dtype, True)], device)
        assert_identical(run("ops", case, stochastic_rounding=True, seed=3), run("ops", case))


def test_non_contiguous_grads_and_unaligned_views(device, rand):
    """Gradients may be any strided layout; parameters and state may be views at odd offsets (flat
    ZeRO partitions of one buffer)."""
    flat_p = rand.randn(20001, device=device)
    flat_m = torch.full((20001,), R.LION8BIT_ZERO_CODE, dtype=torch.uint8, device=device)
    params = [flat_p[1:4098], flat_p[4098 : 4098 + 7000].view(3500, 2)]
    grads = [rand.randn(4097, device=device), rand.randn(2, 3500, device=device).t()]  # the second transposed
    momentum = [flat_m[3:4100], flat_m[5000:12000]]
    absmax = [torch.zeros(17, device=device), torch.zeros(28, device=device)]
    case = (params, grads, momentum, absmax)
    assert_identical(run("ops", case), run("reference", case))


def test_thread_count_independent(rand):
    case = make_case(rand, [(278011, torch.float32, True), (70000, torch.bfloat16, True), (999, torch.half, False)])
    one, many = H.at_thread_counts(lambda: run("ops", case))
    assert_identical(one, many)


def test_empty_lists_and_empty_tensors(device):
    # (the op itself needs a tensor to dispatch on; functional returns before calling it)
    F.lion8bit_step_([], [], [], [], 1e-3)
    F.lion8bit_step_([], [], [], [], 1e-3, use_fused=False)
    e = torch.empty(0, device=device)
    case = ([e.clone()], [e.clone()], [torch.empty(0, dtype=torch.uint8, device=device)], [e.clone()])
    assert_identical(run("ops", case), run("reference", case))


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_case(rand, device):
    return make_case(
        rand,
        [(4097, torch.float32, True), ((3, 70), torch.bfloat16, False), (300, torch.float16, True)],
        device,
    )


def test_opcheck(device, rand):
    for sr in (False, True):
        case = _opcheck_case(rand, device)
        torch.library.opcheck(ops.lion8bit_step_.default, (*case, 1e-3, 0.9, 0.99, 0.1, sr, 5))


def _two_steps(params, grads, momentum, absmax):
    for lr in (1e-3, 5e-4):
        F.lion8bit_step_(params, grads, momentum, absmax, lr, 0.9, 0.99, 0.1, use_fused=True)
        grads = [g * 0.5 for g in grads]
    return params[0].sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, rand, dynamo_reset, backend):
    """One graph with the in-place op (functionalised and re-inplaced), results identical to eager."""
    case = _opcheck_case(rand, device)
    compiled = torch.compile(_two_steps, fullgraph=True, backend=backend)
    a, b = clone(case), clone(case)
    compiled(*a)
    _two_steps(*b)
    assert_identical(a, b)


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument, the same from every route, and nothing changed


def _base(rand, device="cpu"):
    return make_case(rand, [(4097, torch.float32, True), ((3, 5), torch.bfloat16, False)], device)


def _with(kind, i, value):
    def change(case, device):
        case = clone(case)
        k = ("params", "grads", "momentum", "absmax").index(kind)
        case[k][i] = value(case[k][i], device) if callable(value) else value
        return case

    return change


BAD = {
    "lr-neg": (dict(lr=-1.0), r"lion8bit_step_: lr must be finite and >= 0, got -1"),
    "lr-nan": (dict(lr=float("nan")), r"lion8bit_step_: lr must be finite and >= 0, got nan"),
    "lr-inf": (dict(lr=float("inf")), r"lion8bit_step_: lr must be finite and >= 0, got inf"),
    "beta1": (dict(beta1=1.5), r"lion8bit_step_: beta1 must be in \[0, 1\], got 1.5"),
    "beta1-nan": (dict(beta1=float("nan")), r"lion8bit_step_: beta1 must be in \[0, 1\], got nan"),
    "beta2": (dict(beta2=-0.1), r"lion8bit_step_: beta2 must be in \[0, 1\], got -0.1"),
    "wd": (dict(weight_decay=-0.01), r"lion8bit_step_: weight_decay must be finite and >= 0, got -0.01"),
    "lengths": (
        lambda c, d: (c[0], c[1][:1], c[2], c[3]),
        r"lion8bit_step_: params, grads, momentum and absmax must have one entry per tensor, got 2, 1, 2, 2",
    ),
    "param-dtype": (
        _with("params", 1, lambda t, d: t.double()),
        r"lion8bit_step_: params\[1\] must be float32, bfloat16 or float16, got (torch.float64|Double)",
    ),
    "param-int": (
        _with("params", 0, lambda t, d: t.long()),
        r"lion8bit_step_: params\[0\] must be float32, bfloat16 or float16, got",
    ),
    "param-noncontig": (
        _with("params", 1, lambda t, d: t.t()),
        r"lion8bit_step_: params\[1\] must be a contiguous dense tensor",
    ),
    "grad-shape": (
        _with("grads", 1, lambda t, d: t.reshape(5, 3)),
        r"lion8bit_step_: grads\[1\] must have the shape of params\[1\] \[3, 5\], got \[5, 3\]",
    ),
    "grad-numel": (
        _with("grads", 0, lambda t, d: t[:4096]),
        r"lion8bit_step_: grads\[0\] must have the shape of params\[0\] \[4097\], got \[4096\]",
    ),
    "grad-dtype": (
        _with("grads", 1, lambda t, d: t.float()),
        r"lion8bit_step_: grads\[1\] must have the dtype of params\[1\] \((torch.bfloat16|BFloat16)\), got",
    ),
    "grad-sparse": (
        _with("grads", 0, lambda t, d: t.to_sparse()),
        r"lion8bit_step_: grads\[0\] must be a dense tensor",
    ),
    "momentum-dtype": (
        _with("momentum", 1, lambda t, d: t.half()),
        r"lion8bit_step_: momentum\[1\] must be uint8 \(8-bit state\) or float32 \(fp32 state\), got",
    ),
    "momentum-int8": (
        _with("momentum", 0, lambda t, d: t.to(torch.int8)),
        r"lion8bit_step_: momentum\[0\] must be uint8 \(8-bit state\) or float32 \(fp32 state\), got",
    ),
    "momentum-numel": (
        _with("momentum", 0, lambda t, d: t[:-1]),
        r"lion8bit_step_: momentum\[0\] must have 4097 elements \(one per element of params\[0\]\), got 4096",
    ),
    "momentum-noncontig": (
        _with("momentum", 1, lambda t, d: t.t().contiguous().t()),
        r"lion8bit_step_: momentum\[1\] must be a contiguous dense tensor",
    ),
    "absmax-numel": (
        _with("absmax", 0, lambda t, d: t[:16]),
        r"lion8bit_step_: absmax\[0\] must be float32 with 17 elements \(one per 256 elements of params\[0\]\), "
        r"got (torch.float32|Float) with 16",
    ),
    "absmax-dtype": (
        _with("absmax", 0, lambda t, d: t.double()),
        r"lion8bit_step_: absmax\[0\] must be float32 with 17 elements .*got (torch.float64|Double) with 17",
    ),
    "absmax-noncontig": (
        _with("absmax", 0, lambda t, d: torch.zeros(34, device=d)[::2]),
        r"lion8bit_step_: absmax\[0\] must be a contiguous dense tensor",
    ),
    "absmax-fp32-state": (
        _with("absmax", 1, lambda t, d: torch.zeros(1, device=d)),
        r"lion8bit_step_: absmax\[1\] must be empty when momentum\[1\] is float32, got 1 elements",
    ),
    # Two problems: every route reports the first (parameters are checked in order).
    "first-problem": (
        lambda c, d: _with("absmax", 1, torch.zeros(1, device=d))(_with("grads", 0, lambda t, d: t[:1])(c, d), d),
        r"lion8bit_step_: grads\[0\] must have the shape of params\[0\]",
    ),
}


def _call(route, case, scalars):
    s = dict(HYPER, **scalars)
    args = (s["lr"], s["beta1"], s["beta2"], s["weight_decay"])
    if route == "ops":
        ops.lion8bit_step_(*case, *args, False, 0)
    else:
        F.lion8bit_step_(*case, *args, use_fused=route == "fused")


@pytest.mark.parametrize("case_name", list(BAD))
def test_bad_inputs(device, rand, case_name):
    change, match = BAD[case_name]
    case = _base(rand, device)
    scalars = change if isinstance(change, dict) else {}
    bad = case if isinstance(change, dict) else change(case, device)
    before = clone(bad)
    # the dispatcher itself refuses a sparse tensor (no SparseCPU kernel), before the op's checks
    mirrored = case_name != "grad-sparse"
    fused, _ = H.assert_same_error("lion8bit_step_", match, lambda route: _call(route, bad, scalars), mirrored)
    assert re.match(match, fused), fused
    assert_identical(bad, before)  # nothing was written


@pytest.mark.parametrize("kind", ["params", "grads", "momentum", "absmax"])
def test_tensors_on_different_devices(device, rand, kind):
    """One tensor on another device (meta on a CPU-only machine, where the op routes to its fake
    kernel; cuda vs cpu where a GPU is present): the op, the tensor and both devices are named."""
    case = _base(rand, device)
    bad = _with(kind, 1, lambda t, d: H.other_device(t))(case, device)
    H.assert_device_error("lion8bit_step_", f"{kind}[1]", "params[0]", lambda route: _call(route, bad, {}))


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel(rand):
    """Many tensors in one launch (the table search), every kind, unaligned views: bit-identical to
    the CPU kernel."""
    specs = []
    for i in range(300):
        n = [1, 255, 4095, 4097, 20000, 100003][i % 6]
        specs.append((n, H.DTYPES[i % 3], n >= 4096 and i % 4 != 0))
    case = make_case(rand, specs)
    flat = rand.randn(1 << 20)
    case[0].append(flat[3 : 3 + 300001])  # unaligned: the scalar path
    case[1].append(rand.randn(300001))
    codes, am = R.quantize_blockwise(rand.randn(300001, scale=0.1))
    case[2].append(codes)
    case[3].append(am)
    for sr in (False, True):
        cpu = run("ops", case, stochastic_rounding=sr, seed=11)
        gpu = run("ops", tuple([t.cuda() for t in ts] for ts in case), stochastic_rounding=sr, seed=11)
        assert_identical(tuple([t.cpu() for t in ts] for ts in gpu), cpu)


@pytest.mark.cuda
def test_cuda_large_deterministic(rand):
    case = make_case(rand, [(50_000_003, torch.bfloat16, True), (33_554_432, torch.float32, True)], "cuda")
    a, b = run("ops", case), run("ops", case)
    assert_identical(a, b)
    assert_identical(a, run("reference", case))
