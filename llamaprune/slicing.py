"""Tensor surgery: which rows and columns a plan keeps, and small in-place functions per module kind.

Index rules (docs/ARTIFACTS.md, "Groups"): KV head ``g`` owns rows ``[g*d, (g+1)*d)`` of k_proj/v_proj and rows
``[g*r*d, (g+1)*r*d)`` of q_proj (the same columns of o_proj); MLP channel ``c`` is row ``c`` of gate_proj
and up_proj and column ``c`` of down_proj. The same rules slice a module in memory (``slice_attention``,
``slice_mlp``) and a named checkpoint tensor while streaming (``slice_tensor``).

    >>> import torch
    >>> q_rows, kv_rows = attention_rows([1], queries_per_kv=2, head_dim=2)
    >>> q_rows.tolist(), kv_rows.tolist()
    ([4, 5, 6, 7], [2, 3])
    >>> linear = torch.nn.Linear(3, 4)
    >>> keep_rows(linear, torch.tensor([0, 2])).weight.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from llamaprune.pruning_plan import LayerPlan

# Sub-modules that belong to each skippable block: dropped together when a plan skips the block.
BLOCK_MODULES = {"attention": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}
LAYER_KEY = re.compile(r"^(?P<prefix>.*\blayers\.)(?P<layer>\d+)\.(?P<rest>.+)$")
# Checkpoint tensors inside a decoder layer: (dimension to slice, index kind) or None when kept whole.
LAYER_TENSORS = {
    "self_attn.q_proj.weight": (0, "q"),
    "self_attn.q_proj.bias": (0, "q"),
    "self_attn.k_proj.weight": (0, "kv"),
    "self_attn.k_proj.bias": (0, "kv"),
    "self_attn.v_proj.weight": (0, "kv"),
    "self_attn.v_proj.bias": (0, "kv"),
    "self_attn.o_proj.weight": (1, "q"),
    "self_attn.o_proj.bias": None,
    "self_attn.rotary_emb.inv_freq": None,
    "mlp.gate_proj.weight": (0, "mlp"),
    "mlp.gate_proj.bias": (0, "mlp"),
    "mlp.up_proj.weight": (0, "mlp"),
    "mlp.up_proj.bias": (0, "mlp"),
    "mlp.down_proj.weight": (1, "mlp"),
    "mlp.down_proj.bias": None,
    "input_layernorm.weight": None,
    "post_attention_layernorm.weight": None,
}


def attention_rows(groups: Sequence[int], queries_per_kv: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of q_proj (= columns of o_proj) and of k_proj/v_proj owned by the kept KV heads ``groups``."""
    kv = torch.tensor(list(groups), dtype=torch.long)
    offsets = torch.arange(head_dim)
    kv_rows = (kv[:, None] * head_dim + offsets).reshape(-1)
    q_heads = (kv[:, None] * queries_per_kv + torch.arange(queries_per_kv)).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + offsets).reshape(-1)
    return q_rows, kv_rows


def layer_indices(lp: LayerPlan, head_dim: int) -> dict[str, torch.Tensor]:
    """The kept index of each kind ("q", "kv", "mlp") for one layer of a plan (a layer of an already pruned
    model that skips attention has no KV heads at all)."""
    queries_per_kv = lp.num_attention_heads // lp.num_key_value_heads if lp.num_key_value_heads else 0
    q_rows, kv_rows = attention_rows(lp.attn_groups, queries_per_kv, head_dim)
    return {"q": q_rows, "kv": kv_rows, "mlp": torch.tensor(list(lp.mlp_channels), dtype=torch.long)}


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep output features ``index`` of ``linear`` (weight rows and bias entries), in place."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)
    return linear


def keep_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep input features ``index`` of ``linear`` (weight columns; the bias is per output), in place."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(index)
    return linear


def slice_attention(attn: nn.Module, groups: Sequence[int], head_dim: int) -> nn.Module:
    """Keep the KV heads ``groups`` of a Llama-style attention module and their query heads, in place."""
    queries_per_kv = attn.q_proj.out_features // attn.k_proj.out_features
    q_rows, kv_rows = attention_rows(groups, queries_per_kv, head_dim)
    for proj in (attn.k_proj, attn.v_proj):
        keep_rows(proj, kv_rows)
    keep_rows(attn.q_proj, q_rows)
    keep_columns(attn.o_proj, q_rows)
    return attn


def slice_mlp(mlp: nn.Module, channels: Sequence[int]) -> nn.Module:
    """Keep the intermediate channels ``channels`` of a gated MLP, in place."""
    index = torch.tensor(list(channels), dtype=torch.long)
    keep_rows(mlp.gate_proj, index)
    keep_rows(mlp.up_proj, index)
    keep_columns(mlp.down_proj, index)
    mlp.intermediate_size = len(index)
    return mlp


def drop_blocks(layer: nn.Module, skip: Sequence[str]) -> nn.Module:
    """Remove the skipped blocks of a decoder layer (with their norms), in place."""
    for block in skip:
        for name in BLOCK_MODULES[block]:
            setattr(layer, name, None)
    return layer


def slice_layer(layer: nn.Module, lp: LayerPlan, head_dim: int) -> nn.Module:
    """Apply one layer's plan to a decoder layer in place: slice what it keeps, drop what it skips."""
    if "attention" not in lp.skip and len(lp.attn_groups) < lp.num_key_value_heads:
        slice_attention(layer.self_attn, lp.attn_groups, head_dim)
    if "mlp" not in lp.skip and len(lp.mlp_channels) < lp.intermediate_size:
        slice_mlp(layer.mlp, lp.mlp_channels)
    return drop_blocks(layer, lp.skip)


def slice_tensor(
    rest: str, tensor: torch.Tensor, indices: dict[str, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Slice one tensor of a decoder layer (``rest``: its name inside the layer) by the kept indices, into
    ``out`` when given (a reused buffer saves a fresh allocation per tensor)."""
    rule = LAYER_TENSORS[rest]
    if rule is None:
        return tensor
    dim, kind = rule
    index = indices[kind]
    if len(index) == tensor.shape[dim]:
        return tensor
    return torch.index_select(tensor, dim, index, out=out)


def sliced_shape(rest: str, shape: Sequence[int], indices: dict[str, torch.Tensor]) -> list[int]:
    """The shape ``slice_tensor`` gives, without reading the tensor."""
    rule = LAYER_TENSORS[rest]
    shape = list(shape)
    if rule is not None:
        dim, kind = rule
        shape[dim] = len(indices[kind])
    return shape


def is_skipped(rest: str, skip: Sequence[str]) -> bool:
    """True when the layer tensor ``rest`` belongs to a block the plan skips."""
    return any(rest.split(".", 1)[0] in BLOCK_MODULES[block] for block in skip)


def split_layer_key(key: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up.weight`` -> (``model.layers.``, 3, ``mlp.up.weight``); None outside layers."""
    match = LAYER_KEY.match(key)
    if match is None:
        return None
    return match["prefix"], int(match["layer"]), match["rest"]
