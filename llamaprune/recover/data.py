"""Finetuning examples: windows of plain text, or Alpaca-style instructions with the prompt masked out.

A source is whatever ``llamaprune.io.text_data.load_rows`` reads (wikitext2, ptb, c4, a local .txt/.raw/.jsonl/
.parquet), or a ``.jsonl`` whose records carry ``instruction`` and ``output`` (``input`` optional), as in
Alpaca. An example is a pair of 1-D token tensors (input_ids, labels); labels are -100 where no loss is taken
(the prompt, padding).

    >>> source = read_source("alpaca.jsonl")                                        # doctest: +SKIP
    >>> examples = build_examples(tokenizer, source, samples=1000, seq_len=256, seed=0)  # doctest: +SKIP
    >>> train, validation = split_validation(examples, fraction=0.05, batch_size=8, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from llamaprune.core.errors import UsageError, flag, given_flags
from llamaprune.core.user_files import parse_json
from llamaprune.io.text_data import evaluation_windows, jsonl_records, load_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross_entropy skips
INSTRUCTION_FIELDS = ("instruction", "output")
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class TrainingText:
    """The text read from a source: ``rows`` of plain text, or instruction ``records``; exactly one is set."""

    name: str
    rows: list[str] | None = None
    records: list[dict] | None = None

    @property
    def kind(self) -> str:
        return "instruction" if self.records is not None else "text"


def is_instruction_file(path: Path) -> bool:
    """A .jsonl whose first record has the Alpaca fields (a ``text`` .jsonl is plain text)."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as f:
            record = parse_json(next((line for line in f if line.strip()), "{}"), path)
    except (UsageError, UnicodeDecodeError):
        return False  # read as text, which names the file and the line (or byte) that is wrong
    return isinstance(record, dict) and all(field in record for field in INSTRUCTION_FIELDS)


def read_instructions(path: Path) -> list[dict]:
    return jsonl_records(path, INSTRUCTION_FIELDS)


def read_source(source: str, data_dir: str | None = None) -> TrainingText:
    """Read the training split of ``source``; call it before loading a model so that bad data fails fast."""
    path = Path(source).expanduser()
    if is_instruction_file(path):
        return TrainingText(source, records=read_instructions(path))
    return TrainingText(source, rows=load_rows(source, split="train", data_dir=data_dir))


def prompt_text(record: dict) -> str:
    """The Alpaca prompt of a record, up to and including ``### Response:\\n``."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def instruction_example(tokenizer, record: dict, seq_len: int):
    """(input_ids, labels) of prompt + output + EOS, cut to ``seq_len``; labels are -100 over the prompt.

    Prompt and output are tokenized separately, so the mask ends exactly where the prompt's tokens do.
    """
    import torch

    prompt = tokenizer(prompt_text(record), add_special_tokens=False)["input_ids"]
    answer = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    ids = torch.tensor(prompt + answer, dtype=torch.long)[:seq_len]
    labels = ids.clone()
    labels[: len(prompt)] = IGNORE_INDEX
    return ids, labels


def build_examples(tokenizer, source: TrainingText, samples: int, seq_len: int, seed: int) -> list:
    """At most ``samples`` examples, a seeded choice: non-overlapping text windows, or instruction records.

    Text windows do not overlap, so a validation split taken from them shares no text with training.
    """
    rng = random.Random(seed)
    if source.records is None:
        windows = evaluation_windows(tokenizer, source.rows, seq_len, option=flag("finetune --seq-len"))
        order = rng.sample(range(len(windows)), min(samples, len(windows)))
        examples = [(windows[i], windows[i].clone()) for i in order]
    else:
        records = rng.sample(source.records, min(samples, len(source.records)))
        examples = [instruction_example(tokenizer, record, seq_len) for record in records]
        examples = [(ids, labels) for ids, labels in examples if (labels[1:] != IGNORE_INDEX).any()]
        if len(examples) < len(records):
            log.warning(
                "%d instruction(s) dropped: their prompt fills %s %d",
                len(records) - len(examples),
                flag("finetune --seq-len"),
                seq_len,
            )
    if len(examples) < samples:
        log.warning(
            "%s gives %d %s example(s), fewer than the %d asked for",
            source.name,
            len(examples),
            source.kind,
            samples,
        )
    return examples


def split_validation(examples: list, fraction: float, batch_size: int, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded ``fraction`` of the examples, at least one batch, held out."""
    count = max(math.ceil(fraction * len(examples)), min(batch_size, len(examples)))
    if len(examples) - count < 1:
        smaller = given_flags("finetune --batch-size")
        raise UsageError(
            f"{len(examples)} example(s) leave none for training after holding out {count} for validation; "
            f"use more {flag('finetune --samples')} (or more text)" + "".join(f" or a smaller {f}" for f in smaller)
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[count:]], [examples[i] for i in order[:count]]


def collate(examples: list, pad_token_id: int) -> dict:
    """Right-pad a batch to its longest example: input_ids, attention_mask, and labels -100 on padding."""
    import torch

    length = max(ids.numel() for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : ids.numel()] = ids
        labels[row, : ids.numel()] = target
        attention_mask[row, : ids.numel()] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_id(tokenizer) -> int:
    """The pad token, else EOS, else 0: padded positions are masked out of attention and loss anyway."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0
