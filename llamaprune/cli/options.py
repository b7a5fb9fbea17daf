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

# Distillation (finetune --teacher, apply --finetune, prune --finetune): the help of each setting, which prune
# declares under its own flag names.
KD_HELP = {
    "temperature": "Distillation: temperature of both next-token distributions (the KL is scaled by its square).",
    "weight": "Distillation: the KD's share of the loss; the next-token loss gets the rest.",
    "top_k": "Distillation: the KL over the teacher's top k tokens (renormalized) instead of the whole vocabulary.",
    "hidden": "Distillation: weight of a loss on the hidden states of the layers the student kept (0: none).",
    "device": "Distillation: the teacher's device (default: the student's).",
}
KdTemperatureOpt = Annotated[float, typer.Option("--kd-temperature", help=KD_HELP["temperature"])]
KdWeightOpt = Annotated[float, typer.Option("--kd-weight", help=KD_HELP["weight"])]
KdTopKOpt = Annotated[int | None, typer.Option("--kd-top-k", help=KD_HELP["top_k"])]
KdHiddenOpt = Annotated[float, typer.Option("--kd-hidden", help=KD_HELP["hidden"])]
TeacherDeviceOpt = Annotated[Device | None, typer.Option("--teacher-device", help=KD_HELP["device"])]
