"""The registry of importance criteria: each one's name, what the calibration pass must collect for it, its
per-group formula, its other names and its one-line help. No torch here: the planner and the table schemas
read criterion names on machines without it, so formulas are named ("module:function") and imported on use.

Adding a criterion is one ``Criterion`` entry below plus its formula in ``llamaprune/importance/``; the
score/plan/prune commands, the table columns (docs/ARTIFACTS.md, "groups.parquet") and the benchmarks
follow. A formula of ``scope`` "param" gets one prunable weight or bias (``llamaprune.scoring.calibration.ParamSpec``)
and the calibration accumulators (``llamaprune.scoring.calibration.Accumulators``) and returns one float64 score per
group; the scores of a group's weights and biases add up. A formula of ``scope`` "table" gets the number of
groups and the seed and returns one score per group in table order.

    >>> CRITERIA
    ('taylor', 'taylor2', 'wanda', 'magnitude', 'random', 'fluctuation', 'obs')
    >>> DEFAULT_CRITERIA
    ('taylor', 'taylor2', 'wanda', 'magnitude', 'random', 'fluctuation')
    >>> canonical("taylor_2nd"), REGISTRY["wanda"].input_stats
    ('taylor2', ('sq_norm',))
    >>> input_statistics(("fluctuation", "wanda"))
    {'attn_in': ('sq_norm',), 'o_in': ('sq_norm', 'sum'), 'mlp_in': ('sq_norm',), 'down_in': ('sq_norm', 'sum')}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from llamaprune.core.arch import BLOCKS, LINEARS, output_linear
from llamaprune.core.errors import UsageError, flag

FORMULAS = "llamaprune.scoring.importance"  # the package of every formula: ``formula`` is "module:function" in it
PARAM = "param"
TABLE = "table"
# The linear inputs of a decoder layer (attn_in, o_in, mlp_in, down_in), and those of its output projections alone
# (o_in, down_in): the inputs whose columns the groups own.
INPUTS = tuple(dict.fromkeys(linear.input for linear in LINEARS))
OUTPUT_INPUTS = tuple(output_linear(block).input for block in BLOCKS)


@dataclass(frozen=True)
class Criterion:
    """One importance criterion.

    ``gradients``: it needs the backward pass (each parameter's gradient folded per batch, see
    ``llamaprune.scoring.importance.taylor``). ``input_stats``: per-feature statistics of linear inputs it reads,
    by name of ``llamaprune.scoring.calibration.INPUT_STATISTICS``, on the inputs named in ``inputs`` (of
    ``INPUTS``): the calibration pass folds a statistic only where something reads it. ``aliases``: other names
    the one-shot ``prune`` command accepts (the seed toolkit's). ``default``: scored when no criteria are named
    (``obs`` is not: it holds every layer's input Gram matrices during the pass)."""

    name: str
    help: str
    formula: str
    scope: str = PARAM
    gradients: bool = False
    input_stats: tuple[str, ...] = ()
    inputs: tuple[str, ...] = INPUTS
    aliases: tuple[str, ...] = ()
    default: bool = True

    def load(self) -> Callable:
        """The formula itself (imports its module, and so torch, on first use)."""
        module, _, function = self.formula.partition(":")
        return getattr(importlib.import_module(f"{FORMULAS}.{module}"), function)


# The order is the column order of the tables.
REGISTRY = {
    c.name: c
    for c in (
        Criterion("taylor", "|w*G|, G the summed calibration gradient", "taylor:taylor_groups",
                  gradients=True),
        Criterion("taylor2", "taylor + 0.5*w^2*F, F the Fisher diagonal", "taylor:taylor2_groups",
                  gradients=True, aliases=("taylor_2nd",)),
        Criterion("wanda", "|w|*||x||, x the linear's input", "wanda:wanda_groups",
                  input_stats=("sq_norm",)),
        Criterion("magnitude", "|w|, data-free", "magnitude:magnitude_groups"),
        Criterion("random", "a seeded uniform draw per group", "random:random_scores",
                  scope=TABLE),
        Criterion("fluctuation", "var(x)*||W[:,j]||^2 over o_proj/down_proj inputs (FLAP)",
                  "fluctuation:fluctuation_groups", input_stats=("sq_norm", "sum"), inputs=OUTPUT_INPUTS),
        Criterion("obs", "the loss the least-squares refit leaves (Fisher-weighted structured OBS on o_proj/down_proj "
                  "inputs), at a group's place on the greedy removal path; holds each layer's input Gram matrices "
                  "during the pass", "obs:obs_groups", gradients=True, input_stats=("gram", "out_grad_sq"),
                  inputs=OUTPUT_INPUTS, default=False),
    )
}
CRITERIA = tuple(REGISTRY)
# What ``score`` scores when no criteria are named.
DEFAULT_CRITERIA = tuple(c.name for c in REGISTRY.values() if c.default)
# What a layer-streamed pass (``score --stream``) can score: the criteria that need no gradients.
FORWARD_ONLY = tuple(c.name for c in REGISTRY.values() if not c.gradients)
# Every name a criterion goes by, seed names first: what ``prune --importance_method`` accepts.
NAMES = tuple(name for c in REGISTRY.values() for name in (*c.aliases, c.name))


def canonical(name: str) -> str:
    """A criterion's own name for any of its names (``taylor_2nd`` -> ``taylor2``)."""
    for criterion in REGISTRY.values():
        if name == criterion.name or name in criterion.aliases:
            return criterion.name
    raise UsageError(f"unknown criterion {name!r}; choose from {', '.join(NAMES)}")


def parse_criteria(text: str) -> tuple[str, ...]:
    """``"taylor,wanda"`` -> ("taylor", "wanda") in canonical order; unknown names are an error."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in REGISTRY]
    if unknown or not names:
        raise UsageError(
            f"unknown criterion {', '.join(unknown) or '(none)'} in {flag('score --criteria')}; choose from "
            f"{', '.join(CRITERIA)}"
        )
    return tuple(c for c in CRITERIA if c in names)


def needs_gradients(criteria) -> bool:
    return any(REGISTRY[c].gradients for c in criteria)


def input_statistics(criteria) -> dict[str, tuple[str, ...]]:
    """Input name -> the statistics ``criteria`` read on it, each once (inputs in layer order, statistics in the
    order the criteria name them); an input nothing reads is absent."""
    wanted: dict[str, dict[str, None]] = {}
    for criterion in (REGISTRY[c] for c in criteria):
        for name in criterion.inputs:
            wanted.setdefault(name, {}).update(dict.fromkeys(criterion.input_stats))
    return {name: tuple(wanted[name]) for name in INPUTS if wanted.get(name)}


def help_text() -> str:
    """Every criterion with its one-line help, for the CLI."""
    return "; ".join(f"{c.name} ({c.help})" for c in REGISTRY.values())


def names_text() -> str:
    """Every name, aliases marked: ``taylor, taylor_2nd (= taylor2), taylor2, ...``."""
    return ", ".join(f"{name} (= {canonical(name)})" if name != canonical(name) else name for name in NAMES)
