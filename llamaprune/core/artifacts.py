"""Run directories, the manifest, and atomic writes: nothing half-written is ever left under a final name.

    >>> with atomic_dir(Path("artifacts/run1"), overwrite=False) as tmp:   # doctest: +SKIP
    ...     atomic_write_json(tmp / "manifest.json", {"schema_version": 1})
    >>> plain_value({"out": Path("run"), "ratios": (0.1, 0.2)})
    {'out': 'run', 'ratios': [0.1, 0.2]}
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from llamaprune.core.errors import MissingInput, UsageError
from llamaprune.core.temporaries import publish, temporary_dir
from llamaprune.core.user_files import read_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_SCALARS = frozenset((str, int, float, bool, type(None)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; artifacts get the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def plain_value(value):
    """Options (and anything else a manifest or plan records) as JSON values: enums by value, paths as text,
    tuples as lists, dataclasses as dicts of their fields."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        if _SCALARS.issuperset(map(type, value)):  # index lists of a 70B plan: 2.3M ints, no call per item
            return list(value)
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {key: plain_value(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def refuse_existing(path: Path, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it or choose another --out")


@contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds. It is locked
    while it lives, so that a later run can tell it from the leftover of a killed one (``core.temporaries.sweep``)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_dir(path.parent, path.name) as tmp:
        os.chmod(tmp.path, 0o777 & ~_umask())
        yield tmp.path
        publish(tmp, path)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise MissingInput(
            f"no {MANIFEST} in {run_dir}; create the run directory with `llamaprune score MODEL --out {run_dir}`"
        )
    manifest = read_json(path, "re-run `llamaprune score` to rebuild the run directory")
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{path} has schema_version {version}, this llamaprune reads {SCHEMA_VERSION}; "
            f"re-run `llamaprune score` to rebuild the run directory"
        )
    return manifest


def manifest_in(directory: Path | None) -> dict | None:
    """The manifest an earlier phase left in ``directory`` (a run or checkpoint directory), if it has one."""
    if directory is None or not (Path(directory) / MANIFEST).is_file():
        return None
    return read_manifest(directory)


def new_manifest(model: dict, **fields) -> dict:
    """The head every manifest starts with: the schema and llamaprune version that wrote it, and the model."""
    from llamaprune import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "llamaprune_version": __version__,
        "created": now_iso(),
        "model": model,
        **fields,
    }


def with_history(manifest: dict, entry: dict) -> dict:
    """``manifest`` with one phase's run (command, options, timings) appended to its history."""
    manifest.setdefault("history", []).append({"at": now_iso(), **entry})
    return manifest


def append_history(run_dir: Path, entry: dict) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, with_history(read_manifest(run_dir), entry))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
