"""The layerwise strategy: the budget split between attention and MLP, spread across layers (evenly or less
to more important layers), and spent in valid removal steps per layer.

    >>> tables = load_run("artifacts/run1")                                          # doctest: +SKIP
    >>> options = PlanOptions(ratio=0.2, strategy="layerwise", distribution=(2, 8))   # doctest: +SKIP
    >>> removal = layerwise_removal(tables, plan_order(tables, options), removal_limits(tables, options),
    ...                             options, param_budget(options.ratio, tables.total))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamaprune.plan.limits import (
    Limits,
    floor_ratio,
    floor_step,
    layer_importance,
    next_step,
    param_budget,
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
    weight = _layer_weights(tables, options)
    split = _split(tables, limits, options, share, weight, budget)
    if not split.fits:
        most = _most_spendable(tables, limits, options, share, weight, budget)
        raise unreachable(options.ratio, most, tables.total)
    budgets, active, gone, caps = split.budgets, split.active, split.gone, split.caps
    removal = np.zeros_like(tables.width)
    carry = 0  # what attention's rounding leaves goes to the MLP (when the MLP has a share)
    for k in range(2):
        if share[k]:
            left = int(budgets[k]) + carry
            spread = _waterfill(left, weight * full[:, k] * active, caps[:, k])
            carry = _spend(removal, k, spread, left, tables, limits, together=options.uniform)
    removal[gone] = tables.width[gone]
    return removal


@dataclass(frozen=True)
class _Split:
    """A budget split between attention and MLP (``budgets``, what the layers that go take already deducted),
    the layers still to prune (``active``), those that go (``gone``) and what each active one may lose
    (``caps``); it ``fits`` when each kind with a share can spend its budget."""

    share: tuple[int, int]
    budgets: np.ndarray
    active: np.ndarray
    gone: np.ndarray
    caps: np.ndarray
    capacity: np.ndarray  # per kind, all the layers can lose: their caps and the whole of the layers that go

    @property
    def fits(self) -> bool:
        return not any(self.share[k] and self.budgets[k] > self.caps[:, k].sum() for k in range(2))


def _split(tables: RunTables, limits: Limits, options: PlanOptions, share: tuple[int, int], weight: np.ndarray,
           budget: int) -> _Split:
    full = tables.width * tables.group_params
    attn_budget = budget * share[0] // sum(share)
    budgets = np.array([attn_budget, budget - attn_budget], dtype=np.int64)
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
    return _Split(share, budgets, active, gone, caps, caps.sum(axis=0) + whole[gone].sum(axis=0))


def _most_spendable(tables: RunTables, limits: Limits, options: PlanOptions, share: tuple[int, int],
                    weight: np.ndarray, budget: int) -> int:
    """The largest budget below the refused ``budget`` that fits, and whose ratio as the error names it (rounded
    down) fits too. With --remove-empty-layers more layers go as the budget grows, and a layer that goes lets its
    kinds lose all of it, not just down to the minimums: what fits is then not every budget up to a bound. The
    largest budget within what a refused budget's layers can lose is the next one to try: fewer layers go there, so
    this ends within one step per layer. Where every layer could go, one must stay: the budget is below all they
    hold."""
    emptiable = limits.eligible & (options.remove_empty_layers | (limits.most == tables.width).all(axis=1))
    if emptiable.all():
        budget = min(budget, max(int(removal_cost(tables.width, tables).sum()) - 1, 0))
    while True:
        split = _split(tables, limits, options, share, weight, budget)
        while not split.fits:
            budget = min(budget - 1, _within(share, split.capacity))
            split = _split(tables, limits, options, share, weight, budget)
        named = param_budget(floor_ratio(budget, tables.total), tables.total)
        if named == budget or _split(tables, limits, options, share, weight, named).fits:
            return budget
        budget = named


def _within(share: tuple[int, int], capacity: np.ndarray) -> int:
    """The largest budget whose split gives each kind with a share at most its ``capacity`` (attention gets
    ``budget * a // (a + m)``, the MLP the rest)."""
    a, m = share
    bounds = []
    if a:
        bounds.append(((int(capacity[0]) + 1) * (a + m) - 1) // a)
    if m:
        bounds.append(int(capacity[1]) * (a + m) // m)
    return min(bounds)


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
