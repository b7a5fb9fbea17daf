"""The plan command: plans for many ratios from one run, each written as soon as it is made, and the run's
history. Torch-free, like the rest of the planner.

    >>> rows, seconds = plan_ratios(Path("artifacts/run1"), PlanOptions(ratio=0.1), [0.1, 0.2])  # doctest: +SKIP
    >>> [row[0] for row in rows]                                                          # doctest: +SKIP
    ['global-taylor-0.10', 'global-taylor-0.20']
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llamaprune.core.artifacts import read_manifest
from llamaprune.plan.options import PlanOptions
from llamaprune.plan.output import refuse_existing_plans, summary_rows, write_plans
from llamaprune.plan.planning import iter_plans, plan_names
from llamaprune.plan.tables import load_run
from llamaprune.runs.phase import Phase, run_phase


def plan_ratios(run_dir: Path, options: PlanOptions, targets: list[float], name: str | None = None,
                png: bool = True, overwrite: bool = False) -> tuple[list[tuple], float]:
    """One plan per target ratio (sorted, ``options.ratio`` being the first) into ``run_dir/plans``; returns the
    summary rows (smallest ratio first) and the seconds taken. Every ratio and name is checked before any plan is
    written, and the plans are made largest ratio first, one in memory at a time, so an unreachable target fails
    before a file is written."""
    for target in targets[1:]:
        replace(options, ratio=target)
    refuse_existing_plans(run_dir, plan_names(options, targets, name), overwrite)
    with run_phase(Phase("plan", run_dir, in_place=True), lambda _: load_run(run_dir)) as run:
        rows: list[tuple] = []
        for plan in iter_plans(run.inputs, options, targets[::-1], name):
            write_plans(run_dir, [plan], png=png)
            rows[:0] = summary_rows([plan])
        run.summary.update(options=options.to_dict(), ratios=targets, plans=[row[0] for row in rows],
                           seconds=run.seconds())
        run.record(read_manifest(run_dir))
    return rows, run.summary["seconds"]
