"""One way to run a phase into an output directory: the cheap checks first (the output, the device, the model's
config, then the texts it reads, all before any weights load), a temporary directory that replaces the output
only when the phase succeeds, the command's full log in it, and the manifest with this run in its history.

    >>> phase = Phase("apply", Path("artifacts/run1/model"), model="smollm2-135m")
    >>> with run_phase(phase, lambda checked: load_rows("wikitext2")) as run:     # doctest: +SKIP
    ...     rows = run.inputs                       # read before anything was written or loaded
    ...     run.summary["params_after"] = 1         # the history entry, {"command": "apply", ...}
    ...     run.record(new_manifest({"source": "smollm2-135m"}))   # RUN/model/manifest.json
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from llamaprune.artifacts import (
    MANIFEST,
    append_history,
    atomic_dir,
    atomic_write_json,
    read_manifest,
    refuse_existing,
    with_history,
)
from llamaprune.command_log import LOG_NAME, command_log
from llamaprune.model import Device, Source

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Phase:
    """What a command writes and which model it loads. ``model`` None: none, or one an earlier phase of the
    same command makes; ``in_place``: it adds files to the existing run directory ``out`` (plan)."""

    command: str
    out: Path
    overwrite: bool = False
    model: str | None = None
    device: Device = Device.cpu
    log_name: str = LOG_NAME
    in_place: bool = False


@dataclass(frozen=True)
class Checked(Generic[T]):
    """What the pre-flight found: the model's source and config (None without a model) and the inputs read."""

    source: Source | None = None
    config: Any = None
    inputs: T | None = None


def check_model(name: str, device: Device) -> tuple[Source, Any]:
    """A bad device, model path or architecture fails here, before any data or weights load."""
    from llamaprune.model import load_config, resolve_device, resolve_source

    resolve_device(device)
    source = resolve_source(name)
    return source, load_config(source)


def preflight(phase: Phase, read_inputs: Callable[[Checked], T] | None = None) -> Checked[T]:
    """The checks made before any work, cheapest first: an existing output is refused without --overwrite, the
    device and the model's config are checked, then ``read_inputs`` reads the texts (bad data fails fast)."""
    if not phase.in_place:
        refuse_existing(phase.out, phase.overwrite)
    checked = Checked() if phase.model is None else Checked(*check_model(phase.model, phase.device))
    return checked if read_inputs is None else replace(checked, inputs=read_inputs(checked))


@dataclass
class PhaseRun(Generic[T]):
    """A phase under way: the directory it writes into, what the pre-flight found, and its history entry
    (``summary``, which starts as ``{"command": ...}`` and which the phase fills in)."""

    phase: Phase
    dir: Path
    checked: Checked[T]
    summary: dict
    started: float = field(default_factory=time.perf_counter)
    also: list[Path] = field(default_factory=list)

    @property
    def inputs(self) -> T | None:
        return self.checked.inputs

    def seconds(self) -> float:
        """Seconds since the pre-flight began."""
        return round(time.perf_counter() - self.started, 3)

    def record(self, manifest: dict, also: Path | None = None) -> dict:
        """Write ``manifest`` (a new one, or an earlier phase's) with this run appended to its history into the
        output directory; ``also``: a run directory whose manifest gets the same entry once the output is in
        place."""
        atomic_write_json(self.dir / MANIFEST, with_history(manifest, self.summary))
        if also is not None:
            self.also.append(also)
        return manifest


@contextmanager
def run_phase(phase: Phase, read_inputs: Callable[[Checked], T] | None = None) -> Iterator[PhaseRun[T]]:
    """Pre-flight, then a temporary directory with the command's log that becomes ``phase.out`` only if the
    block succeeds (an in-place phase writes into ``phase.out`` itself, its files each written atomically)."""
    started = time.perf_counter()
    checked = preflight(phase, read_inputs)
    with _output(phase) as directory, command_log(directory, phase.log_name):
        run = PhaseRun(phase, directory, checked, {"command": phase.command}, started)
        log.debug("llamaprune %s -> %s", phase.command, phase.out)
        yield run
        log.debug("llamaprune %s done in %.1f s", phase.command, run.seconds())
    for run_dir in run.also:
        append_history(run_dir, run.summary)


def _output(phase: Phase):
    if phase.in_place:
        read_manifest(phase.out)  # fail before writing anything if the history cannot be recorded
        return nullcontext(Path(phase.out))
    return atomic_dir(Path(phase.out), phase.overwrite)
