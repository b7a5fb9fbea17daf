"""The plan order: one criterion's groups by ascending score (importance per parameter, normalized when asked),
ties broken by group_id; DuckDB reads ``groups.parquet`` and computes the scores, numpy sorts them.

The global greedy walks the order model-wide; the layerwise budget and the kept lists walk it partition by
partition (layer 0 attn, layer 0 mlp, layer 1 attn, ...).

    >>> tables = load_run("artifacts/run1")                                    # doctest: +SKIP
    >>> order = plan_order(tables, PlanOptions(ratio=0.2, normalize="mean"))   # doctest: +SKIP
    >>> ranked_groups(tables, PlanOptions(ratio=0.2))["score"][:3]             # doctest: +SKIP
    array([0.00012, 0.00013, 0.00013])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamaprune.core.errors import UsageError, flag
from llamaprune.core.tables import LAYERS_FILE
from llamaprune.plan.options import Normalize, PlanOptions, Strategy
from llamaprune.plan.tables import KINDS, RunTables


@dataclass(frozen=True)
class Order:
    """One criterion's groups in plan order (ascending score, ties broken by group_id), seen two ways:
    model-wide, and partition by partition (layer 0 attn, layer 0 mlp, layer 1 attn, ...), in that order."""

    part: np.ndarray  # model-wide: each group's partition, 2 * layer + (kind == "mlp")
    pos: np.ndarray  # model-wide: its position within its partition
    score: np.ndarray  # model-wide: importance per parameter
    rank: np.ndarray  # by partition: each group's model-wide position
    index: np.ndarray  # by partition: each group's index within its layer and kind
    imp: np.ndarray  # by partition: importance (normalized when asked)
    starts: np.ndarray  # (2 * layers + 1,): where each partition begins


def plan_order(tables: RunTables, options: PlanOptions) -> Order:
    """The order a plan with these options walks, queried once per (criterion, normalize) and kept in
    ``tables``; the layerwise strategy ranks groups within each layer and kind by the plain score."""
    normalize = options.normalize if options.strategy is Strategy.global_ else Normalize.none
    key = (options.criterion, normalize)
    if key not in tables.orders:
        tables.orders[key] = _query_order(tables, options.criterion, normalize)
    return tables.orders[key]


def ranked_groups(tables: RunTables, options: PlanOptions) -> dict[str, np.ndarray]:
    """Every group in plan order (rank 0 first): ``layer``, ``kind`` (0 attn, 1 mlp), ``index``, ``importance``
    (relative to its layer and kind's mean, times params, with ``normalize`` mean) and ``score`` (importance per
    parameter). For files that show a plan's ranking, such as the seed toolkit's group table."""
    order = plan_order(tables, options)
    at = order.starts[order.part] + order.pos  # each group's place in the by-partition arrays
    part = order.part.astype(np.int64)
    return {
        "layer": part // 2,
        "kind": part % 2,
        "index": order.index[at],
        "importance": order.imp[at],
        "score": order.score,
    }


def _query_order(tables: RunTables, criterion: str, normalize: Normalize) -> Order:
    """DuckDB reads groups.parquet and computes the scores (and their normalization); numpy sorts them (faster
    than ORDER BY here) and splits the order by partition."""
    import duckdb

    col = f"coalesce(\"{criterion}\", 'NaN'::DOUBLE)"  # a null score must not pass unnoticed
    imp = col
    if normalize is Normalize.mean:
        # importance in units of its partition's mean, times params: the score below is the relative importance
        imp = f"coalesce({col} / nullif(avg({col}) OVER (PARTITION BY layer, kind), 0), 0) * params"
    elif normalize is Normalize.standard:
        # the partition's z-score, times params: the score below is the z-score itself (FLAP's adaptive search)
        part = "OVER (PARTITION BY layer, kind)"
        imp = f"coalesce(({col} - avg({col}) {part}) / nullif(stddev_pop({col}) {part}, 0), 0) * params"
    sql = (
        "SELECT layer, CASE kind WHEN 'attn' THEN 0 WHEN 'mlp' THEN 1 ELSE 2 END AS k, \"index\", params, "
        f'imp, imp / params AS score FROM (SELECT layer, kind, "index", params, {imp} AS imp '
        "FROM read_parquet(?))"
    )
    with duckdb.connect() as con:
        cols = {name: np.asarray(c) for name, c in con.execute(sql, [str(tables.groups_path)]).fetchnumpy().items()}
    layer, kind, index, score = cols["layer"], cols["k"], cols["index"], cols["score"]
    partitions = 2 * tables.num_layers
    if len(layer) and (layer.min() < 0 or layer.max() >= tables.num_layers or kind.max() > 1):
        raise UsageError(
            f"{tables.groups_path} has layers or kinds that {LAYERS_FILE} lacks; re-run `llamaprune score`"
        )
    part = (layer * 2 + kind).astype(np.min_scalar_type(partitions))
    starts = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=partitions))])
    _check_groups(tables, part, index, cols["params"], starts)
    if np.isnan(score).any():
        raise UsageError(
            f"{tables.groups_path} has {int(np.isnan(score).sum())} null or NaN {criterion} scores; re-run "
            f"`llamaprune score` or choose another {flag('plan --criterion')}"
        )
    seq = _plan_order(score, layer, kind, index)
    # a radix sort by partition that keeps the model-wide order within each
    perm = np.argsort(part[seq], kind="stable")
    order = Order(
        part=part[seq],
        pos=np.empty(len(seq), dtype=np.int64),
        score=score[seq],
        rank=perm,
        index=index[seq[perm]],
        imp=cols["imp"][seq[perm]],
        starts=starts,
    )
    order.pos[perm] = np.arange(len(seq)) - np.repeat(starts[:-1], np.diff(starts))
    return order


def _plan_order(score: np.ndarray, layer: np.ndarray, kind: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows by ascending score, ties broken by group_id ("layers.{layer}.{kind}.{index}", as a string)."""
    seq = np.argsort(score)
    ordered = score[seq]
    tied = np.flatnonzero(ordered[1:] == ordered[:-1])
    if tied.size:
        rows = np.union1d(tied, tied + 1)  # positions inside runs of equal scores: re-sort by (score, key)
        tied_rows = seq[rows]
        key = _group_id_key(layer[tied_rows], kind[tied_rows], index[tied_rows])
        seq[rows] = tied_rows[np.lexsort((key, ordered[rows]))]
    return seq


def _group_id_key(layer: np.ndarray, kind: np.ndarray, index: np.ndarray) -> np.ndarray:
    """An integer per group that sorts like its group_id string, without building the strings: the layer
    compares as the text "{layer}." (so "1." < "10." < "2."), then attn < mlp, then the index as text."""
    layer_rank = np.argsort(np.argsort([f"{i}." for i in range(int(layer.max()) + 1)]))
    index_rank = np.argsort(np.argsort([str(i) for i in range(int(index.max()) + 1)]))
    return (layer_rank[layer].astype(np.int64) * 2 + kind) * len(index_rank) + index_rank[index]


def _check_groups(tables: RunTables, part: np.ndarray, index: np.ndarray, params: np.ndarray, starts) -> None:
    """groups.parquet must hold, per (layer, kind), indices 0..width-1 once each, at the group cost that
    layers.parquet gives."""
    width, cost = tables.width.reshape(-1), tables.group_params.reshape(-1)
    count = np.diff(starts)
    inside = (index >= 0) & (index < width[part])
    slot = starts[:-1][part] + np.where(inside, index, 0)
    wrong = ~inside | (np.bincount(slot)[slot] > 1) | (params != cost[part])
    bad = (count != width) | (np.bincount(part, weights=wrong, minlength=len(count)) > 0)
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        raise UsageError(
            f"{tables.groups_path} does not match {LAYERS_FILE} in layer {p // 2} {KINDS[p % 2]}: it must "
            f"hold indices 0..{width[p] - 1} once each, at {cost[p]} params per group; "
            "re-run `llamaprune score`"
        )
