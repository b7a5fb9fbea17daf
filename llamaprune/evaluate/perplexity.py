"""Perplexity: exp of the mean next-token NLL over non-overlapping windows of a text; with ``tasks``, zero-shot
accuracies through lm-eval (``llamaprune.evaluate.zero_shot``) beside it.

    >>> windows = evaluation_windows(tokenizer, load_rows("wikitext2"), seq_len=128)   # doctest: +SKIP
    >>> perplexity(model, windows, batch_size=8).ppl                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaprune.core.artifacts import plain_value
from llamaprune.core.errors import UsageError, flag
from llamaprune.evaluate.zero_shot import TaskOptions, zero_shot
from llamaprune.io.text_data import evaluation_windows, load_rows, local_file

EVAL_FILE = "eval.json"  # where apply, finetune and prune write perplexity before/after


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    windows: int
    seq_len: int
    tokens: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, total, seconds: float, windows: int, seq_len: int) -> PerplexityResult:
        """The result of ``windows`` windows of ``seq_len`` tokens whose summed NLL is ``total`` (a float64 tensor),
        run in ``seconds``; every window counts seq_len - 1 predictions."""
        nll = (total / (windows * (seq_len - 1))).item()
        tokens = windows * seq_len
        return cls(ppl=math.exp(nll), nll=nll, windows=windows, seq_len=seq_len, tokens=tokens, seconds=seconds,
                   tokens_per_s=tokens / seconds if seconds > 0 else float("inf"))


def shifted_nll(logits, labels, reduction: str):
    """The next-token NLL of ``labels`` under ``logits`` in float32 (labels -100 take none), reduced as
    torch's cross_entropy ``reduction`` says, and the shifted targets: evaluation and finetuning share it."""
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction=reduction)
    return nll, targets


def window_nll_sum(logits, input_ids):
    """Summed next-token NLL of each window, in float32: shape (batch,)."""
    nll, targets = shifted_nll(logits, input_ids, "none")
    return nll.view(targets.shape).sum(dim=1)


def timed_nll(model, batch):
    """The summed NLL of one (B, L) batch of windows under ``model`` (float64, on the CPU, so that a device has
    finished) and the seconds it took, the batch's transfer included. Call it under ``torch.inference_mode``."""
    start = time.perf_counter()
    batch = batch.to(next(model.parameters()).device)
    total = window_nll_sum(model(input_ids=batch, use_cache=False).logits, batch).double().sum().cpu()
    return total, time.perf_counter() - start


def check_batch_size(batch_size: int) -> None:
    """A batch size is checked where windows are split, for callers that build no ``EvalOptions``."""
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")


def perplexity(model, windows, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Batched perplexity of ``model`` over (n, L) token windows; every window counts L-1 predictions."""
    import torch
    from tqdm.auto import tqdm

    check_batch_size(batch_size)
    n, seq_len = windows.shape
    total, seconds = torch.zeros((), dtype=torch.float64), 0.0
    bar = tqdm(total=n, desc="perplexity", unit="win", disable=not progress)
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            nll, took = timed_nll(model, batch)
            total += nll
            seconds += took
            bar.update(batch.size(0))
            bar.set_postfix(tok_s=f"{bar.n * seq_len / seconds:.0f}" if seconds > 0 else "-")
    bar.close()
    return PerplexityResult.of(total, seconds, n, seq_len)


@dataclass(frozen=True)
class EvalOptions:
    """What ``llamaprune eval`` (and ``apply --eval``) measure: test split of ``dataset``, windows of seq_len;
    ``tasks``: lm-eval's tasks too."""

    dataset: str = "wikitext2"
    seq_len: int = 128
    max_windows: int | None = None
    batch_size: int = 8
    data_dir: str | None = None
    tasks: TaskOptions | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UsageError(f"{flag('eval --seq-len')} must be at least 2, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise UsageError(f"{flag('eval --max-windows')} must be positive, got {self.max_windows}")
        if self.batch_size <= 0:
            raise UsageError(f"{flag('eval --batch-size')} must be positive, got {self.batch_size}")

    @property
    def test_file(self) -> Path | None:
        """The local file the test rows come from (None: the hub)."""
        return local_file(self.dataset, split="test", data_dir=self.data_dir)

    def test_rows(self) -> list[str]:
        """The rows evaluated (and the task names checked): read them before loading a model so that bad input
        fails fast."""
        if self.tasks is not None:
            self.tasks.check()
        return load_rows(self.dataset, split="test", data_dir=self.data_dir)


def measure(model, tokenizer, options: EvalOptions, rows: list[str], progress: bool = True) -> dict:
    """Perplexity, forward speed and size of ``model`` (and its zero-shot accuracies when tasks are asked for);
    one warm-up batch first so one-off costs do not skew tokens/s."""
    windows = evaluation_windows(tokenizer, rows, options.seq_len, options.max_windows, flag("eval --seq-len"))
    perplexity(model, windows[: options.batch_size], options.batch_size, progress=False)
    result = perplexity(model, windows, options.batch_size, progress=progress)
    return with_size_and_tasks(result, model, tokenizer, options)


def with_size_and_tasks(result: PerplexityResult, model, tokenizer, options: EvalOptions) -> dict:
    """A measurement as eval.json holds it: ``result``, the model's size, and its zero-shot accuracies when tasks
    are asked for."""
    measured = {**result.to_dict(), "num_parameters": model.num_parameters()}
    if options.tasks is not None:
        measured["tasks"] = zero_shot(model, tokenizer, options.tasks, options.batch_size)
    return measured


def compare(options: EvalOptions, before: dict, after: dict, speed: dict | None = None) -> dict:
    """What eval.json holds: both measurements and their ratios: perplexity, parameters (when both measurements
    have them) and, given ``speed`` (``evaluate.speed.measure_pair``'s: both models timed in turn), forward
    tokens/s. Tokens/s measured apart are not compared: the machine's load may have changed in between."""
    report = {"options": plain_value(options), "before": before, "after": after}
    report["ppl_ratio"] = after["ppl"] / before["ppl"]
    if "num_parameters" in before and "num_parameters" in after:
        report["params_ratio"] = after["num_parameters"] / before["num_parameters"]
    if speed is not None:
        report.update(speed)
    return report


def evaluate_dataset(
    model, tokenizer, options: EvalOptions, progress: bool = True, rows: list[str] | None = None
) -> PerplexityResult:
    """Perplexity on the test split of a text source (``rows``: that split, if already read)."""
    rows = options.test_rows() if rows is None else rows
    windows = evaluation_windows(tokenizer, rows, options.seq_len, options.max_windows, flag("eval --seq-len"))
    return perplexity(model, windows, batch_size=options.batch_size, progress=progress)


# The seed toolkit's result keys: a hub dataset's name with the hub dataset it stands for.
SEED_LABELS = {"wikitext2": "wikitext2 (wikitext-2-raw-v1)", "ptb": "ptb (ptb_text_only)", "c4": "c4 (allenai/c4)"}


def PPLMetric(  # noqa: N802 - the seed toolkit's name, kept so its scripts run unchanged
    model,
    tokenizer,
    datasets=("wikitext2",),
    seq_len: int = 128,
    batch_size: int = 4,
    device=None,
    max_windows: int | None = None,
    data_dir: str | None = None,
) -> dict[str, float]:
    """The seed's evaluation call: ``{'wikitext2 (wikitext-2-raw-v1)': ppl, ...}`` over the test splits.

    The model is moved to ``device`` when one is given; a local file's key is its path.
    """
    if device is not None:
        from llamaprune.io.loading import resolve_device

        model.to(resolve_device(device))
    results = {}
    for dataset in datasets:
        options = EvalOptions(dataset, seq_len, max_windows, batch_size, data_dir)
        results[SEED_LABELS.get(dataset, dataset)] = evaluate_dataset(model, tokenizer, options).ppl
    return results
