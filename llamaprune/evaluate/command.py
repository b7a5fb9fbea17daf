"""The eval command: perplexity of a model on a text source's test split, and its zero-shot accuracy on lm-eval
tasks; the model, the output and the text are checked before the weights load.

    >>> report = evaluate_model("smollm2-135m", EvalOptions("wikitext2", 128, 10))   # doctest: +SKIP
    >>> report["wikitext2"]["ppl"]                                                     # doctest: +SKIP
    56.3
"""

from __future__ import annotations

from pathlib import Path

from llamaprune.core.artifacts import atomic_write_json
from llamaprune.evaluate.perplexity import EvalOptions, evaluate_dataset
from llamaprune.evaluate.zero_shot import zero_shot
from llamaprune.io.loading import Device, DType, load_model, warn_long_context
from llamaprune.runs.phase import check_model, check_writable, local_model, refuse_overlap


def evaluate_model(model: str, options: EvalOptions, dtype: DType = DType.float32, device: Device = Device.cpu,
                   out: Path | None = None) -> dict:
    """``{dataset: perplexity result, "tasks": accuracies}`` of ``model``, also written to ``out`` when given."""
    checked = check_model(model, device, tokenizer=True)
    if out is not None:
        refuse_overlap(out, [local_model(checked.source), options.test_file])
        check_writable(out)
    warn_long_context(checked.config, options.seq_len, "--seq-len")
    rows = options.test_rows()  # a bad dataset or task name fails before the weights load
    loaded = load_model(model, dtype, device)
    report = {options.dataset: evaluate_dataset(loaded.model, loaded.tokenizer, options, rows=rows).to_dict()}
    if options.tasks is not None:
        report["tasks"] = zero_shot(loaded.model, loaded.tokenizer, options.tasks, options.batch_size)
    if out is not None:
        atomic_write_json(out, report)
    return report
