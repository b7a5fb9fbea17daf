"""The seed toolkit's run files, written from a run directory and its plan beside the native artifacts.

``description.txt`` (the configuration, ``key: value`` per line), ``global_group_table.csv`` (global plans:
every group in the order the planner ranked them for the plan, and whether it went), ``layer_importance_config.json``
(layer-wise plans: per layer its importance, pruning ratios and whether it was frozen) and
``pruning_strategy.png`` (the plan's picture).

    >>> tables = load_run("artifacts/run1")                                           # doctest: +SKIP
    >>> plan = read_plan("artifacts/run1/plans/global-taylor2-0.20.json")             # doctest: +SKIP
    >>> write_seed_files(Path("artifacts/run1"), tables, plan, {"pruning_ratio": 0.2})  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa

from llamaprune.core.artifacts import atomic_write_bytes, atomic_write_json
from llamaprune.core.plan_file import Plan
from llamaprune.plan import KINDS, PLANS_DIR, PlanOptions, RunTables, Strategy, ranked_groups

DESCRIPTION = "description.txt"
GROUP_TABLE = "global_group_table.csv"
LAYER_CONFIG = "layer_importance_config.json"
STRATEGY_PNG = "pruning_strategy.png"

# Every group in the order the planner ranked it (the ``ranked`` view), named and costed by groups.parquet.
RANKED_GROUPS = """
SELECT r.rank, g.group_id, r.layer, r.kind, r."index", g.params, r.importance, r.score, k."index" IS NULL AS pruned
FROM ranked AS r
JOIN read_parquet($groups) AS g USING (layer, kind, "index")
LEFT JOIN kept AS k USING (layer, kind, "index")
ORDER BY r.rank
"""


def description_text(config: dict) -> str:
    """One ``key: value`` line per option; enums by value, None as ``None``."""
    return "".join(
        f"{key}: {value.value if isinstance(value, Enum) else value}\n" for key, value in config.items()
    )


def kept_groups(plan: Plan) -> pa.Table:
    """(layer, kind, index) of every group the plan keeps."""
    layer, kind, index = [], [], []
    for lp in plan.layers:
        if lp.removed:
            continue
        for name, kept in zip(KINDS, (lp.attn_groups, lp.mlp_channels), strict=True):
            layer += [lp.layer] * len(kept)
            kind += [name] * len(kept)
            index += kept
    return pa.table(
        {
            "layer": pa.array(layer, pa.int32()),
            "kind": pa.array(kind, pa.string()),
            "index": pa.array(index, pa.int32()),
        }
    )


def ranked_table(tables: RunTables, plan: Plan) -> pa.Table:
    """rank (1 first), layer, kind, index, importance and score of every group, in the order the planner walked
    for ``plan`` (its criterion, normalized as it was), so that the table shows the ranking the plan followed."""
    ranked = ranked_groups(tables, PlanOptions(**plan.options))
    return pa.table(
        {
            "rank": pa.array(np.arange(1, len(ranked["layer"]) + 1), pa.int64()),
            "layer": pa.array(ranked["layer"], pa.int32()),
            "kind": pa.array(np.asarray(KINDS)[ranked["kind"]], pa.string()),
            "index": pa.array(ranked["index"], pa.int32()),
            "importance": pa.array(ranked["importance"], pa.float64()),
            "score": pa.array(ranked["score"], pa.float64()),
        }
    )


def write_group_table(path: Path, tables: RunTables, plan: Plan) -> None:
    """``global_group_table.csv``: rank, group_id, layer, kind, index, params, importance, score, pruned."""
    import duckdb

    with duckdb.connect() as con:
        con.register("ranked", ranked_table(tables, plan))
        con.register("kept", kept_groups(plan))
        ranked = con.sql(RANKED_GROUPS, params={"groups": str(tables.groups_path)})
        ranked.write_csv(str(path), header=True)


def layer_config(tables: RunTables, plan: Plan) -> dict:
    """Per layer: the importance the layer-wise budget was spread by, the fraction of attention (KV groups)
    and MLP channels removed, and whether ``freeze_top_n`` froze it (the N most important layers)."""
    source = plan.options["layer_importance"]
    importance = tables.layer_scores[source]
    frozen = set(
        sorted(range(tables.num_layers), key=lambda i: (-importance[i], i))[: plan.options["freeze_top_n"]]
    )
    layers = [
        {
            "layer": lp.layer,
            "importance": float(importance[lp.layer]),
            "attention_pruning_ratio": _removed_fraction(
                len(lp.attn_groups), lp.num_key_value_heads, lp.removed
            ),
            "mlp_pruning_ratio": _removed_fraction(len(lp.mlp_channels), lp.intermediate_size, lp.removed),
            "kv_heads_kept": len(lp.attn_groups),
            "heads_kept": lp.heads_kept,
            "mlp_channels_kept": len(lp.mlp_channels),
            "frozen": lp.layer in frozen,
            "removed": lp.removed,
        }
        for lp in plan.layers
    ]
    return {
        "plan": plan.name,
        "criterion": plan.criterion,
        "layer_importance": source,
        "pruning_strategy": plan.options["layer_strategy"],
        "pruning_distribution": plan.options["distribution"],
        "freeze_top_n_layers": plan.options["freeze_top_n"],
        "layers": layers,
    }


def _removed_fraction(kept: int, width: int, removed: bool) -> float:
    if removed:
        return 1.0
    return 1 - kept / width if width else 0.0


def write_seed_files(run_dir: Path, tables: RunTables, plan: Plan, config: dict) -> list[str]:
    """Write the seed's files for ``plan`` (already in ``run_dir/plans``); returns their names."""
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / DESCRIPTION, description_text(config).encode())
    written = [DESCRIPTION]
    if plan.strategy == Strategy.global_.value:
        write_group_table(run_dir / GROUP_TABLE, tables, plan)
        written.append(GROUP_TABLE)
    else:
        atomic_write_json(run_dir / LAYER_CONFIG, layer_config(tables, plan))
        written.append(LAYER_CONFIG)
    picture = run_dir / PLANS_DIR / f"{plan.name}.png"
    if picture.is_file():
        shutil.copyfile(picture, run_dir / STRATEGY_PNG)
        written.append(STRATEGY_PNG)
    return written
