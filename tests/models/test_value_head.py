"""AutoModelForCausalLMWithValueHead: outputs, TRL's state_dict layout, save/load round trips, argument checks."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from tiny_models import ARCHS, VOCAB

from ppo_fast import AutoModelForCausalLMWithValueHead
from ppo_fast.models import ValueHead


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_dtypes(arch, make_lm, tokens):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm(arch))
    input_ids, attention_mask = tokens
    logits, loss, value = model(input_ids, attention_mask=attention_mask)
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == torch.float32
    assert loss is None
    assert value.shape == (2, 7) and value.dtype == torch.float32

    logits, loss, value = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    assert loss.shape == () and torch.isfinite(loss)

    # The value is the head applied to the last hidden state (dropout off in eval mode).
    model.eval()
    _, _, value = model(input_ids, attention_mask=attention_mask)
    hidden = model.pretrained_model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(value, model.v_head.summary(hidden[-1]).squeeze(-1), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_model_keeps_fp32_outputs(arch, make_lm, tokens, tmp_path):
    make_lm(arch).save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.pretrained_model.dtype == torch.bfloat16  # the keyword reached transformers
    assert model.v_head.summary.weight.dtype == torch.float32
    logits, _, value = model(tokens[0])
    assert logits.dtype == torch.float32 and value.dtype == torch.float32  # TRL upcasts both

    model.upcast_logits = False  # for log-prob kernels that read bf16 logits directly
    logits, _, value = model(tokens[0])
    assert logits.dtype == torch.bfloat16 and value.dtype == torch.float32


def test_past_key_values_and_generate_delegate(make_lm, tokens):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2")).eval()
    input_ids = tokens[0]
    full_logits, _, full_value = model(input_ids)
    _, _, _, cache = model(input_ids[:, :-1], use_cache=True, return_past_key_values=True)
    step_logits, _, step_value = model(input_ids[:, -1:], past_key_values=cache)
    torch.testing.assert_close(step_logits[:, 0], full_logits[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_value[:, 0], full_value[:, -1], rtol=1e-5, atol=1e-5)

    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids, **kwargs)
    assert out.shape == (2, 11)
    assert torch.equal(out, model.pretrained_model.generate(input_ids, **kwargs))


def test_state_dict_layout_is_trls(make_lm):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2"))
    keys = list(model.state_dict())
    assert keys[-2:] == ["v_head.summary.weight", "v_head.summary.bias"]
    assert "transformer.h.0.attn.c_attn.weight" in keys and not any(k.startswith("pretrained_model.") for k in keys)

    other = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2", seed=1))
    other.load_state_dict(model.state_dict())  # TRL's layout loads back...
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    nested = torch.nn.ModuleDict({"policy": other})  # ...also when the model sits inside another module
    nested.load_state_dict({f"policy.{k}": v for k, v in model.state_dict().items()})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**model.state_dict(), "v_head.bogus": torch.zeros(1)})


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(arch, make_lm, tokens, tmp_path, caplog):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm(arch), v_head_init_strategy="normal")
    with torch.no_grad():
        model.v_head.summary.bias.fill_(0.25)  # something a fresh head would not have
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {"v_head.summary.weight", "v_head.summary.bias"} <= set(f.keys())  # where TRL 0.11 looks

    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert "LOAD REPORT" not in caplog.text  # our own v_head keys are not reported as unexpected
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    model.eval(), loaded.eval()
    input_ids, attention_mask = tokens
    for a, b in zip(model(input_ids, attention_mask=attention_mask), loaded(input_ids, attention_mask=attention_mask)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_save_pretrained_takes_module_path_state_dicts(make_lm, tmp_path):
    """DeepSpeed's consolidated ZeRO-3 state dict names parameters by module path (``pretrained_model.*``)."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("llama"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # not what a fresh model or the base checkpoint holds
    module_paths = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert all(k.startswith(("pretrained_model.", "v_head.")) for k in module_paths)
    model.save_pretrained(tmp_path, state_dict=module_paths)
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_loads_bin_sharded_and_plain_checkpoints(make_lm, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("llama"))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)  # TRL 0.11's pytorch_model.bin
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "bin")
    assert torch.equal(loaded.v_head.summary.weight, model.v_head.summary.weight)

    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "sharded")
    assert torch.equal(loaded.v_head.summary.weight, model.v_head.summary.weight)

    make_lm("llama").save_pretrained(tmp_path / "plain")  # a checkpoint without a value head: fresh one
    torch.manual_seed(7)
    fresh = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "plain")
    torch.manual_seed(7)
    expected = torch.nn.Linear(32, 1)  # TRL's default init is nn.Linear's
    assert torch.equal(fresh.v_head.summary.weight, expected.weight)


def test_value_head_options(make_lm):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2"))
    assert isinstance(model.v_head, ValueHead) and model.v_head.dropout.p == 0.1
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        make_lm("gpt2"), summary_dropout_prob=0.0, v_head_init_strategy="normal", v_head_initializer_range=0.5
    )
    assert isinstance(model.v_head.dropout, torch.nn.Identity)
    assert torch.count_nonzero(model.v_head.summary.bias) == 0
    assert 0.2 < model.v_head.summary.weight.std() < 1.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(summary_dropout_prob=1.5), ValueError, "summary_dropout_prob"),
        (dict(v_head_init_strategy="xavier"), ValueError, "v_head_init_strategy"),
        (dict(v_head_initializer_range=0), ValueError, "v_head_initializer_range"),
        (dict(upcast_logits="yes"), TypeError, "upcast_logits"),
        (dict(reward_adapter="rm"), NotImplementedError, "reward_adapter"),
        (dict(dtype=torch.float16), TypeError, "already-built"),
        (dict(peft_config="lora"), TypeError, "peft_config"),
        (dict(is_trainable=1), TypeError, "is_trainable"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match, make_lm):
    with pytest.raises(error, match=match):
        AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2"), **kwargs)


def test_bad_model_arguments(make_lm, tmp_path):
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        AutoModelForCausalLMWithValueHead.from_pretrained(42)
    with pytest.raises(TypeError, match="pretrained_model must be"):
        AutoModelForCausalLMWithValueHead(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        AutoModelForCausalLMWithValueHead(make_lm("gpt2"), summary_dropout=0.1)
    make_lm("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="load_in_8bit=True or quantization_config"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, load_in_8bit=True, quantization_config={})
    with pytest.raises(ValueError, match="together"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, load_in_8bit=True, load_in_4bit=True)


def test_dtype_casts_of_a_plain_model_still_work(make_lm):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2"))
    assert model.to(torch.float64).v_head.summary.weight.dtype == torch.float64
    assert model.float().pretrained_model.dtype == torch.float32
    assert model.to("cpu") is model


def test_load_report_filter_keeps_reports_about_other_keys():
    from ppo_fast.models._loading import _DropValueHeadReport

    def record(rows):
        table = "Key | Status |  | \n----+----+--+-\n" + "".join(f"{k} | {s} |  | \n" for k, s in rows)
        message = f"\x1b[1mGPT2LMHeadModel LOAD REPORT\x1b[0m from: d\n{table}\nNotes:\n- UNEXPECTED: ..."
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, message, None, None)

    keep = _DropValueHeadReport().filter
    assert not keep(record([("v_head.summary.weight", "UNEXPECTED"), ("v_head.summary.bias", "UNEXPECTED")]))
    assert keep(record([("v_head.summary.weight", "UNEXPECTED"), ("transformer.h.0.ln_1.weight", "MISSING")]))
    assert keep(record([("lm_head.weight", "UNEXPECTED")]))
    assert keep(logging.LogRecord("x", logging.WARNING, "", 0, "something else", None, None))
