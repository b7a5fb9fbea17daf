"""The seed toolkit's one-shot `prune` command: its flags, its output files."""
