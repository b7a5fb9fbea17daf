"""The plan document from removal counts: its default name, its kept lists and its parameter accounting.

The kept lists come from the plan order: each (layer, kind) loses its first ``removal`` groups in that order.

    >>> default_plan_name(PlanOptions(ratio=0.2, round_to=64, remove_empty_layers=True))
    'global-taylor-0.20-round64-depth'
"""

from __future__ import annotations

import math

import numpy as np

from llamaprune.core.errors import UsageError, flag, given_flags
from llamaprune.core.plan_file import SKIPPABLE, LayerPlan, Plan
from llamaprune.plan.limits import removal_cost
from llamaprune.plan.options import PlanOptions, Strategy
from llamaprune.plan.order import Order
from llamaprune.plan.tables import RunTables


def default_plan_name(options: PlanOptions) -> str:
    """``{strategy}-{criterion}-{ratio}`` plus a tag for each option that differs from its default."""
    default = PlanOptions(ratio=options.ratio)
    layerwise = options.strategy is Strategy.layerwise
    tags = [
        (not layerwise and options.normalize != default.normalize, f"norm{options.normalize.value}"),
        (layerwise and options.distribution is not None, "a{}m{}".format(*(options.distribution or (0, 0)))),
        (
            layerwise and options.layer_strategy != default.layer_strategy,
            f"layer{options.layer_strategy.value}",
        ),
        (
            (layerwise or options.freeze_top_n > 0) and options.layer_importance != default.layer_importance,
            f"by{options.layer_importance}",
        ),
        (options.freeze_top_n > 0, f"freeze{options.freeze_top_n}"),
        (bool(options.protect_layers), "protect" + "_".join(str(i) for i in options.protect_layers)),
        (options.min_kv_heads != default.min_kv_heads, f"minkv{options.min_kv_heads}"),
        (options.min_mlp_channels != default.min_mlp_channels, f"minmlp{options.min_mlp_channels}"),
        (options.round_to != default.round_to, f"round{options.round_to}"),
        (options.uniform, "uniform"),
        (options.remove_empty_layers, "depth"),
    ]
    base = [options.strategy.value, options.criterion, ratio_text(options.ratio)]
    return "-".join(base + [tag for wanted, tag in tags if wanted])


def ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}" if math.isclose(ratio, round(ratio, 2), abs_tol=1e-12) else f"{ratio:g}"


def assemble(tables: RunTables, order: Order, removal: np.ndarray, options: PlanOptions, name: str) -> Plan:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise UsageError(f"plan name {name!r} must be a plain file name (no '/', not starting with '.')")
    kept = tables.width - removal
    gone = (kept == 0).all(axis=1)
    if gone.all():
        keep = given_flags("plan --protect-layers", "plan --min-kv-heads", "plan --min-mlp-channels")
        raise UsageError(
            f"ratio {options.ratio} would remove every layer; choose a smaller {flag('plan --ratio')}"
            + (f" or keep layers with {', '.join(keep)}" if keep else "")
        )
    removed_groups = int((removal * tables.group_params).sum())
    removed = int(removal_cost(removal, tables).sum())
    from llamaprune import __version__

    return Plan(
        name=name,
        fingerprint=tables.meta["fingerprint"],
        source_table_sha256=tables.sha256,
        criterion=options.criterion,
        strategy=options.strategy.value,
        options=options.to_dict(),
        target_ratio=options.ratio,
        achieved_ratio=removed / tables.total,
        achieved_prunable_ratio=removed_groups / tables.prunable,
        params_before=tables.total,
        params_after=tables.total - removed,
        prunable_before=tables.prunable,
        prunable_after=tables.prunable - removed_groups,
        head_dim=int(tables.meta["head_dim"]),
        layers=tuple(_layer_plan(tables, order, removal, layer, bool(gone[layer])) for layer in range(len(gone))),
        created_by=f"llamaprune {__version__}",
        weights_fingerprint=tables.meta.get("weights_fingerprint"),
    )


def _layer_plan(tables: RunTables, order: Order, removal: np.ndarray, layer: int, gone: bool) -> LayerPlan:
    kept = []
    for k in range(2):
        start, end = order.starts[2 * layer + k], order.starts[2 * layer + k + 1]
        keep = np.zeros(end - start, dtype=bool)
        keep[order.index[start + removal[layer, k] : end]] = True  # sorted by index, no sort needed
        kept.append(tuple(np.flatnonzero(keep).tolist()))
    return LayerPlan(
        layer=layer,
        num_attention_heads=int(tables.heads[layer]),
        num_key_value_heads=int(tables.width[layer, 0]),
        intermediate_size=int(tables.width[layer, 1]),
        attn_groups=kept[0],
        mlp_channels=kept[1],
        skip=() if gone else tuple(name for name, ids in zip(SKIPPABLE, kept, strict=True) if not ids),
        removed=gone,
    )
