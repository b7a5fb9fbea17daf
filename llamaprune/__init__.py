"""llamaprune: structured pruning of LLaMA-family models (score -> plan -> apply).

Importing the package is cheap (no torch, no transformers): the public API loads on first use. Our pruned
model type is registered with transformers' Auto classes wherever llamaprune loads a model; to load a
heterogeneous pruned checkpoint with transformers' own ``from_pretrained``, call ``llamaprune.register()``
first (or pass ``trust_remote_code=True``: the checkpoint carries its modeling file).

    >>> import llamaprune
    >>> model = llamaprune.load_pruned("artifacts/run1/model")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "score": "llamaprune.scoring.in_memory",
    "make_plan": "llamaprune.plan",
    "apply_plan": "llamaprune.apply.command",
    "load_pruned": "llamaprune.io.pruned_checkpoint",
    "perplexity": "llamaprune.evaluate.perplexity",
    "register": "llamaprune.io.loading",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
