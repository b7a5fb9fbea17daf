"""Run directories, the manifest, and atomic writes: nothing half-written is ever left under a final name.

    >>> with atomic_dir(Path("artifacts/run1"), overwrite=False) as tmp:   # doctest: +SKIP
    ...     atomic_write_json(tmp / "manifest.json", {"schema_version": 1})
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llamaprune.errors import MissingInput, UsageError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


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


def refuse_existing(path: Path, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it or choose another --out")


@contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise MissingInput(
            f"no {MANIFEST} in {run_dir}; create the run directory with `llamaprune score MODEL --out {run_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not valid JSON ({err}); re-run `llamaprune score` to rebuild it"
        ) from err
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{path} has schema_version {version}, this llamaprune reads {SCHEMA_VERSION}; "
            f"re-run `llamaprune score` to rebuild the run directory"
        )
    return manifest


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


def start_log(directory: Path, name: str = "run.log") -> logging.Handler:
    """Send the full log of this command to ``directory/logs/<stamp>/<name>``; returns the handler."""
    log_dir = Path(directory) / "logs" / stamp()
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    return handler


def stop_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
