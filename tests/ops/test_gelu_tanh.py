"""Tests of ppo_fast::gelu_tanh and ppo_fast::gelu_tanh_backward (csrc/include/ppo_fast/gelu_tanh.h,
csrc/cpu/gelu_tanh.cpp, csrc/cuda/gelu_tanh.cu) through ``torch.ops.ppo_fast`` and
``ppo_fast.functional`` (fused and eager routes).

Ground truth is written here in float64: transformers' NewGELUActivation formula and its derivative
by hand, independently of ``ppo_fast.reference`` (whose fp32 error sets the fused op's allowance).
Low-precision inputs are rounded first and the truth is computed from the rounded values.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import _helpers as H
import pytest
import torch

from ppo_fast import functional as F

ops = torch.ops.ppo_fast

C = math.sqrt(2.0 / math.pi)
K = 0.044715
FP32_FLOOR = 1e-6  # absolute, relative to max(1, max|truth|)


def truth(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x), d gelu / dx) in float64: 0.5 x (1 + tanh u) and 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u'."""
    x = x.detach().double().cpu()
    t = torch.tanh(C * (x + K * x**3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * C * (1 + 3 * K * x * x)


def value_and_grad(route: str, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu(x) and d sum(w * gelu(x)) / dx through a route: fused / eager (functional), ops (torch.ops)."""
    x = x.detach().clone().requires_grad_()
    if route == "ops":
        y = ops.gelu_tanh(x)
    else:
        y = F.gelu_tanh(x, use_fused=route == "fused")
    (g,) = torch.autograd.grad(y, x, w)
    return y.detach(), g


def assert_within(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, floor: float, what: str) -> None:
    scale = max(1.0, ref.abs().max().item())
    fused_err, eager_err = H.max_err(out, ref), H.max_err(eager, ref)
    assert fused_err <= 2 * eager_err + floor * scale, f"{what}: fused {fused_err:.3g} vs eager {eager_err:.3g}"


# ------------------------------------------------------------------------------------------------
# Values and gradients against the float64 truth


@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
@pytest.mark.parametrize("scale", [1.0, 4.0, 30.0])
def test_against_formula(device, rand, dtype, scale):
    x = rand.randn(64, 257, dtype=dtype, device=device, scale=scale)
    w = rand.randn(64, 257, dtype=dtype, device=device)
    want_y, want_d = truth(x)
    want_g = want_d * w.double().cpu()
    y, g = value_and_grad("fused", x, w)
    ey, eg = value_and_grad("eager", x, w)
    assert y.dtype == dtype and g.dtype == dtype and y.shape == x.shape and y.device == x.device
    if dtype == torch.float32:
        assert_within(y, ey, want_y, FP32_FLOOR, "gelu")
        assert_within(g, eg, want_g, FP32_FLOOR, "grad")
    else:
        H.assert_flash_rule(y, ey, want_y, "gelu")
        H.assert_flash_rule(g, eg, want_g, "grad")
    # torch.ops and functional are one op
    oy, og = value_and_grad("ops", x, w)
    assert torch.equal(oy, y) and torch.equal(og, g)


def test_reference_is_the_formula(rand):
    x = rand.randn(1000, dtype=torch.float64, scale=3.0)
    want_y, want_d = truth(x)
    y, g = value_and_grad("eager", x, torch.ones_like(x))
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, want_d, rtol=1e-12, atol=1e-12)


def test_float64(rand):
    x = rand.randn(3, 1031, dtype=torch.float64, scale=5.0)
    want_y, want_d = truth(x)
    y, g = value_and_grad("fused", x, torch.ones_like(x))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want_y, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g, want_d, rtol=1e-13, atol=1e-13)


def test_gradcheck(rand):
    x = rand.randn(37, dtype=torch.float64, scale=3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.gelu_tanh(t, use_fused=True), (x,))


def test_hand_computed(device):
    # gelu(1) = 0.5 (1 + tanh(sqrt(2/pi) * 1.044715)), gelu(0) = 0, gelu'(0) = 0.5
    x = torch.tensor([1.0, 0.0, -1.0], device=device)
    y, g = value_and_grad("fused", x, torch.ones_like(x))
    t = math.tanh(C * (1 + K))
    dt = 0.5 * (1 + t) + 0.5 * (1 - t * t) * C * (1 + 3 * K)
    torch.testing.assert_close(y.cpu(), torch.tensor([0.5 * (1 + t), 0.0, -0.5 * (1 - t)]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g.cpu(), torch.tensor([dt, 0.5, 1 - dt]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Special values: the fused op gives the reference's NaN / inf pattern, forward and backward

SPECIAL = [math.inf, -math.inf, math.nan, 1e30, -1e30, 3e38, -3e38, -0.0, 0.0, 1e-40, -1e-40, 1e-45, -1e-45]
SPECIAL += [20.0, -20.0, -10.0, -9.0, 1e13, -1e13, 1.05e19, -1.05e19, 1.07e19, -1.07e19, 2e19, 65504.0, -200.0]


def assert_same_pattern(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().tolist()} vs {want.isnan().tolist()}"
    assert torch.equal(got.isinf(), want.isinf()), f"{what}: inf at {got.isinf().tolist()} vs {want.isinf().tolist()}"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), what
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=2e-2, atol=1e-20, msg=what)  # the reference rounds 1e-37 to 0


@pytest.mark.parametrize("dtype", [*H.DTYPES, torch.float64], ids=H.ids)
def test_special_values(device, dtype):
    if device.type == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on the CPU")
    x = torch.tensor(SPECIAL, dtype=torch.float64).to(device=device, dtype=dtype)
    for gval in (1.0, 0.0, -2.5, math.nan, math.inf, -math.inf):
        w = torch.full_like(x, gval)
        y, g = value_and_grad("fused", x, w)
        ey, eg = value_and_grad("eager", x, w)
        assert_same_pattern(y, ey, f"gelu {dtype}")
        keep = torch.ones_like(x, dtype=torch.bool)
        if math.isinf(gval):
            # gelu_tanh.h: with an infinite upstream gradient the reference's chain rule is NaN where
            # one of its local slopes underflows to 0 (positive subnormal x; fp64's tanh saturating at
            # |x| ~ 20 before the sigmoid does), the fused backward +-inf there.
            if dtype == torch.float64:
                continue
            keep = ~((x > 0) & (x < 1e-30))
        assert_same_pattern(g[keep], eg[keep], f"grad {dtype} (upstream {gval})")
    # the sign of a zero result (-0 for x far below zero) is the reference's too
    zero = ey == 0
    assert torch.equal(y[zero].signbit(), ey[zero].signbit())


def test_finite_far_below_zero_has_finite_gradient(device):
    # exp(-2u) overflows to inf for x < ~-9 (fp32): s = 0, and no 0 * inf anywhere below |x| ~ 1e19
    x = -torch.logspace(0.9, 18.9, 400, dtype=torch.float64).float().to(device)
    y, g = value_and_grad("fused", x, torch.ones_like(x))
    assert y.isfinite().all() and g.isfinite().all()
    assert (y <= 0).all() and (g.abs() < 1e-3).all()


# ------------------------------------------------------------------------------------------------
# Shapes and layouts


@pytest.mark.parametrize(
    "shape", [(0,), (1,), (7,), (1031,), (3, 0), (3, 7), (2, 3, 1031), (2, 1, 3, 7), (5, 8201)], ids=H.ids
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=H.ids)
def test_shapes(device, rand, shape, dtype):
    x = rand.randn(*shape, dtype=dtype, device=device, scale=3.0)
    w = rand.randn(*shape, dtype=dtype, device=device)
    y, g = value_and_grad("fused", x, w)
    ey, eg = value_and_grad("eager", x, w)
    assert y.shape == x.shape and g.shape == x.shape and y.dtype == dtype
    if x.numel() == 0:
        return
    want_y, want_d = truth(x)
    floor = FP32_FLOOR if dtype == torch.float32 else H.FLOOR
    assert_within(y, ey, want_y, floor, "gelu")
    assert_within(g, eg, want_d * w.double(), floor, "grad")


@pytest.mark.parametrize("layout", list(H.LAYOUTS))
def test_non_contiguous(device, rand, layout):
    x = rand.randn(5, 37, device=device, scale=3.0)
    w = rand.randn(5, 37, device=device)
    view, wv = H.LAYOUTS[layout](x), H.LAYOUTS[layout](w)
    y, g = value_and_grad("fused", view, wv)
    cy, cg = value_and_grad("fused", x, w)
    assert y.shape == x.shape
    assert torch.equal(y, cy) and torch.equal(g, cg)
    assert torch.equal(ops.gelu_tanh_backward(wv, view), cg)


def test_thread_count_independent(rand):
    x = rand.randn(9, 8192, scale=3.0)
    one, many = H.at_thread_counts(lambda: (ops.gelu_tanh(x), ops.gelu_tanh_backward(x, x)))
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


_DEFAULT_CAPABILITY = """
import sys, torch
import ppo_fast  # noqa: F401
x, g = torch.load(sys.argv[1])
out = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    xd, gd = x.to(dtype), g.to(dtype)
    out[str(dtype)] = (torch.ops.ppo_fast.gelu_tanh(xd), torch.ops.ppo_fast.gelu_tanh_backward(gd, xd))
torch.save(out, sys.argv[2])
"""


def test_plain_loops_match(rand, tmp_path):
    # ATEN_CPU_CAPABILITY=default selects the plain loops (libm's exp) instead of the AVX2 ones (Sleef's).
    x = torch.cat([rand.randn(4099, scale=4.0), torch.tensor(SPECIAL, dtype=torch.float32)])
    g = rand.randn(x.numel())
    torch.save((x, g), tmp_path / "in.pt")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PPO_FAST_REQUIRE_EXT="1")
    cmd = [sys.executable, "-c", _DEFAULT_CAPABILITY, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    subprocess.run(cmd, env=env, check=True, timeout=120)
    plain = torch.load(tmp_path / "out.pt")
    for dtype, ulp in ((torch.float32, 2.0**-20), (torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)):
        xd, gd = x.to(dtype), g.to(dtype)
        for got, want in zip((ops.gelu_tanh(xd), ops.gelu_tanh_backward(gd, xd)), plain[str(dtype)], strict=True):
            assert_same_pattern(got, want, f"plain loops {dtype}")
            fin = want.isfinite()
            torch.testing.assert_close(got[fin].double(), want[fin].double(), rtol=ulp, atol=ulp)


# ------------------------------------------------------------------------------------------------
# opcheck, torch.compile, fake kernels


def test_opcheck(device, rand):
    cases = [
        rand.randn(4, 33, device=device),
        rand.randn(7, dtype=torch.bfloat16, device=device),
        rand.randn(2, 3, 5, dtype=torch.float16, device=device),
        rand.randn(64 * 3, device=device)[::3],
    ]
    if device.type == "cpu":
        cases.append(rand.randn(17, dtype=torch.float64))
    for x in cases:
        torch.library.opcheck(ops.gelu_tanh.default, (x.requires_grad_(),))
        torch.library.opcheck(ops.gelu_tanh_backward.default, (torch.randn_like(x), x.detach()))


def test_compile_fullgraph(device, rand, dynamo_reset):
    def fn(x, w):
        return (F.gelu_tanh(x * 2.0) * w).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, w = rand.randn(6, 40, device=device), rand.randn(6, 40, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(xa, w), fn(xb, w)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(xa.grad, xb.grad)


def test_fake_kernel_shapes_and_dtypes():
    for dtype in (torch.bfloat16, torch.float64):
        x = torch.empty(2, 3, 5, dtype=dtype, device="meta")
        assert ops.gelu_tanh(x).shape == (2, 3, 5) and ops.gelu_tanh(x).dtype == dtype
        assert ops.gelu_tanh_backward(x, x).shape == (2, 3, 5) and ops.gelu_tanh_backward(x, x).dtype == dtype


# ------------------------------------------------------------------------------------------------
# Bad inputs: the op and the argument named; functional, the C++ op and the fake kernel agree


def test_bad_dtype(device):
    x = torch.ones(4, dtype=torch.int64, device=device)

    def run(route):
        return ops.gelu_tanh(x) if route == "ops" else F.gelu_tanh(x, use_fused=route == "fused")

    H.assert_same_error("gelu_tanh", r"^gelu_tanh: x must be a floating-point tensor .*got torch.int64$", run)


BAD_BACKWARD = {
    "x-int": (lambda d: (torch.ones(4, device=d), torch.ones(4, dtype=torch.int32, device=d)), r"x must be a floating"),
    "shape": (
        lambda d: (torch.ones(3, 4, device=d), torch.ones(4, 3, device=d)),
        r"grad must have the shape of x \[4, 3\], got \[3, 4\]$",
    ),
    "dtype": (
        lambda d: (torch.ones(4, dtype=torch.bfloat16, device=d), torch.ones(4, device=d)),
        r"grad must have the dtype of x \(.*\), got .*",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_bad_backward_inputs(device, case):
    build, match = BAD_BACKWARD[case]
    grad, x = build(device)
    cpp = H.error_line(ops.gelu_tanh_backward, grad, x)
    fake = H.error_line(ops.gelu_tanh_backward, grad.to("meta"), x.to("meta"))
    assert cpp.startswith("gelu_tanh_backward: "), cpp
    assert H.as_cpp_message(fake) == cpp, (fake, cpp)
    assert re.search(match, cpp), cpp


def test_backward_device_mismatch(device):
    x = torch.ones(4, device=device)
    msg = H.error_line(ops.gelu_tanh_backward, H.other_device(x), x)
    assert msg.startswith("gelu_tanh_backward: grad is on ") and "but x is on " in msg, msg


# ------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", H.DTYPES, ids=H.ids)
def test_cuda_matches_cpu(rand, dtype):
    x = torch.cat([rand.randn(3 * 4099 + 5, scale=4.0), torch.tensor(SPECIAL, dtype=torch.float32)]).to(dtype)
    g = rand.randn(x.numel()).to(dtype)
    for n in (x.numel(), 1, 7, 1031):
        for got, want in zip(
            (ops.gelu_tanh(x[:n].cuda()).cpu(), ops.gelu_tanh_backward(g[:n].cuda(), x[:n].cuda()).cpu()),
            (ops.gelu_tanh(x[:n]), ops.gelu_tanh_backward(g[:n], x[:n])),
            strict=True,
        ):
            assert_same_pattern(got, want, f"cuda {dtype}")
            fin = want.isfinite()
            ulp = {torch.float32: 2.0**-21, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
            torch.testing.assert_close(got[fin].double(), want[fin].double(), rtol=ulp, atol=ulp)


@pytest.mark.cuda
def test_cuda_fp64_refused(rand):
    x = rand.randn(8, dtype=torch.float64, device="cuda")
    msg = H.error_line(ops.gelu_tanh, x)
    assert msg.startswith("gelu_tanh: CUDA tensors must be float32, bfloat16 or float16"), msg
