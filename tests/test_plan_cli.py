"""`llamaprune plan` and `llamaprune sql` end to end through typer's CliRunner; planning imports no torch."""

import csv
import io
import json
import subprocess
import sys

import pytest
from conftest import TAYLOR, assert_one_error_line, write_run
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.artifacts import read_manifest
from llamaprune.core.plan_file import read_plan
from llamaprune.plan import sql as query


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", {"taylor": TAYLOR, "wanda": TAYLOR[::-1]}, influence=[0.1, 0.4])


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_plan_writes_json_and_png_per_ratio_prints_a_summary_and_records_history(run):
    result = invoke("plan", run, "--ratio", 0.135, "--ratios", "0.03:0.06:0.03", "--criterion", "taylor")
    assert result.exit_code == 0, result.output
    names = ["global-taylor-0.03", "global-taylor-0.06", "global-taylor-0.135"]
    for name in names:
        plan = read_plan(run / "plans" / f"{name}.json")
        assert plan.achieved_ratio <= plan.target_ratio
        assert (run / "plans" / f"{name}.png").stat().st_size > 1000
    assert "fractions of the model's total parameters" in result.stdout
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("global-taylor-0.135 "))
    assert row[1:3] == ["0.135", "0.13"] and row[5:7] == ["1000", "870"]  # target, achieved, before, after
    history = read_manifest(run)["history"][-1]
    assert history["command"] == "plan" and history["plans"] == names and history["ratios"] == [0.03, 0.06, 0.135]


def test_plan_options_reach_the_plan(run):
    args = [
        "--strategy",
        "layerwise",
        "--distribution",
        "0:10",
        "--layer-strategy",
        "uniform",
        "--name",
        "mine",
        "--protect-layers",
        "-1",
        "--min-mlp-channels",
        "2",
        "--no-png",
    ]
    result = invoke("plan", run, "--ratio", 0.02, *args)
    assert result.exit_code == 0, result.output
    plan = read_plan(run / "plans" / "mine.json")
    assert not (run / "plans" / "mine.png").exists()
    assert plan.strategy == "layerwise" and plan.options["distribution"] == [0, 10]
    assert plan.options["protect_layers"] == [-1] and plan.options["min_mlp_channels"] == 2
    assert [len(lp.mlp_channels) for lp in plan.layers] == [2, 4]


def test_sql_has_groups_layers_plans_and_plan_layers(run):
    assert invoke("plan", run, "--ratio", 0.03, "--ratio", 0.135, "--no-png").exit_code == 0
    result = invoke("sql", run, "SELECT kind, count(*) AS n, sum(params) AS p FROM groups GROUP BY kind ORDER BY kind")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["kind", "n", "p"] and lines[2].split() == ["attn", "4", "400"]
    assert lines[3].split() == ["mlp", "8", "80"]

    query = "SELECT name, params_after, layers_removed, current FROM plans ORDER BY name"
    rows = list(csv.reader(io.StringIO(invoke("sql", run, query, "--format", "csv").stdout)))
    assert rows == [
        ["name", "params_after", "layers_removed", "current"],
        ["global-taylor-0.03", "970", "0", "True"],
        ["global-taylor-0.135", "870", "0", "True"],
    ]

    query = (
        "SELECT layer, num_key_value_heads - kv_heads_kept AS kv_removed, "
        "intermediate_size - mlp_channels_kept AS mlp_removed FROM plan_layers "
        "WHERE plan = 'global-taylor-0.135' ORDER BY layer"
    )
    result = invoke("sql", run, query, "--format", "json")
    assert json.loads(result.stdout) == [
        {"layer": 0, "kv_removed": 1, "mlp_removed": 3},
        {"layer": 1, "kv_removed": 0, "mlp_removed": 0},
    ]
    query = "SELECT l.layer, l.block_influence, l.taylor FROM layers l ORDER BY layer"
    assert json.loads(invoke("sql", run, query, "--format", "json").stdout)[1] == {
        "layer": 1,
        "block_influence": 0.4,
        "taylor": 1800.0,
    }


def test_the_queries_documented_in_the_sql_module_run(run):
    assert invoke("plan", run, "--ratio", 0.2, "--no-png").exit_code == 0  # global-taylor-0.20, which one names
    for block in query.__doc__.split("    -- ")[1:]:
        sql = block.split("\n", 1)[1]
        result = invoke("sql", run, sql)
        assert result.exit_code == 0, result.output
        assert len(result.stdout.strip().splitlines()) > 2, sql  # a header, a rule and some rows


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["plan", "{run}", "--ratio", "0"], ["ratio 0.0 is outside (0, 1)", "total parameters"]),
        (["plan", "{run}", "--ratio", "1.5"], ["ratio 1.5 is outside (0, 1)"]),
        (["plan", "{run}"], ["give --ratio"]),
        (["plan", "{run}/missing", "--ratio", "0.1"], ["groups.parquet not found", "llamaprune score"]),
        (
            ["plan", "{run}", "--ratio", "0.1", "--criterion", "taylor2"],
            ["criterion 'taylor2'", "taylor, wanda"],
        ),
        (["plan", "{run}", "--ratio", "0.4"], ["unreachable", "choose --ratio 0.26 or less"]),
        (["plan", "{run}", "--ratio", "0.1", "--strategy", "best"], ["strategy 'best' is not one of"]),
        (["plan", "{run}", "--ratio", "0.1", "--ratios", "1:2"], ["--ratios '1:2' is not START:STOP:STEP"]),
        (["sql", "{run}", "SELECT nope FROM groups"], ["query failed: Binder Error"]),
        (["sql", "{run}", "SELECT 1", "--format", "xml"], ["--format 'xml' is not one of: table, csv, json"]),
        (["sql", "{run}/missing", "SELECT 1"], ["groups.parquet not found"]),
    ],
)
def test_bad_input_exits_2_with_one_line(run, args, fragments):
    assert_one_error_line(invoke(*[a.format(run=run) for a in args]), *fragments)


def test_plan_and_sql_do_not_import_torch(run):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from llamaprune.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['plan', {str(run)!r}, '--ratio', '0.1'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(app, ['sql', {str(run)!r}, 'SELECT count(*) FROM plans'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert CliRunner().invoke(app, ['plan', '--help']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--ratio", "0.02", "--ratio", "1.5"], "ratio 1.5 is outside (0, 1)"),  # a bad ratio after a good one
        (["--ratios", "0.1:0.5:0.1"], "unreachable"),  # 0.1 and 0.2 are reachable, 0.3 and above are not
    ],
)
def test_a_sweep_with_a_bad_ratio_writes_no_plan_at_all(run, args, fragment):
    assert_one_error_line(invoke("plan", run, *args, "--no-png"), fragment)
    assert not (run / "plans").exists()
    assert "history" not in read_manifest(run)
