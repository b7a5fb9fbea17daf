"""Temporary directories beside an output, locked by the process that writes them, and the sweep that removes
the ones a dead process left behind (``kill -9``, an out-of-memory kill, a power cut).

A temporary ``.NAME.tmp-XXXX`` (an output being written) or ``.NAME.old-XXXX`` (an output being replaced)
holds a lock file that its writer keeps locked (``flock``) for as long as it lives. The kernel drops the lock
when the process dies, however it dies, so the next run into the same parent finds the lock free and removes
the directory; a live writer's lock is held, so its directory is left alone.

    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> with temporary_dir(parent, "run1") as tmp:
    ...     _ = (tmp.path / "a.txt").write_text("a")
    ...     publish(tmp, parent / "run1")
    >>> sorted(p.name for p in parent.iterdir()), sweep(parent)
    (['run1'], Swept(removed=[], unknown=[]))
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOCK = ".llamaprune.lock"
# .NAME.tmp-XXXX and .NAME.old-XXXX (tempfile's random suffix): the names atomic_dir gives its temporaries.
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]{8}$")


@dataclass
class Temporary:
    """A temporary directory and the descriptor of its held lock (-1 once released)."""

    path: Path
    fd: int

    def unlock(self) -> None:
        """Drop the lock file before the directory becomes an output: outputs carry no lock."""
        if self.fd >= 0:
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


@contextmanager
def temporary_dir(parent: Path, name: str, kind: str = "tmp") -> Iterator[Temporary]:
    """A locked ``.NAME.KIND-XXXX`` directory in ``parent``, gone when the block ends: published (``publish``),
    or removed (the block raised, was interrupted, or did not publish it)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.{kind}-"))
    try:
        # Locked under another name and then renamed, so that no sweep ever sees the lock file unlocked.
        fd = os.open(path / f"{LOCK}.new", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path / f"{LOCK}.new", path / LOCK)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    temporary = Temporary(path, fd)
    try:
        yield temporary
    finally:
        shutil.rmtree(path, ignore_errors=True)  # removed before it is unlocked: no sweep ever judges it
        temporary.unlock()


def publish(tmp: Temporary, path: Path) -> None:
    """Rename ``tmp`` to ``path``, replacing what is there (moved aside first, restored if the rename fails)."""
    if not path.exists():
        tmp.unlock()
        os.replace(tmp.path, path)
        return
    with temporary_dir(path.parent, path.name, "old") as old:
        aside = old.path / path.name
        os.replace(path, aside)
        try:
            tmp.unlock()
            os.replace(tmp.path, path)
        except BaseException:
            os.replace(aside, path)
            raise


@dataclass
class Swept:
    """What a sweep found: temporaries of dead processes it removed, and unlocked ones it cannot judge (left by
    an older llamaprune, or caught in the instant between creation and locking) that it leaves alone."""

    removed: list[Path] = field(default_factory=list)
    unknown: list[Path] = field(default_factory=list)


def sweep(parent: Path) -> Swept:
    """Remove the temporaries in ``parent`` whose writer is dead; report those without a lock."""
    swept = Swept()
    if not Path(parent).is_dir():
        return swept
    for path in sorted(Path(parent).iterdir()):
        if not TEMPORARY.match(path.name) or path.is_symlink() or not path.is_dir():
            continue
        state = _writer(path)
        if state == "dead":
            shutil.rmtree(path, ignore_errors=True)
            swept.removed.append(path)
        elif state == "unknown":
            swept.unknown.append(path)
    return swept


def _writer(path: Path) -> str:
    """"alive" (its lock is held), "dead" (its lock is free) or "unknown" (no lock file)."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return "unknown"
    except OSError:  # not ours to judge (permissions): leave it
        return "alive"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "alive"
    finally:
        os.close(fd)
    return "dead"
