"""Scoring the model that a plan leaves, compensated (``llamaprune score --after PLAN``): allocation for the
compensated model, one step of iterative pruning.

The plan (a first step, such as 5%) is applied in memory, compensated by ``prune``'s recipe
(``apply.refit.recipe``, in ``apply.step``, which the score command is handed: scoring imports nothing of
apply) on the score's own calibration text, and the compensated model is scored on the score's
windows. Its tables are written in the original model's groups, so that every plan made from the run is a plan of
the original checkpoint, which ``apply`` compensates from dense as any other: the step's groups score -inf under
every criterion, so every plan removes them first; the others keep their scores on the compensated model, which
count what the refit took back. ``plan`` refuses a ratio that would keep some of the step's groups
(``plan.planning``). On SmolLM2 at 10%, the counts a 5% step leaves gained on WikiText and on text of another
domain over the dense model's table (bench/RESULTS.md).

    >>> model, step, record = compensate_step(loaded, read_plan(path), path, options, rows)  # doctest: +SKIP
    >>> result = in_original_groups(score(model, batches), step, loaded.model.config, record)  # doctest: +SKIP
    >>> result.meta["after"]["plan"]["name"]                                                 # doctest: +SKIP
    'global-taylor2-0.05'
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import torch

from llamaprune.core.arch import ATTN, MLP
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.groups import group_id, model_shape
from llamaprune.core.plan_file import Plan, check_plan
from llamaprune.core.tables import GROUPS_FILE, with_meta
from llamaprune.scoring.in_memory import ScoreResult, groups_table, layers_table, table_meta

AFTER = "after"  # the tables' metadata and the manifest's record of the plan a run was scored after


def check_after(plan: Plan, path: Path, config, weights: str | None) -> None:
    """Refuse, before the model loads, a plan ``path`` that ``score --after`` cannot take: one made for another
    model or other weights (``weights``: the checkpoint's fingerprint), one outside its run's plans/ (its run's
    group table ranks obs's pool in the step's refit), or one that removes whole layers (the compensated model's
    layers would no longer be the original's)."""
    check_plan(plan, config, f"the plan {path}")
    if None not in (plan.weights_fingerprint, weights) and plan.weights_fingerprint != weights:
        raise UsageError(f"the plan {path} was made from a run scored on other weights than this checkpoint's; "
                         f"score this checkpoint and plan its step from that run")
    if path.parent.name != "plans" or not (path.parent.parent / GROUPS_FILE).is_file():
        raise UsageError(f"{flag('score --after')} refits the plan's step by prune's recipe, which ranks obs's "
                         f"candidates by its run's {GROUPS_FILE}; give a plan kept in RUN/plans/, not {path}")
    gone = [lp.layer for lp in plan.layers if lp.removed]
    if gone:
        raise UsageError(f"{flag('score --after')} scores the layers the plan keeps, and {path} removes layers "
                         f"{gone}; make the step's plan without {flag('plan --remove-empty-layers')}")


def in_original_groups(result: ScoreResult, plan: Plan, config, record: dict) -> ScoreResult:
    """``result`` (the scores of the model ``plan`` leaves) as tables of the original model (``config``): each
    kept group's scores at its original index, -inf for the groups the plan removes; the layers' sums over the
    kept groups and their block influence as scored. The metadata records the plan (``AFTER``)."""
    shape = model_shape(config)
    criteria = tuple(result.meta["criteria"])
    kept_scores, scores = {}, {}
    for lp in plan.layers:
        for kind, kept in ((ATTN, lp.attn_groups), (MLP, lp.mlp_channels)):
            width = shape.layers[lp.layer].groups(kind)
            for criterion in criteria:
                full = torch.full((width,), -math.inf, dtype=torch.float64)
                key = group_id(lp.layer, kind, criterion)
                if key in result.stats:
                    kept_scores[(lp.layer, kind, criterion)] = result.stats[key]
                    full[list(kept)] = result.stats[key].to(torch.float64)
                if width:
                    scores[(lp.layer, kind, criterion)] = full
    influence = dict(enumerate(result.layers.column("block_influence").to_pylist()))
    meta = {**table_meta(config, shape, criteria, result.meta["calibration"], result.meta["weights_fingerprint"]),
            AFTER: record}
    groups: pa.Table = with_meta(groups_table(shape, scores, criteria), meta)
    layers: pa.Table = with_meta(layers_table(shape, kept_scores, influence, criteria), meta)
    return ScoreResult(groups, layers, None, meta, result.seconds, result.peak_memory_bytes,
                       result.peak_memory_scope, result.tokens, result.accumulator_bytes)
