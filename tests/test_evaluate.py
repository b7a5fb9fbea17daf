"""Perplexity against a plain reference loop, on a tiny random model and on the real SmolLM2-135M."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, TEST_RAW, tiny_config, tiny_model

from llamaprune.evaluate.perplexity import EvalOptions, evaluate_dataset, perplexity
from llamaprune.io.text_data import evaluation_windows, load_rows


def reference_perplexity(model, windows) -> float:
    """One window at a time: exp of the mean cross-entropy of every next-token prediction."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0].float()
            total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += window.numel() - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def rows():
    lines = TEST_RAW.read_text(encoding="utf-8").split("\n")[:40]
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer)), seed=3)


@pytest.fixture(scope="module")
def windows(tokenizer, rows):
    return evaluation_windows(tokenizer, rows, seq_len=20, max_windows=7)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10])  # 3: a ragged last batch of 1
def test_perplexity_matches_the_reference_loop(model, windows, batch_size):
    assert windows.shape == (7, 20)
    expected = reference_perplexity(model, windows)
    result = perplexity(model, windows, batch_size=batch_size, progress=False)
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-4)
    assert (result.windows, result.seq_len, result.tokens) == (7, 20, 140)
    assert result.tokens_per_s > 0
    assert set(result.to_dict()) == {"ppl", "nll", "windows", "seq_len", "tokens", "seconds", "tokens_per_s"}


def test_perplexity_rejects_a_non_positive_batch_size(model, windows):
    with pytest.raises(ValueError, match="--batch-size must be positive, got 0"):
        perplexity(model, windows, batch_size=0, progress=False)


def test_evaluate_dataset_on_a_local_file(tmp_path, tokenizer, model, rows):
    path = tmp_path / "test.txt"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    options = EvalOptions(dataset=str(path), seq_len=16, max_windows=5, batch_size=2)
    result = evaluate_dataset(model, tokenizer, options, progress=False)
    windows = evaluation_windows(tokenizer, rows, 16, max_windows=5)
    assert result.windows == 5
    assert result.ppl == pytest.approx(reference_perplexity(model, windows), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=1), "--seq-len must be at least 2, got 1"),
        (dict(max_windows=0), "--max-windows must be positive, got 0"),
        (dict(max_windows=-3), "--max-windows must be positive, got -3"),
        (dict(batch_size=0), "--batch-size must be positive, got 0"),
    ],
)
def test_eval_options_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalOptions(**kwargs)


def test_eval_options_defaults_and_frozen():
    options = EvalOptions()
    assert (options.dataset, options.seq_len, options.max_windows, options.batch_size) == (
        "wikitext2",
        128,
        None,
        8,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seq_len = 64


@pytest.mark.real
def test_real_model_perplexity_on_wikitext2(real_model):
    rows = load_rows("wikitext2", split="test", data_dir=str(SHARED_DATA))
    windows = evaluation_windows(real_model.tokenizer, rows, seq_len=128, max_windows=4)
    assert windows.shape == (4, 128)
    result = perplexity(real_model.model, windows, batch_size=3, progress=False)  # ragged: 3 + 1
    assert math.isfinite(result.ppl) and 5 < result.ppl < 500
    assert result.ppl == pytest.approx(reference_perplexity(real_model.model, windows), rel=1e-4)
