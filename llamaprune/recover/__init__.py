"""Recovery finetuning (LoRA, full) of a pruned checkpoint, and its training data."""
