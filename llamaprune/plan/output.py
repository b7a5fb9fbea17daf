"""What ``llamaprune plan`` leaves behind: ``RUN_DIR/plans/<name>.json`` (and ``.png``), and its summary table.

The summary's ratios are fractions of the model's total (``*_prunable``: of attention + MLP) parameters.

    >>> write_plans("artifacts/run1", plans)                                     # doctest: +SKIP
    >>> read_plan("artifacts/run1/plans/global-taylor-0.20.json").name           # doctest: +SKIP
    'global-taylor-0.20'
    >>> format_rows(list(SUMMARY_COLUMNS), summary_rows(plans))                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import Plan, write_plan

PLANS_DIR = "plans"


def write_plans(run_dir: Path | str, plans: Iterable[Plan], png: bool = True) -> list[Path]:
    """Write ``RUN_DIR/plans/<name>.json`` (and ``.png``) for each plan; returns the JSON paths. Without ``png``
    an older picture of the same name goes: it would show another plan."""
    paths = []
    for plan in plans:
        path = Path(run_dir) / PLANS_DIR / f"{plan.name}.json"
        write_plan(plan, path)
        if png:
            from llamaprune.plan.plot import plot_plan

            plot_plan(plan, path.with_suffix(".png"))
        else:
            path.with_suffix(".png").unlink(missing_ok=True)
        paths.append(path)
    return paths


def refuse_existing_plans(run_dir: Path | str, names: Iterable[str], overwrite: bool) -> None:
    """Refuse, before any plan is made, to replace an existing plan of the same name without ``overwrite``."""
    existing = [name for name in names if (Path(run_dir) / PLANS_DIR / f"{name}.json").exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{Path(run_dir) / PLANS_DIR / existing[0]}.json already exists; pass --overwrite to replace "
            f"{'it' if len(existing) == 1 else f'it and {len(existing) - 1} more'} or choose another --name"
        )


SUMMARY_COLUMNS = (
    "plan",
    "target",
    "achieved",
    "target_prunable",
    "achieved_prunable",
    "params_before",
    "params_after",
    "heads_kept",
    "mlp_channels_kept",
    "layers_removed",
)


def summary_rows(plans: Iterable[Plan]) -> list[tuple]:
    """One row per plan in ``SUMMARY_COLUMNS`` order; ratios: fractions of total (prunable) params removed."""
    rows = []
    for plan in plans:
        layers = plan.layers
        heads = f"{sum(lp.heads_kept for lp in layers)}/{sum(lp.num_attention_heads for lp in layers)}"
        channels = f"{sum(len(lp.mlp_channels) for lp in layers)}/{sum(lp.intermediate_size for lp in layers)}"
        target_prunable = plan.target_ratio * plan.params_before / plan.prunable_before
        rows.append(
            (
                plan.name,
                round(plan.target_ratio, 4),
                round(plan.achieved_ratio, 4),
                round(target_prunable, 4),
                round(plan.achieved_prunable_ratio, 4),
                plan.params_before,
                plan.params_after,
                heads,
                channels,
                ",".join(str(i) for i in plan.removed_layers) or "-",
            )
        )
    return rows
