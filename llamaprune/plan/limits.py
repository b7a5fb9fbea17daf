"""What a plan may remove: the removal steps each (layer, kind) allows, what a removal costs, the budget a
target ratio gives, and the error for a target the constraints cannot reach.

    >>> param_budget(0.03, 1000)  # 0.03 is a little below 3/100 as a float; 30 / 1000 <= 0.03 still holds
    30
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from llamaprune.core.errors import UsageError, flag, given_flags
from llamaprune.core.tables import LAYERS_FILE
from llamaprune.plan.options import PlanOptions
from llamaprune.plan.tables import RunTables


@dataclass(frozen=True)
class Limits:
    """What each (layer, kind) may lose: removal counts 0, offset, offset + stride, ... up to ``most``."""

    stride: np.ndarray  # (2,): 1 for attention groups, round_to for MLP channels
    offset: np.ndarray  # (layers, 2): width % stride, the first step when the width is not a multiple
    most: np.ndarray  # (layers, 2): the largest removal the minimums (and protection) allow
    eligible: np.ndarray  # (layers,): neither protected nor frozen


def removal_limits(tables: RunTables, options: PlanOptions) -> Limits:
    """The minimums rounded up to whole steps; protected and frozen layers may lose nothing."""
    eligible = np.ones(tables.num_layers, dtype=bool)
    eligible[_protected(options.protect_layers, tables.num_layers)] = False
    if options.freeze_top_n:
        eligible[_most_important(tables, options)] = False
    stride = np.array([1, options.round_to])
    minimum = np.array([options.min_kv_heads, options.min_mlp_channels])
    kept_min = -(-minimum // stride) * stride  # rounded up to a multiple of the stride
    most = np.maximum(tables.width - kept_min, 0) * eligible[:, None]
    return Limits(stride=stride, offset=tables.width % stride, most=most, eligible=eligible)


def _protected(indices: tuple[int, ...], num_layers: int) -> list[int]:
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise UsageError(
                f"{flag('plan --protect-layers')} {i} is out of range for a model with {num_layers} layers; "
                f"use 0..{num_layers - 1} or -1..-{num_layers}"
            )
    return [i % num_layers for i in indices]


def _most_important(tables: RunTables, options: PlanOptions) -> np.ndarray:
    n = options.freeze_top_n
    if n >= tables.num_layers:
        raise UsageError(
            f"{flag('plan --freeze-top-n')} {n} freezes every one of the {tables.num_layers} layers; use fewer"
        )
    importance = layer_importance(tables, options.layer_importance)
    return np.lexsort((np.arange(tables.num_layers), -importance))[:n]


def layer_importance(tables: RunTables, source: str) -> np.ndarray:
    """Per layer, ``block_influence`` or a criterion's sum; a missing value would rank a layer arbitrarily."""
    if source not in tables.layer_scores:
        raise UsageError(
            f"layer importance {source!r} is not in {LAYERS_FILE}; choose one of: {', '.join(tables.layer_scores)}"
        )
    values = tables.layer_scores[source]
    missing = np.flatnonzero(np.isnan(values))
    if missing.size:
        raise UsageError(
            f"{LAYERS_FILE} has no {source} for layers {missing.tolist()}; choose another "
            f"{flag('plan --layer-importance')} ({', '.join(c for c in tables.layer_scores if c != source)})"
        )
    return values


def removal_cost(removal: np.ndarray, tables: RunTables) -> np.ndarray:
    """Params removed by taking ``removal`` groups of each (layer, kind), fixed ones too when it empties."""
    emptied = (removal == tables.width) & (tables.width > 0)
    return removal * tables.group_params + np.where(emptied, tables.fixed_params, 0)


def floor_step(count: np.ndarray, limits: Limits) -> np.ndarray:
    """The largest valid removal count not above ``count``."""
    count = np.minimum(count, limits.most)
    stepped = limits.offset + (count - limits.offset) // limits.stride * limits.stride
    return np.where(count < limits.offset, 0, stepped)


def next_step(removal: np.ndarray, limits: Limits) -> np.ndarray:
    """The next valid removal count (capped at ``most``, where it equals ``removal``)."""
    step = np.where((removal == 0) & (limits.offset > 0), limits.offset, removal + limits.stride)
    return np.where(step <= limits.most, step, removal)


def prev_step(removal: np.ndarray, limits: Limits) -> np.ndarray:
    """The valid removal count before ``removal`` (0 before the first step)."""
    return np.where(removal <= limits.offset, 0, removal - limits.stride)


def param_budget(ratio: float, total: int) -> int:
    """The most params a plan may remove: the largest B with ``B / total <= ratio`` as computed in floats, so
    the achieved ratio never exceeds the target and ``--ratio 0.03`` of 1000 params allows 30."""
    budget = math.floor(Fraction(ratio) * total)
    return budget + 1 if (budget + 1) / total <= ratio else budget


RELAXABLE = ("protect-layers", "freeze-top-n", "min-kv-heads", "min-mlp-channels", "distribution")


def floor_ratio(params: int, total: int) -> float:
    """``params / total`` rounded down to 4 decimals, as an error names a ratio."""
    return math.floor(params / total * 1e4) / 1e4


def unreachable(ratio: float, reachable: int, total: int) -> UsageError:
    """The error for a target beyond what a plan can remove: at most ``reachable`` params, which the strategy
    found; the ratio it names is rounded down, so it fits."""
    best = floor_ratio(reachable, total)
    relax = given_flags(*(f"plan --{name}" for name in RELAXABLE))
    return UsageError(
        f"ratio {ratio} is unreachable: with these constraints at most {best:.4f} of the parameters can be "
        f"removed; choose {flag('plan --ratio')} {best} or less" + (f", or relax {', '.join(relax)}" if relax else "")
    )
