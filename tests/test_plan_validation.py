"""Plans are checked against the model, not against themselves: a hand-edited plan that keeps its fingerprint but
no longer fits the checkpoint is refused in one line; a plan scored on other weights of the same shapes is refused
unless --force."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from conftest import TOL, assert_one_error_line, calibration_text, ids, logits, tiny_config, tiny_model
from conftest import zeroed_reference as zeroed
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.plan_file import plan_from_kept, plan_json, read_plan
from llamaprune.io.loading import resolve_source


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def valid(tiny_checkpoint):
    """A valid plan's JSON document for the tiny checkpoint (2 layers, 2 KV heads, 24 MLP channels)."""
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    return json.loads(plan_json(plan_from_kept(config, [([1], [0, 4, 5, 20]), ([0, 1], [3, 7])])))


def layer(doc, i):
    return doc["layers"][i]


def extra_layer(doc):
    doc["layers"].append({**copy.deepcopy(layer(doc, 1)), "layer": 2})


def raised_intermediate_size(doc):
    layer(doc, 0).update(intermediate_size=32, mlp_channels=[0, 4, 5, 30])


# (edit of the valid document, fragments of the one error line)
EDITS = {
    "extra-layer": (extra_layer, ["has 3 layers, the model 2"]),
    "missing-layer": (lambda d: d["layers"].pop(), ["has 1 layers, the model 2"]),
    "wrong-kv-heads": (lambda d: layer(d, 0).update(num_key_value_heads=4),
                       ["layer 0 has", "(4, 4, 24), the model (4, 2, 24)"]),
    "wrong-query-heads": (lambda d: layer(d, 1).update(num_attention_heads=8), ["layer 1 has", "(8, 2, 24)"]),
    "raised-intermediate-size": (raised_intermediate_size, ["(4, 2, 32), the model (4, 2, 24)"]),
    "removed-layer-that-does-not-exist": (lambda d: d.update(removed_layers=[7]),
                                          ["removed_layers [7] disagrees with the layers marked removed []"]),
    "float-index": (lambda d: layer(d, 0).update(mlp_channels=[0, 3.9, 5, 20]),
                    ["layers[0]: mlp_channels must be a list of integers, not [0, 3.9, 5, 20]"]),
    "string-index": (lambda d: layer(d, 1).update(attn_groups=["0", "1"]), ["attn_groups must be a list of integers"]),
    "bool-index": (lambda d: layer(d, 1).update(attn_groups=[False, True]), ["attn_groups must be a list of integers"]),
    "string-flag": (lambda d: layer(d, 0).update(removed="false"), ['removed must be true or false, not "false"']),
    "null-skip": (lambda d: layer(d, 0).update(skip=None), ["skip must be a list of strings, not null"]),
    "misspelt-field": (lambda d: layer(d, 0).update(remove=True), ["unknown field(s) remove"]),
    "negative-index": (lambda d: layer(d, 0).update(mlp_channels=[-1, 4, 5, 20]), ["index out of range [0, 24)"]),
    "repeated-index": (lambda d: layer(d, 0).update(mlp_channels=[0, 4, 4, 20]), ["must be sorted and unique"]),
    "unsorted-index": (lambda d: layer(d, 0).update(mlp_channels=[4, 0, 5, 20]), ["must be sorted and unique"]),
    "kept-nothing-unskipped": (lambda d: layer(d, 0).update(attn_groups=[]), ["attention must be skipped exactly"]),
    "head-dim": (lambda d: d.update(head_dim=16), ["has head_dim 16, the model 8"]),
    "params-after": (lambda d: d.update(params_after=d["params_after"] + 1), ["achieved_ratio"]),
    "params-before": (lambda d: d.update(params_before=d["params_before"] * 2), ["achieved_ratio"]),
    "all-counts-edited": (lambda d: d.update(params_after=d["params_after"] - 64,
                                             achieved_ratio=1 - (d["params_after"] - 64) / d["params_before"]),
                          ["params_after is", "but its layers give"]),
    "nan-ratio": (lambda d: d.update(target_ratio=float("nan")), ["target_ratio must be a finite number"]),
    "layers-not-a-list": (lambda d: d.update(layers={"0": {}}), ["layers must be a list"]),
    "layer-not-an-object": (lambda d: d["layers"].__setitem__(0, 5), ["layers[0] must be an object"]),
    "no-fingerprint": (lambda d: d.pop("fingerprint"), ["has no 'fingerprint'"]),
    "fingerprint-of-another-model": (lambda d: d["fingerprint"].update(config_hash="0" * 16),
                                     ["was made for model LlamaForCausalLM/0000000000000000"]),
}


@pytest.mark.parametrize("case", EDITS)
def test_a_hand_edited_plan_that_does_not_fit_is_one_error_line(case, valid, tiny_checkpoint, tmp_path):
    edit, fragments = EDITS[case]
    edit(valid)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(valid))
    result = invoke("apply", path, "--model", tiny_checkpoint, "--out", tmp_path / "out")
    assert_one_error_line(result, str(path), *fragments)
    assert not (tmp_path / "out").exists()


def test_the_valid_plan_applies_and_matches_the_zeroed_original(valid, tiny_checkpoint, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(valid))
    result = invoke("apply", path, "--model", tiny_checkpoint, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    pruned, reference = AutoModelForCausalLM.from_pretrained(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint
    )
    x = ids(reference.config.vocab_size)
    with zeroed(reference, read_plan(path)):
        assert torch.allclose(logits(pruned, x), logits(reference, x), atol=TOL, rtol=0)


# ---------------------------------------------------------------- weights fingerprint


@pytest.fixture
def other_weights(tiny_checkpoint, tmp_path):
    """A checkpoint of the same config with other weights (another seed), same tokenizer."""
    path = tmp_path / "other"
    model = tiny_model(AutoConfig.from_pretrained(tiny_checkpoint), seed=1)
    model.save_pretrained(path)
    for tokenizer_file in tiny_checkpoint.glob("tokenizer*"):
        shutil.copy(tokenizer_file, path)
    return path


def fingerprint_of(path):
    from llamaprune.io.weights import check_weights

    source = resolve_source(str(path))
    return check_weights(source, AutoConfig.from_pretrained(path))


def test_the_fingerprint_tells_weights_apart_not_copies(tiny_checkpoint, other_weights, tmp_path):
    copied = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float16).save_pretrained(half)
    prints = {name: fingerprint_of(path) for name, path in
              (("a", tiny_checkpoint), ("copy", copied), ("other", other_weights), ("half", half))}
    assert prints["a"] == prints["copy"] and prints["a"].startswith("sha256:")
    assert len({prints["a"], prints["other"], prints["half"]}) == 3


def test_a_plan_scored_on_other_weights_is_refused_unless_forced(tiny_checkpoint, other_weights, tmp_path, caplog):
    run = tmp_path / "run"
    score = ["score", tiny_checkpoint, "--out", run, "--dataset", calibration_text(tmp_path), "--num-samples", 2,
             "--seq-len", 16, "--criteria", "magnitude"]
    assert invoke(*score).exit_code == 0
    assert invoke("plan", run, "--ratio", 0.2, "--criterion", "magnitude", "--no-png").exit_code == 0
    (plan,) = (run / "plans").glob("*.json")
    recorded = fingerprint_of(tiny_checkpoint)
    manifest = json.loads((run / "manifest.json").read_text())
    assert read_plan(plan).weights_fingerprint == manifest["model"]["weights_fingerprint"] == recorded
    result = invoke("apply", plan, "--model", other_weights, "--out", tmp_path / "o")
    assert_one_error_line(result, f"was scored on weights {recorded}", f"{other_weights} has weights", "--force")
    with caplog.at_level(logging.WARNING, logger="llamaprune"):
        assert invoke("apply", plan, "--model", other_weights, "--out", tmp_path / "o", "--force").exit_code == 0
    assert "applied anyway (--force)" in caplog.text
    assert invoke("apply", plan, "--model", tiny_checkpoint, "--out", tmp_path / "same").exit_code == 0


def test_a_plan_without_a_weights_fingerprint_still_applies(valid, other_weights, tmp_path):
    assert "weights_fingerprint" not in valid  # plans made before the field, and hand-made ones
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(valid))
    assert invoke("apply", path, "--model", other_weights, "--out", tmp_path / "out").exit_code == 0


def test_plan_from_kept_fits_a_model_that_already_skips_a_block():
    """Its layer widths are what the model has (0 for a skipped block), as the planner writes them."""
    from llamaprune.apply.command import apply_plan, check_plan

    config = tiny_config(layers=2)
    once = apply_plan(tiny_model(config), plan_from_kept(config, [([], [1, 2]), ([0, 1], [3])]))
    plan = plan_from_kept(once.config, [([], [0]), ([1], [0])])
    check_plan(plan, once.config)
    assert plan.layers[0].num_key_value_heads == 0 and apply_plan(once, plan).num_parameters() == plan.params_after
