"""The layerwise strategy: the budget split between attention and MLP, spread across layers (evenly or less
to more important layers), and spent in valid removal steps per layer.

    >>> tables = load_run("artifacts/run1")                                          # doctest: +SKIP
    >>> options = PlanOptions(ratio=0.2, strategy="layerwise", distribution=(2, 8))   # doctest: +SKIP
    >>> removal = layerwise_removal(tables, plan_order(tables, options), removal_limits(tables, options),
    ...                             options, param_budget(options.ratio, tables.total))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from llamaprune.plan.limits import (
    Limits,
    floor_step,
    layer_importance,
    next_step,
    prev_step,
    removal_cost,
    unreachable,
)
from llamaprune.plan.options import LayerStrategy, PlanOptions
from llamaprune.plan.order import Order
from llamaprune.plan.tables import RunTables


def layerwise_removal(tables: RunTables, order: Order, limits: Limits, options: PlanOptions, budget: int):
    """(layers, 2) removal counts: the budget split between attention and MLP, then across layers; within a
    layer the least important groups go first (the order's partitions)."""
    full = tables.width * tables.group_params
    share = options.distribution or tuple(int(x) for x in full.sum(axis=0))
    attn_budget = budget * share[0] // sum(share)
    budgets = np.array([attn_budget, budget - attn_budget], dtype=np.int64)
    weight = _layer_weights(tables, options)
    active = limits.eligible.copy()
    gone = np.zeros(tables.num_layers, dtype=bool)
    whole = removal_cost(tables.width, tables)
    if options.remove_empty_layers:
        # layers whose shares cover all they hold go first, their minimums notwithstanding
        spread = [_waterfill(budgets[k], weight * full[:, k] * active, whole[:, k] * active) for k in range(2)]
        gone = active & np.all(np.stack(spread, axis=1) >= whole, axis=1) & (whole > 0).any(axis=1)
        budgets -= whole[gone].sum(axis=0)
        active &= ~gone
    caps = removal_cost(limits.most, tables) * active[:, None]
    if any(share[k] and budgets[k] > caps[:, k].sum() for k in range(2)):
        capacity = caps.sum(axis=0) + whole[gone].sum(axis=0)
        reachable = min(capacity[k] * sum(share) / share[k] for k in range(2) if share[k])
        raise unreachable(options.ratio, float(reachable), tables.total)
    removal = np.zeros_like(tables.width)
    carry = 0  # what attention's rounding leaves goes to the MLP (when the MLP has a share)
    for k in range(2):
        if share[k]:
            left = int(budgets[k]) + carry
            spread = _waterfill(left, weight * full[:, k] * active, caps[:, k])
            carry = _spend(removal, k, spread, left, tables, limits, together=options.uniform)
    removal[gone] = tables.width[gone]
    return removal


def _layer_weights(tables: RunTables, options: PlanOptions) -> np.ndarray:
    """Share of the budget per unit of layer size: equal, or inversely proportional to layer importance."""
    if options.uniform or options.layer_strategy is LayerStrategy.uniform:
        return np.ones(tables.num_layers)
    importance = layer_importance(tables, options.layer_importance)
    floor = max(float(np.abs(importance).max()) * 1e-12, np.finfo(float).tiny)
    return 1.0 / np.maximum(importance, floor)


def _waterfill(budget: float, weight: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Split ``budget`` in proportion to ``weight``, no layer above its ``cap`` (the excess flows on)."""
    spread = np.zeros(len(cap))
    open_ = (weight > 0) & (cap > 0)
    left = float(budget)
    while open_.any():
        level = left / weight[open_].sum()
        full = open_ & (level * weight >= cap)
        if not full.any():
            spread[open_] = level * weight[open_]
            break
        spread[full] = cap[full]
        left -= float(cap[full].sum())
        open_ &= ~full
    return spread


def _spend(
    removal: np.ndarray, k: int, spread: np.ndarray, budget: int, tables: RunTables, limits: Limits, together: bool
) -> int:
    """Fill column ``k`` of ``removal`` with valid counts from a continuous spread of params: floor each
    layer's share, then spend the rest one step at a time, largest shortfall first (every layer at once when
    ``together``). Returns the params left over."""
    safe = spread * (1 - 1e-12)  # float sums may round up; the budget is a hard limit

    def cost(r: np.ndarray) -> np.ndarray:
        return removal_cost(r, tables)[:, k]

    removal[:, k] = np.floor(safe / np.maximum(tables.group_params[:, k], 1))
    removal[:] = floor_step(removal, limits)
    removal[:, k] = np.where(cost(removal) > safe, prev_step(removal, limits)[:, k], removal[:, k])
    left = budget - int(cost(removal).sum())
    if together:
        while True:
            step = removal.copy()
            step[:, k] = next_step(removal, limits)[:, k]
            delta = int((cost(step) - cost(removal)).sum())
            if not (step[:, k] > removal[:, k]).all() or delta > left:
                return left
            removal[:] = step
            left -= delta
    step = removal.copy()
    step[:, k] = next_step(removal, limits)[:, k]
    delta = cost(step) - cost(removal)
    for i in np.argsort(-(spread - cost(removal)), kind="stable"):
        if step[i, k] > removal[i, k] and delta[i] <= left:
            removal[i, k] = step[i, k]
            left -= int(delta[i])
    return left
