"""The command line: typed option parsing only; each command builds options and calls one phase function."""

from llamaprune.cli.app import app, main

__all__ = ["app", "main"]
