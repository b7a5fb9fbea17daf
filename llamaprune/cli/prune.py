"""``llamaprune prune``: the seed toolkit's one-shot command under its own option names (score, plan, apply,
optionally finetune, with the model loaded once); ``llamaprune.cli.app`` registers it.

    $ llamaprune prune --base_model smollm2-135m --pruning_ratio 0.2 --importance_method taylor_2nd \\
          --save_ckpt_log_name global-20 --save_model --test_after_prune
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamaprune.cli.options import INSTALL_EVAL, KD_HELP, DeviceOpt, DTypeOpt
from llamaprune.core.criteria import names_text
from llamaprune.core.errors import flags_named
from llamaprune.io.loading import Device, DType
from llamaprune.recover.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT


def prune_command(
    base_model: Annotated[
        str, typer.Option("--base_model", help="Checkpoint dir, .gguf, hub id, smollm2-135m.")
    ] = "smollm2-135m",
    save_ckpt_log_name: Annotated[
        str, typer.Option("--save_ckpt_log_name", help="Run name: output goes to artifacts/<name>/.")
    ] = "prune",
    pruning_ratio: Annotated[
        float, typer.Option("--pruning_ratio", help="Fraction of the model's TOTAL parameters to remove.")
    ] = 0.2,
    importance_method: Annotated[
        str, typer.Option("--importance_method", help=f"{names_text()}.")
    ] = "taylor",
    method: Annotated[str, typer.Option("--method", help="global, or layer (= layerwise).")] = "global",
    pruning_distribution: Annotated[
        str | None, typer.Option("--pruning_distribution", help="Layer-wise attention:MLP split: 2:8.")
    ] = None,
    pruning_strategy: Annotated[
        str, typer.Option("--pruning_strategy", help="Layer-wise: inverse or uniform.")
    ] = "inverse",
    freeze_top_n_layers: Annotated[
        int, typer.Option("--freeze_top_n_layers", help="Leave the N most important layers untouched.")
    ] = 0,
    remove_empty_layers: Annotated[
        bool, typer.Option("--remove_empty_layers", help="Drop a layer that would lose all its groups.")
    ] = False,
    normalize: Annotated[
        str, typer.Option("--normalize", help="Global: none, mean or standard (see `llamaprune plan --help`).")
    ] = "none",
    compensate: Annotated[
        str, typer.Option("--compensate", help="Error compensation: none, bias or lstsq (see `llamaprune apply`).")
    ] = "lstsq",
    compensation_samples: Annotated[
        int, typer.Option("--compensation_samples", help="lstsq: calibration windows to refit on.")
    ] = 1024,
    dataset: Annotated[
        str, typer.Option("--dataset", help="Calibration text: wikitext2, ptb, c4, or a local file.")
    ] = "wikitext2",
    num_samples: Annotated[int, typer.Option("--num_samples", help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq_len", help="Tokens per calibration window.")] = 128,
    gradient_batch_size: Annotated[
        int, typer.Option("--gradient_batch_size", help="Calibration windows per forward/backward pass.")
    ] = 8,
    test_after_prune: Annotated[
        bool, typer.Option("--test_after_prune", help="Perplexity of the dense and the pruned model.")
    ] = False,
    eval_dataset: Annotated[
        str, typer.Option("--eval_dataset", help="Test text: wikitext2, ptb, c4, a file.")
    ] = "wikitext2",
    eval_seq_len: Annotated[int, typer.Option("--eval_seq_len", help="Tokens per evaluation window.")] = 128,
    max_windows: Annotated[
        int | None, typer.Option("--max_windows", help="Evaluate at most this many windows.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="With --test_after_prune: zero-shot lm-eval tasks too, e.g. "
                                                 f"piqa,arc_easy (needs {INSTALL_EVAL}).")
    ] = None,
    tasks_limit: Annotated[
        int | None, typer.Option("--tasks_limit", "--tasks-limit", help="At most N examples per task.")
    ] = None,
    tasks_dir: Annotated[
        str | None, typer.Option("--tasks_dir", "--tasks-dir", help="Directory of extra lm-eval task YAMLs.")
    ] = None,
    save_model: Annotated[
        bool, typer.Option("--save_model", help="Save the pruned model in <run>/model.")
    ] = False,
    output_model: Annotated[bool, typer.Option("--output_model", help="Same as --save_model.")] = False,
    finetune: Annotated[
        bool, typer.Option("--finetune", help="Recovery finetuning after pruning (the result is saved).")
    ] = False,
    finetune_method: Annotated[str, typer.Option("--finetune_method", help="lora or full.")] = "lora",
    finetune_dataset: Annotated[
        str | None, typer.Option("--finetune_dataset", help="Text or Alpaca .jsonl (default --dataset).")
    ] = None,
    finetune_samples: Annotated[int, typer.Option("--finetune_samples", help="Training examples.")] = 1000,
    finetune_seq_len: Annotated[
        int, typer.Option("--finetune_seq_len", help="Tokens per training example.")
    ] = 256,
    finetune_lr: Annotated[
        float | None, typer.Option("--finetune_lr", help="Peak learning rate (lora 1e-4, full 1e-5).")
    ] = None,
    lora_r: Annotated[int, typer.Option("--lora_r", help="LoRA rank.")] = 16,
    lora_alpha: Annotated[float, typer.Option("--lora_alpha", help="LoRA scaling numerator.")] = 32.0,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="--finetune distils from this model (default: --base_model, the dense "
                                       "model); none: the next-token loss alone."),
    ] = None,
    kd_temperature: Annotated[
        float, typer.Option("--kd_temperature", help=KD_HELP["temperature"])
    ] = DEFAULT_TEMPERATURE,
    kd_weight: Annotated[float, typer.Option("--kd_weight", help=KD_HELP["weight"])] = DEFAULT_WEIGHT,
    kd_top_k: Annotated[int | None, typer.Option("--kd_top_k", help=KD_HELP["top_k"])] = None,
    kd_hidden: Annotated[float, typer.Option("--kd_hidden", help=KD_HELP["hidden"])] = 0.0,
    teacher_device: Annotated[
        Device | None, typer.Option("--teacher_device", help=KD_HELP["device"])
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output_dir", help="Run directory (artifacts/<name>).")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option("--data_dir", envvar="LLAMAPRUNE_DATA_DIR", help="Local copy of hub datasets."),
    ] = None,
    device: DeviceOpt = Device.cpu,
    dtype: DTypeOpt = DType.float32,
    seed: Annotated[int, typer.Option(help="Seed of calibration sample, random scores and finetuning.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
) -> None:
    """Score, plan, apply (and finetune) in one go with the seed toolkit's options; writes the native run
    directory and the seed's files (description.txt, global_group_table.csv or layer_importance_config.json,
    pruning_strategy.png, logs/<stamp>/training.log)."""
    from llamaprune.plan import parse_distribution
    from llamaprune.seed.prune import SEED_FLAGS, PruneOptions, prune, summary_lines

    with flags_named(SEED_FLAGS):  # PruneOptions and prune name the seed's flags themselves
        distribution = parse_distribution(pruning_distribution) if pruning_distribution else None
    options = PruneOptions(
        base_model=base_model, save_ckpt_log_name=save_ckpt_log_name, pruning_ratio=pruning_ratio,
        importance_method=importance_method, method=method,
        pruning_distribution=distribution,
        pruning_strategy=pruning_strategy, freeze_top_n_layers=freeze_top_n_layers,
        remove_empty_layers=remove_empty_layers, normalize=normalize, compensate=compensate,
        compensation_samples=compensation_samples, dataset=dataset, num_samples=num_samples, seq_len=seq_len,
        gradient_batch_size=gradient_batch_size, test_after_prune=test_after_prune, eval_dataset=eval_dataset,
        eval_seq_len=eval_seq_len, max_windows=max_windows, tasks=tasks, tasks_limit=tasks_limit,
        tasks_dir=tasks_dir, save_model=save_model or output_model,
        finetune=finetune, finetune_method=finetune_method, finetune_dataset=finetune_dataset,
        finetune_samples=finetune_samples, finetune_seq_len=finetune_seq_len, finetune_lr=finetune_lr,
        lora_r=lora_r, lora_alpha=lora_alpha, teacher=teacher, kd_temperature=kd_temperature, kd_weight=kd_weight,
        kd_top_k=kd_top_k, kd_hidden=kd_hidden, teacher_device=teacher_device, output_dir=output_dir,
        data_dir=data_dir, device=device, dtype=dtype, seed=seed, overwrite=overwrite,
    )
    for line in summary_lines(prune(options)):
        typer.echo(line)
