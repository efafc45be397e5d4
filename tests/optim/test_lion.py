"""Tests of ``ppo_fast.optim.Lion`` and ``ppo_fast.optim.Lion8bit`` (ppo_fast/optim/lion.py; the op
underneath is tested in tests/ops/test_lion8bit.py).

Ground truths: an independent float64 transcription of the Lion update (bitsandbytes' order,
decoupled weight decay), the eager reference (``fused=False``: the same arithmetic as the fused op,
so fused and eager runs agree bit for bit), and, where it imports, ``bitsandbytes.optim.Lion8bit``.
Measured on this CPU (50 steps, lr 1e-3, noisy quadratic): Lion8bit's mean parameter error against
fp32 Lion is 0.13 lr (0.3% of the distance travelled), bitsandbytes' 0.13 lr; 99.7% of the
parameters are identical to bitsandbytes' after 50 steps.
"""

from __future__ import annotations

import io

import pytest
import torch

from ppo_fast import reference as R
from ppo_fast.optim import Lion, Lion8bit

LR = 1e-3


def _params(sizes, dtypes=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(sizes)
    out = []
    for n, dt in zip(sizes, dtypes, strict=True):
        shape = n if isinstance(n, tuple) else (n,)
        out.append(torch.nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dt)))
    return out


class Problem:
    """A noisy quadratic: grad = (p - target) + 0.5 noise, drawn from one generator, so every
    optimizer sees the same gradient sequence for the same parameter trajectory."""

    def __init__(self, params, seed=1):
        self.gen = torch.Generator().manual_seed(seed)
        self.targets = [torch.randn(p.shape, generator=self.gen) for p in params]

    def grads(self, params, skip=()):
        for i, (p, t) in enumerate(zip(params, self.targets, strict=True)):
            noise = torch.randn(p.shape, generator=self.gen)
            if i in skip:
                p.grad = None
                continue
            p.grad = ((p.detach().float().cpu() - t) + 0.5 * noise).to(device=p.device, dtype=p.dtype)


def _train(opt, params, problem, steps, skip=()):
    for _ in range(steps):
        problem.grads(params, skip)
        opt.step()


def _run(cls, sizes, steps, dtypes=None, **kw):
    params = _params(sizes, dtypes)
    problem = Problem(params)
    p0 = [p.detach().clone() for p in params]
    opt = cls(params, lr=LR, **kw)
    _train(opt, params, problem, steps)
    return [p.detach() for p in params], p0, opt


def _state_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        if sa[k].keys() != sb[k].keys():
            return False
        for name in sa[k]:
            x, y = sa[k][name], sb[k][name]
            if torch.is_tensor(x):
                if x.dtype != y.dtype or not torch.equal(x.cpu(), y.cpu()):
                    return False
            elif x != y:
                return False
    return True


# ------------------------------------------------------------------------------------------------
# Semantics


def test_lion_matches_float64_formula():
    """fp32 Lion against an independent float64 transcription, 30 steps, with weight decay."""
    sizes, steps, wd = [3000, (17, 33)], 30, 0.3
    params = _params(sizes)
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    problem = Problem(params)
    opt = Lion(params, lr=LR, betas=(0.9, 0.99), weight_decay=wd)
    for _ in range(steps):
        problem.grads(params)
        for i, p in enumerate(params):
            g = p.grad.double()
            ref[i] = ref[i] * (1 - LR * wd) - LR * torch.sign(0.9 * m[i] + 0.1 * g)
            m[i] = 0.99 * m[i] + 0.01 * g
        opt.step()
        for i, p in enumerate(params):  # keep the fp64 run on the fp32 trajectory (no drift from rounding)
            assert (p.detach().double() - ref[i]).abs().max() < 1e-5
            ref[i] = p.detach().double().clone()
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["momentum"].double(), m[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_fused_matches_eager(cls):
    """The fused op and the eager reference, 20 steps over mixed dtypes, two groups, weight decay and
    stochastic rounding: parameters and every state tensor bit for bit (0 mismatching codes)."""
    runs = []
    for fused in (True, False):
        params = _params(
            [278011, 4097, 4095, (40, 130)], [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
        )
        groups = [dict(params=params[:2]), dict(params=params[2:], lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95))]
        opt = cls(groups, lr=LR, weight_decay=0.01, stochastic_rounding=True, seed=3, fused=fused)
        _train(opt, params, Problem(params), 20)
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
    assert _state_equal(oa, ob)


def test_drift_against_fp32_lion():
    """50 steps: Lion8bit against fp32 Lion. Mean absolute error in units of lr, relative error
    against the distance travelled; tensors under 4096 elements (fp32 state) are identical to fp32 Lion;
    Lion8bit's codes match the eager 8-bit reference exactly (the mismatch cap is 0)."""
    sizes, steps = [278011, 4097, 4095, 300], 50
    p8, p0, opt8 = _run(Lion8bit, sizes, steps)
    p32, _, _ = _run(Lion, sizes, steps)
    pe, _, opte = _run(Lion8bit, sizes, steps, fused=False)
    for a, b, c in zip(p8[:2], p32[:2], p0[:2]):
        mae = (a - b).abs().mean().item()
        assert mae / LR < 0.25, mae / LR  # measured 0.13
        assert mae / (b - c).abs().mean().item() < 0.006  # measured 0.003
        assert (a - b).abs().max().item() <= 2 * steps * LR + 1e-6
    for a, b in zip(p8[2:], p32[2:]):
        assert torch.equal(a, b)
    mismatched = sum(
        (opt8.state[a]["momentum"] != opte.state[b]["momentum"]).sum().item()
        for a, b in zip(opt8.param_groups[0]["params"], opte.param_groups[0]["params"])
    )
    assert mismatched == 0
    assert all(torch.equal(a, b) for a, b in zip(p8, pe))


def test_matches_bitsandbytes():
    """Against bitsandbytes' Lion8bit (same code table, block size, threshold and update), 50 steps:
    >= 99% of the parameters identical, and no more drift from fp32 Lion than bitsandbytes has. The
    differences come from rounding: bitsandbytes quantises to the nearest code regardless of sign
    (a tiny momentum can become 0) and its CPU path uses torch ops with fused multiply-adds."""
    bnb = pytest.importorskip("bitsandbytes")
    sizes, steps = [278011, 4097], 50
    ours, _, _ = _run(Lion8bit, sizes, steps)
    theirs, _, bopt = _run(bnb.optim.Lion8bit, sizes, steps, min_8bit_size=4096)
    fp32, _, _ = _run(Lion, sizes, steps)
    assert bopt.state[bopt.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8  # really 8-bit
    for a, b, c in zip(ours, theirs, fp32):
        assert (a == b).float().mean() >= 0.99  # measured 0.997
        assert (a - b).abs().mean() / LR < 0.03  # measured 0.007-0.010
        assert (a - c).abs().mean() <= 1.05 * (b - c).abs().mean()  # measured 0.134 vs 0.134, 0.121 vs 0.123


def test_state_memory():
    big = _params([1 << 20, 100])
    opt8, opt32 = Lion8bit(big, lr=LR), Lion(big, lr=LR)
    for p in big:
        p.grad = torch.randn_like(p)
    opt8.step()
    opt32.step()
    s = opt8.state[big[0]]
    assert s["momentum"].dtype == torch.uint8 and s["absmax"].dtype == torch.float32
    bytes8 = s["momentum"].numel() + 4 * s["absmax"].numel()
    assert bytes8 / big[0].numel() <= 1.02  # 1.0156
    assert opt8.state[big[1]]["momentum"].dtype == torch.float32  # under 4096: fp32
    assert opt32.state[big[0]]["momentum"].dtype == torch.float32 and "absmax" not in opt32.state[big[0]]
    assert opt8.state_bytes() == bytes8 + 400 and opt32.state_bytes() == 4 * ((1 << 20) + 100)


@pytest.mark.parametrize("sizes", [[4095], [4097], [278011], [1, 255, 256, 257]], ids=str)
def test_odd_sizes(sizes):
    """Odd sizes through the optimizer equal the op's reference steps (fp32 state below 4096)."""
    params = _params(sizes)
    ref = [p.detach().clone() for p in params]
    mom = [R.quantize_blockwise(torch.zeros(p.numel())) if p.numel() >= 4096 else None for p in params]
    mom = [(m[0], m[1]) if m is not None else (torch.zeros(p.numel()), torch.empty(0)) for m, p in zip(mom, params)]
    problem = Problem(params)
    opt = Lion8bit(params, lr=LR, weight_decay=0.05)
    for _ in range(5):
        problem.grads(params)
        opt.step()
        grads = [p.grad for p in params]
        R.lion8bit_step_(ref, grads, [m for m, _ in mom], [a for _, a in mom], LR, 0.9, 0.99, 0.05)
    for p, r, (m, _) in zip(params, ref, mom):
        assert torch.equal(p.detach(), r)
        assert torch.equal(opt.state[p]["momentum"].reshape(-1), m)
        assert opt.state[p]["momentum"].dtype == (torch.uint8 if p.numel() >= 4096 else torch.float32)


def test_mixed_dtypes_one_group():
    """fp32, bf16 and fp16 parameters in one group (one op call) step as each would alone (a group
    of its own: one call per tensor)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    sizes = [5000, 5000, 5000, 3000]
    runs = []
    for together in (True, False):
        params = _params(sizes, dtypes)
        opt = Lion8bit(params if together else [dict(params=[p]) for p in params], lr=LR, weight_decay=0.01)
        _train(opt, params, Problem(params), 10)
        runs.append(params)
    for a, b, dt in zip(*runs, dtypes):
        assert a.dtype == dt and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Optimizer mechanics


@pytest.mark.parametrize(
    "config",
    [
        dict(cls=Lion8bit, dtypes=None, kw={}),
        dict(cls=Lion8bit, dtypes=[torch.bfloat16, torch.float16, torch.float32], kw=dict(stochastic_rounding=True)),
        dict(cls=Lion, dtypes=[torch.bfloat16, torch.float32, torch.float32], kw=dict(weight_decay=0.1)),
    ],
    ids=["8bit-fp32", "8bit-mixed-sr", "fp32-mixed"],
)
def test_state_dict_round_trip(config):
    """save -> load -> continue matches an uninterrupted run bit for bit; the state keeps its dtypes
    (uint8 codes, fp32 absmax and momentum, also for bf16 parameters)."""
    sizes, cls, dtypes, kw = [278011, 4097, 999], config["cls"], config["dtypes"], config["kw"]

    def make():
        params = _params(sizes, dtypes)
        return params, cls([dict(params=params[:2]), dict(params=params[2:], lr=2e-3)], lr=LR, **kw)

    params, opt = make()
    problem = Problem(params)
    _train(opt, params, problem, 7)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    gen_state = problem.gen.get_state()
    _train(opt, params, problem, 8)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2, opt2 = make()
    with torch.no_grad():
        for p, saved in zip(params2, ckpt["params"]):
            p.copy_(saved)
    opt2.load_state_dict(ckpt["opt"])
    for p in params2:
        for k, v in opt2.state[p].items():
            if torch.is_tensor(v):
                assert v.dtype in (torch.uint8, torch.float32), (k, v.dtype)
    problem.gen.set_state(gen_state)  # replay the same gradients
    _train(opt2, params2, problem, 8)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert _state_equal(opt, opt2)


def test_grad_none_skipped():
    params = _params([5000, 5000, 100])
    before = params[1].detach().clone()
    opt = Lion8bit(params, lr=LR)
    _train(opt, params, Problem(params), 3, skip=(1,))
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state and opt.state[params[0]]["step"] == 3


def test_param_groups():
    params = _params([5000, 6000, 300])
    groups = [
        dict(params=[params[0]], lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1),
        dict(params=[params[1]], min_8bit_size=10**9),  # fp32 state for this group
        dict(params=[params[2]], lr=0.0),
    ]
    opt = Lion8bit(groups, lr=LR)
    start = [p.detach().clone() for p in params]
    _train(opt, params, Problem(params), 3)
    assert opt.state[params[0]]["momentum"].dtype == torch.uint8
    assert opt.state[params[1]]["momentum"].dtype == torch.float32
    assert torch.equal(params[2].detach(), start[2])  # lr 0
    # group 0 moved by lr 1e-2 per step (sign steps, plus a little decay)
    moved = (params[0].detach() - start[0]).abs().mean().item()
    assert 0.5e-2 < moved < 3.3e-2


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=6),  # cycles betas[0] too
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
    ],
    ids=["step", "lambda", "cosine", "onecycle", "exponential"],
)
def test_lr_schedulers(make_sched):
    """Each step moves every parameter by the scheduled lr (Lion steps are +-lr; wd 0)."""
    params = _params([5000, 100])
    opt = Lion8bit(params, lr=LR)
    sched = make_sched(opt)
    problem = Problem(params)
    for _ in range(5):
        lr = opt.param_groups[0]["lr"]
        before = [p.detach().clone() for p in params]
        problem.grads(params)
        opt.step()
        sched.step()
        for p, b in zip(params, before):
            step = (p.detach() - b).abs()
            assert step.max() > 0 or lr == 0
            assert torch.allclose(step[step > 0], torch.tensor(lr), rtol=1e-3, atol=5e-7), lr


def test_reduce_lr_on_plateau():
    params = _params([5000])
    opt = Lion8bit(params, lr=LR)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    problem = Problem(params)
    for _ in range(3):
        problem.grads(params)
        opt.step()
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 4)


def test_flat_partitions_like_zero():
    """DeepSpeed ZeRO hands a client optimizer flat fp32 partitions (1-D, at any offset of a flat
    buffer) in place of the model's parameters. Shapes do not matter: a [a, b] parameter and the same
    data flattened step identically, and partitions cut at odd offsets match stepping each alone."""
    shaped = _params([(300, 70)])
    flat = [torch.nn.Parameter(shaped[0].detach().reshape(-1).clone())]
    o1, o2 = Lion8bit(shaped, lr=LR), Lion8bit(flat, lr=LR)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        grad = torch.randn(300, 70, generator=g)
        shaped[0].grad, flat[0].grad = grad, grad.reshape(-1)
        o1.step()
        o2.step()
    assert torch.equal(shaped[0].detach().reshape(-1), flat[0].detach())
    assert torch.equal(o1.state[shaped[0]]["momentum"], o2.state[flat[0]]["momentum"])

    buffer = torch.randn(40001)
    cuts = [(1, 17000), (17000, 40001)]  # two "ranks", unaligned offsets
    parts = [torch.nn.Parameter(buffer[a:b]) for a, b in cuts]  # views into one buffer
    alone = [torch.nn.Parameter(buffer[a:b].clone()) for a, b in cuts]
    opt = Lion8bit([torch.nn.Parameter(torch.zeros(3))], lr=LR)  # built on the model, then
    opt.param_groups[0]["params"] = parts  # ZeRO swaps in its partitions
    singles = [Lion8bit([a], lr=LR) for a in alone]
    for _ in range(5):
        for p, a in zip(parts, alone):
            a.grad = torch.randn(a.shape, generator=g)
            p.grad = a.grad.clone()
        opt.step()
        for s in singles:
            s.step()
    for p, a in zip(parts, alone):
        assert torch.equal(p.detach(), a.detach())


def _train_model(cls, model, batch, steps, lr):
    """``steps`` steps with a cosine schedule; returns the mean loss of the last 10."""
    opt = cls(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    tail = []
    for step in range(steps):
        loss = batch(model, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tail.append(loss.item())
    if cls is Lion8bit:
        assert sum(s["momentum"].dtype == torch.uint8 for s in opt.state.values()) >= 2  # really 8-bit
    return sum(tail[-10:]) / 10


def test_small_model_200_steps():
    """An MLP (8-bit state on its two larger weight matrices) trained 200 steps on a fixed regression
    task: Lion8bit's final loss within 2% of fp32 Lion's (measured: 0.015% apart, 0.105 from 0.87)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    y = torch.tanh(x @ torch.randn(32, 16, generator=gen)) + 0.05 * torch.randn(512, 16, generator=gen)

    def batch(model, step):
        idx = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(step))
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx])

    losses = {}
    for cls in (Lion, Lion8bit):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 128),
            torch.nn.GELU(),
            torch.nn.Linear(128, 128),
            torch.nn.GELU(),
            torch.nn.Linear(128, 16),
        )
        _train_model(cls, model, batch, 200, lr=2e-3)
        losses[cls.__name__] = torch.nn.functional.mse_loss(model(x), y).item()
    assert losses["Lion"] < 0.2 * torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()  # it learned
    assert abs(losses["Lion8bit"] / losses["Lion"] - 1) < 0.02, losses


@pytest.mark.slow
def test_tiny_gpt2_200_steps():
    """A tiny GPT-2 (2 layers, width 64; 96% of its parameters in 8-bit state) learns a random
    first-order Markov chain over 64 tokens (entropy 1.61 nats), 200 steps: Lion8bit's held-out loss
    within 2% of fp32 Lion's (measured 0.12% apart, 4.16 -> 1.82; 0.03-0.27% over other seeds).
    A chain rather than a copy task: its loss flattens out by step 200, so the two runs' gap is the
    optimizer's, not the chaos of a steep stretch of training (a copy task gave +-3% between seeds)."""
    tf = pytest.importorskip("transformers")
    vocab = 64
    trans = torch.softmax(3 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)), dim=1)

    def batch(model, step):
        g = torch.Generator().manual_seed(step)
        ids = torch.empty(16, 32, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (16,), generator=g)
        for t in range(1, 32):
            ids[:, t] = torch.multinomial(trans[ids[:, t - 1]], 1, generator=g).squeeze(1)
        return model(input_ids=ids, labels=ids).loss

    losses = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads; on a busy 2-core machine they spin
    try:
        for cls in (Lion, Lion8bit):
            torch.manual_seed(0)
            cfg = tf.GPT2Config(
                vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2
            )
            model = tf.GPT2LMHeadModel(cfg)
            _train_model(cls, model, batch, 200, lr=3e-3)
            with torch.no_grad():
                losses[cls.__name__] = sum(batch(model, 10**6 + i).item() for i in range(8)) / 8
    finally:
        torch.set_num_threads(threads)
    assert losses["Lion"] < 2.0  # it learned (ln 64 = 4.16 at the start; the floor is 1.61)
    assert abs(losses["Lion8bit"] / losses["Lion"] - 1) < 0.02, losses


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-1.0), r"Lion8bit: lr must be finite and >= 0, got -1.0"),
        (dict(lr=float("nan")), r"Lion8bit: lr must be finite and >= 0, got nan"),
        (dict(betas=(1.1, 0.99)), r"Lion8bit: betas\[0\] must be in \[0, 1\], got 1.1"),
        (dict(betas=(0.9, -0.5)), r"Lion8bit: betas\[1\] must be in \[0, 1\], got -0.5"),
        (dict(betas=0.9), r"Lion8bit: betas must be a pair \(beta1, beta2\), got 0.9"),
        (dict(weight_decay=-1e-2), r"Lion8bit: weight_decay must be finite and >= 0, got -0.01"),
        (dict(min_8bit_size=-1), r"Lion8bit: min_8bit_size must be an int >= 0, got -1"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        Lion8bit(_params([10]), **kw)


def test_bad_step_changes_nothing():
    """A bad value set after construction (by hand or a scheduler), a sparse gradient or a float64
    parameter in any group: the step raises before any parameter or state changes."""
    params = _params([5000, 300])
    opt = Lion8bit([dict(params=[params[0]]), dict(params=[params[1]])], lr=LR)
    problem = Problem(params)
    _train(opt, params, problem, 2)
    snapshot = ([p.detach().clone() for p in params], io.BytesIO())
    torch.save(opt.state_dict(), snapshot[1])

    def unchanged():
        snapshot[1].seek(0)
        saved = torch.load(snapshot[1], weights_only=True)
        assert all(torch.equal(p.detach(), s) for p, s in zip(params, snapshot[0]))
        for k, v in opt.state_dict()["state"].items():
            assert v["step"] == saved["state"][k]["step"] and torch.equal(v["momentum"], saved["state"][k]["momentum"])

    problem.grads(params)
    opt.param_groups[1]["lr"] = -0.5
    with pytest.raises(ValueError, match=r"Lion8bit: lr must be finite and >= 0, got -0.5"):
        opt.step()
    unchanged()
    opt.param_groups[1]["lr"] = LR
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\]"):
        opt.step()
    unchanged()
    opt.param_groups[1]["betas"] = (0.9, 0.99)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="Lion8bit does not support sparse gradients"):
        opt.step()
    unchanged()
    wide = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    wide.grad = torch.randn(10, dtype=torch.float64)
    problem.grads(params)
    opt.add_param_group(dict(params=[wide]))
    with pytest.raises(TypeError, match="Lion8bit: parameters must be float32, bfloat16 or float16, got torch.float64"):
        opt.step()
    unchanged()


def test_non_contiguous_parameter():
    base = torch.randn(80, 70)
    p = torch.nn.Parameter(base.t())  # non-contiguous
    q = torch.nn.Parameter(base.t().contiguous())
    o1, o2 = Lion8bit([p], lr=LR), Lion8bit([q], lr=LR)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(70, 80, generator=g)
        p.grad, q.grad = grad, grad.clone()
        o1.step()
        o2.step()
    assert not p.is_contiguous() and torch.equal(p.detach(), q.detach())


def test_closure():
    params = _params([5000])
    opt = Lion8bit(params, lr=LR)

    def closure():
        opt.zero_grad()
        loss = (params[0] ** 2).sum()
        loss.backward()
        return loss

    before = params[0].detach().clone()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx((before**2).sum().item())
    assert not torch.equal(params[0].detach(), before)


# ------------------------------------------------------------------------------------------------
# Non-finite gradients

_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", list(_NONFINITE))
@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_nonfinite_gradient_element(cls, bad, dtype):
    """One NaN / +inf / -inf gradient element in the middle of a 256-element block: its parameter
    and momentum stay as they were, the rest of the tensor takes the fp32 Lion step written out here
    (the momentum requantised from it for 8-bit state), the absmax stays finite, the block keeps
    moving in later steps, and fused and eager runs agree bit for bit."""
    lr, wd, j = 1e-2, 0.1, 5 * 256 + 77  # lr 1e-2 moves a bf16 parameter with |p| < 4 every step
    runs = []
    for fused in (True, False):
        params = _params([5000, 300], [dtype, dtype])
        problem = Problem(params)
        opt = cls(params, lr=lr, weight_decay=wd, fused=fused)
        _train(opt, params, problem, 2)
        problem.grads(params)
        params[0].grad[j] = _NONFINITE[bad]
        p0 = params[0].detach().float().clone()
        g0 = params[0].grad.float().clone()
        s0 = opt.state[params[0]]
        m0 = R.dequantize_blockwise(s0["momentum"], s0["absmax"]) if "absmax" in s0 else s0["momentum"].clone()
        opt.step()
        ok = torch.isfinite(g0)
        want_p = torch.where(ok, p0 * (1.0 - lr * wd) - lr * torch.sign(m0 * 0.9 + g0 * 0.1), p0)
        want_m = torch.where(ok, m0 * 0.99 + g0 * (1.0 - 0.99), m0)
        s1 = opt.state[params[0]]
        assert torch.equal(params[0].detach(), want_p.to(dtype))
        assert params[0][j].item() == p0[j].item(), "the bad element's parameter is untouched"
        if cls is Lion8bit:
            codes, absmax = R.quantize_blockwise(want_m)
            assert torch.isfinite(s1["absmax"]).all() and torch.equal(s1["absmax"], absmax)
            assert torch.equal(s1["momentum"], codes)
        else:
            assert torch.equal(s1["momentum"], want_m)
            assert s1["momentum"][j].item() == m0[j].item(), "the bad element's momentum is untouched"
        block = slice(5 * 256, 6 * 256)
        for _ in range(3):
            before = params[0].detach().clone()
            problem.grads(params)
            opt.step()
            assert (params[0].detach()[block] != before[block]).all(), "the block keeps stepping"
            if cls is Lion8bit:
                assert torch.isfinite(opt.state[params[0]]["absmax"]).all()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))
    assert _state_equal(oa, ob)


# ------------------------------------------------------------------------------------------------
# load_state_dict validation


def _bad_state(case):
    """(parameter index, corruption of that parameter's saved state, message regex). Parameter 0 has
    8-bit state (5000 elements: 20 blocks) in Lion8bit, parameter 1 fp32 state (300 elements)."""
    nan, inf = float("nan"), float("inf")

    def drop(key):
        return lambda s: s.pop(key)

    def put(key, fn):
        return lambda s: s.__setitem__(key, fn(s))

    def poke(key, value, at=3):
        def f(s):
            s[key] = s[key].clone()
            s[key][at] = value

        return f

    return {
        "missing-momentum": (0, drop("momentum"), r"parameter 0: 'momentum' is missing"),
        "missing-absmax": (0, drop("absmax"), r"parameter 0: 'absmax' is missing"),
        "missing-step": (1, drop("step"), r"parameter 1: 'step' is missing"),
        "extra-absmax": (1, put("absmax", lambda s: torch.zeros(2)), r"parameter 1: unexpected key 'absmax'"),
        "shape-codes": (0, put("momentum", lambda s: s["momentum"][:-1]), r"parameter 0: 'momentum' must be .*5000"),
        "shape-absmax": (0, put("absmax", lambda s: s["absmax"][:-1]), r"parameter 0: 'absmax' must be .*\[20\]"),
        "shape-m32": (1, put("momentum", lambda s: s["momentum"].view(3, 100)), r"parameter 1: 'momentum' must be"),
        "dtype-codes": (0, put("momentum", lambda s: s["momentum"].float()), r"parameter 0: 'momentum' must be "),
        "dtype-absmax": (0, put("absmax", lambda s: s["absmax"].double()), r"parameter 0: 'absmax' must be "),
        "dtype-m32": (1, put("momentum", lambda s: s["momentum"].bfloat16()), r"parameter 1: 'momentum' must be "),
        "nan-absmax": (0, poke("absmax", nan), r"parameter 0: 'absmax' must be finite and >= 0"),
        "inf-absmax": (0, poke("absmax", inf), r"parameter 0: 'absmax' must be finite and >= 0"),
        "negative-absmax": (0, poke("absmax", -1e-3), r"parameter 0: 'absmax' must be finite and >= 0"),
        "nan-momentum": (1, poke("momentum", nan), r"parameter 1: 'momentum' has non-finite values"),
        "inf-momentum": (1, poke("momentum", -inf), r"parameter 1: 'momentum' has non-finite values"),
        "negative-step": (1, put("step", lambda s: -1), r"parameter 1: 'step' must be an int >= 0"),
    }[case]


_BAD_STATES = [
    "missing-momentum",
    "missing-absmax",
    "missing-step",
    "extra-absmax",
    "shape-codes",
    "shape-absmax",
    "shape-m32",
    "dtype-codes",
    "dtype-absmax",
    "dtype-m32",
    "nan-absmax",
    "inf-absmax",
    "negative-absmax",
    "nan-momentum",
    "inf-momentum",
    "negative-step",
]


def _snapshot(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_state_dict(a, b) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for k, sa in a["state"].items():
        sb = b["state"][k]
        if sa.keys() != sb.keys():
            return False
        for name, x in sa.items():
            y = sb[name]
            if torch.is_tensor(x):
                if not (torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)):
                    return False
            elif x != y:
                return False
    return True


@pytest.mark.parametrize("case", _BAD_STATES)
def test_load_state_dict_rejects_bad_state(case):
    """Each corruption of a saved state raises a ValueError naming the parameter and the key, and
    the optimizer keeps the state (and groups) it had; the checkpoint itself, with an all-zero
    block (absmax 0, which the quantiser writes), then loads."""
    index, corrupt, match = _bad_state(case)
    params = _params([5000, 300])
    opt = Lion8bit([dict(params=[params[0]]), dict(params=[params[1]], lr=2e-3)], lr=LR)
    problem = Problem(params)
    _train(opt, params, problem, 2)
    good = _snapshot(opt)
    good["state"][0]["momentum"][256:512] = R.LION8BIT_ZERO_CODE  # block 1 all zero
    good["state"][0]["absmax"][1] = 0.0
    bad = _snapshot(opt)
    corrupt(bad["state"][index])
    _train(opt, params, problem, 1)  # the state the failed load must leave alone
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"Lion8bit\.load_state_dict: " + match):
        opt.load_state_dict(bad)
    assert _same_state_dict(_snapshot(opt), before)
    opt.load_state_dict(good)
    assert _same_state_dict(_snapshot(opt), good)
    _train(opt, params, problem, 1)


@pytest.mark.parametrize(
    "index, corrupt, match",
    [
        (0, lambda s: s.pop("momentum"), r"parameter 0: 'momentum' is missing"),
        (1, lambda s: s.pop("step"), r"parameter 1: 'step' is missing"),
        (0, lambda s: s.__setitem__("absmax", torch.zeros(20)), r"parameter 0: unexpected key 'absmax'"),
        (1, lambda s: s.__setitem__("momentum", s["momentum"][:-1]), r"parameter 1: 'momentum' must be .*\[300\]"),
        (0, lambda s: s.__setitem__("momentum", s["momentum"].to(torch.uint8)), r"parameter 0: 'momentum' must be"),
        (1, lambda s: s["momentum"].__setitem__(7, float("nan")), r"parameter 1: 'momentum' has non-finite values"),
        (0, lambda s: s["momentum"].__setitem__(7, float("inf")), r"parameter 0: 'momentum' has non-finite values"),
        (0, lambda s: s.__setitem__("step", 2.0), r"parameter 0: 'step' must be an int >= 0"),
    ],
    ids=["missing-momentum", "missing-step", "extra-absmax", "shape", "dtype", "nan", "inf", "float-step"],
)
def test_lion_load_state_dict_rejects_bad_state(index, corrupt, match):
    """fp32 Lion: the same checks (fp32 momentum of the parameter's shape, no absmax, an int step)."""
    params = _params([5000, 300])
    opt = Lion(params, lr=LR)
    problem = Problem(params)
    _train(opt, params, problem, 2)
    bad = _snapshot(opt)
    corrupt(bad["state"][index])
    _train(opt, params, problem, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"Lion\.load_state_dict: " + match):
        opt.load_state_dict(bad)
    assert _same_state_dict(_snapshot(opt), before)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd: sd["param_groups"][1].__setitem__("lr", -1.0), r"param_groups\[1\]: lr must be finite and >= 0"),
        (lambda sd: sd["param_groups"][0].pop("betas"), r"param_groups\[0\] lacks 'betas'"),
        (lambda sd: sd["param_groups"][1].__setitem__("min_8bit_size", -5), r"param_groups\[1\]: min_8bit_size"),
        (lambda sd: sd["state"].__setitem__(7, {}), r"state for parameter 7, which no parameter group holds"),
        (lambda sd: sd["state"].__setitem__(1, [1, 2]), r"parameter 1: the state must be a dict"),
    ],
    ids=["bad-lr", "missing-betas", "bad-min-size", "unknown-param", "not-a-dict"],
)
def test_load_state_dict_rejects_bad_groups(corrupt, match):
    params = _params([5000, 300])
    opt = Lion8bit([dict(params=[params[0]]), dict(params=[params[1]])], lr=LR)
    _train(opt, params, Problem(params), 2)
    bad = _snapshot(opt)
    corrupt(bad)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"Lion8bit\.load_state_dict: " + match):
        opt.load_state_dict(bad)
    assert _same_state_dict(_snapshot(opt), before)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.__setitem__("momentum", s["momentum"][:-1].clone()),
        lambda s: s.__setitem__("momentum", s["momentum"].double()),
        lambda s: s.__setitem__("absmax", torch.zeros(3)),
    ],
    ids=["momentum-size", "momentum-dtype", "stray-absmax"],
)
@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_bad_second_group_leaves_first_unstepped(cls, corrupt):
    """A two-group optimizer whose second group cannot step (its state was replaced by hand): the
    step raises before the first group's parameters or state change."""
    params = _params([5000, 300, 4097])
    opt = cls([dict(params=params[:2]), dict(params=params[2:], lr=2e-3)], lr=LR)
    problem = Problem(params)
    _train(opt, params, problem, 2)
    corrupt(opt.state[params[2]])
    before_p = [p.detach().clone() for p in params]
    before = _snapshot(opt)
    problem.grads(params)
    with pytest.raises(RuntimeError, match=r"lion8bit_step_: (momentum|absmax)\[0\]"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before_p, strict=True))
    assert _same_state_dict(_snapshot(opt), before)


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_cuda_matches_cpu(cls):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    runs = []
    for device in ("cpu", "cuda"):
        params = _params([1_000_003, 4097, 4095, (64, 300)], dtypes, device=device)
        opt = cls(params, lr=LR, weight_decay=0.01, stochastic_rounding=True)
        _train(opt, params, Problem(params), 10)
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b.cpu())
    assert _state_equal(runs[0][1], runs[1][1])


@pytest.mark.cuda
def test_cuda_load_checkpoint_from_cpu():
    """A checkpoint saved on the CPU loads onto CUDA parameters (state moved, dtypes kept) and the
    run continues exactly as on the CPU."""
    sizes = [300_001, 4095]
    params = _params(sizes)
    opt = Lion8bit(params, lr=LR)
    problem = Problem(params)
    _train(opt, params, problem, 3)
    sd = opt.state_dict()
    saved = [p.detach().clone() for p in params]
    gen_state = problem.gen.get_state()
    _train(opt, params, problem, 4)

    cuda_params = [torch.nn.Parameter(s.cuda()) for s in saved]
    opt2 = Lion8bit(cuda_params, lr=LR)
    opt2.load_state_dict(sd)
    assert all(v.device.type == "cuda" for s in opt2.state.values() for v in s.values() if torch.is_tensor(v))
    problem.gen.set_state(gen_state)
    _train(opt2, cuda_params, problem, 4)
    for a, b in zip(params, cuda_params):
        assert torch.equal(a.detach(), b.detach().cpu())


def test_accelerate_prepare():
    """Through ``accelerate.Accelerator.prepare`` (AcceleratedOptimizer: state moved by a state_dict
    round trip, steps forwarded) the run is the unwrapped one, bit for bit."""
    accelerate = pytest.importorskip("accelerate")
    runs = []
    try:
        _accelerate_runs(accelerate, runs)
    finally:  # Accelerate's process state is global: leave none behind for later tests
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _accelerate_runs(accelerate, runs):
    for wrap in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 4))
        opt = Lion8bit(model.parameters(), lr=LR, weight_decay=0.01)
        if wrap:
            model, opt = accelerate.Accelerator(cpu=True).prepare(model, opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            loss = model(torch.randn(16, 64, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
