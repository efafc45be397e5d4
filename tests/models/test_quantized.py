"""8-bit (and 4-bit) reference models through bitsandbytes on CPU: the guide's spelling, the config, clear errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from ppo_fast import AutoModelForCausalLMWithValueHead
from ppo_fast.models import parameter_bytes

pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")


@pytest.fixture
def saved(make_lm, tmp_path):
    """``saved(arch)``: an fp32 policy saved with its value head, and the directory."""

    def save(arch):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            make_lm(arch, n_layer=2), v_head_init_strategy="normal"
        )
        model.save_pretrained(tmp_path / arch)
        return model.eval(), tmp_path / arch

    return save


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("spelling", ["load_in_8bit", "quantization_config"])
def test_8bit_reference_loads_and_runs(arch, spelling, saved, tokens):
    fp32, path = saved(arch)
    if spelling == "load_in_8bit":  # the guide's spelling, which transformers 5 itself rejects
        ref = AutoModelForCausalLMWithValueHead.from_pretrained(path, device_map="auto", load_in_8bit=True)
    else:
        ref = AutoModelForCausalLMWithValueHead.from_pretrained(
            path, device_map="auto", quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )
    assert ref.is_loaded_in_8bit and ref.is_quantized and not ref.is_loaded_in_4bit
    int8 = [n for n, p in ref.pretrained_model.named_parameters() if p.dtype == torch.int8]
    assert int8 and all(".0." in n or ".1." in n for n in int8)  # the blocks' linear layers, not the heads
    assert parameter_bytes(ref) < 0.75 * parameter_bytes(fp32)
    assert ref.v_head.summary.weight.dtype == torch.float32
    assert torch.equal(ref.v_head.summary.weight, fp32.v_head.summary.weight)  # loaded, not re-initialised

    input_ids, attention_mask = tokens
    with torch.no_grad():
        logits, _, value = ref.eval()(input_ids, attention_mask=attention_mask)
        ref_logits, _, ref_value = fp32(input_ids, attention_mask=attention_mask)
    assert logits.shape == ref_logits.shape and logits.dtype == torch.float32 and value.shape == (2, 7)
    # int8 weights: close to the fp32 model, not equal to it.
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() < 0.1 * scale
    assert (value - ref_value).abs().max() < 0.1 * ref_value.abs().max() + 1e-3


def test_4bit_spelling_loads(saved, tokens):
    _, path = saved("llama")
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(
        path, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32
    )
    assert ref.is_loaded_in_4bit
    config = ref.pretrained_model.config.quantization_config
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.float32  # the extra keyword went in
    logits, _, value = ref(tokens[0])
    assert torch.isfinite(logits).all() and value.shape == (2, 7)


def test_quantized_model_refuses_dtype_casts(saved):
    _, path = saved("gpt2")
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(path, load_in_8bit=True)
    for cast in (lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.bfloat16), lambda m: m.half()):
        with pytest.raises(ValueError, match="quantized"):
            cast(ref)
    assert ref.pretrained_model.transformer.h[0].attn.c_attn.weight.dtype == torch.int8


def test_missing_bitsandbytes_is_a_clear_error(saved, monkeypatch):
    _, path = saved("gpt2")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError) as err:
        AutoModelForCausalLMWithValueHead.from_pretrained(path, device_map="auto", load_in_8bit=True)
    message = str(err.value)
    assert "load_in_8bit needs bitsandbytes" in message and "ppo_fast[bnb]" in message
    assert "dtype=torch.bfloat16" in message and "num_shared_layers" in message


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_bitsandbytes_failure_says_why_and_what_instead(saved, monkeypatch):
    _, path = saved("gpt2")

    def fail(*args, **kwargs):
        raise RuntimeError("no int8 kernel for this device")

    monkeypatch.setattr(AutoModelForCausalLMWithValueHead.transformers_parent_class, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="no int8 kernel") as err:
        AutoModelForCausalLMWithValueHead.from_pretrained(path, load_in_8bit=True)
    note = "\n".join(err.value.__notes__)
    assert "bitsandbytes" in note and "could not quantize" in note and "num_shared_layers" in note
