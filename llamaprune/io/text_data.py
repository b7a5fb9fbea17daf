"""Text sources and the two token samplers built on them (calibration and evaluation).

A source is a hub name (``wikitext2``, ``ptb``, ``c4``) or a local ``.txt`` / ``.raw`` (WikiText layout) /
``.jsonl`` (field ``text``) / ``.parquet`` (column ``text``) file. A local data directory (``--data-dir`` or
``LLAMAPRUNE_DATA_DIR``) is tried before the hub, laid out as ``wikitext-2-raw/wiki.{test,valid,train}.raw``.

    >>> rows = load_rows("wikitext2", split="test", data_dir="../shared/data")   # doctest: +SKIP
    >>> windows = evaluation_windows(tokenizer, rows, seq_len=128)               # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llamaprune.core.errors import MissingInput, UsageError
from llamaprune.core.user_files import parquet_errors, parse_json, read_utf8

HUB_SOURCES = ("wikitext2", "ptb", "c4")
LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl", ".parquet")


@dataclass(frozen=True)
class HubDataset:
    """How a named source is fetched with ``datasets.load_dataset`` and which field holds the text."""

    path: str
    name: str | None
    field: str
    data_files: dict[str, str] | None = None


_HUB = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "sentence"),
    "c4": HubDataset(
        "allenai/c4",
        None,
        "text",
        {  # C4 has no test split: evaluation reads the first validation shard, as the seed toolkit does
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
            "test": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}
_LOCAL_LAYOUT = {
    "wikitext2": "wikitext-2-raw/wiki.{split}.raw",
    "ptb": "ptb/ptb.{split}.txt",
}
_SPLIT_FILE = {"test": "test", "validation": "valid", "valid": "valid", "train": "train"}


def data_dir_from_env(data_dir: str | None = None) -> str | None:
    return data_dir or os.environ.get("LLAMAPRUNE_DATA_DIR") or None


def load_rows(source: str, split: str = "test", data_dir: str | None = None) -> list[str]:
    """Rows of text of ``source``; a hub name is looked up under ``data_dir`` first."""
    if source in _HUB:
        local = _local_copy(source, split, data_dir_from_env(data_dir))
        if local is not None:
            return _read_local(local)
        return _hub_rows(source, split)
    path = Path(source).expanduser()
    if path.suffix not in LOCAL_SUFFIXES:
        raise UsageError(
            f"unknown dataset {source!r}; use one of {', '.join(HUB_SOURCES)} or a local "
            f"{'/'.join(LOCAL_SUFFIXES)} file"
        )
    if not path.is_file():
        raise MissingInput(f"dataset file not found: {source}; give an existing text file")
    return _read_local(path)


def local_file(source: str, split: str = "test", data_dir: str | None = None) -> Path | None:
    """The local file the rows of ``source`` come from (None: the hub), so that no output replaces it."""
    if source in _HUB:
        return _local_copy(source, split, data_dir_from_env(data_dir))
    return Path(source).expanduser()


def _local_copy(source: str, split: str, data_dir: str | None) -> Path | None:
    if data_dir is None or source not in _LOCAL_LAYOUT:
        return None
    if not Path(data_dir).is_dir():
        raise MissingInput(f"data directory not found: {data_dir}; fix --data-dir or LLAMAPRUNE_DATA_DIR")
    path = Path(data_dir) / _LOCAL_LAYOUT[source].format(split=_SPLIT_FILE.get(split, split))
    return path if path.is_file() else None


def _raw_rows(path: Path) -> list[str]:
    """Rebuild the hub's wikitext rows from a ``wiki.*.raw`` file (each text line + "\\n"; blanks -> "")."""
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":  # the file's final newline ends the last row, it does not start one
        lines.pop()
    return [line + "\n" if line.strip() else "" for line in lines]


def _read_local(path: Path) -> list[str]:
    if path.suffix == ".raw":
        return _raw_rows(path)
    if path.suffix == ".jsonl":
        return [record["text"] for record in jsonl_records(path, ("text",))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with parquet_errors(path, "give a Parquet file with a 'text' column"):
            table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UsageError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        return table.column("text").to_pylist()
    return read_utf8(path).splitlines()


def jsonl_records(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped); each must have every ``required`` field."""
    records = []
    for number, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
        missing = [field for field in required if not isinstance(record, dict) or field not in record]
        if missing:
            raise UsageError(
                f"{path}:{number} has no {', '.join(map(repr, missing))} field; every line needs "
                f"{', '.join(map(repr, required))}"
            )
        records.append(record)
    return records


def _hub_rows(source: str, split: str) -> list[str]:
    import datasets

    spec = _HUB[source]
    hub_split = "validation" if split == "valid" else split
    try:
        if spec.data_files:
            data = datasets.load_dataset(spec.path, data_files={hub_split: spec.data_files[hub_split]}, split=hub_split)
        else:
            data = datasets.load_dataset(spec.path, spec.name, split=hub_split)
    except Exception as err:  # network, missing split, hub errors: all mean "no such data here"
        raise UsageError(
            f"could not load {source} ({hub_split}) from the Hugging Face hub: {str(err).splitlines()[0][:200]}; "
            f"point --data-dir / LLAMAPRUNE_DATA_DIR at a local copy or give a local text file"
        ) from err
    return list(data[spec.field])


def tokenize_rows(tokenizer, rows: list[str]):
    """Rows joined with a blank line, tokenized once without special tokens, as a 1-D LongTensor."""
    import torch

    ids = tokenizer("\n\n".join(rows), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def evaluation_windows(tokenizer, rows: list[str], seq_len: int, max_windows: int | None = None,
                       option: str = "--seq-len"):
    """Non-overlapping windows of ``seq_len`` tokens, shape (n, seq_len); the tail is dropped. ``option``: the
    flag that set ``seq_len``, which a text too short for one window names."""
    ids = tokenize_rows(tokenizer, rows)
    count = ids.numel() // seq_len
    if count == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than {option} {seq_len}; use a shorter {option}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


def calibration_windows(tokenizer, rows: list[str], num_samples: int, seq_len: int, seed: int,
                        option: str = "--seq-len"):
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets, shape (n, seq_len); ``option`` as
    in ``evaluation_windows``."""
    import torch

    ids = tokenize_rows(tokenizer, rows)
    room = ids.numel() - seq_len  # the last window starts here: starts 0..room, all of them drawable
    if room < 0:
        raise UsageError(
            f"the calibration text has {ids.numel()} tokens, too few for {option} {seq_len}; "
            f"use more text or a shorter {option}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, room + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def batches(windows, batch_size: int):
    """Split (n, L) windows into a list of (batch_size, L) batches, the last one possibly smaller."""
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    return list(windows.split(batch_size))
