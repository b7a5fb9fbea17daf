"""The layer table against real transformers layers, and the one bias rule against the copy in modeling_llamaprune."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_config, tiny_model

from llamaprune.core.arch import BLOCKS, INPUT_READERS, LINEAR_NAMES, LINEARS, linear_biases
from llamaprune.core.plan_file import plan_from_kept
from llamaprune.io.pruned_checkpoint import pruned_config
from llamaprune.recover.finetune import LORA_TARGETS


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_the_table_lists_every_module_of_a_decoder_layer(model_type):
    layer = tiny_model(tiny_config(model_type=model_type, layers=1)).model.layers[0]
    linears = [name for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
    assert linears == [linear.path for linear in LINEARS]
    tensors = {name.rsplit(".", 1)[0] for name, _ in layer.named_parameters()}
    assert tensors == {linear.path for linear in LINEARS} | {block.norm for block in BLOCKS}
    assert {name for name, _ in layer.named_children()} == {m for b in BLOCKS for m in (b.module, b.norm)}


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
    list(itertools.product(["llama", "mistral", "qwen2"], [False, True], [False, True], [False, True])),
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
