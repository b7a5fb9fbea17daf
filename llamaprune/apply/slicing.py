"""Tensor surgery: which rows and columns a plan keeps, and where each tensor of a model goes under a plan.

Index rules (docs/ARTIFACTS.md, "Groups"): KV head ``g`` owns rows ``[g*d, (g+1)*d)`` of k_proj/v_proj and rows
``[g*r*d, (g+1)*r*d)`` of q_proj (the same columns of o_proj); MLP channel ``c`` is row ``c`` of gate_proj
and up_proj and column ``c`` of down_proj. Which kept index cuts which tensor along which dimension comes from
the layer table (``llamaprune.core.arch``), and which tensors a layer has and which block each goes with, from the
plan's family there. The same per-tensor rules (``tensor_route``, ``slice_tensor``) prune a checkpoint while
streaming it and a state dict in memory (``pruned_state``).

    >>> import torch
    >>> q_rows, kv_rows = attention_rows([1], queries_per_kv=2, head_dim=2)
    >>> q_rows.tolist(), kv_rows.tolist()
    ([4, 5, 6, 7], [2, 3])
    >>> rules = layer_tensors(FAMILIES["qwen3"])
    >>> rules["mlp.down_proj.weight"], rules["mlp.down_proj.bias"], rules["self_attn.q_norm.weight"]
    ((1, 'mlp'), None, None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache

import torch

from llamaprune.core.arch import FAMILIES, LINEARS, ROWS, Family, family_named, split_layer_key
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import LayerPlan, Plan


def _linear_tensors() -> dict[str, tuple[int, str] | None]:
    rules: dict[str, tuple[int, str] | None] = {}
    for linear in LINEARS:
        rules[f"{linear.path}.weight"] = (linear.dim, linear.index)
        rules[f"{linear.path}.bias"] = (0, linear.index) if linear.axis == ROWS else None  # o/down: per output
    return rules


# The linears' tensors, in every family: (dimension to slice, kept index that slices it), or None when kept whole.
LINEAR_TENSORS = _linear_tensors()


@cache
def layer_tensors(family: Family) -> dict[str, tuple[int, str] | None]:
    """Every tensor a decoder layer of ``family`` may hold, with its rule (``LINEAR_TENSORS``; norms and buffers
    are kept whole)."""
    whole = [f"{norm}.weight" for norm in family.layer_norms] + [b for block in family.blocks for b in block.buffers]
    return {**LINEAR_TENSORS, **dict.fromkeys(whole)}


def plan_family(plan: Plan) -> Family:
    """The family of the model a plan was made for (its fingerprint's architecture)."""
    architecture = plan.fingerprint.get("architecture")
    family = family_named(architecture)
    if family is None:
        raise UsageError(
            f"plan {plan.name!r} was made for a {architecture} model; llamaprune supports "
            f"{', '.join(f.architecture for f in FAMILIES.values())}"
        )
    return family


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


# The plan field that lists each output projection's kept groups, by the kept index that cuts its columns.
GROUP_FIELDS = {"q": "attn_groups", "mlp": "mlp_channels"}


def group_columns(lp: LayerPlan, head_dim: int, index: str) -> torch.Tensor:
    """(groups, columns): the input columns of the output projection cut by ``index`` ("q": o_proj, "mlp":
    down_proj) that each group of layer ``lp`` owns, every group of the original layer."""
    if index == "q":
        groups = range(lp.num_key_value_heads)
        return attention_rows(groups, lp.num_attention_heads // lp.num_key_value_heads, head_dim)[0].view(
            lp.num_key_value_heads, -1)
    return torch.arange(lp.intermediate_size).view(-1, 1)


def kept_indices(plan: Plan) -> dict[int, dict]:
    """Original layer -> its kept indices by kind, for every layer the plan keeps."""
    return {lp.layer: layer_indices(lp, plan.head_dim) for lp in plan.layers if not lp.removed}


def slice_tensor(
    rest: str, tensor: torch.Tensor, indices: dict[str, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Slice one tensor of a decoder layer (``rest``: its name inside the layer) by the kept indices, into
    ``out`` when given (a reused buffer saves a fresh allocation per tensor). A tensor that loses nothing is
    returned itself."""
    rule = LINEAR_TENSORS.get(rest)
    if rule is None:
        return tensor
    dim, kind = rule
    index = indices[kind]
    if len(index) == tensor.shape[dim]:
        return tensor
    return torch.index_select(tensor, dim, index.to(tensor.device), out=out)


def sliced_shape(rest: str, shape: Sequence[int], indices: dict[str, torch.Tensor]) -> list[int]:
    """The shape ``slice_tensor`` gives, without reading the tensor."""
    rule = LINEAR_TENSORS.get(rest)
    shape = list(shape)
    if rule is not None:
        dim, kind = rule
        shape[dim] = len(indices[kind])
    return shape


def is_skipped(rest: str, skip: Sequence[str], family: Family) -> bool:
    """True when the layer tensor ``rest`` belongs to a block the plan skips: its module, or a norm before or after
    it, so that a skipped block drops all of its norms."""
    block = family.block_of(rest)
    return block is not None and block.name in skip


def tensor_route(key: str, plan: Plan, source: str = "the model") -> tuple[str, int | None, str] | None:
    """Where the tensor ``key`` of ``source`` goes under ``plan``: (output key, original layer, name inside the
    layer), the layer None and the name empty outside decoder layers; None when the plan drops it (a removed
    layer, a skipped block). Kept layers are renumbered in order."""
    parts = split_layer_key(key)
    if parts is None:
        return key, None, ""
    prefix, layer, rest = parts
    if layer >= len(plan.layers):
        raise UsageError(f"{source}: tensor {key} is in layer {layer}, but the plan has {len(plan.layers)} layers")
    lp = plan.layers[layer]
    family = plan_family(plan)
    if lp.removed or is_skipped(rest, lp.skip, family):
        return None
    if rest not in layer_tensors(family):
        raise UsageError(
            f"{source}: unexpected tensor {key}; a {family.architecture} layer has "
            f"{', '.join(sorted(layer_tensors(family)))}"
        )
    new_layer = sum(1 for other in plan.layers[:layer] if not other.removed)
    return f"{prefix}{new_layer}.{rest}", layer, rest


def pruned_state(tensors: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """Named tensors (a state dict) after ``plan``, under their output names: a sliced tensor is new, any other
    is the same tensor object (shared, not copied)."""
    indices = kept_indices(plan)
    out = {}
    for key, tensor in tensors.items():
        route = tensor_route(key, plan)
        if route is None:
            continue
        out_key, layer, rest = route
        out[out_key] = tensor if layer is None else slice_tensor(rest, tensor, indices[layer])
    return out
