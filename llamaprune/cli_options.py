"""Command-line options that several commands share, declared once so they read the same everywhere.

    >>> def eval_command(device: DeviceOpt = Device.cpu, data_dir: DataDir = None) -> None: ...
"""

from __future__ import annotations

from typing import Annotated

import typer

from llamaprune.model import Device, DType

DataDir = Annotated[
    str | None,
    typer.Option("--data-dir", envvar="LLAMAPRUNE_DATA_DIR", help="Local copy of hub datasets, tried first."),
]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weight dtype.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="cpu, cuda or auto.")]
