"""Phase 2: turn a scored group table into pruning plans (the Plan document lives in ``pruning_plan``).

No torch here: a plan is made from ``groups.parquet`` / ``layers.parquet`` alone (DuckDB orders the
groups, numpy spends the budget) and applied later, possibly on another machine, with only the plan
file and the checkpoint. ``ratio`` is always the fraction of the model's *total* parameters to remove.

The package, in the order a plan is made: ``options`` (what to make), ``tables`` (the run's tables),
``order`` (groups by score), ``limits`` (what may go, and the budget), ``greedy`` / ``layerwise`` (the two
strategies), ``document`` (the Plan from removal counts), ``planning`` (all of it per ratio) and ``output``
(plan files and the summary table).

    >>> tables = load_run("artifacts/run1")                                      # doctest: +SKIP
    >>> plans = make_plans(tables, PlanOptions(ratio=0.2), ratios=[0.1, 0.2])    # doctest: +SKIP
    >>> [p.achieved_ratio <= p.target_ratio for p in plans]                      # doctest: +SKIP
    [True, True]
    >>> write_plans("artifacts/run1", plans)                                     # doctest: +SKIP
    >>> read_plan("artifacts/run1/plans/global-taylor-0.20.json").name           # doctest: +SKIP
    'global-taylor-0.20'
"""

from llamaprune.plan.assemble import default_plan_name
from llamaprune.plan.options import (
    BLOCK_INFLUENCE,
    LayerStrategy,
    Normalize,
    PlanOptions,
    Strategy,
    parse_distribution,
    parse_layers,
    parse_ratios,
)
from llamaprune.plan.order import ranked_groups
from llamaprune.plan.output import PLANS_DIR, SUMMARY_COLUMNS, refuse_existing_plans, summary_rows, write_plans
from llamaprune.plan.planning import iter_plans, make_plan, make_plans, plan_names
from llamaprune.plan.tables import KINDS, RunTables, load_run

__all__ = [
    "BLOCK_INFLUENCE",
    "KINDS",
    "PLANS_DIR",
    "SUMMARY_COLUMNS",
    "LayerStrategy",
    "Normalize",
    "PlanOptions",
    "RunTables",
    "Strategy",
    "default_plan_name",
    "iter_plans",
    "load_run",
    "make_plan",
    "make_plans",
    "parse_distribution",
    "parse_layers",
    "parse_ratios",
    "plan_names",
    "ranked_groups",
    "refuse_existing_plans",
    "summary_rows",
    "write_plans",
]
