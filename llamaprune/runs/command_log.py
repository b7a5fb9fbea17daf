"""The full log of one command in its output directory (``logs/<stamp>/run.log``, docs/ARTIFACTS.md).

The file gets llamaprune's INFO and DEBUG records whatever logging the caller configured (a library caller
often leaves the root logger at WARNING); the console keeps the caller's level for them, and every level and
handler is as it was once the log stops.

    >>> import tempfile
    >>> with command_log(Path(tempfile.mkdtemp())) as path:
    ...     logging.getLogger("llamaprune.example").info("kept in the file only")
    >>> "kept in the file only" in path.read_text()
    True
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llamaprune.core.artifacts import stamp

LOG_NAME = "run.log"
TRAINING_LOG = "training.log"  # the log of a command that trains (finetune, prune), as the seed toolkit names it
PACKAGE = "llamaprune"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _BelowThreshold(logging.Filter):
    """Drops llamaprune's records under the level its logger had before the log started, so that handlers
    the caller set up see what they saw before."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == PACKAGE or record.name.startswith(PACKAGE + ".")
        return not ours or record.levelno >= self.threshold


@contextmanager
def command_log(directory: Path, name: str = LOG_NAME) -> Iterator[Path]:
    """Log into ``directory/logs/<stamp>/<name>`` while the block runs; yields the file's path."""
    path = Path(directory) / "logs" / stamp() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    root, package = logging.getLogger(), logging.getLogger(PACKAGE)
    quiet = _BelowThreshold(package.getEffectiveLevel())
    # Without any handler, Python prints warnings through its last resort; the file handler below would count
    # as a handler and silence them, so the last resort stands in for the console while the log runs.
    stand_in = [logging.lastResort] if not (root.handlers or package.handlers) and logging.lastResort else []
    console = [*package.handlers, *root.handlers, *stand_in]
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    level = package.level
    for other in console:
        other.addFilter(quiet)
    for added in (*stand_in, handler):
        root.addHandler(added)
    package.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        package.setLevel(level)
        for added in (*stand_in, handler):
            root.removeHandler(added)
        handler.close()
        for other in console:
            other.removeFilter(quiet)
