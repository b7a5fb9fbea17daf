"""``llamaprune finetune``: a checkpoint directory in, the same checkpoint format out, finetuned.

It loads the directory, trains with ``llamaprune.finetune``, merges LoRA into the weights and writes the
result atomically (our ``llamaprune`` type with its modeling file, or a plain config) with the input's
tokenizer and plan, the loss curve, eval.json and the manifest.

    >>> options = FinetuneOptions(method="lora", dataset="wikitext2", samples=1000, seq_len=256)
    >>> run_finetune(FinetuneRun(model="artifacts/run1/model", out=Path("artifacts/run1/model-lora"),
    ...                          options=options, eval=EvalOptions("wikitext2")))     # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llamaprune.artifacts import (
    MANIFEST,
    atomic_dir,
    atomic_write_json,
    new_manifest,
    read_manifest,
    refuse_existing,
    start_log,
    stop_log,
    with_history,
)
from llamaprune.checkpoint import MODELING_FILE, save_pruned
from llamaprune.errors import UsageError
from llamaprune.evaluate import EVAL_FILE, EvalOptions, compare, evaluate_dataset
from llamaprune.finetune import CURVE_JSON, CURVE_PNG, FinetuneOptions, Method, finetune, merge_lora, plot_curve
from llamaprune.finetune_data import build_examples, read_source
from llamaprune.model import Device, DType, config_fingerprint, load_config, load_model, resolve_device, resolve_source

ADAPTER_DIR = "adapter"
LOG_NAME = "training.log"
# Files of the input directory that the output gets from elsewhere: the save, or this run's own reports.
NOT_COPIED = {"config.json", MODELING_FILE.name, EVAL_FILE, CURVE_JSON, CURVE_PNG, MANIFEST}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


@dataclass(frozen=True)
class FinetuneRun:
    """``llamaprune finetune``: the checkpoint directory to train, where to write it, and how."""

    model: str
    out: Path
    options: FinetuneOptions = FinetuneOptions()
    eval: EvalOptions | None = None
    save_adapter: bool = False
    dtype: DType = DType.float32
    device: Device = Device.cpu
    overwrite: bool = False
    max_shard_size: str = "2GB"

    def __post_init__(self) -> None:
        if self.save_adapter and self.options.method is not Method.lora:
            raise UsageError("--save-adapter keeps a LoRA adapter; use it with --method lora")


def checkpoint_dir(name: str) -> Path:
    """The input must be a checkpoint directory: its tokenizer, plan and manifest are carried over."""
    source = resolve_source(name)
    if source.kind != "dir":
        raise UsageError(
            f"{name} is a {source.kind} model; finetune reads a checkpoint directory (give its path)"
        )
    load_config(source)
    return Path(source.path)


def copy_input_files(source: Path, out: Path) -> list[str]:
    """Copy the input's tokenizer files, plan, generation config...: every top-level file but weights and
    the files this run writes itself."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    return copied


def manifest_for(source: Path, name: str, config, summary: dict) -> dict:
    """The input's manifest with this finetune appended (a new one for a plain checkpoint directory)."""
    if (source / MANIFEST).is_file():
        return with_history(read_manifest(source), summary)
    return with_history(new_manifest({"source": name, "fingerprint": config_fingerprint(config)}), summary)


def run_finetune(run: FinetuneRun, progress: bool = True) -> dict:
    """Finetune a checkpoint directory into ``run.out`` (atomically); returns what the manifest records."""
    start = time.perf_counter()
    resolve_device(run.device)
    source = checkpoint_dir(run.model)
    refuse_existing(run.out, run.overwrite)
    text = read_source(run.options.dataset, run.options.data_dir)  # bad data fails before the weights load
    eval_rows = run.eval.test_rows() if run.eval else None
    summary = {
        "command": "finetune",
        "model": run.model,
        "out": str(run.out),
        "options": asdict(run.options),
        "learning_rate": run.options.learning_rate,
    }
    with atomic_dir(run.out, run.overwrite) as tmp:
        handler = start_log(tmp, LOG_NAME)
        try:
            loaded = load_model(run.model, run.dtype, run.device)
            model, tokenizer = loaded.model, loaded.tokenizer
            options = run.options
            examples = build_examples(tokenizer, text, options.samples, options.seq_len, options.seed)
            if run.eval:
                before = evaluate_dataset(model, tokenizer, run.eval, progress, eval_rows)
            result = finetune(model, tokenizer, options, examples, progress)
            if run.save_adapter:
                result.model.save_pretrained(tmp / ADAPTER_DIR)
            model = merge_lora(result.model)
            summary.update(data_kind=text.kind, **result.summary())
            if run.eval:
                after = evaluate_dataset(model, tokenizer, run.eval, progress, eval_rows)
                summary["eval"] = compare(run.eval, before.to_dict(), after.to_dict())
                atomic_write_json(tmp / EVAL_FILE, summary["eval"])
            save_pruned(model, tmp, run.max_shard_size)
            summary["copied"] = copy_input_files(source, tmp)
            atomic_write_json(tmp / CURVE_JSON, result.curve)
            plot_curve(result.curve, tmp / CURVE_PNG)
            summary["seconds_total"] = round(time.perf_counter() - start, 3)
            atomic_write_json(tmp / MANIFEST, manifest_for(source, run.model, model.config, summary))
        finally:
            stop_log(handler)
    return summary
