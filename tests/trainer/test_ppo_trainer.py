"""PPOTrainer on tiny GPT-2 and Llama models built from configs: one step against PPO's math written
out independently here, fused against reference over whole steps, learning on a rule-based reward,
generation, and bad inputs that must change nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from trainer_utils import VOCAB, make_batch, make_policy, make_tokenizer

from ppo_fast import PPOConfig, PPOTrainer, create_reference_model

TRL_STAT_KEYS = {
    "objective/kl",
    "objective/kl_dist",
    "objective/logprobs",
    "objective/ref_logprobs",
    "objective/kl_coef",
    "objective/entropy",
    "ppo/mean_non_score_reward",
    "ppo/mean_scores",
    "ppo/std_scores",
    "tokens/queries_len_mean",
    "tokens/queries_len_std",
    "tokens/queries_dist",
    "tokens/responses_len_mean",
    "tokens/responses_len_std",
    "tokens/responses_dist",
    "ppo/loss/policy",
    "ppo/loss/value",
    "ppo/loss/total",
    "ppo/policy/entropy",
    "ppo/policy/approxkl",
    "ppo/policy/policykl",
    "ppo/policy/clipfrac",
    "ppo/policy/advantages",
    "ppo/policy/advantages_mean",
    "ppo/policy/ratio",
    "ppo/returns/mean",
    "ppo/returns/var",
    "ppo/val/vpred",
    "ppo/val/error",
    "ppo/val/clipfrac",
    "ppo/val/mean",
    "ppo/val/var",
    "ppo/val/var_explained",
    "ppo/learning_rate",
    "time/ppo/forward_pass",
    "time/ppo/optimize_step",
    "time/ppo/calc_stats",
    "time/ppo/total",
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _scalars(stats):
    return {k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")}


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ the math
def _independent_step_math(initial, ref, queries, responses, scores, kl_coef, gamma, lam, vf_coef):
    """TRL 0.11's PPO loss for one minibatch = the whole batch in its first epoch, in plain torch."""
    seqs = [torch.cat([q, r]) for q, r in zip(queries, responses)]
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.zeros(B, L, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    for j, (q, r, s) in enumerate(zip(queries, responses, seqs)):
        ids[j, : len(s)] = s
        am[j, : len(s)] = 1
        mask[j, len(q) - 1 : len(q) + len(r) - 1] = 1  # position t scores token t + 1

    def forward(model):
        logits, _, values = model(input_ids=ids, attention_mask=am)
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return lp, values[:, :-1]

    with torch.no_grad():
        ref_lp, _ = forward(ref)
        old_lp, old_v = forward(initial)
    kl = old_lp - ref_lp
    rewards = -kl_coef * kl
    for j in range(B):
        last = int(mask[j].nonzero().max())
        rewards[j, last] += scores[j]
    values, rewards = old_v * mask, rewards * mask
    adv = torch.zeros_like(values)
    last_gae = torch.zeros(B)
    T = values.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros(B)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        adv[:, t] = last_gae
    returns = adv + values
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = (((adv - mean) ** 2) * mask).sum() / (n - 1)
    adv = (adv - mean) * torch.rsqrt(var + 1e-8)

    lp, v = forward(initial)  # with gradients
    ratio = torch.exp(lp - old_lp)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    pg_loss = (pg * mask).sum() / n
    vclip = torch.clamp(v, values - 0.2, values + 0.2)
    vf = torch.max((v - returns) ** 2, (vclip - returns) ** 2)
    vf_loss = 0.5 * (vf * mask).sum() / n
    loss = pg_loss + vf_coef * vf_loss
    loss.backward()
    return loss.detach(), vf_loss.detach(), (kl * mask).sum(-1).mean(), returns, mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_step_is_ppo(arch, tokenizer):
    """ppo_epochs=1 and one minibatch with SGD: the update is exactly -lr * grad of TRL's loss."""
    policy = make_policy(arch, seed=3)
    ref = create_reference_model(policy)
    with torch.no_grad():  # a reference that differs, so the KL reward is not zero
        g = torch.Generator().manual_seed(0)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    initial = copy.deepcopy(policy).eval()
    lr = 0.05
    config = PPOConfig(batch_size=6, mini_batch_size=6, ppo_epochs=1, learning_rate=lr, init_kl_coef=0.2)
    trainer = PPOTrainer(config, policy, ref, tokenizer, optimizer=torch.optim.SGD(policy.parameters(), lr=lr))
    queries, responses, scores = make_batch(6, seed=11)
    stats = trainer.step(queries, responses, scores)

    loss, vf_loss, kl, returns, mask = _independent_step_math(
        initial, ref, queries, responses, scores, 0.2, 1.0, 0.95, 0.1
    )
    assert stats["ppo/loss/total"] == pytest.approx(float(loss), rel=1e-4, abs=1e-6)
    assert stats["ppo/loss/value"] == pytest.approx(float(vf_loss), rel=1e-4, abs=1e-6)
    assert stats["objective/kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    assert stats["ppo/returns/mean"] == pytest.approx(float((returns * mask).sum() / mask.sum()), rel=1e-4, abs=1e-6)
    assert stats["ppo/policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # same weights as the rollout
    assert stats["ppo/policy/clipfrac"] == 0.0
    for (name, p), p0 in zip(policy.named_parameters(), initial.parameters()):
        expected = p0.detach() - lr * p0.grad if p0.grad is not None else p0.detach()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)
    assert trainer.current_step == 1


def test_stat_keys_and_shapes(tokenizer):
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2), make_policy(), None, tokenizer)
    queries, responses, scores = make_batch(4, seed=1)
    stats = trainer.step(queries, responses, scores)
    assert TRL_STAT_KEYS <= set(stats), TRL_STAT_KEYS - set(stats)
    for key, value in stats.items():
        assert isinstance(value, (float, np.ndarray)), key
        if isinstance(value, float) and key != "ppo/std_scores":
            assert np.isfinite(value), key
    assert stats["objective/kl"] == 0.0  # the created reference is the policy before any update
    assert stats["objective/kl_dist"].shape == (4,)
    n_tokens = sum(len(r) for r in responses)
    assert stats["ppo/policy/advantages"].shape == (n_tokens,)
    assert stats["ppo/policy/ratio"].shape == (2 * n_tokens,)  # two epochs
    assert stats["tokens/responses_len_mean"] == pytest.approx(np.mean([len(r) for r in responses]))
    assert stats["ppo/mean_scores"] == pytest.approx(float(torch.stack(scores).mean()), rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "options",
    [
        dict(use_score_scaling=True, use_score_norm=True, score_clip=0.5),
        dict(kl_penalty="full", whiten_rewards=True, kl_loss_coef=0.1, kl_estimator="k3", dual_clip=3.0),
        dict(
            kl_penalty="abs", loss_aggregation="seq_mean_token_mean", max_grad_norm=0.5, gradient_accumulation_steps=2
        ),
    ],
    ids=["score-scaling", "full-kl", "abs-seqmean-accum"],
)
def test_fused_matches_reference_over_three_steps(arch, options, tokenizer):
    results = []
    for fused in (True, False):
        policy = make_policy(arch, seed=5)
        config = PPOConfig(
            batch_size=8, mini_batch_size=2, ppo_epochs=2, learning_rate=0.05, use_fused_kernels=fused, **options
        )
        # SGD: Adam would turn rounding noise in exactly-zero gradients (attention key biases) into +-lr steps.
        optimizer = torch.optim.SGD(policy.parameters(), lr=config.learning_rate)
        trainer = PPOTrainer(config, policy, None, tokenizer, optimizer=optimizer)
        assert trainer.use_fused is fused
        history = [trainer.step(*make_batch(8, seed=100 + s)) for s in range(3)]
        results.append((history, _params(policy)))
    (fused_hist, fused_params), (ref_hist, ref_params) = results
    for a, b in zip(fused_hist, ref_hist):
        sa, sb = _scalars(a), _scalars(b)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k] == pytest.approx(sb[k], rel=2e-3, abs=2e-5), k
    for k in fused_params:
        torch.testing.assert_close(fused_params[k], ref_params[k], rtol=2e-3, atol=2e-5, msg=k)


def test_learns_rule_based_reward(tokenizer):
    """Reward = fraction of response tokens from a fixed set of 8 ids: mean reward must rise clearly."""
    torch.manual_seed(0)
    policy = make_policy("gpt2", seed=0)
    config = PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-3, init_kl_coef=0.01, seed=0)
    trainer = PPOTrainer(config, policy, None, tokenizer)
    target = torch.arange(10, 18)
    g = torch.Generator().manual_seed(7)
    rewards = []
    for _ in range(30):
        queries = [torch.randint(3, VOCAB, (4,), generator=g) for _ in range(16)]
        responses = trainer.generate(
            queries, return_prompt=False, batch_size=16, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0
        )
        scores = [torch.isin(r, target).float().mean() for r in responses]
        rewards.append(float(torch.stack(scores).mean()))
        trainer.step(queries, responses, scores)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert first < 0.2, rewards
    assert last > 0.6 and last > first + 0.4, rewards


def test_generate_batched_matches_one_by_one(tokenizer):
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), make_policy("llama"), None, tokenizer)
    queries = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12]), torch.tensor([20, 21, 22])]
    greedy = dict(do_sample=False, max_new_tokens=5)
    batched = trainer.generate(queries, batch_size=3, return_prompt=False, **greedy)
    for q, out in zip(queries, batched):
        single = trainer.generate(q, return_prompt=False, **greedy)
        assert single.shape == (1, 5)
        torch.testing.assert_close(out, single[0])  # left padding does not change the continuation
    with_prompt = trainer.generate(queries, batch_size=2, **greedy)
    for q, out, resp in zip(queries, with_prompt, batched):
        torch.testing.assert_close(out, torch.cat([q, resp]))
    lengths = iter([2, 3])
    sampled = trainer.generate(
        queries, batch_size=2, return_prompt=False, length_sampler=lambda: next(lengths), do_sample=False
    )
    assert [len(s) for s in sampled] == [2, 2, 3]


def test_generate_cuts_after_eos(tokenizer):
    policy = make_policy("gpt2")
    with torch.no_grad():  # make EOS (id 2) the certain next token
        policy.pretrained_model.lm_head.weight.zero_()
        policy.pretrained_model.transformer.ln_f.bias.fill_(1.0)
        policy.pretrained_model.lm_head.weight[2].fill_(1.0)
    trainer = PPOTrainer(PPOConfig(batch_size=1, mini_batch_size=1), policy, None, tokenizer)
    (out,) = trainer.generate([torch.tensor([5, 6])], return_prompt=False, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, torch.tensor([2]))


def test_response_masks_exclude_tokens(tokenizer):
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1), make_policy(), None, tokenizer)
    queries, responses, scores = make_batch(2, seed=3, r_len=(4, 6))
    masks = [torch.tensor([1] * (len(r) - 2) + [0, 0]) for r in responses]
    stats = trainer.step(queries, responses, scores, response_masks=masks)
    assert stats["ppo/policy/advantages"].shape == (sum(len(r) - 2 for r in responses),)


# ------------------------------------------------------------------------------------ bad input
def _state(trainer):
    return (
        trainer.current_step,
        trainer.running.state.clone(),
        trainer.kl_ctl.value,
        [p.detach().clone() for p in trainer.model.parameters()],
        torch.get_rng_state(),
    )


def _assert_same_state(a, b):
    assert a[0] == b[0] and a[2] == b[2]
    torch.testing.assert_close(a[1], b[1])
    for x, y in zip(a[3], b[3]):
        assert torch.equal(x, y)
    assert torch.equal(a[4], b[4])


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, r, s: (q[:3], r, s), ValueError, r"queries has 3 elements but config.batch_size is 4"),
        (lambda q, r, s: (q, r[:5] + r, s), ValueError, "responses has"),
        (lambda q, r, s: (q, r, s[:2]), ValueError, "scores has 2 elements"),
        (
            lambda q, r, s: (q, r[:1] + [torch.tensor([], dtype=torch.long)] + r[2:], s),
            ValueError,
            r"responses\[1\] is empty",
        ),
        (lambda q, r, s: (q, r, s[:3] + [0.5]), TypeError, r"scores\[3\] must be a tensor, got float"),
        (
            lambda q, r, s: (q, r, s[:1] + [torch.tensor(float("nan"))] + s[2:]),
            ValueError,
            r"scores must be finite; NaN or inf at \[1\]",
        ),
        (lambda q, r, s: (q, r, s[:1] + [torch.ones(2)] + s[2:]), ValueError, r"scores\[1\] must hold one real number"),
        (lambda q, r, s: ([q[0][None]] + q[1:], r, s), ValueError, r"queries\[0\] must be a 1-D tensor of token ids"),
        (
            lambda q, r, s: (q, [r[0].float()] + r[1:], s),
            ValueError,
            r"responses\[0\] must be a 1-D tensor of token ids",
        ),
        (
            lambda q, r, s: (q, r, s[:1] + [torch.tensor(1.0, device="meta")] + s[2:]),
            ValueError,
            r"scores\[1\] is on meta",
        ),
        (lambda q, r, s: (torch.stack([x[:1] for x in q]), r, s), TypeError, "queries must be a list of tensors"),
        (lambda q, r, s: (q, [r[0] + VOCAB] + r[1:], s), ValueError, r"token ids must be in \[0, 96\)"),
    ],
)
def test_bad_input_raises_and_changes_nothing(mutate, error, match, tokenizer):
    config = PPOConfig(batch_size=4, mini_batch_size=2, use_score_scaling=True)
    trainer = PPOTrainer(config, make_policy(), None, tokenizer)
    trainer.step(*make_batch(4, seed=0))
    before = _state(trainer)
    with pytest.raises(error, match=match):
        trainer.step(*mutate(*make_batch(4, seed=1)))
    _assert_same_state(before, _state(trainer))


def test_bad_constructor_arguments(tokenizer):
    policy = make_policy()
    with pytest.raises(TypeError, match="config must be a PPOConfig"):
        PPOTrainer({"batch_size": 1}, policy, None, tokenizer)
    with pytest.raises(TypeError, match="model must be an AutoModelForCausalLMWithValueHead"):
        PPOTrainer(PPOConfig(), policy.pretrained_model, None, tokenizer)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        PPOTrainer(PPOConfig(), policy, None, tokenizer, optimizer="adam")
    with pytest.raises(TypeError, match="lr_scheduler must have a step"):
        PPOTrainer(PPOConfig(), policy, None, tokenizer, lr_scheduler=0.9)
    with pytest.raises(ValueError, match="ref_model must not be the policy"):
        PPOTrainer(PPOConfig(), policy, policy, tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        PPOTrainer(PPOConfig(), policy, None, None)
