"""Perplexity and zero-shot accuracy of a model in memory."""
