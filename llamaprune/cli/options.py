"""Command-line options that several commands share, declared once so they read the same everywhere.

    >>> def eval_command(device: DeviceOpt = Device.cpu, data_dir: DataDir = None) -> None: ...
"""

from __future__ import annotations

from typing import Annotated

import typer

from llamaprune.io.loading import Device, DType

# Typer's help is rich markup, where [eval] would be read as a style tag and vanish: the bracket is escaped.
INSTALL_EVAL = r"pip install 'llamaprune\[eval]'"

DataDir = Annotated[
    str | None,
    typer.Option("--data-dir", envvar="LLAMAPRUNE_DATA_DIR", help="Local copy of hub datasets, tried first."),
]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weight dtype.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="cpu, cuda or auto.")]
TasksOpt = Annotated[
    str | None,
    typer.Option("--tasks", help="Also zero-shot lm-eval tasks, comma-separated, e.g. piqa,arc_easy,hellaswag "
                                 f"(needs {INSTALL_EVAL})."),
]
TasksLimitOpt = Annotated[int | None, typer.Option("--tasks-limit", help="At most N examples per task (quick runs).")]
TasksDirOpt = Annotated[str | None, typer.Option("--tasks-dir", help="Directory of extra lm-eval task YAMLs.")]
