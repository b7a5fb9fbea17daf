"""``python -m llamaprune``: the CLI, as ``torchrun -m llamaprune`` launches it."""

from llamaprune.cli.app import main

main()
