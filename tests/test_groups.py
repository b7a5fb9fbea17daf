"""Group map: costs add up to num_parameters(), and zeroing one group touches exactly its cost."""

import pytest
import torch
from conftest import group_slices, tiny_config, tiny_model
from transformers import LlamaConfig

from llamaprune.core.groups import ATTN, MLP, iter_groups, model_shape

CONFIGS = [
    dict(heads=4, kv_heads=4),  # MHA, ratio 1
    dict(heads=4, kv_heads=2, bias=True),  # ratio 2, biases
    dict(heads=6, kv_heads=2, tie=True),  # ratio 3, tied embeddings
    dict(heads=8, kv_heads=2, bias=True, tie=True),  # ratio 4
    dict(heads=6, kv_heads=2, model_type="qwen2"),  # q/k/v biases, no o_proj bias
    dict(heads=4, kv_heads=1, model_type="mistral"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_costs_add_up_to_num_parameters(kwargs):
    config = tiny_config(**kwargs)
    shape = model_shape(config)
    counts = shape.counts()
    assert counts.prunable + counts.fixed == counts.total == tiny_model(config).num_parameters()
    assert sum(g.params for g in iter_groups(shape)) == counts.prunable
    layer_sum = sum(shape.layer_params(i) for i in range(shape.num_hidden_layers))
    assert layer_sum + shape.embedding_params() == counts.total


def _zero_group(model, layer: int, kind: str, index: int) -> None:
    with torch.no_grad():
        for param, where in group_slices(model, layer, kind, index):
            param[where] = 0


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_zeroing_one_group_touches_exactly_its_cost(kwargs):
    config = tiny_config(**kwargs)
    shape = model_shape(config)
    picks = [g for g in iter_groups(shape) if (g.layer, g.index) in {(1, 1), (0, 0)}]
    assert {g.kind for g in picks} == {ATTN, MLP}
    for group in picks:
        model = tiny_model(config)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _zero_group(model, group.layer, group.kind, group.index)
        changed = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
        assert changed == group.params, group


def test_group_ids_and_row_count():
    config = tiny_config(heads=6, kv_heads=3, layers=3, intermediate=10)
    groups = list(iter_groups(model_shape(config)))
    assert len(groups) == 3 * (3 + 10)
    assert groups[0].group_id == "layers.0.attn.0"
    assert groups[-1].group_id == "layers.2.mlp.9"


def test_per_layer_config_is_read_per_layer():
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=24,
        num_hidden_layers=3, vocab_size=50,
        per_layer_config={0: {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 10},
                          1: {"skip": ["attention"]}},
        allow_global_per_layer_attribute_access=True,
    )
    shape = model_shape(config)
    assert [(s.kv_groups, s.mlp_channels, s.skip) for s in shape.layers] == [
        (1, 10, ()), (0, 24, ("attention",)), (2, 24, ())
    ]
    # A skipped attention also drops its norm: 2*4*... nothing of it is counted.
    assert shape.layer_params(1) == 24 * 3 * 32 + 32


def test_a_pruned_qwen2_config_keeps_its_qkv_biases():
    from llamaprune.apply.command import apply_plan
    from llamaprune.core.plan_file import plan_from_kept

    config = tiny_config(heads=6, kv_heads=2, layers=2, intermediate=12, model_type="qwen2")
    plan = plan_from_kept(config, [([1], [0, 3, 5]), ([0, 1], [2])])
    pruned = apply_plan(tiny_model(config), plan)
    assert pruned.config.model_type == "llamaprune"
    assert model_shape(pruned.config).counts().total == pruned.num_parameters() == plan.params_after
