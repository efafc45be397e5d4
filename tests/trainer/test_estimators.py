"""PPOTrainer with the value-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++ and its group
baseline), GSPO's sequence-level ratio and DAPO's clip-higher, on tiny models built from configs.

The advantages the trainer uses (``stats["ppo/policy/advantages"]``, every response token in order) are checked
against the estimators' formulas written out here from the scores and an independent forward pass of the
policy and the reference (the KL reward: verl's use_kl_in_reward, the outcome being the score plus the sum of
the per-token ``-kl_coef * kl``). Where ppo_fast differs from verl on purpose: a group of one gets advantage 0
for every group estimator (verl keeps the score for rloo and reinforce_pp_baseline and divides it by 1 + eps
for grpo); PPOConfig refuses group_size 1 with a group estimator, so that case only reaches the op
(tests/ops/test_group_advantages.py). REINFORCE++'s return scan continues through masked positions inside a
response (GAE's rule) where verl's resets; with right-padded responses, as here, they agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_utils import build_lm, make_batch, make_policy, make_tokenizer

from ppo_fast import PPOConfig, PPOTrainer, create_reference_model
from ppo_fast import functional as F
from ppo_fast.trainer import estimators

KL_COEF = 0.1
GROUP = 4
BATCH = 8
VALUE_KEYS = {k for k in estimators.VALUE_STATS}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _perturbed_reference(policy, seed=0):
    """A frozen copy of the policy, moved a little, so the KL rewards are not zero."""
    ref = create_reference_model(policy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


def _logprobs(model, queries, responses):
    """Per-token log-probs [B, L - 1] of the padded sequences and the response mask, computed plainly."""
    seqs = [torch.cat([q, r]) for q, r in zip(queries, responses)]
    B, L = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, L, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L - 1, dtype=torch.bool)
    for j, (q, r, s) in enumerate(zip(queries, responses, seqs)):
        ids[j, : len(s)] = s
        am[j, : len(s)] = 1
        mask[j, len(q) - 1 : len(q) + len(r) - 1] = True  # position t scores token t + 1
    with torch.no_grad():
        logits, _, _ = model(input_ids=ids, attention_mask=am)
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp, mask


def _whiten(x, m):
    vals = x[m]
    return (x - vals.mean()) / torch.sqrt(vals.var() + 1e-8)  # Bessel-corrected, as TRL's masked_whiten


def expected_advantages(estimator, scores, kl, mask, n, gamma=1.0):
    """The estimator's per-token advantages at the response tokens (row-major), float64."""
    B, T = mask.shape
    non_score = torch.where(mask, -KL_COEF * kl, 0.0)
    if estimator == "reinforce_pp":
        rewards = non_score.clone()
        for b in range(B):
            rewards[b, int(mask[b].nonzero().max())] += scores[b]
        returns = torch.zeros_like(rewards)
        running = torch.zeros(B, dtype=torch.float64)
        for t in reversed(range(T)):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
        return _whiten(returns, mask)[mask]
    total = scores + non_score.sum(-1)
    seq = torch.empty(B, dtype=torch.float64)
    for g0 in range(0, B, n):
        grp = total[g0 : g0 + n]
        for i in range(n):
            s = grp[i]
            if estimator == "grpo":
                seq[g0 + i] = (s - grp.mean()) / (grp.std() + 1e-6)
            elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
                seq[g0 + i] = s - grp.mean()
            elif estimator == "rloo":
                seq[g0 + i] = s - (grp.sum() - s) / (n - 1)
    adv = seq[:, None].expand(B, T)
    if estimator == "reinforce_pp_baseline":
        adv = _whiten(adv, mask)
    return adv[mask]


def _config(estimator, fused, **kw):
    kw.setdefault("group_size", 1 if estimator == "reinforce_pp" else GROUP)
    kw.setdefault("mini_batch_size", 4)
    return PPOConfig(
        batch_size=BATCH,
        ppo_epochs=2,
        learning_rate=0.05,
        init_kl_coef=KL_COEF,
        adap_kl_ctrl=False,
        advantage_estimator=estimator,
        use_fused_kernels=fused,
        **kw,
    )


def _run(config, tokenizer, batches, arch="gpt2"):
    policy = make_policy(arch, seed=5)
    ref = _perturbed_reference(policy)
    initial = copy.deepcopy(policy).eval()
    trainer = PPOTrainer(config, policy, ref, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=0.05))
    history = [trainer.step(*b) for b in batches]
    return trainer, initial, ref, history


def _scalars(stats):
    return {k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")}


CASES = {
    "grpo-score-norm-llama": ("grpo", dict(use_score_scaling=True, use_score_norm=True, score_clip=1.5)),
    "dr_grpo": ("dr_grpo", dict(loss_aggregation="seq_mean_token_sum")),
    "rloo": ("rloo", dict(kl_penalty="abs")),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", {}),
    "reinforce_pp": ("reinforce_pp", dict(gamma=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_uses_the_estimators_advantages(case, tokenizer):
    """A whole step: the trainer's advantages are the formula's, fused and eager agree (statistics
    and parameters), the value head gets no gradient and its statistics are left out."""
    estimator, options = CASES[case]
    arch = "llama" if case.endswith("llama") else "gpt2"
    batches = [make_batch(BATCH, seed=40)]
    runs = {}
    for fused in (True, False):
        runs[fused] = _run(_config(estimator, fused, **options), tokenizer, batches, arch)
    trainer, initial, ref, history = runs[True]

    queries, responses, scores = batches[0]
    lp, mask = _logprobs(initial, queries, responses)
    ref_lp, _ = _logprobs(ref, queries, responses)
    d = lp - ref_lp
    kl = d.abs() if options.get("kl_penalty") == "abs" else d
    s = torch.stack(scores).double()
    if options.get("use_score_scaling"):  # the first batch's own moments, then the clip: before the group step
        s = ((s - s.mean()) / (s.std() + torch.finfo(torch.float32).eps)).clamp(-1.5, 1.5)
    want = expected_advantages(estimator, s, kl, mask, trainer.config.group_size, options.get("gamma", 1.0))
    for fused in (True, False):
        got = torch.from_numpy(runs[fused][3][0]["ppo/policy/advantages"]).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, f=fused: f"fused={f}: {m}")

    for a, b in zip(runs[True][3], runs[False][3], strict=True):
        sa, sb = _scalars(a), _scalars(b)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k] == pytest.approx(sb[k], rel=2e-3, abs=2e-5), k
    for (name, p), q in zip(runs[True][0].model.named_parameters(), runs[False][0].model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-5, msg=name)

    model = trainer.model
    for p, p0 in zip(model.v_head.parameters(), initial.v_head.parameters()):
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, p0)  # not trained
    moved = [
        not torch.equal(p, p0)
        for p, p0 in zip(model.pretrained_model.parameters(), initial.pretrained_model.parameters())
    ]
    assert any(moved)  # the policy itself did train
    assert not VALUE_KEYS & set(history[0]), VALUE_KEYS & set(history[0])
    assert "ppo/loss/policy" in history[0] and "ppo/returns/mean" in history[0]


def test_gae_keeps_the_value_head(tokenizer):
    trainer, initial, _, history = _run(_config("gae", True, group_size=1), tokenizer, [make_batch(BATCH, seed=1)])
    assert VALUE_KEYS <= set(history[0])
    v, v0 = trainer.model.v_head.summary.weight, initial.v_head.summary.weight
    assert v.requires_grad and not torch.equal(v, v0)


def test_plain_causal_lm_is_accepted_without_a_value_head(tokenizer):
    lm = build_lm("llama", seed=2)
    config = _config("rloo", True)
    trainer = PPOTrainer(config, lm, None, tokenizer)
    stats = trainer.step(*make_batch(BATCH, seed=3))
    assert trainer.model.pretrained_model is lm and not trainer.model.v_head.summary.weight.requires_grad
    assert "ppo/loss/policy" in stats
    with pytest.raises(TypeError, match="model must be an AutoModelForCausalLMWithValueHead"):
        PPOTrainer(PPOConfig(batch_size=BATCH), build_lm("llama", seed=2), None, tokenizer)


# ------------------------------------------------------------------------------------------------
# GSPO: the sequence-level ratio


def test_gspo_logprobs_value_gradient_and_kl():
    """logp' = old + sg(mean_t(logp - old)) + logp - sg(logp): the ratio exp(logp' - old) is each row's
    length-normalised sequence ratio, d logp' / d logp is the identity, and logp' - ref' = logp - ref."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_()
    ref = old + 0.2 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    cfg = PPOConfig(batch_size=3, importance_sampling_level="sequence")
    out, ref_out = estimators.importance_logprobs(cfg, logp, old, ref, mask)
    for b in range(3):
        m = mask[b]
        s = torch.exp((logp[b, m] - old[b, m]).mean())
        torch.testing.assert_close(torch.exp(out[b, m] - old[b, m]), s.expand(int(m.sum())).detach())
    torch.testing.assert_close((out - ref_out)[mask], (logp - ref)[mask].detach())
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * out).sum(), logp)
    torch.testing.assert_close(grad, w)
    token = PPOConfig(batch_size=3)
    same, same_ref = estimators.importance_logprobs(token, logp, old, ref, mask)
    assert same is logp and same_ref is ref


def test_gspo_step(tokenizer):
    """With importance_sampling_level="sequence" every response token of a row sees the same ratio (1 in the first
    epoch, the row's sequence ratio after an update), and fused and eager agree."""
    batch = make_batch(BATCH, seed=7, r_len=(5, 6))  # equal response lengths: the ratios reshape by row
    hist = {}
    for fused in (True, False):
        config = _config("grpo", fused, importance_sampling_level="sequence", mini_batch_size=BATCH)
        _, _, _, hist[fused] = _run(config, tokenizer, [batch])
    ratios = hist[True][0]["ppo/policy/ratio"].reshape(2, BATCH, 5)  # epoch, row, token
    assert (ratios[0] == 1.0).all()
    assert abs(ratios[1] - 1.0).max() > 1e-4  # the first epoch moved the policy
    torch.testing.assert_close(torch.from_numpy(ratios[1]), torch.from_numpy(ratios[1][:, :1]).expand(BATCH, 5))
    for k, v in _scalars(hist[True][0]).items():
        assert v == pytest.approx(_scalars(hist[False][0])[k], rel=2e-3, abs=2e-5), k


# ------------------------------------------------------------------------------------------------
# What reaches the loss op


class _Spy:
    """functional.backend(...) whose ppo_loss records its positional arguments."""

    def __init__(self, inner, calls):
        self._inner, self._calls = inner, calls

    def __getattr__(self, name):
        fn = getattr(self._inner, name)
        if name != "ppo_loss":
            return fn

        def spy(*args):
            self._calls.append(args)
            return fn(*args)

        return spy


def test_cliprange_high_and_vf_coef_reach_the_loss(tokenizer, monkeypatch):
    real = F.backend
    for estimator, high, vf, fused in (("grpo", 0.28, 0.0, True), ("gae", None, 0.1, False)):
        calls = []
        monkeypatch.setattr(F, "backend", lambda use_fused=None, c=calls: _Spy(real(use_fused), c))
        group = GROUP if estimator == "grpo" else 1
        _run(_config(estimator, fused, group_size=group, cliprange_high=high), tokenizer, [make_batch(BATCH, seed=2)])
        monkeypatch.setattr(F, "backend", real)
        assert len(calls) == 4  # 2 epochs x 2 minibatches
        for args in calls:
            assert args[8] == 0.2 and args[10] == vf and args[17] == high  # cliprange, vf_coef, cliprange_high
            if estimator == "grpo":  # vpreds = old values = returns: the value term is exactly 0
                assert torch.equal(args[1], args[3]) and torch.equal(args[1], args[5])


# ------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(advantage_estimator="ppo"), r"advantage_estimator must be one of gae, grpo, dr_grpo, rloo"),
        (dict(advantage_estimator="grpo"), r"group_size must be >= 2 with advantage_estimator='grpo', .* \(got 1\)"),
        (dict(advantage_estimator="rloo", group_size=1), r"group_size must be >= 2 with advantage_estimator='rloo'"),
        (dict(group_size=4), r"group_size must be 1 with advantage_estimator='gae', which uses no groups \(got 4\)"),
        (dict(advantage_estimator="reinforce_pp", group_size=2), r"group_size must be 1 with .*'reinforce_pp'"),
        (dict(advantage_estimator="grpo", group_size=3), r"batch_size \(8, per process\) must be a multiple of group"),
        (dict(advantage_estimator="grpo", group_size=0), r"group_size must be a positive int, got 0"),
        (dict(advantage_estimator="grpo", group_size=True), r"group_size must be a positive int, got True"),
        (dict(advantage_estimator="grpo", group_size=4, whiten_rewards=True), r"whiten_rewards whitens"),
        (dict(importance_sampling_level="seq"), r"importance_sampling_level must be one of token, sequence"),
        (dict(cliprange_high=-0.1), r"cliprange_high must be >= 0.0"),
        (dict(cliprange_high=float("nan")), r"cliprange_high must be a finite number"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=r"^PPOConfig: " + match):
        PPOConfig(batch_size=8, **kwargs)


def test_config_from_args():
    config = PPOConfig.from_args(
        ["--advantage_estimator", "rloo", "--group_size", "4", "--batch_size", "8", "--cliprange_high", "0.28"]
        + ["--importance_sampling_level", "sequence"]
    )
    assert (config.advantage_estimator, config.group_size, config.cliprange_high) == ("rloo", 4, 0.28)
    assert config.importance_sampling_level == "sequence" and not config.uses_value_head
