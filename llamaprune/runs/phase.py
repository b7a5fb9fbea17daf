"""One way to run a phase into an output directory: the cheap checks first (the output, the device, the model's
config, then the texts it reads, all before any weights load), a temporary directory that replaces the output
only when the phase succeeds, the command's full log in it, and the manifest with this run in its history.

The output checks hold for every command: an output never is, contains or lies inside one of the phase's
inputs (whatever the flags), its directory must be writable, and the temporaries that killed runs left beside
it are swept (``llamaprune.core.temporaries``).

    >>> phase = Phase("apply", Path("artifacts/run1/model"), model="smollm2-135m")
    >>> with run_phase(phase, lambda checked: load_rows("wikitext2")) as run:     # doctest: +SKIP
    ...     rows = run.inputs                       # read before anything was written or loaded
    ...     run.summary["params_after"] = 1         # the history entry, {"command": "apply", ...}
    ...     run.record(new_manifest({"source": "smollm2-135m"}))   # RUN/model/manifest.json
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from llamaprune.core.artifacts import (
    MANIFEST,
    append_history,
    atomic_dir,
    atomic_write_json,
    read_manifest,
    refuse_existing,
    with_history,
)
from llamaprune.core.errors import UsageError
from llamaprune.core.temporaries import sweep
from llamaprune.io.loading import Device, Source, warn_long_context
from llamaprune.runs.command_log import LOG_NAME, command_log

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Phase:
    """What a command writes and which model it loads. ``model`` None: none, or one an earlier phase of the
    same command makes; ``in_place``: it adds files to the existing run directory ``out`` (plan). ``inputs``:
    the files it reads besides the model (None entries are skipped), never replaced by ``out``; ``tokenizer``:
    the model's tokenizer is needed; ``seq_lens``: (option, tokens) pairs checked against the model's context."""

    command: str
    out: Path
    overwrite: bool = False
    model: str | None = None
    device: Device = Device.cpu
    log_name: str = LOG_NAME
    in_place: bool = False
    inputs: tuple[Path | None, ...] = ()
    tokenizer: bool = True
    seq_lens: tuple[tuple[str, int], ...] = ()
    out_option: str = "--out"


@dataclass(frozen=True)
class Checked(Generic[T]):
    """What the pre-flight found: the model's source, config and weights fingerprint (None without a model) and
    the inputs read."""

    source: Source | None = None
    config: Any = None
    inputs: T | None = None
    weights: str | None = None


def check_model(name: str, device: Device, tokenizer: bool = False) -> Checked:
    """A bad device, model path, architecture, weight file (truncated, not matching config.json) or tokenizer
    fails here, before any data or weights load."""
    from llamaprune.io.loading import load_config, load_tokenizer, resolve_device, resolve_source
    from llamaprune.io.weights import check_weights

    resolve_device(device)
    source = resolve_source(name)
    config = load_config(source)
    weights = check_weights(source, config)
    if tokenizer:
        load_tokenizer(source)
    return Checked(source, config, weights=weights)


def preflight(phase: Phase, read_inputs: Callable[[Checked], T] | None = None) -> Checked[T]:
    """The checks made before any work, cheapest first: the output (refused if it exists without --overwrite,
    if it overlaps an input, if it cannot be written; stale temporaries beside it swept), then the device and
    the model, then ``read_inputs`` reads the texts (bad data fails fast)."""
    if not phase.in_place:
        check_output(phase)
    checked = Checked() if phase.model is None else check_model(phase.model, phase.device, phase.tokenizer)
    for option, tokens in phase.seq_lens if checked.config is not None else ():
        warn_long_context(checked.config, tokens, option)
    return checked if read_inputs is None else replace(checked, inputs=read_inputs(checked))


def check_output(phase: Phase) -> None:
    """The output's own checks, before the model is even looked at."""
    out = Path(phase.out)
    typed = Path(phase.model).expanduser() if phase.model else None  # the model as a path, before it is resolved
    refuse_overlap(out, [*phase.inputs, typed if typed and typed.exists() else None], phase.out_option)
    refuse_existing(out, phase.overwrite)
    if phase.model is not None:
        from llamaprune.io.loading import resolve_source

        refuse_overlap(out, [local_model(resolve_source(phase.model))], phase.out_option)
    check_writable(out, phase.out_option)
    sweep_leftovers(out.parent)


def local_model(source: Source) -> Path | None:
    """The checkpoint directory or GGUF file of a model source (None for a hub id)."""
    if source.kind == "hub":
        return None
    return Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)


def refuse_overlap(out: Path, inputs: list[Path | None], option: str = "--out") -> None:
    """An output that is, contains or lies inside an input (None entries skipped) would replace, or be written
    into, what the command reads: refused whatever the flags."""
    target = Path(out).resolve()
    for path in filter(None, inputs):
        source = Path(path).resolve()
        relation = (
            "is" if target == source
            else "contains" if source.is_relative_to(target)
            else "lies inside" if target.is_relative_to(source) and source.is_dir()
            else None
        )
        if relation:
            raise UsageError(
                f"{option} {out} {relation} the input {path}; an output never replaces an input, even with "
                f"--overwrite: choose another {option}"
            )


def check_writable(out: Path, option: str = "--out") -> None:
    """The output's nearest existing ancestor must be a writable directory, and an output to replace writable
    itself (it is renamed away): found now, not after the work."""
    out = Path(out)
    ancestor = next(path for path in (out.parent, *out.parent.parents) if path.exists() or path == path.parent)
    fix = f"choose another {option}"
    if not ancestor.is_dir():
        raise UsageError(f"{option} {out} lies under {ancestor}, which is a file, not a directory; {fix}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {out}: {ancestor} is not writable; {fix} or fix its permissions")
    if out.is_dir() and not out.is_symlink() and not os.access(out, os.W_OK):
        raise UsageError(f"{out} is not writable, so it cannot be replaced; {fix} or fix its permissions")


def sweep_leftovers(parent: Path) -> None:
    """Remove what killed runs left in ``parent``; name what may be a leftover but cannot be judged."""
    swept = sweep(parent)
    for path in swept.removed:
        log.info("removed %s, the temporary of a run that was killed", path)
    for path in swept.unknown:
        log.warning("%s looks like the temporary of an interrupted run (it has no lock to tell); remove it if no "
                    "llamaprune is writing into %s", path, parent)


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
def run_phase(phase: Phase, read_inputs: Callable[[Checked], T] | None = None,
              checked: Checked[T] | None = None) -> Iterator[PhaseRun[T]]:
    """Pre-flight (unless ``checked``, its result, is given), then a temporary directory with the command's
    log that becomes ``phase.out`` only if the block succeeds (an in-place phase writes into ``phase.out``
    itself, its files each written atomically)."""
    started = time.perf_counter()
    checked = checked if checked is not None else preflight(phase, read_inputs)
    with _output(phase) as directory, command_log(directory, phase.log_name):
        run = PhaseRun(phase, directory, checked, {"command": phase.command}, started)
        log.debug("llamaprune %s -> %s", phase.command, phase.out)
        yield run
        log.debug("llamaprune %s done in %.1f s", phase.command, run.seconds())
    for run_dir in run.also:
        try:
            append_history(run_dir, run.summary)
        except (OSError, UsageError) as err:  # the output is in place: a history entry is not worth losing it
            log.warning("%s is written, but its run %s could not record it: %s", phase.out, run_dir, err)


def _output(phase: Phase):
    if phase.in_place:
        read_manifest(phase.out)  # fail before writing anything if the history cannot be recorded
        return nullcontext(Path(phase.out))
    return atomic_dir(Path(phase.out), phase.overwrite)
