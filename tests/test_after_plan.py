"""Allocation for the compensated model (``score --after PLAN``): the run's tables are in the original model's
groups, the step's groups first; plans from it remove the step and more, and apply from the dense checkpoint;
what cannot be planned or scored that way is refused in one line."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from conftest import VALID_TXT, assert_one_error_line, ids, tiny_config, tiny_model
from typer.testing import CliRunner

from llamaprune.apply.command import apply_plan
from llamaprune.cli.app import app
from llamaprune.core.plan_file import plan_from_kept, read_plan
from llamaprune.scoring.after_plan import in_original_groups
from llamaprune.scoring.in_memory import score

CALIBRATION = ["--dataset", str(VALID_TXT), "--num-samples", "8", "--seq-len", "16", "--criteria", "taylor2"]


def test_the_scores_of_the_model_a_plan_leaves_land_on_the_original_groups():
    config = tiny_config(layers=2, heads=4, kv_heads=2, intermediate=16)
    model = tiny_model(config)
    plan = plan_from_kept(config, [([1], [0, 3, 4, 9, 15]), ([0, 1], list(range(2, 16)))])
    pruned = score(apply_plan(model, plan), list(ids(config.vocab_size, batch=4, length=8).split(2)),
                   criteria=("magnitude",), progress=False)
    mapped = in_original_groups(pruned, plan, config, {"plan": {"name": "step"}})
    got = mapped.groups.to_pydict()
    assert len(got["group_id"]) == 2 * (2 + 16) and mapped.stats is None
    kept_rows = pruned.groups.to_pydict()
    for layer, lp in enumerate(plan.layers):
        for kind, kept, width in (("attn", lp.attn_groups, 2), ("mlp", lp.mlp_channels, 16)):
            rows = [i for i, (la, k) in enumerate(zip(got["layer"], got["kind"], strict=True))
                    if (la, k) == (layer, kind)]
            values = [got["magnitude"][i] for i in rows]
            assert [got["index"][i] for i in rows] == list(range(width))
            assert [i for i, v in enumerate(values) if v == -math.inf] == sorted(set(range(width)) - set(kept))
            scored = [v for la, k, v in zip(kept_rows["layer"], kept_rows["kind"], kept_rows["magnitude"], strict=True)
                      if (la, k) == (layer, kind)]
            assert [values[i] for i in kept] == scored
    layers = mapped.layers.to_pydict()
    assert layers["mlp_channels"] == [16, 16] and layers["attn_groups"] == [2, 2]
    assert layers["magnitude"] == pruned.layers.column("magnitude").to_pylist()
    assert mapped.meta["after"]["plan"]["name"] == "step"
    assert mapped.meta["params"] == in_original_groups(pruned, plan, config, {}).meta["params"]


@pytest.fixture
def step_run(tmp_path, tokenizer):
    """A tiny checkpoint, its run, a step's plan in it and the run scored after that plan."""
    config = tiny_config(layers=2, heads=4, kv_heads=2, intermediate=32, vocab=len(tokenizer))
    tiny_model(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    runner = CliRunner()
    model = str(tmp_path / "model")
    for args in (["score", model, "--out", str(tmp_path / "run"), *CALIBRATION],
                 ["plan", str(tmp_path / "run"), "--ratio", "0.05", "--criterion", "taylor2", "--name", "step"],
                 ["score", model, "--out", str(tmp_path / "after"), *CALIBRATION,
                  "--after", str(tmp_path / "run" / "plans" / "step.json"), "--after-samples", "4"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return tmp_path


def test_plans_from_a_run_scored_after_a_step_remove_the_step_and_apply_from_dense(step_run):
    runner = CliRunner()
    step = read_plan(step_run / "run" / "plans" / "step.json")
    table = pq.read_table(step_run / "after" / "groups.parquet").to_pydict()
    removed = {(la, k, i) for la, k, i, v in zip(table["layer"], table["kind"], table["index"], table["taylor2"],
                                                 strict=True) if v == -math.inf}
    counts = {(lp.layer, kind): width - len(kept) for lp in step.layers
              for kind, kept, width in (("attn", lp.attn_groups, 2), ("mlp", lp.mlp_channels, 32))}
    assert removed and {key: sum(1 for la, k, _ in removed if (la, k) == key) for key in counts} == counts
    manifest = json.loads((step_run / "after" / "manifest.json").read_text())
    assert manifest["after"]["plan"]["name"] == "step" and manifest["after"]["compensation"]["method"] == "obs"
    assert manifest["params"] == json.loads((step_run / "run" / "manifest.json").read_text())["params"]
    assert not (step_run / "after" / "stats.safetensors").exists()
    result = runner.invoke(app, ["plan", str(step_run / "after"), "--ratio", "0.1", "--criterion", "taylor2",
                                 "--name", "p"])
    assert result.exit_code == 0, result.output
    plan = read_plan(step_run / "after" / "plans" / "p.json")
    kept = {(lp.layer, kind, i) for lp in plan.layers for kind, indices in (("attn", lp.attn_groups),
                                                                             ("mlp", lp.mlp_channels)) for i in indices}
    assert not kept & removed  # the step's groups (as its refit chose them) are gone
    assert plan.params_after < step.params_after
    out = step_run / "pruned"
    result = runner.invoke(app, ["apply", str(step_run / "after" / "plans" / "p.json"), "--model",
                                 str(step_run / "model"), "--out", str(out), "--compensate", "lstsq",
                                 "--calibration", str(VALID_TXT), "--calibration-samples", "4",
                                 "--calibration-seq-len", "16", "--select", "obs", "--obs-pool", "1.25"])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_a_plan_that_keeps_the_step_s_groups_and_other_misuse_is_refused(step_run):
    runner = CliRunner()
    after = str(step_run / "after")
    assert_one_error_line(runner.invoke(app, ["plan", after, "--ratio", "0.01", "--criterion", "taylor2"]),
                          "keeps some of its groups")
    assert_one_error_line(runner.invoke(app, ["plan", after, "--ratio", "0.2", "--criterion", "taylor2",
                                              "--normalize", "mean"]), "--normalize none")
    model = str(step_run / "model")
    plan = step_run / "run" / "plans" / "step.json"
    assert_one_error_line(runner.invoke(app, ["score", model, "--out", str(step_run / "x"), *CALIBRATION,
                                              "--after", str(plan), "--stream"]), "--stream")
    loose = step_run / "step.json"
    loose.write_bytes(plan.read_bytes())
    assert_one_error_line(runner.invoke(app, ["score", model, "--out", str(step_run / "y"), *CALIBRATION,
                                              "--after", str(loose)]), "RUN/plans/")
    assert not (step_run / "x").exists() and not (step_run / "y").exists()
    before = (step_run / "run" / "groups.parquet").read_bytes()
    assert_one_error_line(runner.invoke(app, ["score", model, "--out", str(step_run / "run"), *CALIBRATION,
                                              "--after", str(plan), "--overwrite"]))
    assert (step_run / "run" / "groups.parquet").read_bytes() == before and plan.is_file()
    bias = runner.invoke(app, ["plan", after, "--ratio", "0.2", "--criterion", "taylor2", "--name", "q"])
    assert bias.exit_code == 0, bias.output
    assert_one_error_line(runner.invoke(app, ["apply", str(step_run / "after" / "plans" / "q.json"), "--model",
                                              model, "--out", str(step_run / "z"), "--compensate", "bias"]),
                          "stats.safetensors")
