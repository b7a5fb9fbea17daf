"""Run llamaprune from a checkout without installing it: ``python cli.py score ...``."""
from llamaprune.cli.app import main

main()
