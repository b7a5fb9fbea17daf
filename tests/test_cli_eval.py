"""`llamaprune eval` end to end through typer's CliRunner: the JSON report and the one-line errors."""

import json
import math

import pytest
import torch
from conftest import TEST_RAW, assert_one_error_line
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.evaluate.perplexity import perplexity
from llamaprune.io.loading import load_model
from llamaprune.io.text_data import evaluation_windows


@pytest.fixture
def text_file(tmp_path):
    lines = TEST_RAW.read_text(encoding="utf-8").split("\n")[:40]
    path = tmp_path / "test.txt"
    path.write_text("\n".join(line for line in lines if line.strip()) + "\n", encoding="utf-8")
    return path


def run(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_eval_writes_json_keyed_by_dataset(tiny_checkpoint, text_file, tmp_path):
    out = tmp_path / "eval.json"
    args = [tiny_checkpoint, "--dataset", text_file, "--seq-len", 16, "--max-windows", 3, "--batch-size", 2]
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report) == [str(text_file)]
    entry = report[str(text_file)]
    assert (entry["windows"], entry["seq_len"], entry["tokens"]) == (3, 16, 48)
    assert entry["ppl"] == pytest.approx(math.exp(entry["nll"]), rel=1e-9)
    assert f"perplexity {entry['ppl']:.3f} over 3 windows of 16 tokens" in result.stdout

    loaded = load_model(str(tiny_checkpoint))
    rows = text_file.read_text(encoding="utf-8").splitlines()
    windows = evaluation_windows(loaded.tokenizer, rows, 16, max_windows=3)
    assert entry["ppl"] == pytest.approx(perplexity(loaded.model, windows, progress=False).ppl, rel=1e-6)


def test_eval_without_out_prints_the_json(tiny_checkpoint, text_file):
    result = run(tiny_checkpoint, "--dataset", text_file, "--seq-len", 16, "--max-windows", 2)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report[str(text_file)]["windows"] == 2


def test_missing_model_path(tmp_path, text_file):
    missing = tmp_path / "no-such-model"
    assert_one_error_line(run(missing, "--dataset", text_file), f"model not found: {missing}")


def test_unknown_dataset(tiny_checkpoint):
    assert_one_error_line(
        run(tiny_checkpoint, "--dataset", "wikitext3"), "unknown dataset 'wikitext3'", "wikitext2"
    )


def test_missing_dataset_file(tiny_checkpoint, tmp_path):
    assert_one_error_line(run(tiny_checkpoint, "--dataset", tmp_path / "absent.txt"), "absent.txt")


def test_unsupported_architecture(gpt2_checkpoint, text_file):
    assert_one_error_line(
        run(gpt2_checkpoint, "--dataset", text_file),
        "unsupported architecture GPT2LMHeadModel",
        "LlamaForCausalLM",
    )


@pytest.mark.parametrize(
    "option, message",
    [
        (["--seq-len", "1"], "--seq-len must be at least 2, got 1"),
        (["--max-windows", "0"], "--max-windows must be positive, got 0"),
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    ],
)
def test_bad_option_values(tiny_checkpoint, text_file, option, message):
    assert_one_error_line(run(tiny_checkpoint, "--dataset", text_file, *option), message)


def test_device_cuda_without_cuda(tiny_checkpoint, text_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine
    assert_one_error_line(
        run(tiny_checkpoint, "--dataset", text_file, "--device", "cuda"), "--device cuda", "cpu"
    )
