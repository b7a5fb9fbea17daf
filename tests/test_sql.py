"""`llamaprune sql` only reads the run's tables: one SELECT-like statement, no other file read or written."""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TAYLOR, assert_one_error_line, write_run
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.plan import PlanOptions, make_plan, write_plans
from llamaprune.plan.sql import run_query


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", {"taylor": TAYLOR}, influence=[0.1, 0.4])


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# DuckDB's names for the Arrow types of the run's tables.
DUCKDB_TYPES = {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR"}


def table(run, name):
    return pq.read_table(run / f"{name}.parquet")


def described(run, name):
    return [(f.name, DUCKDB_TYPES[f.type]) for f in table(run, name).schema]


def summarized(run, name):
    """Per column of the table, as SUMMARIZE shows them: name, count, min and max (as text)."""
    t = table(run, name)
    extremes = {c: pc.min_max(t[c]) for c in t.column_names}
    return [(c, t.num_rows, str(m["min"].as_py()), str(m["max"].as_py())) for c, m in extremes.items()]


@pytest.fixture
def run_with_plans(run):
    """The run with two plans written into it."""
    write_plans(run, [make_plan(run, PlanOptions(ratio=r, criterion="taylor")) for r in (0.05, 0.135)], png=False)
    return run


def test_with_counts_the_groups_table_rows(run):
    _, rows = run_query(run, "WITH a AS (SELECT layer FROM groups) SELECT count(*) FROM a")
    assert rows == [(table(run, "groups").num_rows,)] == [(12,)]


def test_from_first_select_reads_the_layers_table(run):
    columns, rows = run_query(run, "FROM layers SELECT layer")
    assert columns == ["layer"]
    assert sorted(rows) == [(layer,) for layer in table(run, "layers")["layer"].to_pylist()] == [(0,), (1,)]


def test_describe_lists_the_groups_columns_and_types(run):
    columns, rows = run_query(run, "DESCRIBE groups")
    assert columns[:2] == ["column_name", "column_type"]
    assert [row[:2] for row in rows] == described(run, "groups")


def test_summarize_gives_each_layers_column_its_count_min_and_max(run):
    columns, rows = run_query(run, "SUMMARIZE layers")
    at = {name: columns.index(name) for name in ("column_name", "count", "min", "max")}
    assert [tuple(row[at[k]] for k in ("column_name", "count", "min", "max")) for row in rows] == summarized(
        run, "layers"
    )


def test_explain_shows_a_scan_of_the_groups_table(run):
    columns, rows = run_query(run, "EXPLAIN SELECT * FROM groups")
    assert columns == ["explain_key", "explain_value"]
    assert [key for key, _ in rows] == ["physical_plan"]
    explained = rows[0][1]
    assert "ARROW_SCAN" in explained
    assert all(name in explained for name in table(run, "groups").column_names), explained


def test_plans_has_one_row_per_plan_file(run_with_plans):
    _, rows = run_query(run_with_plans, "SELECT count(*) FROM plans")
    assert rows == [(len(list((run_with_plans / "plans").glob("*.json"))),)] == [(2,)]


def test_a_trailing_semicolon_is_one_statement(run):
    assert run_query(run, "SELECT 1;") == (["1"], [(1,)])


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("", "the query is empty"),
        ("  -- only a comment", "the query is empty"),
        ("SELECT 1; SELECT 2", "holds 2 statements"),
        ("COPY (SELECT 1) TO '{out}/x.csv'", "COPY statements are not allowed"),
        ("ATTACH '{out}/x.db'", "ATTACH statements are not allowed"),
        ("CREATE TABLE t AS SELECT 1", "CREATE statements are not allowed"),
        ("INSTALL httpfs", "LOAD statements are not allowed"),
        ("SET enable_external_access = true", "SET statements are not allowed"),
        ("SELECT * FROM read_text('{secret}')", "Permission Error"),
        ("SELECT * FROM read_csv_auto('{secret}')", "Permission Error"),
        ("SELECT * FROM glob('{out}/*')", "Permission Error"),
        ("SELECT * FROM read_parquet('{run}/groups.parquet')", "Permission Error"),
        ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/x.csv'", "Permission Error"),
        ("SELEC 1", "Parser Error"),
    ],
)
def test_anything_but_one_read_is_refused_and_nothing_is_written(run, tmp_path, query, fragment):
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("sql", run, query.format(out=out, run=run, secret=secret))
    assert_one_error_line(result, fragment)
    assert "password" not in result.output
    assert not list(out.iterdir())
