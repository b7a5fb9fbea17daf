"""The ``llamaprune`` command line: one typed function per command, heavy imports deferred.

    $ llamaprune eval smollm2-135m --dataset wikitext2 --seq-len 128 --max-windows 200 --out eval.json

Library errors (ValueError, FileNotFoundError) print as one ``error:`` line and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamaprune.model import Device, DType

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Structured pruning of LLaMA-family models: score once, plan many ratios, apply to a checkpoint.",
)

DataDir = Annotated[
    Optional[str],
    typer.Option("--data-dir", envvar="LLAMAPRUNE_DATA_DIR", help="Local copy of hub datasets, tried first."),
]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weight dtype.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="cpu, cuda or auto.")]


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Structured pruning of LLaMA-family models."""
    if version:
        from llamaprune import __version__

        typer.echo(__version__)
        raise typer.Exit()


def one_line_errors(command):
    """Turn the library's input errors into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("eval")
@one_line_errors
def eval_command(
    model: Annotated[str, typer.Argument(help="Checkpoint dir, .gguf file, hub id, or smollm2-135m.")],
    dataset: Annotated[str, typer.Option(help="wikitext2, ptb, c4, or a local .txt/.jsonl/.parquet.")] = "wikitext2",
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the result as JSON here.")] = None,
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
    model: Annotated[str, typer.Argument(help="Checkpoint dir, .gguf file, hub id, or smollm2-135m.")],
    out: Annotated[Path, typer.Option(help="Run directory to create (groups.parquet, layers.parquet, ...).")],
    dataset: Annotated[str, typer.Option(help="Calibration text: wikitext2, ptb, c4, or a local file.")] = "wikitext2",
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward/backward pass.")] = 8,
    criteria: Annotated[str, typer.Option(help="Comma-separated: taylor,taylor2,wanda,magnitude,random.")] = (
        "taylor,taylor2,wanda,magnitude,random"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample and the random baseline.")] = 0,
    dtype: DTypeOpt = DType.float32,
    device: DeviceOpt = Device.cpu,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
) -> None:
    """Measure importance and cost of every attention group and MLP channel (phase 1)."""
    from llamaprune.score import ScoreOptions, parse_criteria, score_run

    options = ScoreOptions(model, dataset, num_samples, seq_len, batch_size, parse_criteria(criteria), seed, dtype,
                           device, data_dir)
    result = score_run(options, out, overwrite)
    typer.echo(
        f"scored {result.groups.num_rows} groups over {result.tokens} tokens in {result.seconds:.1f} s "
        f"(peak memory {result.peak_memory_bytes / 2**20:.0f} MiB) -> {out}"
    )
