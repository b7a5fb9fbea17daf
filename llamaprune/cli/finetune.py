"""``llamaprune finetune``: recover quality after pruning (LoRA or full finetuning) into the same checkpoint
format; ``llamaprune.cli.app`` registers the command.

    $ llamaprune finetune artifacts/run1/model --out artifacts/run1/model-lora --dataset wikitext2 --eval wikitext2
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamaprune.cli.options import (
    DataDir,
    DeviceOpt,
    DTypeOpt,
    KdHiddenOpt,
    KdTemperatureOpt,
    KdTopKOpt,
    KdWeightOpt,
    TeacherDeviceOpt,
)
from llamaprune.core.arch import LINEAR_NAMES
from llamaprune.core.errors import flags_named
from llamaprune.io.loading import Device, DType
from llamaprune.recover.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT


@flags_named({"eval --seq-len": "--eval-seq-len"})  # --seq-len is the training examples'
def finetune_command(
    model_dir: Annotated[
        str,
        typer.Argument(metavar="MODEL_DIR", help="Checkpoint directory to finetune (e.g. the output of apply)."),
    ],
    out: Annotated[Path, typer.Option(help="Directory to write the finetuned checkpoint to.")],
    method: Annotated[str, typer.Option(help="lora (adapters, merged back) or full (every weight).")] = "lora",
    dataset: Annotated[
        str, typer.Option(help="Training text (wikitext2, ptb, c4, .txt/.jsonl/.parquet) or Alpaca .jsonl.")
    ] = "wikitext2",
    samples: Annotated[int, typer.Option(help="Training examples (text windows or instructions), 5% held out.")] = 1000,
    seq_len: Annotated[int, typer.Option(help="Tokens per training example.")] = 256,
    epochs: Annotated[int, typer.Option(help="Passes over the training examples.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-4 lora, 1e-5 full).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward/backward pass.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA scaling numerator (scale = alpha / r).")] = 32.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA input.")] = 0.05,
    lora_targets: Annotated[
        str, typer.Option(help="Comma-separated linear layers to adapt.")
    ] = ",".join(LINEAR_NAMES),
    eval_dataset: Annotated[
        str | None, typer.Option("--eval", help="Perplexity before and after on: wikitext2, ptb, c4 or a file.")
    ] = None,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 128,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")] = None,
    val_every: Annotated[
        int | None, typer.Option(help="Validation loss every N optimizer steps (default: about 10 times).")
    ] = None,
    save_adapter: Annotated[
        bool, typer.Option("--save-adapter", help="Also keep the LoRA adapter alone in OUT/adapter.")
    ] = False,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward: less memory.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data sample, the split and the initialization.")] = 0,
    teacher: Annotated[
        str | None,
        typer.Option(help="Distil from this model (dir, .gguf, hub id, smollm2-135m): the one that was pruned. "
                          "Default: the next-token loss alone."),
    ] = None,
    kd_temperature: KdTemperatureOpt = DEFAULT_TEMPERATURE,
    kd_weight: KdWeightOpt = DEFAULT_WEIGHT,
    kd_top_k: KdTopKOpt = None,
    kd_hidden: KdHiddenOpt = 0.0,
    teacher_device: TeacherDeviceOpt = None,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT directory.")] = False,
) -> None:
    """Recover quality after pruning: LoRA or full finetuning, on the next-token loss or distilled from the dense
    model (--teacher), saved in the same checkpoint format."""
    from llamaprune.evaluate.perplexity import EvalOptions
    from llamaprune.recover.command import FinetuneRun, run_finetune
    from llamaprune.recover.distill import distillation
    from llamaprune.recover.finetune import FinetuneOptions, parse_targets

    distill = distillation(teacher, kd_temperature, kd_weight, kd_top_k, kd_hidden, teacher_device)
    options = FinetuneOptions(
        method=method, dataset=dataset, samples=samples, seq_len=seq_len, epochs=epochs, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, val_every=val_every, gradient_checkpointing=gradient_checkpointing, seed=seed,
        data_dir=data_dir, lora_targets=parse_targets(lora_targets), distill=distill,
    )
    evaluation = EvalOptions(eval_dataset, eval_seq_len, max_windows, batch_size, data_dir) if eval_dataset else None
    summary = run_finetune(FinetuneRun(model_dir, out, options, evaluation, save_adapter, dtype, device, overwrite))
    report_finetune(summary, options, evaluation, out)


def report_finetune(summary: dict, options, evaluation, out: Path) -> None:
    """What ``finetune`` (and ``apply --finetune``) print: training, then perplexity (and task accuracies) before
    and after."""
    distilled = f" distilled from {options.distill.teacher}" if options.distill else ""
    typer.echo(
        f"{options.method.value}{distilled}: {summary['steps']} steps over {summary['train_examples']} examples "
        f"({summary['tokens_per_s']:.0f} tokens/s), best validation loss {summary['best_validation_loss']:.4f} "
        f"at step {summary['best_step']} in {summary['seconds']:.1f} s -> {out}"
    )
    if evaluation:
        report = summary["eval"]
        typer.echo(
            f"{evaluation.dataset}: perplexity {report['before']['ppl']:.3f} -> {report['after']['ppl']:.3f} "
            f"(x{report['ppl_ratio']:.3f}) over {report['after']['windows']} windows of {evaluation.seq_len} tokens "
            f"-> {out / 'eval.json'}"
        )
        if evaluation.tasks is not None:
            from llamaprune.evaluate.zero_shot import task_lines

            for line in task_lines(report["before"], report["after"]):
                typer.echo(line)
