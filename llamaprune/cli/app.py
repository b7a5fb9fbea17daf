"""The ``llamaprune`` command line: one typed function per command, heavy imports deferred. The phases and
``eval`` are here; ``finetune`` (``llamaprune.cli.finetune``) and the seed's one-shot ``prune``
(``llamaprune.cli.prune``) live in modules of their own and are registered on the same app below.

    $ llamaprune eval smollm2-135m --dataset wikitext2 --seq-len 128 --max-windows 200 --out eval.json
    $ llamaprune eval artifacts/run1/model --tasks piqa,arc_easy,hellaswag --tasks-limit 200 --out eval.json

Bad input (``UsageError``) and failed file operations (OSError: a path unreadable, unwritable, or a full disk)
print as one ``error:`` line and exit with code 2; any other exception is a bug: traceback, exit code 1. SIGTERM
unwinds like Ctrl-C, so temporaries are removed (exit code 143).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from llamaprune.cli.finetune import finetune_command, report_finetune
from llamaprune.cli.options import (
    DataDir,
    DeviceOpt,
    DTypeOpt,
    KdHiddenOpt,
    KdTemperatureOpt,
    KdTopKOpt,
    KdWeightOpt,
    TasksDirOpt,
    TasksLimitOpt,
    TasksOpt,
    TeacherDeviceOpt,
)
from llamaprune.cli.prune import prune_command
from llamaprune.core.criteria import CRITERIA, DEFAULT_CRITERIA, FORWARD_ONLY, help_text
from llamaprune.core.errors import UsageError, flags_named
from llamaprune.io.loading import Device, DType
from llamaprune.recover.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Structured pruning of LLaMA-family models: score once, plan many ratios, apply to a checkpoint.",
)

def _print_version(version: bool) -> None:
    """Eager, so that it runs before the missing command is noticed."""
    if version:
        from llamaprune import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Structured pruning of LLaMA-family models."""


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


def first_line(err: BaseException | str) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that every ``finally`` and cleanup runs, as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main() -> None:
    """Console entry point: typer's own usage errors (bad option values) also become one ``error:`` line."""
    try:
        from typer._click import exceptions as click_exceptions  # recent typer vendors click
    except ImportError:
        from click import exceptions as click_exceptions

    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as err:
        typer.echo(err.format_message())
        code = 0
    except click_exceptions.UsageError as err:
        command = err.ctx.command_path if err.ctx else "llamaprune"
        typer.echo(f"error: {first_line(err.format_message())} (see `{command} --help`)", err=True)
        code = 2
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    except Terminated:
        typer.echo("error: terminated (SIGTERM); nothing half-written was left", err=True)
        code = 128 + signal.SIGTERM
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
    tasks: TasksOpt = None,
    tasks_limit: TasksLimitOpt = None,
    tasks_dir: TasksDirOpt = None,
) -> None:
    """Perplexity of a model on the test split of a text source (and zero-shot accuracy on lm-eval's --tasks)."""
    from llamaprune.evaluate.command import evaluate_model
    from llamaprune.evaluate.perplexity import EvalOptions
    from llamaprune.evaluate.zero_shot import task_lines, task_options

    zero_shot_tasks = task_options(tasks, tasks_limit, tasks_dir)
    report = evaluate_model(model, EvalOptions(dataset, seq_len, max_windows, batch_size, data_dir, zero_shot_tasks),
                            dtype, device, out)
    result = report[dataset]
    typer.echo(
        f"{dataset}: perplexity {result['ppl']:.3f} over {result['windows']} windows of {seq_len} tokens "
        f"({result['tokens_per_s']:.0f} tokens/s)"
    )
    if "tasks" in report:
        for line in task_lines(report):
            typer.echo(line)
    if out is None:
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
    criteria: Annotated[str, typer.Option(
        help=f"Comma-separated criteria: {help_text()}. Default: all but obs.")] = ",".join(DEFAULT_CRITERIA),
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample and the random baseline.")] = 0,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    fisher_windows: Annotated[
        int, typer.Option(help="Windows per gradient group of taylor/taylor2 (fixed, so --batch-size changes nothing).")
    ] = 8,
    accumulate: Annotated[
        str, typer.Option(help="dtype of the w*G sums of taylor/taylor2: fp32, or bf16 at half the memory.")
    ] = "fp32",
    fsdp: Annotated[
        bool, typer.Option(help="Under torchrun: shard parameters, gradients and w*G sums across the processes.")
    ] = False,
    stream: Annotated[
        bool, typer.Option(help="Read one decoder layer at a time from a safetensors checkpoint directory, so memory "
                                "holds about one layer, not the model; forward-only criteria "
                                f"({','.join(FORWARD_ONLY)}).")
    ] = False,
    after: Annotated[
        Path | None, typer.Option(help="A plan (RUN/plans/NAME.json, a first step such as 5%): score the model it "
                                       "leaves, compensated by prune's recipe on this calibration text. Another "
                                       "calibration pass (the step's refit) besides scoring; plans from the new run "
                                       "remove the step's groups and more, counted as the compensated model ranks "
                                       "them (allocation for the compensated model).")
    ] = None,
    after_samples: Annotated[
        int | None, typer.Option(help="With --after: calibration windows the step is refitted on (default "
                                      "--num-samples).")
    ] = None,
) -> None:
    """Measure importance and cost of every attention group and MLP channel (phase 1). Under
    `torchrun --nproc-per-node N -m llamaprune score ...` the processes share the calibration windows."""
    from llamaprune.core.criteria import parse_criteria
    from llamaprune.scoring.collectives import ranks_from_env
    from llamaprune.scoring.command import score_run
    from llamaprune.scoring.in_memory import ScoreOptions

    options = ScoreOptions(model, dataset, num_samples, seq_len, batch_size, parse_criteria(criteria), seed, dtype,
                           device, data_dir, fisher_windows, accumulate, fsdp, stream,
                           str(after) if after is not None else None, after_samples)
    from llamaprune.apply.step import compensate_step

    result = score_run(options, out, overwrite, compensate_step if after is not None else None)
    ranks = ranks_from_env()
    if ranks is not None and not ranks.main:  # the first process reports the run it wrote
        return
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
        str, typer.Option(help="global: none, mean (importance / its layer and kind's mean) or standard (z-score "
                               "within its layer and kind, FLAP's).")
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
    overwrite: Annotated[bool, typer.Option(help="Replace existing plans of the same names.")] = False,
) -> None:
    """Turn target ratios into pruning plans (phase 2): RUN_DIR/plans/<name>.json and .png, no torch."""
    from llamaprune.plan import SUMMARY_COLUMNS, PlanOptions, parse_distribution, parse_layers, parse_ratios
    from llamaprune.plan.command import plan_ratios
    from llamaprune.plan.sql import format_rows

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
    rows, seconds = plan_ratios(run_dir, options, targets, name, png, overwrite)
    typer.echo("ratios are fractions of the model's total parameters removed (*_prunable: of attention+MLP)")
    typer.echo(format_rows(list(SUMMARY_COLUMNS), rows))
    typer.echo(f"wrote {len(rows)} plan(s) to {run_dir / 'plans'} in {seconds:.2f} s")


@app.command("sql")
@one_line_errors
def sql_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run directory written by `llamaprune score`.")],
    query: Annotated[
        str,
        typer.Argument(metavar="QUERY", help="One read-only SELECT (WITH, EXPLAIN, DESCRIBE, SUMMARIZE too)."),
    ],
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Query a run directory with DuckDB. Views: groups (one row per group), layers (one per layer), plans
    (one per plan file) and plan_layers (one per plan and layer)."""
    from llamaprune.core.choices import parse_choice
    from llamaprune.plan.sql import OutputFormat, format_rows, run_query

    fmt = parse_choice(OutputFormat, output, "--format")
    columns, rows = run_query(run_dir, query)
    typer.echo(format_rows(columns, rows, fmt))


# apply --finetune: the finetuning options under apply's names (see llamaprune.core.errors.flag); None: not an option
# of apply (its --batch-size is the evaluation's)
APPLY_FINETUNE_FLAGS: dict[str, str | None] = {
    "finetune --method": "--finetune",
    "finetune --dataset": "--finetune-dataset",
    "finetune --samples": "--finetune-samples",
    "finetune --seq-len": "--finetune-seq-len",
    "finetune --lr": "--finetune-lr",
    "finetune --epochs": "--finetune-epochs",
    **dict.fromkeys(
        ("finetune --batch-size", "finetune --grad-accum", "finetune --lora-dropout", "finetune --lora-targets",
         "finetune --val-every")
    ),
}


@app.command("apply")
@one_line_errors
@flags_named(APPLY_FINETUNE_FLAGS)
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
    tasks: TasksOpt = None,
    tasks_limit: TasksLimitOpt = None,
    tasks_dir: TasksDirOpt = None,
    compensate: Annotated[
        str, typer.Option(help="Error compensation: none, bias (input means from the plan's run), or lstsq "
                               "(refit o_proj/down_proj layer by layer on --calibration text).")
    ] = "none",
    calibration: Annotated[
        str | None, typer.Option(help="lstsq: calibration text (wikitext2, ptb, c4, or a local file).")
    ] = None,
    calibration_samples: Annotated[int, typer.Option(help="lstsq: calibration windows.")] = 128,
    calibration_seq_len: Annotated[int, typer.Option(help="lstsq: tokens per calibration window.")] = 128,
    damp: Annotated[float, typer.Option(help="lstsq: ridge, relative to the mean input energy.")] = 1e-3,
    select: Annotated[
        str, typer.Option(help="lstsq: which groups go, in the plan's per-layer counts: score (the plan's) or obs "
                               "(chosen in the refit pass by structured OBS; written to OUT/plan.json).")
    ] = "score",
    swaps: Annotated[int, typer.Option(help="obs: swap rounds per block after the greedy choice.")] = 0,
    obs_pool: Annotated[
        float | None, typer.Option(help="obs: choose only among this many times each block's count of its "
                                        "lowest-scored groups by the plan's criterion (needs the plan's run; 1: "
                                        "the plan's own groups).")
    ] = None,
    target: Annotated[
        str, typer.Option(help="lstsq: what the refit reproduces: pruned (the unpruned block on the pruned model's "
                               "inputs), dense (the dense model's block output there) or residual (the dense "
                               "model's hidden states after the block).")
    ] = "pruned",
    residual_share: Annotated[
        float, typer.Option(help="residual: how far the refit's target goes from pruned (0) to the dense hidden "
                                 "states (1).")
    ] = 1.0,
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
    teacher: Annotated[
        str | None,
        typer.Option(help="--finetune distils from this model (dir, .gguf, hub id, smollm2-135m; default: --model, "
                          "the dense source); none: the next-token loss alone."),
    ] = None,
    kd_temperature: KdTemperatureOpt = DEFAULT_TEMPERATURE,
    kd_weight: KdWeightOpt = DEFAULT_WEIGHT,
    kd_top_k: KdTopKOpt = None,
    kd_hidden: KdHiddenOpt = 0.0,
    teacher_device: TeacherDeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Apply a plan scored on other weights of the same shapes.")] = False,
) -> None:
    """Slice a checkpoint by a plan into a smaller one that from_pretrained loads (phase 3), then optionally
    finetune it (--finetune lora|full): the pruned checkpoint is kept beside OUT as OUT-pruned."""
    from llamaprune.apply.command import ApplyOptions, apply_and_finetune
    from llamaprune.apply.refit import CompensationOptions
    from llamaprune.evaluate.perplexity import EvalOptions
    from llamaprune.evaluate.speed import speed_text
    from llamaprune.evaluate.zero_shot import task_lines, task_options

    evaluation = None
    zero_shot_tasks = task_options(tasks, tasks_limit, tasks_dir)
    if eval_dataset:
        evaluation = EvalOptions(eval_dataset, seq_len, max_windows, batch_size, data_dir, zero_shot_tasks)
    elif zero_shot_tasks is not None:
        raise UsageError("--tasks runs beside the perplexity of --eval; add --eval DATASET, e.g. --eval wikitext2")
    compensation = CompensationOptions(compensate, calibration, calibration_samples, calibration_seq_len, damp,
                                       data_dir=data_dir, select=select, swaps=swaps, target=target,
                                       obs_pool=obs_pool, residual_share=residual_share)
    recovery = None
    if finetune:
        from llamaprune.recover.distill import distillation
        from llamaprune.recover.finetune import FinetuneOptions

        distill = distillation(model if teacher is None else teacher, kd_temperature, kd_weight, kd_top_k, kd_hidden,
                               teacher_device)
        recovery = FinetuneOptions(method=finetune, dataset=finetune_dataset, samples=finetune_samples,
                                   seq_len=finetune_seq_len, epochs=finetune_epochs, lr=finetune_lr, lora_r=lora_r,
                                   lora_alpha=lora_alpha, data_dir=data_dir, distill=distill)
    plan_out, summary, finetuned = apply_and_finetune(
        ApplyOptions(plan, model, out, dtype, device, max_shard_size, overwrite, evaluation, compensation, force),
        recovery,
    )
    before, after = summary["params_before"], summary["params_after"]
    how = "streamed" if summary["streamed"] else "pruned in memory"
    seconds = summary["seconds"]
    typer.echo(f"{how}: {before:,} -> {after:,} parameters ({after / before:.1%}) in {seconds:.1f} s: {plan_out}")
    if evaluation:
        report = summary["eval"]
        old, new = report["before"], report["after"]
        typer.echo(
            f"{eval_dataset}: perplexity {old['ppl']:.3f} -> {new['ppl']:.3f} (x{report['ppl_ratio']:.3f}) "
            f"over {new['windows']} windows of {seq_len} tokens; {speed_text(report)} -> {plan_out / 'eval.json'}"
        )
        if zero_shot_tasks is not None:
            for line in task_lines(old, new):
                typer.echo(line)
    if finetuned is not None:
        report_finetune(finetuned, recovery, evaluation, out)


@app.command("export")
@one_line_errors
def export_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="PRUNED_DIR", help="Checkpoint written by `llamaprune apply` (or a plain llama or mistral one)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The file to write, e.g. pruned.gguf.")],
    output: Annotated[str, typer.Option("--format", help="gguf (llama.cpp).")] = "gguf",
    outtype: Annotated[
        str, typer.Option(help="Weight type: f32, f16, bf16 or q8_0 (norms and biases stay f32).")
    ] = "f32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT file.")] = False,
) -> None:
    """Write a checkpoint as one GGUF file that llama.cpp runs with nothing else: llama architecture when every
    layer has one shape, deci (per-layer widths, output biases) otherwise."""
    from llamaprune.export.gguf import ExportOptions, export

    summary = export(ExportOptions(checkpoint, out, output, outtype, overwrite))
    typer.echo(f"{summary['architecture']} {summary['outtype']}: {summary['tensors']} tensors, "
               f"{summary['bytes'] / 2**20:.1f} MiB -> {out}")


app.command("finetune")(one_line_errors(finetune_command))
app.command("prune")(one_line_errors(prune_command))


@app.command("refresh-code")
@one_line_errors
def refresh_code_command(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="PRUNED_DIR", help="A checkpoint of the llamaprune model type.")
    ],
) -> None:
    """Replace the checkpoint's copy of modeling_llamaprune.py with this release's (weights and config stay), so
    loading it with trust_remote_code runs today's code: a checkpoint keeps the copy it was written with."""
    from llamaprune import __version__
    from llamaprune.io.pruned_checkpoint import MODELING_FILE, refresh_modeling_file

    changed = refresh_modeling_file(checkpoint)
    typer.echo(f"{checkpoint / MODELING_FILE.name}: {'replaced with' if changed else 'already'} llamaprune "
               f"{__version__}'s")
