"""A LoRA policy is its own reference: the adapter-disabled forward, saving and loading the adapter with the head."""

from __future__ import annotations

import pytest
import torch

from ppo_fast import AutoModelForCausalLMWithValueHead

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning", "ignore:fan_in_fan_out:UserWarning")


def _lora(arch="gpt2"):
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[arch]
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")


def _step(model, input_ids):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    logits, _, value = model(input_ids)
    (logits.logsumexp(-1).mean() + value.pow(2).mean()).backward()
    optimizer.step()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_disabled_adapter_is_the_reference(arch, make_lm, tokens, tmp_path):
    make_lm(arch).save_pretrained(tmp_path)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, peft_config=_lora(arch))
    assert policy.is_peft_model
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)

    policy.eval()
    input_ids, attention_mask = tokens
    base = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        base_logits = base(input_ids, attention_mask=attention_mask)[0]
        with policy.disable_adapter():
            ref_before = policy(input_ids, attention_mask=attention_mask)[0]
    torch.testing.assert_close(ref_before, base_logits, rtol=0, atol=0)

    _step(policy, input_ids)
    with torch.no_grad():
        enabled = policy(input_ids, attention_mask=attention_mask)[0]
        with policy.disable_adapter():
            disabled = policy(input_ids, attention_mask=attention_mask)[0]
        enabled_again = policy(input_ids, attention_mask=attention_mask)[0]
    assert (enabled - disabled).abs().max() > 1e-3  # the adapter learned something...
    assert torch.equal(disabled, ref_before)  # ...and the reference (adapter off) did not move
    assert torch.equal(enabled_again, enabled)  # the adapter is back on after the block


def test_adapter_from_a_model_instance_and_transformers_adapters(make_lm, tokens):
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("llama"), peft_config=_lora("llama"))
    assert isinstance(policy.pretrained_model, peft.PeftModel)

    # transformers' own adapter integration (model.add_adapter; it needs a newer peft than PyPI has today, so
    # its switch is stood in for here): disable_adapter turns the adapters off for the block, and back on.
    lm = make_lm("llama")
    calls = []
    lm._hf_peft_config_loaded = True
    lm.disable_adapters = lambda: calls.append("off")
    lm.enable_adapters = lambda: calls.append("on")
    policy = AutoModelForCausalLMWithValueHead(lm)
    assert policy.is_peft_model
    with pytest.raises(KeyError), policy.disable_adapter():
        assert calls == ["off"]
        raise KeyError("the adapter comes back on even when the block raises")
    assert calls == ["off", "on"]


def test_bad_option_leaves_the_model_without_an_adapter(make_lm):
    lm = make_lm("gpt2")
    with pytest.raises(ValueError, match="summary_dropout_prob"):
        AutoModelForCausalLMWithValueHead.from_pretrained(lm, peft_config=_lora(), summary_dropout_prob=2.0)
    assert not any("lora_" in n for n, _ in lm.named_parameters())


def test_no_adapter_means_no_disable_adapter(make_lm):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(make_lm("gpt2"))
    assert not model.is_peft_model
    with pytest.raises(ValueError, match="no PEFT adapter"), model.disable_adapter():
        pass


def test_save_load_adapter_with_value_head(make_lm, tokens, tmp_path):
    make_lm("gpt2").save_pretrained(tmp_path / "base")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "base", peft_config=_lora())
    _step(policy, tokens[0])
    policy.save_pretrained(tmp_path / "policy")
    files = {p.name for p in (tmp_path / "policy").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= files
    assert "model.safetensors" not in files  # the frozen base is not duplicated

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy", is_trainable=True)
    assert loaded.is_peft_model and loaded.v_head.summary.weight.requires_grad
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    policy.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(policy(tokens[0]), loaded(tokens[0])):
            assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="drop peft_config"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy", peft_config=_lora())


def test_lora_on_an_8bit_model(make_lm, tokens, tmp_path):
    pytest.importorskip("bitsandbytes")
    make_lm("llama").save_pretrained(tmp_path)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path, load_in_8bit=True, peft_config=_lora("llama"), use_gradient_checkpointing=False
    )
    assert policy.is_loaded_in_8bit and policy.is_peft_model
    _step(policy, tokens[0])
    with torch.no_grad(), policy.disable_adapter():
        logits, _, value = policy(tokens[0])
    assert torch.isfinite(logits).all() and value.shape == (2, 7)
