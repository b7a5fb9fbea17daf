"""The one error type for bad input, apart from bugs.

A ``UsageError`` says what was wrong with what the user gave (a path, an option, a file's contents) and how
to fix it; the CLI prints it as one ``error:`` line and exits 2. Any other exception is a bug and keeps its
traceback (exit 1). It subclasses ValueError so library callers may catch it as one.

    >>> try:
    ...     raise UsageError("--ratio 2 is outside (0, 1); use e.g. --ratio 0.2")
    ... except UsageError as err:
    ...     print(err)
    --ratio 2 is outside (0, 1); use e.g. --ratio 0.2
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: one line naming the bad value, what was expected and the command that fixes it."""


class MissingInput(UsageError, FileNotFoundError):
    """An input path that does not exist (also a FileNotFoundError, for callers that test for one)."""
