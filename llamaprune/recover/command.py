"""``llamaprune finetune``: a checkpoint directory in, the same checkpoint format out, finetuned.

It loads the directory, trains with ``llamaprune.recover.finetune``, merges LoRA into the weights and writes the
result atomically (our ``llamaprune`` type with its modeling file, or a plain config) with the input's
tokenizer and plan, the loss curve, eval.json and the manifest.

    >>> options = FinetuneOptions(method="lora", dataset="wikitext2", samples=1000, seq_len=256)
    >>> run_finetune(FinetuneRun(model="artifacts/run1/model", out=Path("artifacts/run1/model-lora"),
    ...                          options=options, eval=EvalOptions("wikitext2")))     # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llamaprune.core.artifacts import MANIFEST, atomic_write_json, manifest_in, new_manifest, plain_value
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.groups import config_fingerprint
from llamaprune.evaluate.perplexity import EVAL_FILE, EvalOptions, compare, measure
from llamaprune.io.loading import Device, DType, load_model, resolve_source
from llamaprune.io.pruned_checkpoint import MODELING_FILE, save_pruned
from llamaprune.recover.data import TrainingText, build_examples, read_source
from llamaprune.recover.finetune import FinetuneOptions, Method, finetune, merge_lora
from llamaprune.recover.loss_curve import CURVE_JSON, CURVE_PNG, plot_curve
from llamaprune.recover.teacher import check_teacher, checkpoint_plan, load_teacher
from llamaprune.runs.command_log import TRAINING_LOG
from llamaprune.runs.phase import Phase, run_phase

ADAPTER_DIR = "adapter"
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
            raise UsageError(f"--save-adapter keeps a LoRA adapter; use it with {flag('finetune --method')} lora")

    def phase(self, model_ready: bool = True) -> Phase:
        """The run as a phase; ``model_ready`` False checks all but the input model, which an earlier phase of
        the same command (``apply --finetune``) has yet to write."""
        from llamaprune.io.text_data import local_file

        evaluation = self.eval
        seq_lens = ((flag("finetune --seq-len"), self.options.seq_len),)
        seq_lens += ((flag("eval --seq-len"), evaluation.seq_len),) if evaluation else ()
        return Phase(
            "finetune", self.out, self.overwrite, self.model if model_ready else None, self.device, TRAINING_LOG,
            inputs=(local_file(self.options.dataset, "train", self.options.data_dir),
                    None if model_ready else Path(self.model), evaluation and evaluation.test_file),
            seq_lens=seq_lens,
        )


@dataclass(frozen=True)
class Inputs:
    """The texts, read before any weights load so that bad data fails fast."""

    training: TrainingText
    evaluation: list[str] | None


def read_inputs(run: FinetuneRun, model_ready: bool = True) -> Inputs:
    """The texts, then (``model_ready``: the checkpoint to finetune exists) the teacher against the checkpoint."""
    inputs = Inputs(read_source(run.options.dataset, run.options.data_dir), run.eval.test_rows() if run.eval else None)
    if model_ready:
        check_teacher(run.options.distill, run.model, checkpoint_plan(Path(run.model)))
    return inputs


def check_checkpoint_dir(name: str) -> None:
    """The input must be a checkpoint directory: its tokenizer, plan and manifest are carried over."""
    source = resolve_source(name)
    if source.kind != "dir":
        raise UsageError(f"{name} is a {source.kind} model; finetune reads a checkpoint directory (give its path)")


def copy_input_files(source: Path, out: Path) -> list[str]:
    """Copy the input's tokenizer files, plan, generation config...: every top-level file but weights and
    the files this run writes itself."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    return copied


def run_finetune(run: FinetuneRun, progress: bool = True) -> dict:
    """Finetune a checkpoint directory into ``run.out`` (atomically); returns what the manifest records."""
    check_checkpoint_dir(run.model)
    with run_phase(run.phase(), lambda _: read_inputs(run)) as phase_run:
        source, inputs, tmp = Path(phase_run.checked.source.path), phase_run.inputs, phase_run.dir
        summary = phase_run.summary
        summary.update(model=run.model, out=str(run.out), options=plain_value(run.options),
                       learning_rate=run.options.learning_rate)
        loaded = load_model(run.model, run.dtype, run.device)
        model, tokenizer = loaded.model, loaded.tokenizer
        options = run.options
        examples = build_examples(tokenizer, inputs.training, options.samples, options.seq_len, options.seed)
        if run.eval:
            before = measure(model, tokenizer, run.eval, inputs.evaluation, progress)
        teacher = load_teacher(options.distill, model, checkpoint_plan(source), run.dtype) if options.distill else None
        result = finetune(model, tokenizer, options, examples, progress, teacher)
        if run.save_adapter:
            result.model.save_pretrained(tmp / ADAPTER_DIR)
        model = merge_lora(result.model)
        summary.update(data_kind=inputs.training.kind, **result.summary())
        if run.eval:
            after = measure(model, tokenizer, run.eval, inputs.evaluation, progress)
            # no speed ratio: the model before finetuning is gone (trained in place), and measured apart the two
            # would compare the machine's load more than the models (which have the same shapes anyway)
            summary["eval"] = compare(run.eval, before, after)
            atomic_write_json(tmp / EVAL_FILE, summary["eval"])
        save_pruned(model, tmp, run.max_shard_size)
        summary["copied"] = copy_input_files(source, tmp)
        atomic_write_json(tmp / CURVE_JSON, result.curve)
        plot_curve(result.curve, tmp / CURVE_PNG)
        summary["seconds_total"] = phase_run.seconds()
        # The input's manifest with this finetune appended (a new one for a plain checkpoint directory).
        fingerprint = config_fingerprint(model.config)
        phase_run.record(manifest_in(source) or new_manifest({"source": run.model, "fingerprint": fingerprint}))
    return summary
