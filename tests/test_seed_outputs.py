"""The seed toolkit's group table on hand-built tables: it ranks groups as the planner did for the plan."""

import csv
from fractions import Fraction

import pytest
from conftest import removed_ids, write_run

from llamaprune.plan import PlanOptions, load_run, make_plan
from llamaprune.seed.outputs import write_group_table

# Per parameter (attention 100 params, MLP 10) every MLP channel is least important (0.1); relative to the mean of
# its layer and kind, layers.0.attn.0 is (0.2, every other group 1 but layers.0.attn.1 at 1.8).
SCORES = [([100.0, 900.0], [1.0, 1.0, 1.0, 1.0]), ([500.0, 500.0], [1.0, 1.0, 1.0, 1.0])]
PARAMS = {"attn": 100, "mlp": 10}


def groups():
    """group_id -> (importance, params, mean importance of its layer and kind) of every group in SCORES."""
    out = {}
    for layer, pair in enumerate(SCORES):
        for kind, values in zip(("attn", "mlp"), pair, strict=True):
            mean = Fraction(sum(values)) / len(values)
            out |= {f"layers.{layer}.{kind}.{i}": (Fraction(v), PARAMS[kind], mean) for i, v in enumerate(values)}
    return out


def ranking(key):
    """group_ids by ``key(importance, params, mean)``, ties broken by group_id."""
    return sorted(groups(), key=lambda gid: (key(*groups()[gid]), gid))


def group_table(tmp_path, options):
    tables = load_run(write_run(tmp_path / "run", {"taylor": SCORES}))
    plan = make_plan(tables, options)
    write_group_table(tmp_path / "global_group_table.csv", tables, plan)
    with open(tmp_path / "global_group_table.csv", newline="") as f:
        return plan, list(csv.DictReader(f))


def test_group_table_follows_a_normalize_mean_plan(tmp_path):
    plan, rows = group_table(tmp_path, PlanOptions(ratio=0.1, normalize="mean"))
    planned = ranking(lambda importance, params, mean: importance / mean)
    assert planned != ranking(lambda importance, params, mean: importance / params)  # the orders differ here
    assert [row["group_id"] for row in rows] == planned
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    assert {row["group_id"] for row in rows if row["pruned"] == "true"} == removed_ids(plan) == {"layers.0.attn.0"}
    for row in rows:  # score: the relative importance the plan ranked by; importance: that times params
        importance, _, mean = groups()[row["group_id"]]
        assert float(row["score"]) == pytest.approx(float(importance / mean), rel=1e-12)
        assert float(row["importance"]) == pytest.approx(float(row["score"]) * int(row["params"]), rel=1e-12)


def test_group_table_of_a_plain_plan_ranks_by_importance_per_parameter(tmp_path):
    plan, rows = group_table(tmp_path, PlanOptions(ratio=0.1))
    assert [row["group_id"] for row in rows] == ranking(lambda importance, params, mean: importance / params)
    assert {row["group_id"] for row in rows if row["pruned"] == "true"} == removed_ids(plan)
    for row in rows:
        importance, params, _ = groups()[row["group_id"]]
        assert float(row["importance"]) == importance and int(row["params"]) == params
        assert float(row["score"]) == float(importance) / params
