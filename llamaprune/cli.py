"""The ``llamaprune`` command line: one typed function per command, heavy imports deferred.

    $ llamaprune eval smollm2-135m --dataset wikitext2 --seq-len 128 --max-windows 200 --out eval.json

Bad input (``UsageError``) and failed file operations (OSError: a path unreadable, unwritable, or a full disk)
print as one ``error:`` line and exit with code 2; any other exception is a bug: traceback, exit code 1.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from llamaprune.arch import LINEAR_NAMES
from llamaprune.criteria import CRITERIA, help_text, names_text
from llamaprune.errors import UsageError
from llamaprune.model import Device, DType

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Structured pruning of LLaMA-family models: score once, plan many ratios, apply to a checkpoint.",
)

DataDir = Annotated[
    str | None,
    typer.Option("--data-dir", envvar="LLAMAPRUNE_DATA_DIR", help="Local copy of hub datasets, tried first."),
]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weight dtype.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="cpu, cuda or auto.")]


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Structured pruning of LLaMA-family models."""
    if version:
        from llamaprune import __version__

        typer.echo(__version__)
        raise typer.Exit()


def one_line_errors(command):
    """Turn bad input and failed file operations into one line on stderr and exit code 2; bugs propagate."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        try:
            return command(*args, **kwargs)
        except (UsageError, OSError) as err:
            typer.echo(f"error: {first_line(err)}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def main() -> None:
    """Console entry point: typer's own usage errors (bad option values) also become one ``error:`` line."""
    try:
        from typer._click import exceptions as click_exceptions  # recent typer vendors click
    except ImportError:
        from click import exceptions as click_exceptions

    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as err:
        typer.echo(err.format_message())
        code = 0
    except click_exceptions.UsageError as err:
        command = err.ctx.command_path if err.ctx else "llamaprune"
        typer.echo(f"error: {first_line(err)} (see `{command} --help`)", err=True)
        code = 2
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


@app.command("eval")
@one_line_errors
def eval_command(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint dir, .gguf file, hub id, or smollm2-135m.")],
    dataset: Annotated[str, typer.Option(help="wikitext2, ptb, c4, or a local .txt/.jsonl/.parquet.")] = "wikitext2",
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
) -> None:
    """Perplexity of a model on the test split of a text source."""
    from llamaprune.artifacts import atomic_write_json
    from llamaprune.evaluate import EvalOptions, evaluate_dataset
    from llamaprune.model import load_config, load_model, resolve_device, resolve_source

    options = EvalOptions(dataset, seq_len, max_windows, batch_size, data_dir)
    resolve_device(device)
    load_config(resolve_source(model))  # a bad device, path or architecture fails before any data loads
    rows = options.test_rows()  # and a bad dataset before the weights load
    loaded = load_model(model, dtype, device)
    result = evaluate_dataset(loaded.model, loaded.tokenizer, options, rows=rows)
    report = {dataset: result.to_dict()}
    typer.echo(
        f"{dataset}: perplexity {result.ppl:.3f} over {result.windows} windows of {seq_len} tokens "
        f"({result.tokens_per_s:.0f} tokens/s)"
    )
    if out is not None:
        atomic_write_json(out, report)
    else:
        typer.echo(json.dumps(report))


@app.command("score")
@one_line_errors
def score_command(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint dir, .gguf file, hub id, or smollm2-135m.")],
    out: Annotated[Path, typer.Option(help="Run directory to create (groups.parquet, layers.parquet, ...).")],
    dataset: Annotated[str, typer.Option(help="Calibration text: wikitext2, ptb, c4, or a local file.")] = "wikitext2",
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward/backward pass.")] = 8,
    criteria: Annotated[str, typer.Option(help=f"Comma-separated criteria: {help_text()}.")] = ",".join(CRITERIA),
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample and the random baseline.")] = 0,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
) -> None:
    """Measure importance and cost of every attention group and MLP channel (phase 1)."""
    from llamaprune.scoring import ScoreOptions, parse_criteria, score_run

    options = ScoreOptions(model, dataset, num_samples, seq_len, batch_size, parse_criteria(criteria), seed, dtype,
                           device, data_dir)
    result = score_run(options, out, overwrite)
    typer.echo(
        f"scored {result.groups.num_rows} groups over {result.tokens} tokens in {result.seconds:.1f} s "
        f"(peak memory {result.peak_memory_bytes / 2**20:.0f} MiB) -> {out}"
    )


@app.command("plan")
@one_line_errors
def plan_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run directory written by `llamaprune score`.")],
    ratio: Annotated[
        list[float] | None,
        typer.Option(help="Fraction of the model's TOTAL parameters to remove, 0 < R < 1; repeatable."),
    ] = None,
    ratios: Annotated[
        str | None, typer.Option(help="A sweep START:STOP:STEP, inclusive, e.g. 0.05:0.5:0.05.")
    ] = None,
    criterion: Annotated[
        str, typer.Option(help=f"Score column: {', '.join(CRITERIA)}.")
    ] = "taylor",
    strategy: Annotated[
        str, typer.Option(help="global (least importance per parameter first) or layerwise.")
    ] = "global",
    name: Annotated[
        str | None, typer.Option(help="Plan name (default STRATEGY-CRITERION-RATIO[-tags]), -RATIO added.")
    ] = None,
    normalize: Annotated[
        str, typer.Option(help="global: none, or mean (score = importance / mean importance of its layer and kind).")
    ] = "none",
    distribution: Annotated[
        str | None, typer.Option(help="layerwise: attention:MLP budget split, e.g. 2:8 (default: size).")
    ] = None,
    layer_strategy: Annotated[
        str, typer.Option(help="layerwise: inverse (important layers lose less) or uniform.")
    ] = "inverse",
    layer_importance: Annotated[
        str, typer.Option(help="block_influence, or a criterion's per-layer sum.")
    ] = "block_influence",
    freeze_top_n: Annotated[int, typer.Option(help="Leave the N most important layers untouched.")] = 0,
    protect_layers: Annotated[str, typer.Option(help="Layers never pruned, e.g. 0,-1 (-1: the last).")] = "",
    min_kv_heads: Annotated[
        int, typer.Option(help="KV heads kept per layer; 0 lets attention be skipped.")
    ] = 1,
    min_mlp_channels: Annotated[int, typer.Option(help="MLP channels kept per layer; 0 lets the MLP go.")] = (
        1
    ),
    round_to: Annotated[int, typer.Option(help="Keep each layer's MLP width a multiple of M.")] = 1,
    uniform: Annotated[
        bool, typer.Option("--uniform", help="The same shape in every layer (a plain llama config).")
    ] = False,
    remove_empty_layers: Annotated[
        bool, typer.Option("--remove-empty-layers", help="Drop a layer that would lose all its groups.")
    ] = False,
    png: Annotated[bool, typer.Option(help="Also draw plans/<name>.png.")] = True,
) -> None:
    """Turn target ratios into pruning plans (phase 2): RUN_DIR/plans/<name>.json and .png, no torch."""
    import time
    from dataclasses import replace

    from llamaprune.artifacts import append_history, read_manifest
    from llamaprune.plan import (
        SUMMARY_COLUMNS,
        PlanOptions,
        iter_plans,
        load_run,
        parse_distribution,
        parse_layers,
        parse_ratios,
        summary_rows,
        write_plans,
    )
    from llamaprune.query import format_rows

    start = time.perf_counter()
    targets = sorted(set(ratio or []) | set(parse_ratios(ratios) if ratios else []))
    if not targets:
        raise UsageError("give --ratio R (the fraction of total parameters to remove) or --ratios A:B:STEP")
    options = PlanOptions(
        ratio=targets[0],
        criterion=criterion,
        strategy=strategy,
        normalize=normalize,
        distribution=parse_distribution(distribution) if distribution else None,
        layer_strategy=layer_strategy,
        layer_importance=layer_importance,
        freeze_top_n=freeze_top_n,
        protect_layers=parse_layers(protect_layers),
        min_kv_heads=min_kv_heads,
        min_mlp_channels=min_mlp_channels,
        round_to=round_to,
        uniform=uniform,
        remove_empty_layers=remove_empty_layers,
    )
    for target in targets[1:]:  # every ratio is checked before any plan is written
        replace(options, ratio=target)
    tables = load_run(run_dir)
    read_manifest(run_dir)  # fail before writing anything if the history cannot be recorded
    rows = []
    # One plan in memory at a time, the largest ratio first: an unreachable target fails before any file is written.
    for plan in iter_plans(tables, options, targets[::-1], name):
        write_plans(run_dir, [plan], png=png)
        rows[:0] = summary_rows([plan])
    typer.echo("ratios are fractions of the model's total parameters removed (*_prunable: of attention+MLP)")
    typer.echo(format_rows(list(SUMMARY_COLUMNS), rows))
    seconds = time.perf_counter() - start
    names = [row[0] for row in rows]
    entry = {"command": "plan", "options": options.to_dict(), "ratios": targets, "plans": names}
    append_history(run_dir, {**entry, "seconds": seconds})
    typer.echo(f"wrote {len(rows)} plan(s) to {run_dir / 'plans'} in {seconds:.2f} s")


@app.command("sql")
@one_line_errors
def sql_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run directory written by `llamaprune score`.")],
    query: Annotated[
        str,
        typer.Argument(metavar="QUERY", help="One SQL statement over groups, layers, plans, plan_layers."),
    ],
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Query a run directory with DuckDB. Views: groups (one row per group), layers (one per layer), plans
    (one per plan file) and plan_layers (one per plan and layer)."""
    from llamaprune.choices import parse_choice
    from llamaprune.query import OutputFormat, format_rows, run_query

    fmt = parse_choice(OutputFormat, output, "--format")
    columns, rows = run_query(run_dir, query)
    typer.echo(format_rows(columns, rows, fmt))


@app.command("apply")
@one_line_errors
def apply_command(
    plan: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan JSON written by `llamaprune plan`.")],
    model: Annotated[str, typer.Option(help="Checkpoint the plan is for: dir, .gguf, hub id, smollm2-135m.")],
    out: Annotated[Path, typer.Option(help="Directory of the pruned checkpoint to create.")],
    dtype: Annotated[
        DType | None, typer.Option("--dtype", help="Output weight dtype (default: the checkpoint's own).")
    ] = None,
    device: DeviceOpt = Device.cpu,
    max_shard_size: Annotated[str, typer.Option(help="Largest output weight file, e.g. 2GB, 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT directory.")] = False,
    eval_dataset: Annotated[
        str | None,
        typer.Option("--eval", help="Perplexity before and after on: wikitext2, ptb, c4 or a local file."),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 128,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    data_dir: DataDir = None,
    finetune: Annotated[
        str | None, typer.Option("--finetune", help="Then recover: lora or full (see `llamaprune finetune`).")
    ] = None,
    finetune_dataset: Annotated[str, typer.Option(help="Finetuning text or Alpaca .jsonl.")] = "wikitext2",
    finetune_samples: Annotated[int, typer.Option(help="Finetuning windows / examples.")] = 1000,
    finetune_seq_len: Annotated[int, typer.Option(help="Tokens per finetuning window.")] = 256,
    finetune_lr: Annotated[float | None, typer.Option(help="Default: 1e-4 (lora), 1e-5 (full).")] = None,
    finetune_epochs: Annotated[int, typer.Option(help="Passes over the finetuning data.")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 32.0,
) -> None:
    """Slice a checkpoint by a plan into a smaller one that from_pretrained loads (phase 3), then optionally
    finetune it (--finetune lora|full): the pruned checkpoint is kept beside OUT as OUT-pruned."""
    from llamaprune.apply import ApplyOptions, apply
    from llamaprune.evaluate import EvalOptions

    evaluation = None
    if eval_dataset:
        evaluation = EvalOptions(eval_dataset, seq_len, max_windows, batch_size, data_dir)
    recovery = None
    if finetune:
        from llamaprune.artifacts import refuse_existing
        from llamaprune.finetune import FinetuneOptions
        from llamaprune.finetune_data import read_source
        from llamaprune.finetune_run import FinetuneRun, run_finetune

        options = FinetuneOptions(method=finetune, dataset=finetune_dataset, samples=finetune_samples,
                                  seq_len=finetune_seq_len, epochs=finetune_epochs, lr=finetune_lr, lora_r=lora_r,
                                  lora_alpha=lora_alpha, data_dir=data_dir)
        pruned_out, out = out.with_name(f"{out.name}-pruned"), out
        recovery = FinetuneRun(str(pruned_out), out, options, evaluation, dtype=dtype or DType.float32,
                               device=device, overwrite=overwrite, max_shard_size=max_shard_size)
        refuse_existing(out, overwrite)
        read_source(options.dataset, options.data_dir)  # bad finetuning data fails before any work
        plan_out = pruned_out
    else:
        plan_out = out
    summary = apply(ApplyOptions(plan, model, plan_out, dtype, device, max_shard_size, overwrite, evaluation))
    before, after = summary["params_before"], summary["params_after"]
    how = "streamed" if summary["streamed"] else "pruned in memory"
    seconds = summary["seconds"]
    typer.echo(f"{how}: {before:,} -> {after:,} parameters ({after / before:.1%}) in {seconds:.1f} s: {plan_out}")
    if evaluation:
        report = summary["eval"]
        old, new = report["before"], report["after"]
        typer.echo(
            f"{eval_dataset}: perplexity {old['ppl']:.3f} -> {new['ppl']:.3f} (x{report['ppl_ratio']:.3f}) "
            f"over {new['windows']} windows of {seq_len} tokens; forward {old['tokens_per_s']:.0f} -> "
            f"{new['tokens_per_s']:.0f} tokens/s (x{report['tokens_per_s_ratio']:.2f}) -> {plan_out / 'eval.json'}"
        )
    if recovery is not None:
        _report_finetune(run_finetune(recovery), recovery.options, evaluation, out)


@app.command("finetune")
@one_line_errors
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
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT directory.")] = False,
) -> None:
    """Recover quality after pruning: LoRA or full finetuning, saved in the same checkpoint format."""
    from llamaprune.evaluate import EvalOptions
    from llamaprune.finetune import FinetuneOptions, parse_targets
    from llamaprune.finetune_run import FinetuneRun, run_finetune

    options = FinetuneOptions(
        method=method, dataset=dataset, samples=samples, seq_len=seq_len, epochs=epochs, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, val_every=val_every, gradient_checkpointing=gradient_checkpointing, seed=seed,
        data_dir=data_dir, lora_targets=parse_targets(lora_targets),
    )
    evaluation = EvalOptions(eval_dataset, eval_seq_len, max_windows, batch_size, data_dir) if eval_dataset else None
    summary = run_finetune(FinetuneRun(model_dir, out, options, evaluation, save_adapter, dtype, device, overwrite))
    _report_finetune(summary, options, evaluation, out)


def _report_finetune(summary: dict, options, evaluation, out: Path) -> None:
    typer.echo(
        f"{options.method.value}: {summary['steps']} steps over {summary['train_examples']} examples "
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


@app.command("prune")
@one_line_errors
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
    from llamaprune.prune import PruneOptions, prune, summary_lines

    options = PruneOptions(
        base_model=base_model, save_ckpt_log_name=save_ckpt_log_name, pruning_ratio=pruning_ratio,
        importance_method=importance_method, method=method,
        pruning_distribution=parse_distribution(pruning_distribution) if pruning_distribution else None,
        pruning_strategy=pruning_strategy, freeze_top_n_layers=freeze_top_n_layers,
        remove_empty_layers=remove_empty_layers, dataset=dataset, num_samples=num_samples, seq_len=seq_len,
        gradient_batch_size=gradient_batch_size, test_after_prune=test_after_prune, eval_dataset=eval_dataset,
        eval_seq_len=eval_seq_len, max_windows=max_windows, save_model=save_model or output_model,
        finetune=finetune, finetune_method=finetune_method, finetune_dataset=finetune_dataset,
        finetune_samples=finetune_samples, finetune_seq_len=finetune_seq_len, finetune_lr=finetune_lr,
        lora_r=lora_r, lora_alpha=lora_alpha, output_dir=output_dir, data_dir=data_dir, device=device,
        dtype=dtype, seed=seed, overwrite=overwrite,
    )
    for line in summary_lines(prune(options)):
        typer.echo(line)
