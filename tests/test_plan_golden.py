"""Plans are a contract: the same table and options give byte-identical plan JSON across refactors.

The digests in data/golden_plans.json were made by the planner before it was split into a package; a change
that alters any plan (order, tie-breaks, rounding, naming, JSON layout) fails here and must say why.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_run

from llamaprune.core.plan_file import plan_json
from llamaprune.plan import PlanOptions, make_plan

GOLDEN = Path(__file__).with_name("data") / "golden_plans.json"
LAYERS, KV, INTER, HEADS = 6, 4, 48, 8

# name -> PlanOptions fields; every planner path (global, layerwise, constraints, depth, uniform) once or more
CASES = {
    "global-0.1": dict(ratio=0.1),
    "global-0.35": dict(ratio=0.35),
    "global-wanda-mean": dict(ratio=0.25, criterion="wanda", normalize="mean"),
    "global-round8": dict(ratio=0.3, round_to=8),
    "global-uniform": dict(ratio=0.3, uniform=True),
    "global-uniform-round8": dict(ratio=0.2, uniform=True, round_to=8),
    "global-depth": dict(ratio=0.5, min_kv_heads=0, min_mlp_channels=0, remove_empty_layers=True),
    "global-depth-round8": dict(ratio=0.45, min_kv_heads=0, min_mlp_channels=0, remove_empty_layers=True,
                                round_to=8),
    "global-protect-freeze": dict(ratio=0.3, protect_layers=(0, -1), freeze_top_n=1),
    "global-min": dict(ratio=0.3, min_kv_heads=2, min_mlp_channels=16),
    "layerwise-inverse": dict(ratio=0.25, strategy="layerwise"),
    "layerwise-uniform-2:8": dict(ratio=0.25, strategy="layerwise", layer_strategy="uniform", distribution=(2, 8)),
    "layerwise-0:10-round8": dict(ratio=0.2, strategy="layerwise", distribution=(0, 10), round_to=8),
    "layerwise-uniform-shape": dict(ratio=0.3, strategy="layerwise", uniform=True),
    "layerwise-depth": dict(ratio=0.55, strategy="layerwise", min_kv_heads=0, min_mlp_channels=0,
                            remove_empty_layers=True),
    "layerwise-by-taylor-freeze": dict(ratio=0.2, strategy="layerwise", layer_importance="taylor", freeze_top_n=2,
                                       protect_layers=(1,)),
}


def golden_run(tmp_path: Path) -> Path:
    """Six layers of seeded scores, with ties (rounded values) and depth-dependent scales."""
    rng = np.random.default_rng(1234)
    scores = {}
    for criterion, scale in (("taylor", 1.0), ("wanda", 3.0)):
        scores[criterion] = [
            (
                np.round(rng.gamma(2.0, 50.0 * (1 + layer * scale), KV), 1),
                np.round(rng.gamma(1.5, 2.0 * (1 + layer * scale), INTER), 1),
            )
            for layer in range(LAYERS)
        ]
    influence = list(np.round(rng.uniform(0.05, 0.5, LAYERS), 3))
    return write_run(tmp_path / "run", scores, kv=KV, inter=INTER, heads=HEADS, attn=96, mlp=12, attn_fixed=4,
                     mlp_fixed=2, embed=4000, influence=influence)


def plan_digest(plan) -> str:
    """sha256 of the plan's JSON with the table checksum left out (it depends on the Parquet writer's version)."""
    assert len(plan.source_table_sha256) == 64
    text = plan_json(plan).replace(plan.source_table_sha256, "")
    return hashlib.sha256(text.encode()).hexdigest()


def digests(run_dir: Path) -> dict[str, str]:
    return {name: plan_digest(make_plan(run_dir, PlanOptions(**fields), name)) for name, fields in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_plans_are_byte_identical_to_the_golden_ones(tmp_path, case):
    run_dir = golden_run(tmp_path)
    expected = json.loads(GOLDEN.read_text())
    assert plan_digest(make_plan(run_dir, PlanOptions(**CASES[case]), case)) == expected[case]


def test_golden_cases_cover_distinct_plans(tmp_path):
    """Each case makes a different plan: a golden set of copies would check less than it claims."""
    assert len(set(json.loads(GOLDEN.read_text()).values())) == len(CASES)
