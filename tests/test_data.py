"""Text sources and samplers: hub rows rebuilt from the local copy, local readers, windows, batches."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED_DATA, TEST_RAW

from llamaprune.io.text_data import (
    batches,
    calibration_windows,
    data_dir_from_env,
    evaluation_windows,
    load_rows,
)

# From ../shared/data/wikitext-2-raw/PROVENANCE.md: the HF wikitext-2-raw-v1 test split.
HUB_TEST_ROWS = 4358
HUB_TEST_TEXT_ROWS = 2891
HUB_TEST_NUM_BYTES = 1_305_088


@pytest.fixture(scope="module")
def text_rows():
    """About 60 rows of real wikitext: enough for a few hundred tiny-tokenizer tokens."""
    lines = TEST_RAW.read_text(encoding="utf-8").split("\n")[:60]
    return [line for line in lines if line.strip()]


def _ids(tokenizer, rows):
    """The evaluation token stream, written independently of llamaprune.io.text_data."""
    return tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"]


# --- wikitext2 through the local data directory -------------------------------------------------


def test_wikitext2_rows_match_the_hub_split():
    rows = load_rows("wikitext2", split="test", data_dir=str(SHARED_DATA))
    assert len(rows) == HUB_TEST_ROWS
    assert sum(len(r.encode("utf-8")) for r in rows) + 4 * len(rows) == HUB_TEST_NUM_BYTES
    assert sum(1 for r in rows if r) == HUB_TEST_TEXT_ROWS
    assert rows[0] == ""  # the hub split opens with an empty row
    assert next(r for r in rows if r) == " = Robert Boulter = \n"
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)


def test_raw_file_by_path_gives_the_same_rows():
    """A wiki.*.raw file named directly is read the way the data directory reads it."""
    assert load_rows(str(TEST_RAW)) == load_rows("wikitext2", split="test", data_dir=str(SHARED_DATA))


def test_data_dir_env_is_honoured(monkeypatch):
    monkeypatch.setenv("LLAMAPRUNE_DATA_DIR", str(SHARED_DATA))
    assert data_dir_from_env() == str(SHARED_DATA)
    assert data_dir_from_env("/explicit") == "/explicit"  # an explicit --data-dir wins
    assert len(load_rows("wikitext2", split="test")) == HUB_TEST_ROWS


def test_data_dir_env_unset_gives_none():
    assert data_dir_from_env() is None


def test_missing_data_dir_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*--data-dir"):
        load_rows("wikitext2", data_dir=str(tmp_path / "nowhere"))


# --- the hub (never reached: datasets.load_dataset is replaced) ---------------------------------


def test_hub_failure_gives_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        ValueError, match=r"could not load wikitext2 \(test\).*Couldn't reach.*--data-dir"
    ) as err:
        load_rows("wikitext2", split="test")
    assert "\n" not in str(err.value)


def test_data_dir_without_the_split_falls_back_to_the_hub(monkeypatch):
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a\n", "", "b\n"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("wikitext2", split="valid", data_dir=str(SHARED_DATA))  # no wiki.valid.raw here
    assert rows == ["a\n", "", "b\n"]
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})]


# --- local files and names ----------------------------------------------------------------------


def test_local_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nthird line\n", encoding="utf-8")
    assert load_rows(str(path)) == ["first line", "", "third line"]


def test_local_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_rows(str(path)) == ["one", "two"]


def test_local_jsonl_without_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2 has no 'text' field"):
        load_rows(str(path))


def test_local_parquet(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), path)
    assert load_rows(str(path)) == ["alpha", "beta"]


def test_local_parquet_without_text_column(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["alpha"], "n": [1]}), path)
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: body, n\)"):
        load_rows(str(path))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'wikitext3'; use one of wikitext2, ptb, c4"
    ) as err:
        load_rows("wikitext3")
    assert ".parquet" in str(err.value) and "\n" not in str(err.value)


def test_missing_local_file(tmp_path):
    missing = tmp_path / "absent.txt"
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_rows(str(missing))


# --- evaluation windows -------------------------------------------------------------------------


def test_evaluation_windows_are_contiguous_non_overlapping_and_drop_the_tail(tokenizer, text_rows):
    ids = _ids(tokenizer, text_rows)
    seq_len = 32
    assert len(ids) % seq_len != 0  # so there is a tail to drop
    windows = evaluation_windows(tokenizer, text_rows, seq_len)
    count = len(ids) // seq_len
    assert windows.shape == (count, seq_len) and windows.dtype == torch.long
    assert windows.flatten().tolist() == ids[: count * seq_len]


def test_evaluation_windows_max_windows(tokenizer, text_rows):
    full = evaluation_windows(tokenizer, text_rows, 16)
    capped = evaluation_windows(tokenizer, text_rows, 16, max_windows=3)
    assert capped.shape == (3, 16)
    assert torch.equal(capped, full[:3])
    assert torch.equal(evaluation_windows(tokenizer, text_rows, 16, max_windows=10**6), full)


def test_evaluation_windows_add_no_bos(tokenizer, text_rows):
    """With a tokenizer that prepends <s> by default, the windows still start at the text's first token."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    bos = tokenizer.bos_token_id
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert with_bos("Hello")["input_ids"][0] == bos  # the default path would add it
    windows = evaluation_windows(with_bos, text_rows, 16)
    assert windows[0].tolist() == _ids(tokenizer, text_rows)[:16]
    assert bos not in windows.flatten().tolist()


def test_evaluation_windows_text_too_short(tokenizer):
    with pytest.raises(ValueError, match="fewer than --seq-len 4096"):
        evaluation_windows(tokenizer, ["a few words"], 4096)


# --- calibration windows ------------------------------------------------------------------------


def test_calibration_windows_are_seeded_slices(tokenizer, text_rows):
    ids = torch.tensor(_ids(tokenizer, text_rows))
    seq_len = 24
    first = calibration_windows(tokenizer, text_rows, num_samples=6, seq_len=seq_len, seed=1)
    again = calibration_windows(tokenizer, text_rows, num_samples=6, seq_len=seq_len, seed=1)
    other = calibration_windows(tokenizer, text_rows, num_samples=6, seq_len=seq_len, seed=2)
    assert first.shape == (6, seq_len) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    slices = ids.unfold(0, seq_len, 1)  # every contiguous window of the token stream
    for window in torch.cat([first, other]):
        assert (slices == window).all(dim=1).any()


def test_calibration_windows_text_too_short(tokenizer):
    with pytest.raises(ValueError, match="too few for --seq-len 512"):
        calibration_windows(tokenizer, ["a few words"], num_samples=2, seq_len=512, seed=0)


def test_calibration_windows_draw_every_start_up_to_the_last(tokenizer, text_rows):
    ids = torch.tensor(_ids(tokenizer, text_rows))
    seq_len = ids.numel() - 2  # three valid starts: 0, 1 and 2
    windows = calibration_windows(tokenizer, text_rows, num_samples=60, seq_len=seq_len, seed=0)
    starts = {next(s for s in range(3) if torch.equal(window, ids[s : s + seq_len])) for window in windows}
    assert starts == {0, 1, 2}


def test_calibration_windows_take_a_text_of_exactly_seq_len_tokens(tokenizer, text_rows):
    ids = torch.tensor(_ids(tokenizer, text_rows))
    windows = calibration_windows(tokenizer, text_rows, num_samples=3, seq_len=ids.numel(), seed=0)
    assert windows.shape == (3, ids.numel()) and all(torch.equal(window, ids) for window in windows)


# --- batches ------------------------------------------------------------------------------------


def test_batches_split_with_a_ragged_last_batch():
    windows = torch.arange(7 * 5).view(7, 5)
    parts = batches(windows, 3)
    assert [p.shape for p in parts] == [(3, 5), (3, 5), (1, 5)]
    assert torch.equal(torch.cat(parts), windows)


def test_batches_reject_a_non_positive_size():
    with pytest.raises(ValueError, match="--batch-size must be positive, got 0"):
        batches(torch.zeros(2, 3, dtype=torch.long), 0)


def test_c4_test_split_reads_the_first_validation_shard(monkeypatch):
    """C4 has no test split (eval, apply --eval): the validation shard stands in for it."""
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["c4 row"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("c4", split="test") == ["c4 row"]
    assert calls == [
        (("allenai/c4",), {"data_files": {"test": "en/c4-validation.00000-of-00008.json.gz"}, "split": "test"})
    ]
