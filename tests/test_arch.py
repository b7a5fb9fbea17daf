"""The layer table against real transformers layers, and the one bias rule against the copy in modeling_llamaprune."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES, tiny_config, tiny_model

from llamaprune.core.arch import FAMILIES as TABLE
from llamaprune.core.arch import INPUT_READERS, LINEAR_NAMES, LINEARS, embed_scale, family_of, linear_biases
from llamaprune.core.plan_file import plan_from_kept
from llamaprune.io.pruned_checkpoint import pruned_config
from llamaprune.recover.finetune import LORA_TARGETS


def _layer_tensors(layer) -> set[str]:
    return {name.rsplit(".", 1)[0] for name, _ in layer.named_parameters()}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_table_lists_every_module_of_a_decoder_layer(model_type):
    config = tiny_config(model_type=model_type, layers=1)
    family = family_of(config)
    assert set(TABLE) == set(FAMILIES) and family.model_type == model_type
    layer = tiny_model(config).model.layers[0]
    linears = [name for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
    assert linears == [linear.path for linear in LINEARS]
    assert _layer_tensors(layer) == {linear.path for linear in LINEARS} | set(family.layer_norms)
    modules = {m for b in family.blocks for m in (b.module, *b.norms)}
    assert {name for name, _ in layer.named_children()} == modules


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("skip", [(), ("attention",), ("mlp",)])
def test_the_remote_code_has_the_table_s_layer_for_every_family(model_type, skip):
    """modeling_llamaprune.py may import only torch and transformers, so it names the family's norms itself: a
    pruned layer of our type holds exactly the tensors of the source family's layer that the plan keeps, and the
    embedding scale is the table's."""
    from llamaprune.modeling_llamaprune import LlamaPruneForCausalLM

    config = tiny_config(heads=4, kv_heads=2, layers=2, model_type=model_type)
    family = family_of(config)
    kept = [([0] if "attention" not in skip else [], [0, 5] if "mlp" not in skip else []), ([1], [3])]
    pruned = pruned_config(config, plan_from_kept(config, kept))
    assert pruned.model_type == "llamaprune" and family_of(pruned) == family
    model = LlamaPruneForCausalLM(pruned)
    source = _layer_tensors(tiny_model(config).model.layers[0])
    dropped = {name for name in source if (block := family.block_of(name)) is not None and block.name in skip}
    assert _layer_tensors(model.model.layers[0]) == source - dropped
    assert _layer_tensors(model.model.layers[1]) == source
    assert pruned.embed_scale == embed_scale(config) == (config.hidden_size**0.5 if family.embed_scale else 1.0)


def test_inputs_are_read_once_per_layer_where_they_first_appear():
    assert {key: linear.path for key, linear in INPUT_READERS.items()} == {
        "attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
        "down_in": "mlp.down_proj",
    }
    assert LORA_TARGETS == LINEAR_NAMES == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")


def _biased(model) -> dict[str, bool]:
    """Linear path -> bias present, the same in every layer of ``model`` that has the linear."""
    seen: dict[str, set[bool]] = {}
    for layer in model.model.layers:
        for linear in LINEARS:
            try:
                module = layer.get_submodule(linear.path)
            except AttributeError:  # a skipped block
                continue
            seen.setdefault(linear.path, set()).add(module.bias is not None)
    assert all(len(values) == 1 for values in seen.values())
    return {path: values.pop() for path, values in seen.items()}


@pytest.mark.parametrize(
    ("model_type", "attention_bias", "mlp_bias", "output_bias"),
    list(itertools.product(FAMILIES, [False, True], [False, True], [False, True])),
)
def test_one_bias_rule_for_groups_and_the_remote_code(model_type, attention_bias, mlp_bias, output_bias):
    """modeling_llamaprune.py may import only torch and transformers, so it keeps its own copy of the rule."""
    from llamaprune.modeling_llamaprune import LlamaPruneForCausalLM, projection_biases

    config = tiny_config(heads=4, kv_heads=2, layers=2, model_type=model_type)
    config.attention_bias, config.mlp_bias = attention_bias, mlp_bias
    rule = linear_biases(config)
    plan = plan_from_kept(config, [([1], [0, 5]), ([], [3])])  # layers of two shapes: our model type
    pruned = pruned_config(config, plan, output_bias=output_bias)
    source = dict(rule)
    if output_bias:  # compensation adds o_proj and down_proj output biases to whatever the source has
        rule.update({"self_attn.o_proj": True, "mlp.down_proj": True})
    assert pruned.model_type == "llamaprune" and linear_biases(pruned) == rule
    assert projection_biases(pruned) == (rule["self_attn.q_proj"], rule["self_attn.o_proj"])
    assert _biased(LlamaPruneForCausalLM(pruned)) == rule
    if model_type == "llama" or not (attention_bias or mlp_bias):  # configs that exist: the source model agrees
        assert _biased(tiny_model(config)) == source
