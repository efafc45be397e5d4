"""create_reference_model: shared storage, measured memory, frozen shared layers, tied embeddings, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS

from ppo_fast import AutoModelForCausalLMWithValueHead, create_reference_model
from ppo_fast.models import LAYER_PATTERNS, parameter_bytes

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "gpt_neox": "gpt_neox.layers"}
# What runs before the blocks, shared with them (GPT-2's wte, tied to its LM head, by default as in TRL).
EMBEDDINGS = {
    "gpt2": ["transformer.wpe", "transformer.wte"],
    "llama": ["model.embed_tokens"],
    "gpt_neox": ["gpt_neox.embed_in"],
}


def _policy(make_lm, arch, n_layer=2, **overrides):
    return AutoModelForCausalLMWithValueHead.from_pretrained(make_lm(arch, n_layer=n_layer, **overrides))


def _params(model, prefix):
    return {n: p for n, p in model.pretrained_model.named_parameters() if n.startswith(prefix + ".")}


def _snapshot(model):
    return {n: (p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()}


def test_full_copy_shares_nothing_and_is_frozen(make_lm, tokens):
    policy = _policy(make_lm, "llama")
    ref = create_reference_model(policy)
    assert not ref.training and policy.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    assert not {p.data_ptr() for p in policy.parameters()} & {p.data_ptr() for p in ref.parameters()}
    policy.eval()
    for a, b in zip(policy(tokens[0]), ref(tokens[0])):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_layers_are_the_same_storage(arch, make_lm):
    policy = _policy(make_lm, arch, n_layer=4)
    ref = create_reference_model(policy, num_shared_layers=2)
    blocks = BLOCKS[arch]
    shared = [f"{blocks}.0", f"{blocks}.1", *EMBEDDINGS[arch]]
    copied = [f"{blocks}.2", f"{blocks}.3"]
    for prefix in shared:
        for (name, p), q in zip(_params(policy, prefix).items(), _params(ref, prefix).values()):
            assert p is q and p.data_ptr() == q.data_ptr(), name
            assert not p.requires_grad, f"{name} must be frozen in the policy"
    for prefix in copied:
        for (name, p), q in zip(_params(policy, prefix).items(), _params(ref, prefix).values()):
            assert p.data_ptr() != q.data_ptr() and torch.equal(p, q), name
            assert p.requires_grad and not q.requires_grad, name
    assert policy.v_head.summary.weight.requires_grad and policy.v_head.summary.weight is not ref.v_head.summary.weight
    assert all(not p.requires_grad for p in ref.parameters())
    assert not ref.training and policy.training  # separate modules: the policy's mode is untouched


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_shared", [0, 1, 6, 12])
def test_memory_saving_bar_on_12_blocks(arch, n_shared, make_lm):
    """The bar: num_shared_layers=N on a 12-block model saves at least N/12 of the blocks' bytes vs a full copy."""
    policy = _policy(make_lm, arch, n_layer=12)
    block_bytes = sum(p.numel() * p.element_size() for p in _params(policy, BLOCKS[arch]).values())
    one_copy = parameter_bytes(policy)
    ref = create_reference_model(policy, num_shared_layers=n_shared)
    assert parameter_bytes(ref) == one_copy  # the reference alone is a whole model...
    saved = 2 * one_copy - parameter_bytes(policy, ref)  # ...but policy + reference store less than two
    assert saved >= n_shared / 12 * block_bytes
    # And no more than what was shared: the blocks above N and the heads are real copies.
    embeddings = sum(p.numel() * p.element_size() for e in EMBEDDINGS[arch] for p in _params(policy, e).values())
    assert saved == n_shared / 12 * block_bytes + embeddings


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_skip_shared_layers_and_reference_stays_put(arch, make_lm, tokens):
    policy = _policy(make_lm, arch, n_layer=4, summary_dropout_prob=0.0)
    policy.eval()  # deterministic outputs (no dropout); gradients flow the same
    ref = create_reference_model(policy, num_shared_layers=2)
    input_ids, attention_mask = tokens
    before = [t.detach().clone() for t in policy(input_ids, attention_mask=attention_mask) if t is not None]

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)  # all parameters, as the guide does
    logits, _, value = policy(input_ids, attention_mask=attention_mask)
    (logits.logsumexp(-1).mean() + value.pow(2).mean()).backward()
    for name, p in policy.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), name
    assert all(p.grad is None for p in _params(policy, f"{BLOCKS[arch]}.0").values())
    assert all(p.grad is not None for p in _params(policy, f"{BLOCKS[arch]}.3").values())
    optimizer.step()

    after = policy(input_ids, attention_mask=attention_mask)
    assert not torch.equal(after[0], before[0])
    ref_out = [t for t in ref(input_ids, attention_mask=attention_mask) if t is not None]
    for a, b in zip(ref_out, before):
        assert torch.equal(a, b)  # the reference is still the policy as it was


def test_tied_embeddings_shared_by_default_or_kept_trainable(make_lm, tokens, caplog):
    policy = _policy(make_lm, "gpt2", n_layer=4)
    wte, lm_head = policy.pretrained_model.transformer.wte, policy.pretrained_model.lm_head
    assert lm_head.weight is wte.weight  # GPT-2 ties them
    ref = create_reference_model(policy, num_shared_layers=2, share_tied_embeddings=False)
    assert lm_head.weight is wte.weight and wte.weight.requires_grad  # still tied, still trainable
    ref_wte, ref_lm_head = ref.pretrained_model.transformer.wte, ref.pretrained_model.lm_head
    assert ref_wte.weight.data_ptr() != wte.weight.data_ptr()  # the reference has its own frozen copy...
    assert ref_lm_head.weight is ref_wte.weight and not ref_wte.weight.requires_grad  # ...tied to its own head
    assert policy.pretrained_model.transformer.wpe.weight is ref.pretrained_model.transformer.wpe.weight

    logits, _, _ = policy(tokens[0])
    logits.sum().backward()
    assert wte.weight.grad is not None

    assert "tied" not in caplog.text

    policy = _policy(make_lm, "gpt2", n_layer=4)
    with caplog.at_level("WARNING", logger="ppo_fast.models.reference_model"):
        ref = create_reference_model(policy, num_shared_layers=2)  # the default: TRL's sharing
    wte, lm_head = policy.pretrained_model.transformer.wte, policy.pretrained_model.lm_head
    assert (
        ref.pretrained_model.transformer.wte.weight is wte.weight and ref.pretrained_model.lm_head.weight is wte.weight
    )
    assert not lm_head.weight.requires_grad
    assert "freezes the policy's LM head" in caplog.text  # said, not silent


def test_untied_llama_shares_its_embedding(make_lm):
    policy = _policy(make_lm, "llama", n_layer=2)
    assert policy.pretrained_model.lm_head.weight is not policy.pretrained_model.model.embed_tokens.weight
    ref = create_reference_model(policy, num_shared_layers=1)
    assert ref.pretrained_model.model.embed_tokens.weight is policy.pretrained_model.model.embed_tokens.weight
    assert policy.pretrained_model.lm_head.weight.requires_grad
    assert ref.pretrained_model.model.norm.weight is not policy.pretrained_model.model.norm.weight


def test_opt_final_norm_registered_before_blocks_is_not_shared():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=64, hidden_size=16, word_embed_proj_dim=8, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2
    )
    cfg.max_position_embeddings = 32
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(OPTForCausalLM(cfg))
    assert policy.v_head.summary.in_features == 8  # OPT-350m-style projection before the LM head
    ref = create_reference_model(policy, num_shared_layers=1)
    decoder, ref_decoder = policy.pretrained_model.model.decoder, ref.pretrained_model.model.decoder
    assert ref_decoder.embed_positions.weight is decoder.embed_positions.weight
    assert ref_decoder.project_in.weight is decoder.project_in.weight  # runs before the blocks: shared
    assert ref_decoder.project_out.weight is not decoder.project_out.weight  # runs after them: copied
    assert decoder.project_out.weight.requires_grad
    assert ref_decoder.layers[0].fc1.weight is decoder.layers[0].fc1.weight
    assert ref_decoder.layers[1].fc1.weight is not decoder.layers[1].fc1.weight


def _mamba_policy():
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2)
    return AutoModelForCausalLMWithValueHead.from_pretrained(MambaForCausalLM(cfg))


def test_unsupported_architecture_names_layouts_and_pattern():
    policy = _mamba_policy()
    before = _snapshot(policy)
    with pytest.raises(ValueError) as err:
        create_reference_model(policy, num_shared_layers=1)
    message = str(err.value)
    assert all(p in message for p in LAYER_PATTERNS) and "pattern=" in message and "backbone.layers" in message
    assert _snapshot(policy) == before

    ref = create_reference_model(policy, num_shared_layers=2, pattern="backbone.layers.{layer}")
    shared = policy.pretrained_model.backbone.layers[1].mixer.in_proj.weight
    assert ref.pretrained_model.backbone.layers[1].mixer.in_proj.weight is shared and not shared.requires_grad
    assert ref.pretrained_model.backbone.layers[2].mixer.in_proj.weight is not (
        policy.pretrained_model.backbone.layers[2].mixer.in_proj.weight
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_shared_layers=-1), ValueError, r"num_shared_layers must be between 0 and 4 .*got -1"),
        (dict(num_shared_layers=5), ValueError, r"num_shared_layers must be between 0 and 4 .*got 5"),
        (dict(num_shared_layers=1.0), TypeError, "num_shared_layers must be an int"),
        (dict(num_shared_layers=True), TypeError, "num_shared_layers must be an int"),
        (dict(num_shared_layers=1, pattern="model.blocks.{layer}"), ValueError, "pattern 'model.blocks"),
        (dict(num_shared_layers=1, pattern="model.layers"), ValueError, r"pattern must be '<path"),
        (dict(num_shared_layers=1, pattern=3), TypeError, "pattern must be a str"),
        (dict(pattern="model.layers.{layer}"), ValueError, "pattern only applies"),
        (dict(num_shared_layers=1, share_tied_embeddings=1), TypeError, "share_tied_embeddings"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, error, match, make_lm):
    policy = _policy(make_lm, "llama", n_layer=4)
    before = _snapshot(policy)
    with pytest.raises(error, match=match):
        create_reference_model(policy, **kwargs)
    assert _snapshot(policy) == before


def test_pattern_in_trls_form_with_prefix(make_lm):
    policy = _policy(make_lm, "llama", n_layer=3)
    ref = create_reference_model(policy, num_shared_layers=1, pattern="pretrained_model.model.layers.{layer}")
    assert (
        ref.pretrained_model.model.layers[0].mlp.up_proj.weight
        is policy.pretrained_model.model.layers[0].mlp.up_proj.weight
    )


def test_model_must_be_the_value_head_wrapper(make_lm):
    with pytest.raises(TypeError, match="AutoModelForCausalLMWithValueHead"):
        create_reference_model(make_lm("gpt2"), num_shared_layers=1)
