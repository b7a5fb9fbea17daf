"""Making plans: options and a run's tables in, ``Plan`` documents out (one per target ratio).

No torch here: a plan is made from ``groups.parquet`` / ``layers.parquet`` alone and applied later, possibly on
another machine, with only the plan file and the checkpoint.

    >>> tables = load_run("artifacts/run1")                                      # doctest: +SKIP
    >>> plans = make_plans(tables, PlanOptions(ratio=0.2), ratios=[0.1, 0.2])    # doctest: +SKIP
    >>> [p.achieved_ratio <= p.target_ratio for p in plans]                      # doctest: +SKIP
    [True, True]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from llamaprune.core.errors import UsageError, flag
from llamaprune.core.plan_file import Plan
from llamaprune.plan.assemble import assemble, default_plan_name, ratio_text
from llamaprune.plan.greedy import global_removal
from llamaprune.plan.layerwise import layerwise_removal
from llamaprune.plan.limits import param_budget, removal_limits
from llamaprune.plan.options import Normalize, PlanOptions, Strategy
from llamaprune.plan.order import Order, plan_order
from llamaprune.plan.tables import RunTables, load_run


def make_plan(source: RunTables | Path | str, options: PlanOptions, name: str | None = None) -> Plan:
    """One plan from a run directory (or tables already loaded with ``load_run``)."""
    tables = source if isinstance(source, RunTables) else load_run(source)
    if options.criterion not in tables.criteria:
        raise UsageError(
            f"criterion {options.criterion!r} is not in {tables.groups_path}; it has: "
            f"{', '.join(tables.criteria)} "
            f"(add it with `llamaprune score ... --criteria {options.criterion}`)"
        )
    after = tables.meta.get("after")
    if after is not None and options.normalize is not Normalize.none:
        raise UsageError(f"{tables.groups_path} was scored after the plan {after['plan']['name']!r}, whose groups "
                         f"score -inf; plan from it with {flag('plan --normalize')} none")
    order = plan_order(tables, options)
    limits = removal_limits(tables, options)
    budget = param_budget(options.ratio, tables.total)
    strategy = global_removal if options.strategy is Strategy.global_ else layerwise_removal
    removal = strategy(tables, order, limits, options, budget)
    if after is not None:
        _check_after(tables, order, removal, after, options)
    return assemble(tables, order, removal, options, name or default_plan_name(options))


def _check_after(tables: RunTables, order: Order, removal: np.ndarray, after: dict, options: PlanOptions) -> None:
    """A plan from a run scored after a step's plan (``scoring.after_plan``) must remove every group of the step:
    they are the first of each layer and kind in plan order (their scores are -inf)."""
    step = np.bincount(order.part[np.isneginf(order.score)], minlength=removal.size).reshape(removal.shape)
    if (removal < step).any():
        plan = after["plan"]
        raise UsageError(
            f"{tables.groups_path} was scored after the plan {plan['name']!r} removed "
            f"{plan['achieved_ratio']:.1%} of the model, and a plan at {flag('plan --ratio')} {options.ratio} by "
            f"these options keeps some of its groups; plan at least that ratio, with the layerwise strategy's "
            f"counts or the layers and minimums kept no tighter than the step's"
        )


def make_plans(
    source: RunTables | Path | str, options: PlanOptions, ratios=None, name: str | None = None
) -> list[Plan]:
    """One plan per ratio (default: ``options.ratio``), reading the tables once; with several ratios a given
    ``name`` gets the ratio appended."""
    return list(iter_plans(source, options, ratios, name))


def iter_plans(
    source: RunTables | Path | str, options: PlanOptions, ratios=None, name: str | None = None
) -> Iterator[Plan]:
    """``make_plans`` one plan at a time, so that a sweep holds one plan (~2M indices for 70B) at once."""
    tables = source if isinstance(source, RunTables) else load_run(source)
    ratios = list(dict.fromkeys(ratios or [options.ratio]))
    for ratio, label in zip(ratios, plan_names(options, ratios, name), strict=True):
        yield make_plan(tables, replace(options, ratio=ratio), label)


def plan_names(options: PlanOptions, ratios, name: str | None = None) -> list[str]:
    """The names ``iter_plans`` gives its plans: ``name`` (with the ratio appended when there are several), or
    the default name of each ratio."""
    ratios = list(dict.fromkeys(ratios or [options.ratio]))
    if name:
        return [f"{name}-{ratio_text(ratio)}" if len(ratios) > 1 else name for ratio in ratios]
    return [default_plan_name(replace(options, ratio=ratio)) for ratio in ratios]
