"""Prunable groups of a LLaMA-family config and their parameter costs (docs/ARTIFACTS.md, "Groups").

Works from the config alone (no weights, no torch), so a checkpoint can be fingerprinted and planned
for without loading it. A config may be uniform or already pruned per layer (``per_layer_config``).

    >>> from transformers import LlamaConfig
    >>> shape = model_shape(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    ...                                 intermediate_size=96, num_hidden_layers=2, vocab_size=100))
    >>> shape.attn_group_cost(0), shape.mlp_group_cost(0)
    (6144, 192)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from llamaprune.core.arch import ATTN, COLS, MLP, ROWS, SUPPORTED_MODEL_TYPES, bias_rule, family_of, source_model_type


@dataclass(frozen=True)
class LayerShape:
    """Width of one decoder layer; ``skip`` names sub-blocks ("attention", "mlp") the layer lacks."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    skip: tuple[str, ...] = ()

    @property
    def kv_groups(self) -> int:
        return 0 if "attention" in self.skip else self.num_key_value_heads

    @property
    def query_heads(self) -> int:
        return 0 if "attention" in self.skip else self.num_attention_heads

    @property
    def mlp_channels(self) -> int:
        return 0 if "mlp" in self.skip else self.intermediate_size

    def groups(self, kind: str) -> int:
        """Groups of ``kind`` ("attn" or "mlp") the layer has."""
        return self.kv_groups if kind == ATTN else self.mlp_channels


@dataclass(frozen=True)
class ModelShape:
    """Everything about a config's dimensions that decides parameter counts."""

    hidden_size: int
    head_dim: int
    vocab_size: int
    layers: tuple[LayerShape, ...]
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    down_proj_bias: bool = False  # mlp_bias, or the output bias of error compensation
    block_norms: int = 1  # hidden-size norms per sub-block: 2 where a norm follows its output projection (Gemma 3)
    head_norms: bool = False  # the attention has query and key norms over head_dim (Qwen3, Gemma 3)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    def queries_per_kv(self, layer: int) -> int:
        shape = self.layers[layer]
        if shape.num_key_value_heads == 0:
            return 0
        return shape.num_attention_heads // shape.num_key_value_heads

    def attn_group_cost(self, layer: int) -> int:
        """Parameters of one KV head, its query heads and their o_proj columns (+ q/k/v biases)."""
        r, d, hidden = self.queries_per_kv(layer), self.head_dim, self.hidden_size
        cost = (2 * r + 2) * d * hidden
        if self.attention_bias:
            cost += (r + 2) * d
        return cost

    def mlp_group_cost(self, layer: int) -> int:
        """Parameters of one MLP channel: a gate_proj row, an up_proj row, a down_proj column (+ biases)."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def attn_fixed_params(self, layer: int) -> int:
        """Parameters of the attention sub-block that no width pruning removes: its norms (the per-head query and
        key norms, shared by all heads, included), the o_proj bias."""
        if "attention" in self.layers[layer].skip:
            return 0
        return self.hidden_size * (self.block_norms + self.o_proj_bias) + 2 * self.head_dim * self.head_norms

    def mlp_fixed_params(self, layer: int) -> int:
        """Parameters of the MLP sub-block that no width pruning removes: its norms, the down_proj bias."""
        if "mlp" in self.layers[layer].skip:
            return 0
        return self.hidden_size * (self.block_norms + self.down_proj_bias)

    def layer_fixed_params(self, layer: int) -> int:
        return self.attn_fixed_params(layer) + self.mlp_fixed_params(layer)

    def layer_params(self, layer: int) -> int:
        shape = self.layers[layer]
        return (
            shape.kv_groups * self.attn_group_cost(layer)
            + shape.mlp_channels * self.mlp_group_cost(layer)
            + self.layer_fixed_params(layer)
        )

    def embedding_params(self) -> int:
        """Embeddings, lm_head (when untied) and the final norm."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def counts(self) -> ParamCounts:
        prunable = sum(
            shape.kv_groups * self.attn_group_cost(i) + shape.mlp_channels * self.mlp_group_cost(i)
            for i, shape in enumerate(self.layers)
        )
        fixed = self.embedding_params() + sum(self.layer_fixed_params(i) for i in range(len(self.layers)))
        return ParamCounts(total=prunable + fixed, prunable=prunable, fixed=fixed)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    prunable: int
    fixed: int


@dataclass(frozen=True)
class Group:
    """One prunable unit: ``kind`` is "attn" (``index`` = KV head) or "mlp" (``index`` = channel)."""

    layer: int
    kind: str
    index: int
    params: int

    @property
    def group_id(self) -> str:
        return group_id(self.layer, self.kind, self.index)


def group_id(layer: int, kind: str, index: int) -> str:
    return f"layers.{layer}.{kind}.{index}"


def _layer_attr(layer_config, name: str, default=None):
    value = getattr(layer_config, name, default)
    return default if value is None else value


def model_shape(config) -> ModelShape:
    """Read the dimensions of a config of any family (``core.arch.FAMILIES``), uniform or per-layer."""
    hidden = config.hidden_size
    if config.is_heterogeneous:
        layer_configs = list(config.per_layer_config)
    else:
        layer_configs = [config] * config.num_hidden_layers
    layers = tuple(
        LayerShape(
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=_layer_attr(c, "num_key_value_heads", c.num_attention_heads),
            intermediate_size=c.intermediate_size,
            skip=tuple(sorted(_layer_attr(c, "skip", ()))),
        )
        for c in layer_configs
    )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        head_dim = hidden // layers[0].num_attention_heads
    biases = bias_rule(config)
    family = family_of(config)
    return ModelShape(
        hidden_size=hidden,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        layers=layers,
        attention_bias=biases[(ATTN, ROWS)],
        o_proj_bias=biases[(ATTN, COLS)],
        mlp_bias=biases[(MLP, ROWS)],
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        down_proj_bias=biases[(MLP, COLS)],
        block_norms=len(family.blocks[0].norms),
        head_norms=family.head_norms,
    )


def iter_groups(shape: ModelShape) -> Iterator[Group]:
    """Every prunable group, layer by layer, attention groups before MLP channels."""
    for layer, layer_shape in enumerate(shape.layers):
        attn_cost, mlp_cost = shape.attn_group_cost(layer), shape.mlp_group_cost(layer)
        for g in range(layer_shape.kv_groups):
            yield Group(layer, ATTN, g, attn_cost)
        for c in range(layer_shape.mlp_channels):
            yield Group(layer, MLP, c, mlp_cost)


def config_fingerprint(config) -> dict:
    """What a plan or table must match: architecture family, a hash of all shapes, parameter count."""
    shape = model_shape(config)
    fields = asdict(shape)
    if fields["down_proj_bias"] == fields["mlp_bias"]:  # as before output biases existed: hashes stay the same
        del fields["down_proj_bias"]
    for name, before in (("block_norms", 1), ("head_norms", False)):  # so do those of families without them
        if fields[name] == before:
            del fields[name]
    blob = json.dumps(fields, sort_keys=True).encode()
    model_type = source_model_type(config)
    return {
        "architecture": SUPPORTED_MODEL_TYPES.get(model_type, model_type),
        "config_hash": hashlib.sha256(blob).hexdigest()[:16],
        "num_parameters": shape.counts().total,
    }
