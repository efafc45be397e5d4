"""A small CUDA workload for compute-sanitizer (benchmarks/gpu_check.sh): every op, both row-group
layouts (a warp per row; a block per long row), ragged tails, vector and scalar load paths, every
mask dtype path. Prints one line; exits non-zero on a mismatch with the CPU kernels."""

import torch

from ppo_fast import functional as F
from ppo_fast import reference


def gae_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(0)
    for B, T in [(3, 7), (5, 1031), (9, 256)]:  # T=1031: a block per row
        for dtype in (torch.float32, torch.bfloat16):
            v, r, lp, ref = (torch.randn(B, T, generator=g).to(dtype) for _ in range(4))
            s = torch.randn(B, generator=g)
            m = torch.rand(B, T, generator=g) > 0.3
            for mask in (m, m.to(dtype)):
                for carry in (False, True):
                    for wr in (False, True):
                        args = (s, lp, ref, v, mask, 0.1, "k3", 0.99, 0.95)
                        kw = dict(whiten_rewards=wr, carry_masked=carry)
                        got = F.rollout_advantages(*(a.cuda() if torch.is_tensor(a) else a for a in args), **kw)
                        want = F.rollout_advantages(*args, **kw)
                        for x, y in zip(got, want):
                            bad += not torch.allclose(x.cpu().float(), y.float(), rtol=2e-2, atol=2e-2)
            got = F.masked_whiten(v.cuda(), m.cuda(), shift_mean=False)
            bad += not torch.allclose(got.cpu().float(), F.masked_whiten(v, m, shift_mean=False).float(), atol=2e-2)
            got = F.compute_advantages(v.cuda(), r.cuda(), m.cuda(), whiten_rewards=True)
            want = F.compute_advantages(v, r, m, whiten_rewards=True)
            bad += sum(not torch.allclose(x.cpu().float(), y.float(), atol=2e-2) for x, y in zip(got, want))
            got = F.gae(v.cuda(), r.cuda(), m.cuda())
            bad += sum(not torch.allclose(x.cpu().float(), y.float(), atol=2e-2) for x, y in zip(got, F.gae(v, r, m)))
            # an unaligned (offset) view takes the scalar path
            vo, ro, mo = v.cuda()[:, 1:], r.cuda()[:, 1:], m.cuda()[:, 1:]
            got = F.compute_rewards(s.cuda(), vo, ro, mo, 0.2)
            want = F.compute_rewards(s, v[:, 1:], r[:, 1:], m[:, 1:], 0.2)
            bad += sum(not torch.allclose(x.cpu().float(), y.float(), atol=2e-2) for x, y in zip(got, want))
    torch.cuda.synchronize()
    return bad


def ppo_loss_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(1)
    for B, T in [(3, 7), (2, 1031), (5, 2048)]:  # ragged chunks, several chunks per row, vector path
        for dtype in (torch.float32, torch.bfloat16):
            old, v_old, adv, ret = (torch.randn(B, T, generator=g).to(dtype) for _ in range(4))
            lp = (old.float() + 0.1 * torch.randn(B, T, generator=g)).to(dtype)
            v = (v_old.float() + 0.3 * torch.randn(B, T, generator=g)).to(dtype)
            ref = (lp.float() + 0.1 * torch.randn(B, T, generator=g)).to(dtype)
            m = torch.rand(B, T, generator=g) > 0.3
            for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
                kw = dict(kl_coef=0.1, kl_estimator="k3", dual_clip=3.0, aggregation=agg, cliprange_high=0.28)
                outs = []
                for dev in ("cpu", "cuda"):
                    x = [t.to(dev).requires_grad_(i < 2) for i, t in enumerate((lp, v, old, v_old, adv, ret))]
                    loss, stats = F.ppo_loss(*x, m.to(dev), ref.to(dev), **kw)
                    grads = torch.autograd.grad(loss, x[:2])
                    outs.append([loss, stats["_vector"], *grads])
                for x, y in zip(*outs):
                    bad += not torch.allclose(x.cpu().float(), y.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    return bad


def moments_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(2)
    for shape in [(7,), (512,), (3, 5000), (40000,)]:  # several chunks, ragged tails, unaligned views
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(shape, generator=g) * 3 + 100).to(dtype)
            m = torch.rand(shape, generator=g) > 0.2
            states = [torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64, device="cuda")]
            for xs, mask in ((x, None), (x, m), (x.flatten()[1:], None)):
                outs = []
                for state in states:
                    dev = state.device
                    mk = None if mask is None else mask.to(dev)
                    out, batch = F.moments_update_normalize_(state, xs.to(dev), mk, center=True, clip=2.0)
                    outs.append((out, batch, F.moments(xs.to(dev), mk)))
                for a, b in zip(*outs):
                    bad += not torch.allclose(a.cpu().double(), b.double(), rtol=1e-3, atol=1e-2)
                bad += not torch.allclose(states[0], states[1].cpu(), rtol=1e-9)
    torch.cuda.synchronize()
    return bad


def logprobs_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(3)
    for B, T, V in [(2, 3, 7), (2, 5, 50257), (1, 4, 4096)]:  # scalar and vector paths, ragged V
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype)[:, :-1]  # non-contiguous view
            r = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
            y = torch.randint(0, V, (B, T), generator=g)
            outs = []
            for dev in ("cpu", "cuda"):
                xd = x.to(dev).requires_grad_()
                lp, h = F.logprobs_from_logits(xd, y.to(dev), 0.9, return_entropy=True)
                (grad,) = torch.autograd.grad(lp.sum() + 0.5 * h.sum(), xd)
                outs.append((lp, h, grad, F.full_kl(x.to(dev), r.to(dev), 0.9)))
            for a, b in zip(*outs):
                bad += not torch.allclose(a.cpu().float(), b.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    return bad


def lion8bit_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(4)
    # Every dtype and state kind in one launch, sizes around the block and the 8-bit threshold, an
    # unaligned view (the scalar path), stochastic rounding; bit-identical to the CPU kernel.
    flat = torch.randn(20000, generator=g)
    specs = [
        (1, torch.float32),
        (255, torch.bfloat16),
        (4097, torch.float16),
        (5000, torch.bfloat16),
        (70001, torch.float32),
    ]
    params = [torch.randn(n, generator=g).to(dt) for n, dt in specs] + [flat[3:9003]]
    grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    momentum, absmax = [], []
    for p in params:
        if p.numel() >= 4096:
            codes, am = reference.quantize_blockwise(0.1 * torch.randn(p.numel(), generator=g))
            momentum.append(codes)
            absmax.append(am)
        else:
            momentum.append(0.1 * torch.randn(p.numel(), generator=g))
            absmax.append(torch.empty(0))
    for sr in (False, True):
        outs = []
        for dev in ("cpu", "cuda"):
            lists = [[t.to(dev, copy=True) for t in ts] for ts in (params, grads, momentum, absmax)]
            F.lion8bit_step_(*lists, 1e-3, 0.9, 0.99, 0.1, stochastic_rounding=sr, seed=5)
            outs.append([t for ts in (lists[0], lists[2], lists[3]) for t in ts])
        for a, b in zip(*outs):
            bad += not torch.equal(a.cpu(), b)
    torch.cuda.synchronize()
    return bad


def group_advantages_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(5)
    for n, groups in [(1, 7), (3, 33), (8, 100), (33, 5), (64, 9), (1000, 2)]:  # partial warps, strided lanes
        for dtype in (torch.float32, torch.bfloat16):
            s = (torch.randn(n * groups, generator=g) * 2).to(dtype)
            for estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "reinforce_pp"):
                got = F.group_advantages(s.cuda(), n, estimator)
                bad += not torch.allclose(got.cpu(), F.group_advantages(s, n, estimator), rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    return bad


def gelu_tanh_workload() -> int:
    bad = 0
    g = torch.Generator().manual_seed(6)
    for n in (1, 7, 8, 1031, 8 * 256 * 3 + 5):  # partial packs, a grid-stride tail
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(n, generator=g) * 4).to(dtype)
            w = torch.randn(n, generator=g).to(dtype)
            for got, want in (
                (F.gelu_tanh(x.cuda()), F.gelu_tanh(x)),
                (
                    torch.ops.ppo_fast.gelu_tanh_backward(w.cuda(), x.cuda()),
                    torch.ops.ppo_fast.gelu_tanh_backward(w, x),
                ),
            ):
                bad += not torch.allclose(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-5)
            bad += not torch.equal(F.gelu_tanh(x.cuda()[1:]).cpu(), F.gelu_tanh(x.cuda())[1:].cpu())  # unaligned
    torch.cuda.synchronize()
    return bad


if __name__ == "__main__":
    bad = gae_workload() + ppo_loss_workload() + moments_workload() + logprobs_workload() + lion8bit_workload()
    bad += group_advantages_workload() + gelu_tanh_workload()
    print(f"sanitize workload: {bad} mismatches")
    raise SystemExit(1 if bad else 0)
