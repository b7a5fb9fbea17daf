"""Slicing equals zeroing: a pruned model computes what the original computes with the same groups zeroed.

The reference is the original model with the pruned rows/columns zeroed (conftest.group_slices, written from
docs/ARTIFACTS.md, "Groups"), skipped sub-blocks' outputs zeroed and removed layers bypassed by forward hooks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FAMILIES,
    TOL,
    ids,
    logits,
    pruned_and_reference,
    random_plan,
    remote_outputs,
    tiny_config,
    tiny_model,
    zeroed_reference,
)

from llamaprune.apply.command import apply_plan
from llamaprune.apply.slicing import attention_rows, layer_tensors, pruned_state, slice_tensor
from llamaprune.core.arch import FAMILIES as FAMILIES_TABLE
from llamaprune.core.arch import split_layer_key
from llamaprune.core.plan_file import plan_from_kept


def test_attention_rows_closed_form():
    q_rows, kv_rows = attention_rows([0, 2], queries_per_kv=3, head_dim=2)
    assert kv_rows.tolist() == [0, 1, 4, 5]
    assert q_rows.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]


def test_slice_tensor_follows_the_layer_rules():
    indices = {"q": torch.tensor([2, 3]), "kv": torch.tensor([1]), "mlp": torch.tensor([0, 2])}
    weight = torch.arange(20.0).view(4, 5)
    assert torch.equal(slice_tensor("self_attn.q_proj.weight", weight, indices), weight[2:4])
    assert torch.equal(slice_tensor("self_attn.o_proj.weight", weight, indices), weight[:, 2:4])
    assert torch.equal(slice_tensor("mlp.down_proj.weight", weight, indices), weight[:, [0, 2]])
    assert slice_tensor("input_layernorm.weight", weight, indices) is weight
    assert split_layer_key("model.layers.12.mlp.up_proj.weight") == (
        "model.layers.",
        12,
        "mlp.up_proj.weight",
    )
    assert split_layer_key("model.embed_tokens.weight") is None


def test_the_layer_tensor_rules_as_written_in_the_contract():
    """docs/ARTIFACTS.md, "Groups": rows of q/k/v/gate/up and their biases, columns of o/down; the rest whole."""
    cut = {
        "self_attn.q_proj.weight": (0, "q"), "self_attn.q_proj.bias": (0, "q"),
        "self_attn.k_proj.weight": (0, "kv"), "self_attn.k_proj.bias": (0, "kv"),
        "self_attn.v_proj.weight": (0, "kv"), "self_attn.v_proj.bias": (0, "kv"),
        "self_attn.o_proj.weight": (1, "q"),
        "mlp.gate_proj.weight": (0, "mlp"), "mlp.gate_proj.bias": (0, "mlp"),
        "mlp.up_proj.weight": (0, "mlp"), "mlp.up_proj.bias": (0, "mlp"),
        "mlp.down_proj.weight": (1, "mlp"),
    }
    whole = ["self_attn.o_proj.bias", "mlp.down_proj.bias", "input_layernorm.weight",
             "post_attention_layernorm.weight", "self_attn.rotary_emb.inv_freq"]
    assert layer_tensors(FAMILIES_TABLE["llama"]) == {**cut, **dict.fromkeys(whole)}
    head_norms = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    assert layer_tensors(FAMILIES_TABLE["qwen3"]) == {**cut, **dict.fromkeys(whole + head_norms)}
    sandwich = ["input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight"]
    assert layer_tensors(FAMILIES_TABLE["gemma3_text"]) == {
        **cut, **dict.fromkeys(whole[:2] + sandwich + head_norms)}


def test_pruned_state_renames_slices_and_shares_the_rest():
    config = tiny_config(heads=4, kv_heads=2, layers=3)
    model = tiny_model(config)
    plan = plan_from_kept(config, [([1], list(range(24))), ([0], [0]), ([], [2, 3])], removed=(1,))
    full = model.state_dict()
    state = {k.removeprefix("model."): v for k, v in full.items()}
    pruned = {k.removeprefix("model."): v for k, v in pruned_state(full, plan).items()}
    assert pruned["embed_tokens.weight"] is state["embed_tokens.weight"]
    assert pruned["layers.0.mlp.up_proj.weight"] is state["layers.0.mlp.up_proj.weight"]  # every channel kept
    assert torch.equal(pruned["layers.0.self_attn.k_proj.weight"], state["layers.0.self_attn.k_proj.weight"][8:])
    assert torch.equal(pruned["layers.1.mlp.down_proj.weight"], state["layers.2.mlp.down_proj.weight"][:, 2:4])
    assert not any(k.startswith(("layers.1.self_attn", "layers.1.input_layernorm")) for k in pruned)  # skipped
    assert not any(k.startswith("layers.2.") for k in pruned)  # three layers, one removed


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_apply_plan_leaves_its_argument_unchanged(model_type):
    config = tiny_config(heads=6, kv_heads=3, layers=4, bias=True, model_type=model_type)
    model = tiny_model(config)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    modules = [name for name, _ in model.named_modules()]
    x = ids(config.vocab_size)
    expected = logits(model, x)
    for seed in range(3):
        pruned = apply_plan(model, random_plan(config, seed, skip_p=0.3, remove_p=0.25))
        assert pruned is not model and pruned.num_parameters() < model.num_parameters()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and [name for name, _ in model.named_modules()] == modules
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name
    assert torch.equal(logits(model, x), expected)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "bias", "model_type", "seed"),
    [
        (4, 4, False, "llama", 1),  # r = 1
        (4, 2, True, "llama", 2),  # r = 2, all projections biased
        (6, 2, False, "llama", 3),  # r = 3
        (8, 2, True, "llama", 4),  # r = 4
        (6, 3, False, "qwen2", 5),  # q/k/v biases, o_proj without
        (4, 2, False, "mistral", 6),
        (6, 2, False, "qwen3", 7),  # query/key norms, heads x head_dim != hidden
        (6, 3, False, "gemma3_text", 8),  # and norms after the projections, sliding layers, scaled embeddings
        (4, 2, False, "gemma3_text", 9),
    ],
)
def test_pruned_logits_equal_zeroed_original(heads, kv_heads, bias, model_type, seed):
    config = tiny_config(heads=heads, kv_heads=kv_heads, layers=4, bias=bias, model_type=model_type)
    plan = random_plan(config, seed)
    pruned, reference = pruned_and_reference(config, plan)
    assert pruned.num_parameters() == plan.params_after
    x = ids(config.vocab_size, seed=seed)
    with zeroed_reference(reference, plan):
        expected = logits(reference, x)
    assert torch.allclose(logits(pruned, x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("remote", [False, True], ids=["llamaprune", "trust_remote_code"])
@pytest.mark.parametrize(
    ("kept", "removed"),
    [
        ([([], [1, 5]), ([0, 1], list(range(24))), ([1], [])], ()),  # skipped attention, skipped MLP
        ([([0], [3]), ([0, 1], [2, 7, 9]), ([1], [0])], (1,)),  # a removed middle layer
        ([([], [0, 1]), ([], []), ([], [4])], (1,)),  # no attention left anywhere
    ],
)
def test_skips_and_removed_layers_equal_hooked_original(kept, removed, remote, tmp_path):
    config = tiny_config(heads=4, kv_heads=2, layers=3, bias=True)
    plan = plan_from_kept(config, kept, removed)
    pruned, reference = pruned_and_reference(config, plan)
    assert len(pruned.model.layers) == 3 - len(removed)
    x = ids(config.vocab_size)
    with zeroed_reference(reference, plan):
        expected = logits(reference, x)
        expected_tokens = reference.generate(x[:1], max_new_tokens=6, do_sample=False)
    if remote:  # the copy of the modeling file inside the checkpoint, on its own
        result = remote_outputs(pruned, x, tmp_path)
        got, tokens = result["logits"], result["tokens"]
    else:
        got, tokens = logits(pruned, x), pruned.generate(x[:1], max_new_tokens=6, do_sample=False)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generate_matches_zeroed_original_on_random_plans(model_type):
    config = tiny_config(heads=6, kv_heads=3, layers=4, model_type=model_type)
    if model_type == "mistral":
        config.sliding_window = 5  # shorter than prompt + generation: the window and its cache matter
    for seed in range(2):
        plan = random_plan(config, seed, skip_p=0.3, remove_p=0.25)
        pruned, reference = pruned_and_reference(config, plan, seed)
        prompt = ids(config.vocab_size, batch=1, length=5, seed=seed)
        with zeroed_reference(reference, plan):
            expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(pruned.generate(prompt, max_new_tokens=8, do_sample=False), expected)
        # the cached path agrees with recomputing the whole sequence
        uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(uncached, expected)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("remote", [False, True], ids=["llamaprune", "trust_remote_code"])
def test_cached_steps_equal_recomputing_with_padding_and_skipped_first_attention(remote, model_type, tmp_path):
    """Gemma 3's layers are sliding, sliding, full (a window of 5 of the 8 tokens): its cache slots 0 and 1 are a
    sliding and a full layer, whatever layer indices they have."""
    from transformers import DynamicCache

    config = tiny_config(heads=4, kv_heads=2, layers=3, bias=True, model_type=model_type)
    plan = plan_from_kept(config, [([], [1, 5]), ([0, 1], list(range(24))), ([1], [])])
    pruned, _ = pruned_and_reference(config, plan)
    x = ids(config.vocab_size, batch=2, length=8)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # a left-padded prompt: the mask is materialized and sized from the cache
    with torch.no_grad():
        expected = pruned(x, attention_mask=mask).logits[:, -1]
        if remote:
            result = remote_outputs(pruned, x, tmp_path, mask=mask)
            assert torch.equal(result["masked_last"], expected)
            steps = [(result[name + "_length"], result[name]) for name in ("config_cache", "lazy_cache")]
        else:
            steps = []
            for cache in (DynamicCache(config=pruned.config), DynamicCache()):  # as generate() / lazily filled
                prefix = pruned(x[:, :-1], attention_mask=mask[:, :-1], cache=cache, use_cache=True)
                length = prefix.cache.get_seq_length()
                step = pruned(x[:, -1:], attention_mask=mask, cache=prefix.cache, use_cache=True).logits[:, -1]
                steps.append((length, step))
    for length, step in steps:
        assert length == 7
        assert torch.allclose(step, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_empty_plan_is_the_identity(tie):
    config = tiny_config(heads=4, kv_heads=2, layers=2, tie=tie)
    keep_all = [(list(range(2)), list(range(24)))] * 2
    plan = plan_from_kept(config, keep_all)
    assert plan.is_empty
    pruned, reference = pruned_and_reference(config, plan)
    x = ids(config.vocab_size)
    assert torch.equal(logits(pruned, x), logits(reference, x))
    assert pruned.num_parameters() == reference.num_parameters() == plan.params_after
    assert pruned.config.model_type == "llama"


def test_fingerprint_mismatch_names_both_models():
    plan = random_plan(tiny_config(heads=4, kv_heads=2, layers=2), seed=0)
    other = tiny_model(tiny_config(heads=4, kv_heads=2, layers=2, intermediate=32))
    with pytest.raises(ValueError, match=r"was made for model LlamaForCausalLM/\w+ .* but this model is Llama"):
        apply_plan(other, plan)
