"""The one error type for bad input, apart from bugs.

A ``UsageError`` says what was wrong with what the user gave (a path, an option, a file's contents) and how
to fix it; the CLI prints it as one ``error:`` line and exits 2. Any other exception is a bug and keeps its
traceback (exit 1). It subclasses ValueError so library callers may catch it as one.

An error about an option names the flag the user typed, which differs between commands for the same option
(``finetune --seq-len`` is ``apply --finetune-seq-len`` and ``prune --finetune_seq_len``): messages get it from
``flag``, and a command that spells an option its own way says so with ``flags_named``.

    >>> try:
    ...     raise UsageError("--ratio 2 is outside (0, 1); use e.g. --ratio 0.2")
    ... except UsageError as err:
    ...     print(err)
    --ratio 2 is outside (0, 1); use e.g. --ratio 0.2
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

_FLAGS: ContextVar[Mapping[str, str | None]] = ContextVar("llamaprune_flags", default=MappingProxyType({}))


class UsageError(ValueError):
    """Bad input: one line naming the bad value, what was expected and the command that fixes it."""


class MissingInput(UsageError, FileNotFoundError):
    """An input path that does not exist (also a FileNotFoundError, for callers that test for one)."""


def flag(option: str) -> str:
    """How the running command spells ``option``, given as ``"PHASE --flag"`` with the flag of the phase's own
    command (``"finetune --seq-len"``, ``"apply --calibration-samples"``, ``"eval --seq-len"``), so that an
    error names the flag the user typed: the command's own spelling where it set one with ``flags_named``
    (``apply``'s --finetune-seq-len, ``prune``'s --finetune_seq_len), else the phase's.

        >>> flag("finetune --seq-len")
        '--seq-len'
        >>> with flags_named({"finetune --seq-len": "--finetune-seq-len"}):
        ...     flag("finetune --seq-len")
        '--finetune-seq-len'
    """
    return _FLAGS.get().get(option) or option.partition(" ")[2]


def given_flags(*options: str) -> list[str]:
    """The flags of ``options`` that the running command has (see ``flag``), for an error's list of what to
    change: one that ``flags_named`` maps to None is fixed in that command and left out.

        >>> with flags_named({"plan --min-kv-heads": None, "plan --ratio": "--pruning_ratio"}):
        ...     given_flags("plan --ratio", "plan --min-kv-heads")
        ['--pruning_ratio']
    """
    names = _FLAGS.get()
    return [flag(option) for option in options if names.get(option, "") is not None]


@contextmanager
def flags_named(names: Mapping[str, str | None]) -> Iterator[None]:
    """Within the block (or the decorated function), errors name options as ``names`` maps them: ``"PHASE
    --flag"`` to this command's flag, or None where the command has none (the option keeps its default)."""
    token = _FLAGS.set({**_FLAGS.get(), **names})
    try:
        yield
    finally:
        _FLAGS.reset(token)
