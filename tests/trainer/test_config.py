"""PPOConfig: TRL 0.11's fields and defaults, the optimize_cuda_cache alias, validation, CLI parsing."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from ppo_fast import PPOConfig

# TRL 0.11's PPOConfig defaults, written out from its source (fields the trainer fills in are None).
TRL_011_DEFAULTS = {
    "seed": 0,
    "log_with": None,
    "task_name": None,
    "model_name": "gpt2",
    "query_dataset": "stanfordnlp/imdb",
    "reward_model": "sentiment-analysis:lvwerra/distilbert-imdb",
    "remove_unused_columns": True,
    "tracker_kwargs": {},
    "accelerator_kwargs": {},
    "project_kwargs": {},
    "tracker_project_name": "trl",
    "push_to_hub_if_best_kwargs": {},
    "steps": 20000,
    "learning_rate": 1.41e-5,
    "adap_kl_ctrl": True,
    "init_kl_coef": 0.2,
    "kl_penalty": "kl",
    "target": 6.0,
    "horizon": 10000.0,
    "gamma": 1.0,
    "lam": 0.95,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "vf_coef": 0.1,
    "batch_size": 128,
    "forward_batch_size": None,
    "mini_batch_size": 128,
    "gradient_accumulation_steps": 1,
    "world_size": None,
    "ppo_epochs": 4,
    "max_grad_norm": None,
    "optimize_cuda_cache": None,
    "optimize_device_cache": False,
    "early_stopping": False,
    "target_kl": 1.0,
    "compare_steps": 1,
    "ratio_threshold": 10.0,
    "use_score_scaling": False,
    "use_score_norm": False,
    "score_clip": None,
    "whiten_rewards": False,
    "gradient_checkpointing": False,
    "is_encoder_decoder": None,
    "is_peft_model": None,
    "global_backward_batch_size": None,
    "global_batch_size": None,
    "dataset_num_proc": None,
}


def test_every_trl_field_with_its_default():
    config = PPOConfig()
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    missing = set(TRL_011_DEFAULTS) - fields
    assert not missing, missing
    for name, default in TRL_011_DEFAULTS.items():
        assert getattr(config, name) == default, name
    assert config.backward_batch_size == 128  # mini_batch_size x gradient_accumulation_steps
    assert config.total_ppo_epochs == 157  # ceil(steps / batch_size)
    assert "exp_name" in fields


def test_our_fields():
    config = PPOConfig()
    assert config.use_fused_kernels is None  # resolved by the trainer: on when the extension is built
    assert (config.kl_loss_coef, config.kl_estimator, config.dual_clip) == (0.0, "k1", None)
    assert (config.loss_aggregation, config.advantage_whitening) == ("token_mean", "process")


@pytest.mark.parametrize("value", [True, False])
def test_optimize_cuda_cache_is_a_working_alias(value):
    # TRL 0.11 assigned the alias in the class body: it never reached optimize_device_cache.
    assert PPOConfig(optimize_cuda_cache=value).optimize_device_cache is value


def test_mini_batch_size_defaults_to_128_or_the_batch():
    # TRL 0.11's default of 128 made its own guide's PPOConfig(batch_size=1) raise.
    assert PPOConfig(batch_size=1).mini_batch_size == 1
    assert PPOConfig(batch_size=256).mini_batch_size == 128
    with pytest.raises(ValueError, match=r"batch_size \(1\) must be a multiple of mini_batch_size"):
        PPOConfig(batch_size=1, mini_batch_size=128)  # given explicitly: checked, not changed


def test_forward_batch_size_sets_mini_batch_size():
    with pytest.warns(FutureWarning, match="mini_batch_size"):
        config = PPOConfig(batch_size=8, forward_batch_size=4)
    assert config.mini_batch_size == 4


def test_command_line_parsing():
    parser = HfArgumentParser(PPOConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--use_score_scaling", "--use_score_norm", "--score_clip", "0.5", "--log_with", "wandb"]
        + ["--batch_size", "16", "--mini_batch_size", "4", "--tracker_kwargs", '{"wandb": {"mode": "offline"}}']
        + ["--no_adap_kl_ctrl", "--optimize_cuda_cache", "true", "--kl_estimator", "k3"]
    )
    assert config.use_score_scaling and config.use_score_norm and config.score_clip == 0.5
    assert config.log_with == "wandb" and config.tracker_kwargs == {"wandb": {"mode": "offline"}}
    assert (config.batch_size, config.mini_batch_size, config.adap_kl_ctrl) == (16, 4, False)
    assert config.optimize_device_cache is True and config.kl_estimator == "k3"
    assert PPOConfig.from_args(["--gamma", "0.9"]).gamma == 0.9


def test_command_line_rejects_bad_choice():
    with pytest.raises(SystemExit):
        PPOConfig.from_args(["--kl_penalty", "kullback"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=10, mini_batch_size=4), r"batch_size \(10\) must be a multiple of mini_batch_size"),
        (dict(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=4), "batch_size"),
        (dict(mini_batch_size=0), "mini_batch_size must be a positive int"),
        (dict(ppo_epochs=1.5), "ppo_epochs must be a positive int"),
        (dict(kl_penalty="kullback"), "kl_penalty must be one of kl, abs, mse, full"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(loss_aggregation="sum"), "loss_aggregation"),
        (dict(advantage_whitening="node"), "advantage_whitening"),
        (dict(log_with="mlflow"), "log_with"),
        (dict(gamma=1.5), "gamma must be <= 1"),
        (dict(lam=-0.1), "lam must be >= 0"),
        (dict(cliprange=float("nan")), "cliprange must be a finite number"),
        (dict(score_clip=0.0), "score_clip must be > 0"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be > 0"),
        (dict(target=0.0), "target must be > 0"),
        (dict(ratio_threshold=0), "ratio_threshold must be > 0"),
        (dict(tracker_kwargs="{not json"), "tracker_kwargs must be a dict or a JSON object"),
        (dict(use_fused_kernels="yes"), "use_fused_kernels"),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)


def test_score_norm_without_scaling_warns():
    with pytest.warns(UserWarning, match="use_score_norm only takes effect with use_score_scaling"):
        PPOConfig(use_score_norm=True)


def test_to_dict_is_flat_and_complete():
    d = PPOConfig(batch_size=4, mini_batch_size=2).to_dict()
    assert d["batch_size"] == 4 and d["total_ppo_epochs"] == 5000 and d["backward_batch_size"] == 2
    assert set(TRL_011_DEFAULTS) <= set(d)
