"""``score --stream``: one layer at a time from a multi-shard checkpoint gives the whole-model pass's tables and
stats; through the CLI it writes a run that ``plan`` takes, and refuses what it cannot stream in one line."""

import json

import pytest
import torch
from conftest import assert_one_error_line, calibration_text, ids, tiny_config, tiny_model
from transformers import AutoConfig
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.criteria import FORWARD_ONLY
from llamaprune.core.tables import read_table_meta
from llamaprune.scoring.in_memory import score
from llamaprune.scoring.streamed import score_streamed

CONFIGS = [dict(heads=4, kv_heads=2), dict(heads=6, kv_heads=2, bias=True), dict(heads=4, kv_heads=4, tie=True),
           dict(heads=4, kv_heads=2, model_type="qwen2"), dict(heads=6, kv_heads=2, model_type="qwen3"),
           dict(heads=4, kv_heads=2, model_type="gemma3_text", tie=True)]
RECORDED = ("sq_norm", "sum")


def close(actual, expected, rel: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rel, atol=0)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_the_streamed_pass_gives_the_whole_model_s_tables_and_stats(tmp_path, kwargs):
    config = tiny_config(layers=3, **kwargs)
    model = tiny_model(config)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="16KB")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    windows = ids(config.vocab_size, batch=5, length=12)
    whole = score(model, list(windows.split(2)), FORWARD_ONLY, seed=3, progress=False)
    streamed = score_streamed(tmp_path / "ckpt", AutoConfig.from_pretrained(tmp_path / "ckpt"), windows, FORWARD_ONLY,
                              seed=3, batch_size=2, progress=False)
    assert streamed.groups.schema == whole.groups.schema and streamed.layers.schema == whole.layers.schema
    assert streamed.meta == whole.meta and streamed.tokens == whole.tokens
    for table in ("groups", "layers"):
        mine, theirs = getattr(streamed, table).to_pydict(), getattr(whole, table).to_pydict()
        for column, values in theirs.items():
            if isinstance(values[0], float):  # the criteria, and block influence
                close(mine[column], values)
            else:
                assert mine[column] == values, column
    assert set(streamed.stats) == set(whole.stats)
    inputs = {key for key in whole.stats if key.endswith(RECORDED)}
    # wanda reads every input's square norms, fluctuation (and bias compensation) the output projections' sums
    names = ("attn_in.sq_norm", "o_in.sq_norm", "mlp_in.sq_norm", "down_in.sq_norm", "o_in.sum", "down_in.sum")
    assert inputs == {f"layers.{layer}.{name}" for layer in range(3) for name in names}
    for key, value in whole.stats.items():
        close(streamed.stats[key], value)


def test_a_streamed_run_is_one_plan_accepts(tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    args = ["score", str(tiny_checkpoint), "--out", str(run), "--dataset", str(calibration_text(tmp_path)),
            "--num-samples", "4", "--seq-len", "16", "--batch-size", "2", "--criteria", ",".join(FORWARD_ONLY),
            "--stream"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["options"]["stream"] is True and manifest["peak_memory_bytes"] > 0
    assert read_table_meta(run / "groups.parquet")["criteria"] == list(FORWARD_ONLY)
    planned = CliRunner().invoke(app, ["plan", str(run), "--ratio", "0.2", "--criterion", "wanda", "--no-png"])
    assert planned.exit_code == 0, planned.output
    assert list((run / "plans").glob("*.json"))


@pytest.mark.parametrize("case", ["gradients", "gguf", "hub"])
def test_what_cannot_be_streamed_is_one_error_line_and_writes_nothing(tmp_path, tiny_checkpoint, case):
    model, criteria = str(tiny_checkpoint), "wanda,taylor"
    if case != "gradients":
        criteria = "wanda"
        model = "org/name" if case == "hub" else str(tmp_path / "model.gguf")
        (tmp_path / "model.gguf").write_bytes(b"GGUF")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["score", model, "--out", str(out), "--dataset", str(calibration_text(tmp_path)),
                                      "--criteria", criteria, "--stream"])
    fix = {"gradients": ["taylor needs gradients", "--criteria wanda,magnitude,random,fluctuation", "drop --stream"],
           "gguf": ["a GGUF file", "save_pretrained"], "hub": ["a hub id", "save_pretrained"]}[case]
    assert_one_error_line(result, *fix)
    assert not out.exists()
