"""Zero-shot accuracy through lm-evaluation-harness, the optional ``eval`` extra (``pip install
'llamaprune[eval]'``). lm-eval's HF wrapper is handed the model already in memory, so a pruned checkpoint of
llamaprune's own model type is evaluated without remote code, and ``apply`` / ``prune`` measure the very
model they made.

    >>> options = TaskOptions(parse_tasks("piqa,arc_easy"), limit=100)                  # doctest: +SKIP
    >>> options.check()                             # unknown names fail before weights load  # doctest: +SKIP
    >>> zero_shot(loaded.model, loaded.tokenizer, options)["results"]["piqa"]["acc"]      # doctest: +SKIP
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from llamaprune.core.errors import MissingInput, UsageError

INSTALL = "pip install 'llamaprune[eval]'"
NUM_FEWSHOT = 0  # zero-shot, whatever a task's YAML says
METRICS = ("acc", "acc_norm")


def lm_eval_version() -> str:
    """The installed lm-eval's version; without the extra, one line naming the install command."""
    try:
        import lm_eval
    except ImportError:
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed; run {INSTALL}") from None
    return lm_eval.__version__


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"piqa, arc_easy"`` -> ``("piqa", "arc_easy")``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class TaskOptions:
    """Which lm-eval tasks run: names (tasks, groups or tags), at most ``limit`` examples each, and a directory
    of extra task YAMLs (lm-eval's ``include_path``). lm-eval must be installed: checked on construction."""

    tasks: tuple[str, ...]
    limit: int | None = None
    tasks_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise UsageError("--tasks names no task; give lm-eval task names, e.g. --tasks piqa,arc_easy")
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--tasks-limit must be positive, got {self.limit}")
        if self.tasks_dir is not None and not Path(self.tasks_dir).is_dir():
            raise MissingInput(f"--tasks-dir not found: {self.tasks_dir} (a directory of lm-eval task YAMLs)")
        lm_eval_version()

    def check(self) -> None:
        """Refuse names lm-eval does not know; its task index takes seconds to build, so call this before the
        weights load rather than after."""
        known = set(task_manager(self.tasks_dir).all_tasks)
        unknown = [name for name in self.tasks if name not in known]
        if unknown:
            where = f"lm-eval's tasks or the YAMLs in {self.tasks_dir}" if self.tasks_dir else "lm-eval's tasks"
            raise UsageError(
                f"unknown task(s) {', '.join(unknown)}: not among {where}; `lm-eval ls tasks` lists them"
            )


def task_options(tasks: str | None, limit: int | None, tasks_dir: str | None) -> TaskOptions | None:
    """The options of ``--tasks``, ``--tasks-limit``, ``--tasks-dir`` (None without ``--tasks``; the other two
    alone are refused rather than silently ignored)."""
    if tasks is None:
        if limit is not None or tasks_dir is not None:
            raise UsageError("--tasks-limit and --tasks-dir apply to --tasks; add --tasks NAMES, e.g. --tasks piqa")
        return None
    return TaskOptions(parse_tasks(tasks), limit, tasks_dir)


@functools.lru_cache(maxsize=4)
def task_manager(tasks_dir: str | None):
    """lm-eval's task index (with ``tasks_dir``'s YAMLs), built once per process: checking names and running
    the tasks share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir)


def zero_shot(model, tokenizer, options: TaskOptions, batch_size: int = 8) -> dict:
    """Run the tasks on ``model`` (any causal LM in memory) with lm-eval's default seeds; the eval.json entry:
    per task acc / acc_norm with their standard errors and the examples scored, plus what decides the figures
    (lm-eval version, limit, num_fewshot)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    output = simple_evaluate(
        model=lm,
        tasks=list(options.tasks),
        num_fewshot=NUM_FEWSHOT,
        limit=options.limit,
        task_manager=task_manager(options.tasks_dir),
        log_samples=False,
    )
    samples = output.get("n-samples", {})
    results = {}
    for task, metrics in output["results"].items():
        entry = {}
        for metric in METRICS:
            if f"{metric},none" in metrics:
                entry[metric] = _number(metrics[f"{metric},none"])
                entry[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
        if task in samples:
            entry["samples"] = samples[task]["effective"]
        results[task] = entry
    return {
        "lm_eval_version": lm_eval_version(),
        "num_fewshot": NUM_FEWSHOT,
        "limit": options.limit,
        "seconds": round(time.perf_counter() - start, 3),
        "results": results,
    }


def _number(value) -> float | None:
    """lm-eval writes "N/A" for a standard error it cannot give (one example): null in JSON."""
    return float(value) if isinstance(value, (int, float)) else None


def task_lines(*measurements: dict) -> list[str]:
    """One line per task, its accuracies across ``measurements`` (each with a ``tasks`` entry) joined by
    arrows: ``piqa: acc 0.612 -> 0.571, acc_norm 0.601 -> 0.560 (200 examples)``."""
    entries = [m["tasks"]["results"] for m in measurements]
    lines = []
    for task, first in entries[0].items():
        figures = [
            f"{metric} " + " -> ".join(f"{entry[task][metric]:.3f}" for entry in entries)
            for metric in METRICS
            if metric in first
        ]
        if figures:
            lines.append(f"{task}: {', '.join(figures)} ({first.get('samples', '?')} examples)")
    return lines
