"""Perplexity against a plain reference loop, on a tiny random model and on the real SmolLM2-135M."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, TEST_RAW, ForwardClock, tiny_config, tiny_model

from llamaprune.evaluate.perplexity import EvalOptions, compare, evaluate_dataset, perplexity
from llamaprune.evaluate.speed import paired_perplexity
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


@pytest.mark.parametrize("batch_size", [2, 3, 1, 7])  # 4, 3 (a ragged last one), 7 and 1 batches
def test_two_models_run_in_turn_and_the_median_speed_leaves_out_a_slow_round(model, tokenizer, windows, batch_size):
    """Each batch runs both models back to back (the order swapped every batch); the speed ratio is the median of
    the per-batch ratios, so a round that another job slowed for one model does not move it. Fewer batches than
    5 are timed again, but counted once."""
    small = tiny_model(tiny_config(heads=4, kv_heads=2, intermediate=8, vocab=len(tokenizer)), seed=5)
    clock = ForwardClock(slow={2: 10.0})  # the second round's first forward (the small model's) is slowed
    with clock.installed():
        dense, pruned, speed = paired_perplexity(model, small, windows, batch_size, progress=False)
    sizes = [len(batch) for batch in windows.split(batch_size)]
    steps = max(5, len(sizes))
    assert clock.models == [m for step in range(steps) for m in ((model, small) if step % 2 == 0 else (small, model))]
    assert speed == {"tokens_per_s_ratio": pytest.approx(model.num_parameters() / small.num_parameters(), rel=1e-9),
                     "speed_rounds": steps}
    for measured, reference in ((dense, model), (pruned, small)):
        assert measured.ppl == perplexity(reference, windows, batch_size, progress=False).ppl
        assert (measured.windows, measured.tokens) == (7, 140)
    slowed = [10.0 if i == 1 else 1.0 for i in range(len(sizes))]  # the slow round counts where it is a batch's own
    expected = sum(20 * size * factor for size, factor in zip(sizes, slowed, strict=True)) * small.num_parameters()
    assert pruned.seconds == pytest.approx(expected * 1e-9, rel=1e-9)
    report = compare(EvalOptions(), dense.to_dict(), pruned.to_dict(), speed)
    assert report["tokens_per_s_ratio"] == speed["tokens_per_s_ratio"] and report["speed_rounds"] == steps
    assert "tokens_per_s_ratio" not in compare(EvalOptions(), dense.to_dict(), pruned.to_dict())  # measured apart


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
