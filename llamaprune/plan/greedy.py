"""The global strategy: a greedy over removal units in plan order, model-wide.

A unit is one removal step of one (layer, kind): a group, a run of ``round_to`` channels, the same step in
every layer at once (``uniform``), or what a layer's minimums keep (``remove_empty_layers``).

    >>> tables = load_run("artifacts/run1")                                          # doctest: +SKIP
    >>> options = PlanOptions(ratio=0.2, round_to=64)                                 # doctest: +SKIP
    >>> removal = global_removal(tables, plan_order(tables, options), removal_limits(tables, options), options,
    ...                          param_budget(options.ratio, tables.total))           # doctest: +SKIP
    >>> removal.shape                                                                 # doctest: +SKIP
    (32, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from llamaprune.core.errors import UsageError
from llamaprune.plan.limits import Limits, unreachable
from llamaprune.plan.options import PlanOptions
from llamaprune.plan.order import Order
from llamaprune.plan.tables import RunTables


@dataclass(frozen=True)
class Units:
    """Removal units in the order the greedy considers them. ``kind`` 0/1 removes ``size`` groups of that
    kind from ``layer`` (-1: from every layer, --uniform); kind 2 removes what is left of the layer."""

    cost: np.ndarray
    layer: np.ndarray
    kind: np.ndarray
    size: np.ndarray
    last: np.ndarray  # the unit empties its sub-block (or layer)


def global_removal(tables: RunTables, order: Order, limits: Limits, options: PlanOptions, budget: int):
    """(layers, 2) removal counts: the greedy over removal units in plan order."""
    key = replace(options, ratio=0.5)  # the units depend on every option but the ratio: reuse them in a sweep
    if tables.units is None or tables.units[0] != key:
        build = _slice_units if options.uniform else _group_units
        units, score = build(tables, order, limits)
        if options.remove_empty_layers:
            units = _with_whole_layers(units, score, tables, order, limits)
        tables.units = (key, units)
    units = tables.units[1]
    reachable = int(units.cost.sum())
    emptiable = limits.eligible & (options.remove_empty_layers | (limits.most == tables.width).all(axis=1))
    one_stays = emptiable.all() and units.last.any()  # every layer could go, and one must stay
    if one_stays:  # targets up to here are planned, short of them where a whole-layer unit cannot be taken
        reachable -= int(units.cost[units.last].min())
    if budget > reachable:  # the error names what a plan can remove at most
        most = int(units.cost.sum()) - (_keeping_a_layer(units) if one_stays else 0)
        raise unreachable(options.ratio, most, tables.total)
    taken = _take(units, budget)
    return _apply(units, taken, tables)


def _keeping_a_layer(units: Units) -> int:
    """What a plan must leave of its units so that a layer stays, at the least: a layer with a whole-layer unit
    stays by leaving that unit (the rest of the layer may go; without the rest, that unit cannot be taken
    either), one without by leaving its cheapest emptying unit (with --uniform, every layer's: layer -1)."""
    whole = units.kind == 2
    by_whole = dict(zip(units.layer[whole].tolist(), units.cost[whole].tolist(), strict=True))
    keep = dict(by_whole)
    emptying = units.last & ~whole
    for layer, cost in zip(units.layer[emptying].tolist(), units.cost[emptying].tolist(), strict=True):
        if layer not in by_whole:
            keep[layer] = min(keep.get(layer, cost), cost)
    return min(keep.values())


def _group_units(tables: RunTables, order: Order, limits: Limits) -> tuple[Units, np.ndarray]:
    """One unit per removal step of each (layer, kind): a group, or with --round-to a run of channels."""
    width, group_params = tables.width.reshape(-1), tables.group_params.reshape(-1)
    most, fixed = limits.most.reshape(-1), tables.fixed_params.reshape(-1)
    if (limits.stride == 1).all():  # every group is a unit, already in plan order
        pick = np.flatnonzero(order.pos < most[order.part])
        part = order.part[pick].astype(np.int64)
        last = order.pos[pick] == width[part] - 1
        cost = group_params[part] + np.where(last, fixed[part], 0)
        units = Units(cost=cost, layer=part // 2, kind=part % 2, size=np.ones(len(pick), dtype=np.int64), last=last)
        return units, order.score[pick]
    part = np.repeat(np.arange(len(order.starts) - 1), np.diff(order.starts))  # by partition from here on
    pos = np.arange(len(part)) - order.starts[part]
    pick = np.flatnonzero(pos < most[part])
    offset, stride = limits.offset.reshape(-1)[part[pick]], limits.stride[part[pick] % 2]
    step = (pos[pick] - offset + stride) // stride - (offset == 0)  # which removal step each group belongs to
    bounds = np.flatnonzero(np.diff(part[pick].astype(np.int64) * (len(part) + 1) + step, prepend=-1))
    first, size = pick[bounds], np.diff(np.append(bounds, len(pick)))
    upart = part[first]
    score = np.add.reduceat(order.imp[pick], bounds) / (size * group_params[upart])
    last = pos[first] + size == width[upart]
    cost = size * group_params[upart] + np.where(last, fixed[upart], 0)
    seq = np.lexsort((order.rank[first], score))
    units = Units(cost=cost[seq], layer=upart[seq] // 2, kind=upart[seq] % 2, size=size[seq], last=last[seq])
    return units, score[seq]


def _slice_units(tables: RunTables, order: Order, limits: Limits) -> tuple[Units, np.ndarray]:
    """--uniform: one unit per removal step taken in every layer at once (the same width everywhere)."""
    if (tables.width != tables.width[0]).any() or (tables.group_params != tables.group_params[0]).any():
        raise UsageError("--uniform needs every layer to have the same widths and costs; this model's layers differ")
    parts = []
    for k in range(2):
        most, offset, stride = int(limits.most[0, k]), int(limits.offset[0, k]), int(limits.stride[k])
        if most == 0:
            continue
        bounds = np.concatenate([[0], np.arange(offset or stride, most, stride)])
        where = order.starts[k:-1:2][:, None] + np.arange(most)[None, :]  # (layers, most)
        size = np.diff(np.append(bounds, most))
        params = size * tables.group_params[:, k].sum()
        ends = bounds + size == tables.width[0, k]
        cost = params + np.where(ends, tables.fixed_params[:, k].sum(), 0)
        score = np.add.reduceat(order.imp[where].sum(axis=0), bounds) / params
        rank = order.rank[where[:, bounds]].min(axis=0)
        parts.append((cost, np.full(len(size), k), size, score, rank, ends))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return Units(cost=empty, layer=empty, kind=empty, size=empty, last=empty.astype(bool)), np.zeros(0)
    cost, kind, size, score, rank, ends = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    seq = np.lexsort((rank, score))
    units = Units(cost=cost[seq], layer=np.full(len(seq), -1), kind=kind[seq], size=size[seq], last=ends[seq])
    return units, score[seq]


def _with_whole_layers(units: Units, score: np.ndarray, tables: RunTables, order: Order, limits: Limits) -> Units:
    """--remove-empty-layers: after a layer's last unit comes one that takes what its minimums keep, so a
    layer the plan would empty is removed outright. Placed by the score of what it removes, after the rest."""
    reserved = (tables.width - limits.most) * limits.eligible[:, None]
    layers = np.flatnonzero((reserved > 0).any(axis=1))
    if not layers.size:
        return units
    total_imp = np.concatenate([[0.0], np.cumsum(order.imp)])
    ends = order.starts[1:].reshape(-1, 2)
    imp = (total_imp[ends] - total_imp[ends - reserved]).sum(axis=1)
    params = (reserved * tables.group_params).sum(axis=1)
    cost = params + np.where(reserved > 0, tables.fixed_params, 0).sum(axis=1)
    last = np.full(tables.num_layers, -np.inf)
    np.maximum.at(last, units.layer, score)  # the score of each layer's last regular unit
    key = np.maximum(imp[layers] / params[layers], last[layers])
    seq = np.argsort(key, kind="stable")
    layers, at = layers[seq], np.searchsorted(score, key[seq], side="right")
    return Units(
        cost=np.insert(units.cost, at, cost[layers]),
        layer=np.insert(units.layer, at, layers),
        kind=np.insert(units.kind, at, 2),
        size=np.insert(units.size, at, 0),
        last=np.insert(units.last, at, True),
    )


def _take(units: Units, budget: int) -> np.ndarray:
    """The greedy, vectorized: take units in order while they fit; one that would overshoot is skipped and
    later, cheaper ones are still taken. A whole-layer unit is taken only if all other units of its layer
    were."""
    cost, n = units.cost, len(units.cost)
    taken = np.zeros(n, dtype=bool)
    whole = units.kind == 2
    if whole.any():
        layers = int(units.layer.max()) + 1
        needed = np.bincount(units.layer[~whole], minlength=layers)
        have = np.zeros(layers, dtype=np.int64)
    left, start = budget, 0
    while start < n:
        cand = start + np.flatnonzero(cost[start:] <= left)
        if not cand.size:
            break
        spent = np.cumsum(cost[cand])
        k = int(np.searchsorted(spent, left, side="right"))
        resume = cand[k] + 1 if k < cand.size else n  # cand[k] overshoots: skip it, go on after it
        if whole.any():
            wanted = cand[:k]
            counts = have + np.bincount(units.layer[wanted[~whole[wanted]]], minlength=layers)
            early = wanted[whole[wanted]]
            early = early[counts[units.layer[early]] < needed[units.layer[early]]]
            if early.size:  # a layer still has parts left: skip its whole-layer unit
                k, resume = int(np.searchsorted(cand, early[0])), early[0] + 1
            have += np.bincount(units.layer[cand[:k][~whole[cand[:k]]]], minlength=layers)
        taken[cand[:k]] = True
        left -= int(spent[k - 1]) if k else 0
        start = resume
    return taken


def _apply(units: Units, taken: np.ndarray, tables: RunTables) -> np.ndarray:
    """(layers, 2) removal counts from the taken units."""
    layers = tables.num_layers
    part = units.kind < 2
    every = taken & part & (units.layer < 0)
    one = taken & part & (units.layer >= 0)
    removal = np.bincount(units.kind[every], weights=units.size[every], minlength=2)[None, :].repeat(layers, 0)
    flat = units.layer[one] * 2 + units.kind[one]
    removal = removal + np.bincount(flat, weights=units.size[one], minlength=2 * layers).reshape(layers, 2)
    removal = removal.astype(np.int64)
    whole = units.layer[taken & (units.kind == 2)]
    removal[whole] = tables.width[whole]
    return removal
