"""llamaprune: structured pruning of LLaMA-family models (score -> plan -> apply).

Importing the package is cheap (no torch, no transformers): the public API loads on first use, and the
``llamaprune`` model type is registered with transformers' Auto classes as soon as transformers is imported.

    >>> import llamaprune
    >>> model = llamaprune.load_pruned("artifacts/run1/model")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_API = {
    "score": "llamaprune.score",
    "make_plan": "llamaprune.plan",
    "apply_plan": "llamaprune.apply",
    "load_pruned": "llamaprune.checkpoint",
    "perplexity": "llamaprune.evaluate",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register() -> None:
    """Import the modeling module, which registers itself (when it is what imports transformers, it is
    already importing, and registers when it finishes)."""
    if importlib.util.find_spec("torch") is not None:  # a planning-only install has no model to register
        importlib.import_module("llamaprune.modeling_llamaprune")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Register our model type right after the ``transformers`` package finishes importing, once. The finder
    stays until transformers is really imported: a library may look it up (``importlib.util.find_spec``) first."""

    _looking = False  # our own find_spec call below must not come back here

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
