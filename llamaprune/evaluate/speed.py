"""Forward speed of a pruned model against its dense one, measured only with both in memory in one process.

Each evaluation batch runs one model, then the other (the order swapped every batch), after a warm-up batch
each; the speed ratio is the median over the batches of the dense model's seconds over the pruned one's on the
same batch. Whatever else the machine does then slows both alike, or shows in a few rounds that the median
leaves out; two measurements made apart (minutes apart, with another job starting or ending in between) compare
the machine's load more than the models, so they give no ratio.

    >>> before, after, speed = measure_pair(dense, pruned, tokenizer, options, rows)   # doctest: +SKIP
    >>> speed["tokens_per_s_ratio"], speed["speed_rounds"]                              # doctest: +SKIP
    (1.12, 13)
"""

from __future__ import annotations

import statistics

from llamaprune.core.errors import flag
from llamaprune.evaluate.perplexity import (
    EvalOptions,
    PerplexityResult,
    check_batch_size,
    perplexity,
    timed_nll,
    with_size_and_tasks,
)
from llamaprune.io.text_data import evaluation_windows

# Timed rounds of a speed comparison at the least: an evaluation of fewer batches times its batches again.
SPEED_ROUNDS = 5


def paired_perplexity(before, after, windows, batch_size: int = 8, progress: bool = True,
                      rounds: int = SPEED_ROUNDS) -> tuple[PerplexityResult, PerplexityResult, dict]:
    """The perplexities of models ``before`` and ``after`` over the same (n, L) windows, run batch by batch in
    turn, and their speed: ``{"tokens_per_s_ratio": after's tokens/s over before's (the median of the per-batch
    ratios), "speed_rounds": how many}``. Fewer batches than ``rounds`` are timed again (not counted twice in
    the perplexities) until there are ``rounds``. Each result's seconds and tokens/s are its model's batches'."""
    import torch
    from tqdm.auto import tqdm

    check_batch_size(batch_size)
    n, seq_len = windows.shape
    batches = list(windows.split(batch_size))
    models = (before, after)
    totals = [torch.zeros((), dtype=torch.float64) for _ in models]
    seconds = [0.0, 0.0]
    ratios = []
    with torch.inference_mode():
        for step in tqdm(range(max(rounds, len(batches))), desc="perplexity (both models in turn)", unit="batch",
                         disable=not progress):
            timed = [0.0, 0.0]
            for which in (0, 1) if step % 2 == 0 else (1, 0):
                nll, timed[which] = timed_nll(models[which], batches[step % len(batches)])
                if step < len(batches):
                    totals[which] += nll
                    seconds[which] += timed[which]
            ratios.append(timed[0] / timed[1] if timed[1] > 0 else float("inf"))
    first, second = (PerplexityResult.of(total, own, n, seq_len) for total, own in zip(totals, seconds, strict=True))
    return first, second, {"tokens_per_s_ratio": statistics.median(ratios), "speed_rounds": len(ratios)}


def measure_pair(before, after, tokenizer, options: EvalOptions, rows: list[str],
                 progress: bool = True) -> tuple[dict, dict, dict]:
    """``evaluate.perplexity.measure`` of two models in memory at once (a dense model and its pruned one), their
    batches run in turn after a warm-up batch each; returns both measurements and their speed for ``compare``."""
    windows = evaluation_windows(tokenizer, rows, options.seq_len, options.max_windows, flag("eval --seq-len"))
    for model in (before, after):
        perplexity(model, windows[: options.batch_size], options.batch_size, progress=False)
    first, second, speed = paired_perplexity(before, after, windows, options.batch_size, progress)
    return (with_size_and_tasks(first, before, tokenizer, options),
            with_size_and_tasks(second, after, tokenizer, options), speed)


def speed_text(report: dict) -> str:
    """eval.json's forward speed in words: the ratio of the two models timed in turn, or why there is none."""
    old, new = report["before"], report["after"]
    if "tokens_per_s_ratio" not in report:
        return (f"forward speed not compared (the models were not in memory at once; {old['tokens_per_s']:.0f} and "
                f"{new['tokens_per_s']:.0f} tokens/s measured apart)")
    return (f"forward {old['tokens_per_s']:.0f} -> {new['tokens_per_s']:.0f} tokens/s "
            f"(x{report['tokens_per_s_ratio']:.2f}, median of {report['speed_rounds']} batches timed in turn)")
