"""``llamaprune sql``: DuckDB over a run directory, with the views ``groups``, ``layers``, ``plans`` (one row
per plan file) and ``plan_layers`` (one row per plan and layer) already defined.

    >>> columns, rows = run_query("artifacts/run1", "SELECT count(*) AS n FROM groups")  # doctest: +SKIP
    >>> print(format_rows(columns, rows, OutputFormat.table))                          # doctest: +SKIP

Three useful queries:

    -- the three least important groups (per parameter) of each layer
    SELECT layer, group_id, taylor / params AS score FROM groups
    QUALIFY row_number() OVER (PARTITION BY layer ORDER BY taylor / params, group_id) <= 3
    ORDER BY layer, score

    -- what a plan removes per layer
    SELECT layer, num_key_value_heads - kv_heads_kept AS kv_heads_removed,
           intermediate_size - mlp_channels_kept AS mlp_channels_removed, skip, removed
    FROM plan_layers WHERE plan = 'global-taylor-0.20' ORDER BY layer

    -- how far two criteria agree (Spearman rank correlation per kind)
    SELECT kind, corr(a, b) AS spearman FROM (
        SELECT kind, rank() OVER (PARTITION BY kind ORDER BY taylor) AS a,
               rank() OVER (PARTITION BY kind ORDER BY wanda) AS b FROM groups
    ) GROUP BY kind
"""

from __future__ import annotations

import csv
import io
import json
import re
from enum import Enum
from pathlib import Path

import pyarrow as pa

from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import LayerPlan, Plan, read_plan
from llamaprune.core.tables import GROUPS_FILE, LAYERS_FILE, file_sha256, read_table_meta
from llamaprune.plan import PLANS_DIR


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


_INT, _FLOAT, _STR, _BOOL = pa.int64(), pa.float64(), pa.string(), pa.bool_()
PLANS_SCHEMA = pa.schema(
    [
        ("name", _STR),
        ("criterion", _STR),
        ("strategy", _STR),
        ("target_ratio", _FLOAT),
        ("achieved_ratio", _FLOAT),
        ("achieved_prunable_ratio", _FLOAT),
        ("params_before", _INT),
        ("params_after", _INT),
        ("prunable_before", _INT),
        ("prunable_after", _INT),
        ("layers_removed", _INT),
        ("heads_kept", _INT),
        ("kv_heads_kept", _INT),
        ("mlp_channels_kept", _INT),
        ("current", _BOOL),  # made from the groups.parquet that is there now
        ("options", _STR),
        ("created_by", _STR),
        ("file", _STR),
    ]
)
PLAN_LAYERS_SCHEMA = pa.schema(
    [
        ("plan", _STR),
        ("layer", _INT),
        ("num_attention_heads", _INT),
        ("num_key_value_heads", _INT),
        ("intermediate_size", _INT),
        ("heads_kept", _INT),
        ("kv_heads_kept", _INT),
        ("mlp_channels_kept", _INT),
        ("skip", _STR),
        ("removed", _BOOL),
    ]
)


# Statements a query may be: SELECT (with WITH, DESCRIBE, SUMMARIZE, SHOW, FROM-first forms) and EXPLAIN.
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def run_query(run_dir: Path | str, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement; returns column names and rows. Plan files are read only if the query names
    them. The tables are registered before DuckDB's file access is switched off and its configuration locked, so
    a query can read the run's tables and nothing else, and write nowhere."""
    import duckdb
    import pyarrow.dataset as ds

    run_dir = Path(run_dir)
    for name in (GROUPS_FILE, LAYERS_FILE):
        read_table_meta(run_dir / name)  # a missing or foreign table fails here, naming the file
    statement = _one_statement(sql)
    plans = plan_rows(run_dir) if re.search(r"\bplan", sql, flags=re.IGNORECASE) else None
    with duckdb.connect() as con:
        for view, name in (("groups", GROUPS_FILE), ("layers", LAYERS_FILE)):
            con.register(view, ds.dataset(run_dir / name, format="parquet"))
        if plans is not None:
            con.register("plans", pa.Table.from_pylist(plans[0], schema=PLANS_SCHEMA))
            con.register("plan_layers", pa.Table.from_pylist(plans[1], schema=PLAN_LAYERS_SCHEMA))
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            cursor = con.execute(statement)
            columns = [d[0] for d in cursor.description or ()]
            return columns, cursor.fetchall() if columns else []
        except duckdb.Error as err:
            raise UsageError(f"query failed: {str(err).splitlines()[0]}") from None


def _one_statement(sql: str) -> str:
    """The query's single read-only statement, or a UsageError saying what is wrong with it."""
    import duckdb

    example = 'e.g. "SELECT kind, count(*) FROM groups GROUP BY kind"'
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise UsageError(f"query failed: {str(err).splitlines()[0]}") from None
    if not statements:
        raise UsageError(f"the query is empty; give one SELECT statement, {example}")
    if len(statements) > 1:
        raise UsageError(f"the query holds {len(statements)} statements; give exactly one SELECT, {example}")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise UsageError(
            f"{kind} statements are not allowed: `llamaprune sql` only reads (SELECT, WITH ... SELECT, EXPLAIN, "
            f"DESCRIBE, SUMMARIZE), {example}"
        )
    return statements[0].query


def plan_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Rows of the ``plans`` and ``plan_layers`` views, from every ``plans/*.json`` (each one validated)."""
    sha = file_sha256(run_dir / GROUPS_FILE)
    plans, layers = [], []
    for path in sorted((run_dir / PLANS_DIR).glob("*.json")):
        plan = read_plan(path)
        plans.append(_row(PLANS_SCHEMA, _plan_values(plan, sha, path)))
        layers += [_row(PLAN_LAYERS_SCHEMA, (plan.name, *_layer_values(lp))) for lp in plan.layers]
    return plans, layers


def _row(schema: pa.Schema, values: tuple) -> dict:
    return dict(zip(schema.names, values, strict=True))


def _plan_values(plan: Plan, sha: str, path: Path) -> tuple:
    return (
        plan.name,
        plan.criterion,
        plan.strategy,
        plan.target_ratio,
        plan.achieved_ratio,
        plan.achieved_prunable_ratio,
        plan.params_before,
        plan.params_after,
        plan.prunable_before,
        plan.prunable_after,
        len(plan.removed_layers),
        sum(lp.heads_kept for lp in plan.layers),
        sum(len(lp.attn_groups) for lp in plan.layers),
        sum(len(lp.mlp_channels) for lp in plan.layers),
        plan.source_table_sha256 == sha,
        json.dumps(plan.options),
        plan.created_by,
        str(path),
    )


def _layer_values(lp: LayerPlan) -> tuple:
    return (
        lp.layer,
        lp.num_attention_heads,
        lp.num_key_value_heads,
        lp.intermediate_size,
        lp.heads_kept,
        len(lp.attn_groups),
        len(lp.mlp_channels),
        ",".join(lp.skip),
        lp.removed,
    )


def format_rows(columns: list[str], rows: list[tuple], fmt: OutputFormat = OutputFormat.table) -> str:
    """Rows as an aligned text table, CSV, or a JSON array of objects."""
    if fmt is OutputFormat.json:
        return json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str)
    if fmt is OutputFormat.csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
