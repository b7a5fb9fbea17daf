"""`llamaprune prune` end to end through typer's CliRunner on a tiny checkpoint: the native run directory and
the seed's files (checked against the plan and the tables), the saved model, evaluation, LoRA finetuning, the
root shim, and bad input as one error line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import VALID_TXT, assert_one_error_line, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.artifacts import read_manifest
from llamaprune.core.plan_file import read_plan
from llamaprune.evaluate.perplexity import perplexity
from llamaprune.io.text_data import evaluation_windows, load_rows

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ("manifest.json", "groups.parquet", "layers.parquet", "stats.safetensors")


@pytest.fixture
def texts(tmp_path):
    """Small calibration and evaluation text files cut from the WikiText-2 validation text."""
    lines = VALID_TXT.read_text(encoding="utf-8").splitlines()
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    calibration.write_text("\n".join(lines[:300]), encoding="utf-8")
    evaluation.write_text("\n".join(lines[300:360]), encoding="utf-8")
    return calibration, evaluation


def invoke(*args):
    return CliRunner().invoke(app, ["prune", *(str(a) for a in args)])


def common(checkpoint, texts, out, *extra):
    calibration, evaluation = texts
    return (
        "--base_model",
        checkpoint,
        "--dataset",
        calibration,
        "--eval_dataset",
        evaluation,
        "--num_samples",
        8,
        "--seq_len",
        32,
        "--gradient_batch_size",
        4,
        "--eval_seq_len",
        32,
        "--max_windows",
        6,
        "--output_dir",
        out,
        *extra,
    )


def only_plan(run):
    (path,) = (run / "plans").glob("*.json")
    return read_plan(path)



def compensated(plan, hidden: int) -> int:
    """The plan's parameters plus the output biases that prune's default compensation (lstsq) adds: one per kept
    o_proj and down_proj."""
    kept = [lp for lp in plan.layers if not lp.removed]
    return plan.params_after + hidden * sum(("attention" not in lp.skip) + ("mlp" not in lp.skip) for lp in kept)

@pytest.mark.parametrize(("model_type", "target"), [("llama", "residual"), ("qwen3", "residual"),
                                                 ("gemma3_text", "pruned")])
def test_prune_s_recipe_fits_towards_the_dense_model_where_the_family_allows(model_type, target):
    """Gemma 3's output projections pass through a norm before the residual: its recipe keeps the pruned target."""
    from llamaprune.seed.prune import PruneOptions

    config = tiny_config(model_type=model_type)
    options = PruneOptions(pruning_ratio=0.2).compensation_options(config)
    assert (options.select.value, options.obs_pool, options.target.value) == ("obs", 1.25, target)
    assert options.residual_share == (0.3 if target == "residual" else 1.0)
    options.check_model(config)  # what the family takes
    assert PruneOptions(pruning_ratio=0.2).compensation_options().target.value == "pruned"  # no model: checks only


def test_global_run_writes_native_and_seed_files(tiny_checkpoint, tokenizer, texts, tmp_path):
    out = tmp_path / "global"
    args = common(
        tiny_checkpoint,
        texts,
        out,
        "--pruning_ratio",
        0.2,
        "--importance_method",
        "taylor_2nd",
        "--save_ckpt_log_name",
        "g20",
        "--test_after_prune",
        "--save_model",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    for name in NATIVE + (
        "description.txt",
        "global_group_table.csv",
        "pruning_strategy.png",
        "model/eval.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "layer_importance_config.json").exists()
    (log,) = (out / "logs").glob("*/training.log")
    assert log.parent.name[:8].isdigit() and log.parent.name[8] == "_" and "scoring" in log.read_text()

    plan = only_plan(out)
    assert plan.criterion == "taylor2" and plan.strategy == "global" and plan.achieved_ratio <= 0.2
    assert (out / "pruning_strategy.png").read_bytes() == (out / "plans" / f"{plan.name}.png").read_bytes()

    # The group table: every group once, ranked by importance per parameter, pruned where the plan drops it.
    groups = pq.read_table(out / "groups.parquet").to_pylist()
    with open(out / "global_group_table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(groups)
    assert {"group_id", "layer", "kind", "index", "params", "importance", "score", "pruned"} <= rows[0].keys()
    by_id = {g["group_id"]: g for g in groups}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    # the groups removed are those the default recipe's OBS chose within the pool, in the plan's counts
    chosen = read_plan(out / "model" / "plan.json")
    assert chosen.selection["method"] == "obs" and chosen.selection["pool"] == 1.25
    assert [(len(lp.attn_groups), len(lp.mlp_channels)) for lp in chosen.layers] == [
        (len(lp.attn_groups), len(lp.mlp_channels)) for lp in plan.layers]
    kept = {(lp.layer, "attn", i) for lp in chosen.layers for i in lp.attn_groups}
    kept |= {(lp.layer, "mlp", i) for lp in chosen.layers for i in lp.mlp_channels}
    for row in rows:
        group = by_id[row["group_id"]]
        assert float(row["importance"]) == pytest.approx(group["taylor2"], rel=1e-12)
        assert float(row["score"]) == pytest.approx(group["taylor2"] / group["params"], rel=1e-12)
        assert row["pruned"] == str((group["layer"], group["kind"], group["index"]) not in kept).lower()
    pruned_params = sum(int(r["params"]) for r in rows if r["pruned"] == "true")
    assert pruned_params == plan.prunable_before - plan.prunable_after

    description = dict(line.split(": ", 1) for line in (out / "description.txt").read_text().splitlines())
    assert description["pruning_ratio"] == "0.2" and description["importance_method"] == "taylor_2nd"
    assert description["criterion"] == "taylor2" and description["plan"] == plan.name
    assert description["base_model"] == str(tiny_checkpoint) and description["save_model"] == "True"

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.num_parameters() == compensated(plan, model.config.hidden_size)
    report = json.loads((out / "model" / "eval.json").read_text())
    assert report["before"]["num_parameters"] == plan.params_before
    assert report["after"]["num_parameters"] == compensated(plan, model.config.hidden_size)
    assert (
        report["after"]["windows"] == 6
        and report["ppl_ratio"] == report["after"]["ppl"] / report["before"]["ppl"]
    )
    assert report["tokens_per_s_ratio"] > 0 and report["speed_rounds"] >= 5  # both in memory: timed in turn
    windows = evaluation_windows(tokenizer, load_rows(str(texts[1])), seq_len=32, max_windows=6)
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    for key, checked in (("before", dense), ("after", model)):  # the saved model is the one evaluated
        assert report[key]["ppl"] == pytest.approx(perplexity(checked, windows, progress=False).ppl, rel=1e-5)
    manifest = read_manifest(out)
    assert [h["command"] for h in manifest["history"]] == ["score", "prune"]
    compensation = manifest["history"][-1]["compensation"]
    assert (compensation["target"], compensation["residual_share"]) == ("residual", 0.3)
    assert manifest["criteria"] == ["taylor2"] and manifest["calibration"]["n_samples"] == 8
    assert json.loads((out / "model" / "manifest.json").read_text()) == manifest
    assert f"{plan.params_before:,} -> {plan.params_after:,}" in result.stdout
    assert f"dense {report['before']['ppl']:.3f}, pruned {report['after']['ppl']:.3f}" in result.stdout
    assert f"tokens/s (x{report['tokens_per_s_ratio']:.2f}, median of" in result.stdout


def test_layerwise_run_with_lora_writes_the_layer_config_and_the_finetuned_model(
    tiny_checkpoint, texts, tmp_path
):
    out = tmp_path / "layer"
    args = common(
        tiny_checkpoint,
        texts,
        out,
        "--pruning_ratio",
        0.05,
        "--method",
        "layer",
        "--pruning_distribution",
        "2:8",
        "--pruning_strategy",
        "inverse",
        "--freeze_top_n_layers",
        1,
        "--importance_method",
        "wanda",
        "--finetune",
        "--finetune_method",
        "lora",
        "--lora_r",
        4,
        "--lora_alpha",
        8,
        "--finetune_samples",
        24,
        "--finetune_seq_len",
        32,
        "--finetune_lr",
        1e-2,
        "--test_after_prune",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert not (out / "global_group_table.csv").exists()
    plan = only_plan(out)
    assert plan.strategy == "layerwise" and plan.options["distribution"] == [2, 8]

    config = json.loads((out / "layer_importance_config.json").read_text())
    influence = pq.read_table(out / "layers.parquet").column("block_influence").to_pylist()
    top = max(range(len(influence)), key=lambda i: (influence[i], -i))
    assert config["pruning_strategy"] == "inverse" and config["pruning_distribution"] == [2, 8]
    assert [entry["importance"] for entry in config["layers"]] == influence
    assert [entry["frozen"] for entry in config["layers"]] == [i == top for i in range(len(influence))]
    for entry, lp in zip(config["layers"], plan.layers, strict=True):
        assert entry["mlp_pruning_ratio"] == pytest.approx(1 - len(lp.mlp_channels) / lp.intermediate_size)
        assert entry["attention_pruning_ratio"] == pytest.approx(
            1 - len(lp.attn_groups) / lp.num_key_value_heads
        )
        if entry["frozen"]:
            assert entry["mlp_pruning_ratio"] == entry["attention_pruning_ratio"] == 0
    assert config["layers"][1 - top]["mlp_pruning_ratio"] > 0

    model = AutoModelForCausalLM.from_pretrained(out / "model")  # finetuning implies saving
    assert model.num_parameters() == compensated(plan, model.config.hidden_size)
    assert (out / "model" / "loss_curve.png").is_file()
    report = json.loads((out / "model" / "eval.json").read_text())
    assert {"before", "after", "finetuned", "recovered_fraction"} <= report.keys()
    assert report["finetuned"]["num_parameters"] == compensated(plan, model.config.hidden_size)
    history = read_manifest(out)["history"][-1]
    assert history["finetune"]["method"] == "lora" and history["finetune"]["steps"] > 0
    assert "finetune lora" in result.stdout and "finetuned" in result.stdout


def test_the_root_shim_shows_the_seed_options():
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "cli.py", "prune", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for option in (
        "--base_model",
        "--save_ckpt_log_name",
        "--importance_method",
        "--gradient_batch_size",
        "--output_model",
        "--pruning_distribution",
        "--freeze_top_n_layers",
        "--finetune_method",
    ):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--importance_method", "taylor3"), "taylor3"),
        (("--pruning_ratio", 1.0), "ratio 1.0"),
        (("--finetune", "--lora_r", 0), "--lora_r must be positive"),  # the seed's flag, not finetune's --lora-r
        (("--method", "layer", "--pruning_distribution", "2-8"), "2-8"),
        (("--dataset", "no_such_dir/missing.txt"), "missing.txt"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tiny_checkpoint, texts, tmp_path, extra, fragment):
    out = tmp_path / "bad"
    result = invoke(*common(tiny_checkpoint, texts, out), *extra)
    assert_one_error_line(result, fragment)
    assert not out.exists()
