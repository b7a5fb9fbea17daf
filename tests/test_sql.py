"""`llamaprune sql` only reads the run's tables: one SELECT-like statement, no other file read or written."""

import pytest
from conftest import TAYLOR, assert_one_error_line, write_run
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.plan.sql import run_query


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", {"taylor": TAYLOR}, influence=[0.1, 0.4])


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "query",
    [
        "WITH a AS (SELECT layer FROM groups) SELECT count(*) FROM a",
        "FROM layers SELECT layer",
        "DESCRIBE groups",
        "SUMMARIZE layers",
        "EXPLAIN SELECT * FROM groups",
        "SELECT count(*) FROM plans",
        "SELECT 1;",
    ],
)
def test_read_only_statements_run(run, query):
    columns, rows = run_query(run, query)
    assert columns and rows


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
