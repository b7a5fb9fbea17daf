"""Phase 2: turn a scored group table into pruning plans (the Plan document lives in ``pruning_plan``).

No torch here: a plan is made from ``groups.parquet`` / ``layers.parquet`` alone (DuckDB orders the
groups, numpy spends the budget) and applied later, possibly on another machine, with only the plan
file and the checkpoint. ``ratio`` is always the fraction of the model's *total* parameters to remove.

    >>> tables = load_run("artifacts/run1")                                      # doctest: +SKIP
    >>> plans = make_plans(tables, PlanOptions(ratio=0.2), ratios=[0.1, 0.2])    # doctest: +SKIP
    >>> [p.achieved_ratio <= p.target_ratio for p in plans]                      # doctest: +SKIP
    [True, True]
    >>> write_plans("artifacts/run1", plans)                                     # doctest: +SKIP
    >>> read_plan("artifacts/run1/plans/global-taylor-0.20.json").name           # doctest: +SKIP
    'global-taylor-0.20'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from fractions import Fraction
from pathlib import Path

import numpy as np

from llamaprune.choices import parse_choice
from llamaprune.errors import UsageError
from llamaprune.pruning_plan import SKIPPABLE, LayerPlan, Plan, plain_value, write_plan
from llamaprune.table import GROUPS_FILE, LAYERS_FILE, check_fingerprint, file_sha256, read_table_meta

PLANS_DIR = "plans"
KINDS = ("attn", "mlp")  # column 0 and 1 of every (layers, 2) array below, in the order of SKIPPABLE
BLOCK_INFLUENCE = "block_influence"


# ---------------------------------------------------------------- options


class Strategy(str, Enum):
    """global: least importance per parameter first, model-wide; layerwise: a budget per layer."""

    global_ = "global"
    layerwise = "layerwise"


class LayerStrategy(str, Enum):
    """How layerwise spreads its budget: the same fraction everywhere, or less in more important layers."""

    uniform = "uniform"
    inverse = "inverse"


class Normalize(str, Enum):
    """Global only. ``mean``: a group's score is its importance over the mean importance of its layer and kind,
    so an average group scores 1 in every layer and kind: for criteria whose scale drifts with depth (wanda's
    activation norms grow along the residual stream). Dividing that by params as well would remove every attention
    group (hundreds of times an MLP channel's cost) before any MLP channel."""

    none = "none"
    mean = "mean"


@dataclass(frozen=True)
class PlanOptions:
    """How to turn a scored table into a plan; ``ratio``: the fraction of the model's total params to remove.

    ``distribution`` is the attention:MLP split of a layerwise budget (``None``: in proportion to their
    sizes); ``protect_layers`` accepts negative indices (-1 is the last layer); ``freeze_top_n`` leaves the N
    most important layers (by ``layer_importance``) untouched; ``uniform`` gives every layer the same shape.
    """

    ratio: float
    criterion: str = "taylor"
    strategy: Strategy = Strategy.global_
    normalize: Normalize = Normalize.none
    distribution: tuple[int, int] | None = None
    layer_strategy: LayerStrategy = LayerStrategy.inverse
    layer_importance: str = BLOCK_INFLUENCE
    freeze_top_n: int = 0
    protect_layers: tuple[int, ...] = ()
    min_kv_heads: int = 1
    min_mlp_channels: int = 1
    round_to: int = 1
    uniform: bool = False
    remove_empty_layers: bool = False

    def __post_init__(self) -> None:
        for name, enum in (
            ("strategy", Strategy),
            ("normalize", Normalize),
            ("layer_strategy", LayerStrategy),
        ):
            object.__setattr__(self, name, parse_choice(enum, getattr(self, name), name))
        object.__setattr__(self, "protect_layers", tuple(int(i) for i in self.protect_layers))
        if self.distribution is not None:
            object.__setattr__(self, "distribution", tuple(int(x) for x in self.distribution))
        _check_options(self)

    def to_dict(self) -> dict:
        """Every option as plain JSON values (enums by value, tuples as lists)."""
        return {f.name: plain_value(getattr(self, f.name)) for f in fields(self)}


def _check_options(options: PlanOptions) -> None:
    if not 0 < options.ratio < 1:
        raise UsageError(
            f"ratio {options.ratio} is outside (0, 1): it is the fraction of the model's total parameters to "
            f"remove, e.g. --ratio 0.2"
        )
    for name in ("freeze_top_n", "min_kv_heads", "min_mlp_channels"):
        if getattr(options, name) < 0:
            raise UsageError(f"{name} {getattr(options, name)} is negative; use 0 or more")
    if options.round_to < 1:
        raise UsageError(f"round_to {options.round_to} must be 1 or more (1 keeps any MLP width)")
    dist = options.distribution
    if dist is not None and (len(dist) != 2 or min(dist) < 0 or sum(dist) == 0):
        raise UsageError(f"distribution {dist} must be two non-negative shares A:M, not both 0, e.g. 2:8")
    if options.uniform and (options.protect_layers or options.freeze_top_n or options.remove_empty_layers):
        raise UsageError(
            "--uniform gives every layer the same shape, so it cannot be combined with --protect-layers, "
            "--freeze-top-n or --remove-empty-layers; drop one of them"
        )


def parse_ratios(spec: str) -> list[float]:
    """``START:STOP:STEP`` -> the ratios from START to STOP inclusive (``0.05:0.5:0.05`` gives ten)."""
    try:
        start, stop, step = (float(x) for x in spec.split(":"))
    except ValueError:
        raise UsageError(f"--ratios {spec!r} is not START:STOP:STEP, e.g. 0.05:0.5:0.05") from None
    if not (step > 0 and stop >= start):
        raise UsageError(f"--ratios {spec!r} needs STEP > 0 and STOP >= START, e.g. 0.05:0.5:0.05")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]


def parse_layers(spec: str) -> tuple[int, ...]:
    """``"0,-1"`` -> (0, -1); negative indices count from the last layer."""
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UsageError(
            f"--protect-layers {spec!r} is not a comma-separated list of layer indices, e.g. 0,-1"
        ) from None


def parse_distribution(spec: str) -> tuple[int, int]:
    """``"2:8"`` -> (2, 8): the attention and MLP shares of a layerwise budget."""
    try:
        attn, mlp = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UsageError(f"--distribution {spec!r} is not A:M with integer shares, e.g. 2:8 or 0:10") from None
    return attn, mlp


@dataclass
class RunTables:
    """The checked tables of one run directory; group orderings are computed once per criterion and reused."""

    groups_path: Path
    meta: dict
    sha256: str
    criteria: tuple[str, ...]
    width: np.ndarray  # (layers, 2): attention groups (KV heads) and MLP channels
    group_params: np.ndarray  # (layers, 2): cost of one attention group / one MLP channel
    fixed_params: np.ndarray  # (layers, 2): params that vanish with the sub-block (norm, output bias)
    heads: np.ndarray  # (layers,): query heads
    layer_scores: dict[str, np.ndarray]  # block_influence and each criterion's per-layer sum
    orders: dict = field(default_factory=dict, repr=False)  # (criterion, normalize) -> _Order
    units: tuple | None = field(default=None, repr=False)  # (options but ratio, _Units): the last greedy's units

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def total(self) -> int:
        return int(self.meta["params"]["total"])

    @property
    def prunable(self) -> int:
        return int(self.meta["params"]["prunable"])


def load_run(run_dir: Path | str) -> RunTables:
    """Read ``layers.parquet`` and check it against the metadata; ``groups.parquet`` is read (and checked
    against it) once per criterion, when a plan first needs it."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    groups_path, layers_path = run_dir / GROUPS_FILE, run_dir / LAYERS_FILE
    meta = read_table_meta(groups_path)
    check_fingerprint(read_table_meta(layers_path).get("fingerprint"), meta.get("fingerprint"), str(layers_path))
    table = pq.ParquetFile(layers_path).read()  # read_table and to_numpy would import pandas (+0.3 s)
    cols = {name: np.array(table.column(name).to_pylist(), dtype=float) for name in table.column_names}
    if not np.array_equal(cols["layer"], np.arange(table.num_rows)):  # (a null becomes NaN)
        raise UsageError(f"{layers_path} must list layers 0..n-1 in order; re-run `llamaprune score`")
    criteria = tuple(c for c in meta.get("criteria", ()) if c in cols)
    tables = RunTables(
        groups_path=groups_path,
        meta=meta,
        sha256=file_sha256(groups_path),
        criteria=criteria,
        width=_pair(cols, "attn_groups", "mlp_channels"),
        group_params=_pair(cols, "attn_group_params", "mlp_group_params"),
        fixed_params=_pair(cols, "attn_fixed_params", "mlp_fixed_params"),
        heads=cols["num_attention_heads"].astype(np.int64),
        layer_scores={name: cols[name].astype(np.float64) for name in (BLOCK_INFLUENCE, *criteria)},
    )
    prunable = int((tables.width * tables.group_params).sum())
    if prunable != tables.prunable:
        raise UsageError(
            f"{layers_path}: its layers hold {prunable} prunable params, the metadata {tables.prunable}; "
            f"re-run `llamaprune score`"
        )
    return tables


def _pair(cols: dict, attn: str, mlp: str) -> np.ndarray:
    return np.stack([cols[attn], cols[mlp]], axis=1).astype(np.int64)


@dataclass(frozen=True)
class _Order:
    """One criterion's groups in plan order (ascending score, ties broken by group_id), seen two ways:
    model-wide, and partition by partition (layer 0 attn, layer 0 mlp, layer 1 attn, ...), in that order."""

    part: np.ndarray  # model-wide: each group's partition, 2 * layer + (kind == "mlp")
    pos: np.ndarray  # model-wide: its position within its partition
    score: np.ndarray  # model-wide: importance per parameter
    rank: np.ndarray  # by partition: each group's model-wide position
    index: np.ndarray  # by partition: each group's index within its layer and kind
    imp: np.ndarray  # by partition: importance (normalized when asked)
    starts: np.ndarray  # (2 * layers + 1,): where each partition begins


def _order(tables: RunTables, criterion: str, normalize: Normalize) -> _Order:
    key = (criterion, normalize)
    if key not in tables.orders:
        tables.orders[key] = _query_order(tables, criterion, normalize)
    return tables.orders[key]


def _query_order(tables: RunTables, criterion: str, normalize: Normalize) -> _Order:
    """DuckDB reads groups.parquet and computes the scores (and their normalization); numpy sorts them (faster
    than ORDER BY here) and splits the order by partition."""
    import duckdb

    col = f"coalesce(\"{criterion}\", 'NaN'::DOUBLE)"  # a null score must not pass unnoticed
    imp = col
    if normalize is Normalize.mean:
        # importance in units of its partition's mean, times params: the score below is the relative importance
        imp = f"coalesce({col} / nullif(avg({col}) OVER (PARTITION BY layer, kind), 0), 0) * params"
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
            f"`llamaprune score` or choose another --criterion"
        )
    seq = _plan_order(score, layer, kind, index)
    # a radix sort by partition that keeps the model-wide order within each
    perm = np.argsort(part[seq], kind="stable")
    order = _Order(
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


@dataclass(frozen=True)
class _Limits:
    """What each (layer, kind) may lose: removal counts 0, offset, offset + stride, ... up to ``most``."""

    stride: np.ndarray  # (2,): 1 for attention groups, round_to for MLP channels
    offset: np.ndarray  # (layers, 2): width % stride, the first step when the width is not a multiple
    most: np.ndarray  # (layers, 2): the largest removal the minimums (and protection) allow
    eligible: np.ndarray  # (layers,): neither protected nor frozen


def _limits(tables: RunTables, options: PlanOptions) -> _Limits:
    eligible = np.ones(tables.num_layers, dtype=bool)
    eligible[_protected(options.protect_layers, tables.num_layers)] = False
    if options.freeze_top_n:
        eligible[_most_important(tables, options)] = False
    stride = np.array([1, options.round_to])
    minimum = np.array([options.min_kv_heads, options.min_mlp_channels])
    kept_min = -(-minimum // stride) * stride  # rounded up to a multiple of the stride
    most = np.maximum(tables.width - kept_min, 0) * eligible[:, None]
    return _Limits(stride=stride, offset=tables.width % stride, most=most, eligible=eligible)


def _protected(indices: tuple[int, ...], num_layers: int) -> list[int]:
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise UsageError(
                f"--protect-layers {i} is out of range for a model with {num_layers} layers; "
                f"use 0..{num_layers - 1} or -1..-{num_layers}"
            )
    return [i % num_layers for i in indices]


def _most_important(tables: RunTables, options: PlanOptions) -> np.ndarray:
    n = options.freeze_top_n
    if n >= tables.num_layers:
        raise UsageError(f"--freeze-top-n {n} freezes every one of the {tables.num_layers} layers; use fewer")
    importance = _layer_importance(tables, options.layer_importance)
    return np.lexsort((np.arange(tables.num_layers), -importance))[:n]


def _layer_importance(tables: RunTables, source: str) -> np.ndarray:
    if source not in tables.layer_scores:
        raise UsageError(
            f"layer importance {source!r} is not in {LAYERS_FILE}; choose one of: {', '.join(tables.layer_scores)}"
        )
    values = tables.layer_scores[source]
    missing = np.flatnonzero(np.isnan(values))
    if missing.size:
        raise UsageError(
            f"{LAYERS_FILE} has no {source} for layers {missing.tolist()}; choose another --layer-importance "
            f"({', '.join(c for c in tables.layer_scores if c != source)})"
        )
    return values


def _cost(removal: np.ndarray, tables: RunTables) -> np.ndarray:
    """Params removed by taking ``removal`` groups of each (layer, kind), fixed ones too when it empties."""
    emptied = (removal == tables.width) & (tables.width > 0)
    return removal * tables.group_params + np.where(emptied, tables.fixed_params, 0)


def _floor_step(count: np.ndarray, limits: _Limits) -> np.ndarray:
    """The largest valid removal count not above ``count``."""
    count = np.minimum(count, limits.most)
    stepped = limits.offset + (count - limits.offset) // limits.stride * limits.stride
    return np.where(count < limits.offset, 0, stepped)


def _next_step(removal: np.ndarray, limits: _Limits) -> np.ndarray:
    """The next valid removal count (capped at ``most``, where it equals ``removal``)."""
    step = np.where((removal == 0) & (limits.offset > 0), limits.offset, removal + limits.stride)
    return np.where(step <= limits.most, step, removal)


def _prev_step(removal: np.ndarray, limits: _Limits) -> np.ndarray:
    return np.where(removal <= limits.offset, 0, removal - limits.stride)


def _budget(ratio: float, total: int) -> int:
    """The most params a plan may remove: the largest B with ``B / total <= ratio`` as computed in floats, so
    the achieved ratio never exceeds the target and ``--ratio 0.03`` of 1000 params allows 30."""
    budget = math.floor(Fraction(ratio) * total)
    return budget + 1 if (budget + 1) / total <= ratio else budget


def _unreachable(ratio: float, reachable: float, total: int) -> UsageError:
    best = math.floor(reachable / total * 1e4) / 1e4
    return UsageError(
        f"ratio {ratio} is unreachable: with these constraints at most {best:.4f} of the parameters can be "
        f"removed; choose --ratio {best} or less, or relax --protect-layers, --freeze-top-n, --min-kv-heads, "
        f"--min-mlp-channels, --distribution"
    )


# ---------------------------------------------------------------- global: a greedy over removal units


@dataclass(frozen=True)
class _Units:
    """Removal units in the order the greedy considers them. ``kind`` 0/1 removes ``size`` groups of that
    kind from ``layer`` (-1: from every layer, --uniform); kind 2 removes what is left of the layer."""

    cost: np.ndarray
    layer: np.ndarray
    kind: np.ndarray
    size: np.ndarray
    last: np.ndarray  # the unit empties its sub-block (or layer)


def _global_removal(tables: RunTables, order: _Order, limits: _Limits, options: PlanOptions, budget: int):
    """(layers, 2) removal counts: the greedy over removal units in plan order."""
    key = replace(options, ratio=0.5)  # the units depend on every option but the ratio: reuse them in a sweep
    if tables.units is None or tables.units[0] != key:
        build = _slice_units if options.uniform else _group_units
        units, score = build(tables, order, limits)
        if options.remove_empty_layers:
            units = _with_whole_layers(units, score, tables, order, limits)
        tables.units = (key, units)
    units = tables.units[1]
    reachable = int(units.cost.sum())
    emptiable = limits.eligible & (options.remove_empty_layers | (limits.most == tables.width).all(axis=1))
    if emptiable.all() and units.last.any():  # one layer must stay: leave out the cheapest emptying unit
        reachable -= int(units.cost[units.last].min())
    if budget > reachable:
        raise _unreachable(options.ratio, reachable, tables.total)
    taken = _take(units, budget)
    return _apply(units, taken, tables)


def _group_units(tables: RunTables, order: _Order, limits: _Limits) -> tuple[_Units, np.ndarray]:
    """One unit per removal step of each (layer, kind): a group, or with --round-to a run of channels."""
    width, group_params = tables.width.reshape(-1), tables.group_params.reshape(-1)
    most, fixed = limits.most.reshape(-1), tables.fixed_params.reshape(-1)
    if (limits.stride == 1).all():  # every group is a unit, already in plan order
        pick = np.flatnonzero(order.pos < most[order.part])
        part = order.part[pick].astype(np.int64)
        last = order.pos[pick] == width[part] - 1
        cost = group_params[part] + np.where(last, fixed[part], 0)
        units = _Units(cost=cost, layer=part // 2, kind=part % 2, size=np.ones(len(pick), dtype=np.int64), last=last)
        return units, order.score[pick]
    part = np.repeat(np.arange(len(order.starts) - 1), np.diff(order.starts))  # by partition from here on
    pos = np.arange(len(part)) - order.starts[part]
    pick = np.flatnonzero(pos < most[part])
    offset, stride = limits.offset.reshape(-1)[part[pick]], limits.stride[part[pick] % 2]
    step = (pos[pick] - offset + stride) // stride - (offset == 0)  # which removal step each group belongs to
    bounds = np.flatnonzero(np.diff(part[pick].astype(np.int64) * (len(part) + 1) + step, prepend=-1))
    first, size = pick[bounds], np.diff(np.append(bounds, len(pick)))
    upart = part[first]
    score = np.add.reduceat(order.imp[pick], bounds) / (size * group_params[upart])
    last = pos[first] + size == width[upart]
    cost = size * group_params[upart] + np.where(last, fixed[upart], 0)
    seq = np.lexsort((order.rank[first], score))
    units = _Units(cost=cost[seq], layer=upart[seq] // 2, kind=upart[seq] % 2, size=size[seq], last=last[seq])
    return units, score[seq]


def _slice_units(tables: RunTables, order: _Order, limits: _Limits) -> tuple[_Units, np.ndarray]:
    """--uniform: one unit per removal step taken in every layer at once (the same width everywhere)."""
    if (tables.width != tables.width[0]).any() or (tables.group_params != tables.group_params[0]).any():
        raise UsageError("--uniform needs every layer to have the same widths and costs; this model's layers differ")
    parts = []
    for k in range(2):
        most, offset, stride = int(limits.most[0, k]), int(limits.offset[0, k]), int(limits.stride[k])
        if most == 0:
            continue
        bounds = np.concatenate([[0], np.arange(offset or stride, most, stride)])
        where = order.starts[k:-1:2][:, None] + np.arange(most)[None, :]  # (layers, most)
        size = np.diff(np.append(bounds, most))
        params = size * tables.group_params[:, k].sum()
        ends = bounds + size == tables.width[0, k]
        cost = params + np.where(ends, tables.fixed_params[:, k].sum(), 0)
        score = np.add.reduceat(order.imp[where].sum(axis=0), bounds) / params
        rank = order.rank[where[:, bounds]].min(axis=0)
        parts.append((cost, np.full(len(size), k), size, score, rank, ends))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return _Units(cost=empty, layer=empty, kind=empty, size=empty, last=empty.astype(bool)), np.zeros(0)
    cost, kind, size, score, rank, ends = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    seq = np.lexsort((rank, score))
    units = _Units(cost=cost[seq], layer=np.full(len(seq), -1), kind=kind[seq], size=size[seq], last=ends[seq])
    return units, score[seq]


def _with_whole_layers(units: _Units, score: np.ndarray, tables: RunTables, order: _Order, limits: _Limits) -> _Units:
    """--remove-empty-layers: after a layer's last unit comes one that takes what its minimums keep, so a
    layer the plan would empty is removed outright. Placed by the score of what it removes, after the rest."""
    reserved = (tables.width - limits.most) * limits.eligible[:, None]
    layers = np.flatnonzero((reserved > 0).any(axis=1))
    if not layers.size:
        return units
    total_imp = np.concatenate([[0.0], np.cumsum(order.imp)])
    ends = order.starts[1:].reshape(-1, 2)
    imp = (total_imp[ends] - total_imp[ends - reserved]).sum(axis=1)
    params = (reserved * tables.group_params).sum(axis=1)
    cost = params + np.where(reserved > 0, tables.fixed_params, 0).sum(axis=1)
    last = np.full(tables.num_layers, -np.inf)
    np.maximum.at(last, units.layer, score)  # the score of each layer's last regular unit
    key = np.maximum(imp[layers] / params[layers], last[layers])
    seq = np.argsort(key, kind="stable")
    layers, at = layers[seq], np.searchsorted(score, key[seq], side="right")
    return _Units(
        cost=np.insert(units.cost, at, cost[layers]),
        layer=np.insert(units.layer, at, layers),
        kind=np.insert(units.kind, at, 2),
        size=np.insert(units.size, at, 0),
        last=np.insert(units.last, at, True),
    )


def _take(units: _Units, budget: int) -> np.ndarray:
    """The greedy, vectorized: take units in order while they fit; one that would overshoot is skipped and
    later, cheaper ones are still taken. A whole-layer unit is taken only if all other units of its layer
    were."""
    cost, n = units.cost, len(units.cost)
    taken = np.zeros(n, dtype=bool)
    whole = units.kind == 2
    if whole.any():
        layers = int(units.layer.max()) + 1
        needed = np.bincount(units.layer[~whole], minlength=layers)
        have = np.zeros(layers, dtype=np.int64)
    left, start = budget, 0
    while start < n:
        cand = start + np.flatnonzero(cost[start:] <= left)
        if not cand.size:
            break
        spent = np.cumsum(cost[cand])
        k = int(np.searchsorted(spent, left, side="right"))
        resume = cand[k] + 1 if k < cand.size else n  # cand[k] overshoots: skip it, go on after it
        if whole.any():
            wanted = cand[:k]
            counts = have + np.bincount(units.layer[wanted[~whole[wanted]]], minlength=layers)
            early = wanted[whole[wanted]]
            early = early[counts[units.layer[early]] < needed[units.layer[early]]]
            if early.size:  # a layer still has parts left: skip its whole-layer unit
                k, resume = int(np.searchsorted(cand, early[0])), early[0] + 1
            have += np.bincount(units.layer[cand[:k][~whole[cand[:k]]]], minlength=layers)
        taken[cand[:k]] = True
        left -= int(spent[k - 1]) if k else 0
        start = resume
    return taken


def _apply(units: _Units, taken: np.ndarray, tables: RunTables) -> np.ndarray:
    """(layers, 2) removal counts from the taken units."""
    layers = tables.num_layers
    part = units.kind < 2
    every = taken & part & (units.layer < 0)
    one = taken & part & (units.layer >= 0)
    removal = np.bincount(units.kind[every], weights=units.size[every], minlength=2)[None, :].repeat(layers, 0)
    flat = units.layer[one] * 2 + units.kind[one]
    removal = removal + np.bincount(flat, weights=units.size[one], minlength=2 * layers).reshape(layers, 2)
    removal = removal.astype(np.int64)
    whole = units.layer[taken & (units.kind == 2)]
    removal[whole] = tables.width[whole]
    return removal


# ---------------------------------------------------------------- layerwise: a budget per layer


def _layerwise_removal(tables: RunTables, order: _Order, limits: _Limits, options: PlanOptions, budget: int):
    """(layers, 2) removal counts: the budget split between attention and MLP, then across layers; within a
    layer the least important groups go first (the order's partitions)."""
    full = tables.width * tables.group_params
    share = options.distribution or tuple(int(x) for x in full.sum(axis=0))
    attn_budget = budget * share[0] // sum(share)
    budgets = np.array([attn_budget, budget - attn_budget], dtype=np.int64)
    weight = _layer_weights(tables, options)
    active = limits.eligible.copy()
    gone = np.zeros(tables.num_layers, dtype=bool)
    whole = _cost(tables.width, tables)
    if options.remove_empty_layers:
        # layers whose shares cover all they hold go first, their minimums notwithstanding
        spread = [_waterfill(budgets[k], weight * full[:, k] * active, whole[:, k] * active) for k in range(2)]
        gone = active & np.all(np.stack(spread, axis=1) >= whole, axis=1) & (whole > 0).any(axis=1)
        budgets -= whole[gone].sum(axis=0)
        active &= ~gone
    caps = _cost(limits.most, tables) * active[:, None]
    if any(share[k] and budgets[k] > caps[:, k].sum() for k in range(2)):
        capacity = caps.sum(axis=0) + whole[gone].sum(axis=0)
        reachable = min(capacity[k] * sum(share) / share[k] for k in range(2) if share[k])
        raise _unreachable(options.ratio, float(reachable), tables.total)
    removal = np.zeros_like(tables.width)
    carry = 0  # what attention's rounding leaves goes to the MLP (when the MLP has a share)
    for k in range(2):
        if share[k]:
            left = int(budgets[k]) + carry
            spread = _waterfill(left, weight * full[:, k] * active, caps[:, k])
            carry = _spend(removal, k, spread, left, tables, limits, together=options.uniform)
    removal[gone] = tables.width[gone]
    return removal


def _layer_weights(tables: RunTables, options: PlanOptions) -> np.ndarray:
    """Share of the budget per unit of layer size: equal, or inversely proportional to layer importance."""
    if options.uniform or options.layer_strategy is LayerStrategy.uniform:
        return np.ones(tables.num_layers)
    importance = _layer_importance(tables, options.layer_importance)
    floor = max(float(np.abs(importance).max()) * 1e-12, np.finfo(float).tiny)
    return 1.0 / np.maximum(importance, floor)


def _waterfill(budget: float, weight: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Split ``budget`` in proportion to ``weight``, no layer above its ``cap`` (the excess flows on)."""
    spread = np.zeros(len(cap))
    open_ = (weight > 0) & (cap > 0)
    left = float(budget)
    while open_.any():
        level = left / weight[open_].sum()
        full = open_ & (level * weight >= cap)
        if not full.any():
            spread[open_] = level * weight[open_]
            break
        spread[full] = cap[full]
        left -= float(cap[full].sum())
        open_ &= ~full
    return spread


def _spend(
    removal: np.ndarray, k: int, spread: np.ndarray, budget: int, tables: RunTables, limits: _Limits, together: bool
) -> int:
    """Fill column ``k`` of ``removal`` with valid counts from a continuous spread of params: floor each
    layer's share, then spend the rest one step at a time, largest shortfall first (every layer at once when
    ``together``). Returns the params left over."""
    safe = spread * (1 - 1e-12)  # float sums may round up; the budget is a hard limit

    def cost(r: np.ndarray) -> np.ndarray:
        return _cost(r, tables)[:, k]

    removal[:, k] = np.floor(safe / np.maximum(tables.group_params[:, k], 1))
    removal[:] = _floor_step(removal, limits)
    removal[:, k] = np.where(cost(removal) > safe, _prev_step(removal, limits)[:, k], removal[:, k])
    left = budget - int(cost(removal).sum())
    if together:
        while True:
            step = removal.copy()
            step[:, k] = _next_step(removal, limits)[:, k]
            delta = int((cost(step) - cost(removal)).sum())
            if not (step[:, k] > removal[:, k]).all() or delta > left:
                return left
            removal[:] = step
            left -= delta
    step = removal.copy()
    step[:, k] = _next_step(removal, limits)[:, k]
    delta = cost(step) - cost(removal)
    for i in np.argsort(-(spread - cost(removal)), kind="stable"):
        if step[i, k] > removal[i, k] and delta[i] <= left:
            removal[i, k] = step[i, k]
            left -= int(delta[i])
    return left


# ---------------------------------------------------------------- making plans


def make_plan(source: RunTables | Path | str, options: PlanOptions, name: str | None = None) -> Plan:
    """One plan from a run directory (or tables already loaded with ``load_run``)."""
    tables = source if isinstance(source, RunTables) else load_run(source)
    if options.criterion not in tables.criteria:
        raise UsageError(
            f"criterion {options.criterion!r} is not in {tables.groups_path}; it has: "
            f"{', '.join(tables.criteria)} "
            f"(add it with `llamaprune score ... --criteria {options.criterion}`)"
        )
    is_global = options.strategy is Strategy.global_
    order = _order(tables, options.criterion, options.normalize if is_global else Normalize.none)
    limits = _limits(tables, options)
    budget = _budget(options.ratio, tables.total)
    removal = (_global_removal if is_global else _layerwise_removal)(tables, order, limits, options, budget)
    return _assemble(tables, order, removal, options, name or default_plan_name(options))


def make_plans(
    source: RunTables | Path | str, options: PlanOptions, ratios=None, name: str | None = None
) -> list[Plan]:
    """One plan per ratio (default: ``options.ratio``), reading the tables once; with several ratios a given
    ``name`` gets the ratio appended."""
    return list(iter_plans(source, options, ratios, name))


def iter_plans(
    source: RunTables | Path | str, options: PlanOptions, ratios=None, name: str | None = None
) -> Iterator[Plan]:
    """``make_plans`` one plan at a time, so that a sweep holds one plan (~2M indices for 70B) at once."""
    tables = source if isinstance(source, RunTables) else load_run(source)
    ratios = list(dict.fromkeys(ratios or [options.ratio]))
    for ratio in ratios:
        label = f"{name}-{_ratio_text(ratio)}" if name and len(ratios) > 1 else name
        yield make_plan(tables, replace(options, ratio=ratio), label)


def default_plan_name(options: PlanOptions) -> str:
    """``{strategy}-{criterion}-{ratio}`` plus a tag for each option that differs from its default."""
    default = PlanOptions(ratio=options.ratio)
    layerwise = options.strategy is Strategy.layerwise
    tags = [
        (not layerwise and options.normalize != default.normalize, f"norm{options.normalize.value}"),
        (layerwise and options.distribution is not None, "a{}m{}".format(*(options.distribution or (0, 0)))),
        (
            layerwise and options.layer_strategy != default.layer_strategy,
            f"layer{options.layer_strategy.value}",
        ),
        (
            (layerwise or options.freeze_top_n > 0) and options.layer_importance != default.layer_importance,
            f"by{options.layer_importance}",
        ),
        (options.freeze_top_n > 0, f"freeze{options.freeze_top_n}"),
        (bool(options.protect_layers), "protect" + "_".join(str(i) for i in options.protect_layers)),
        (options.min_kv_heads != default.min_kv_heads, f"minkv{options.min_kv_heads}"),
        (options.min_mlp_channels != default.min_mlp_channels, f"minmlp{options.min_mlp_channels}"),
        (options.round_to != default.round_to, f"round{options.round_to}"),
        (options.uniform, "uniform"),
        (options.remove_empty_layers, "depth"),
    ]
    base = [options.strategy.value, options.criterion, _ratio_text(options.ratio)]
    return "-".join(base + [tag for wanted, tag in tags if wanted])


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}" if math.isclose(ratio, round(ratio, 2), abs_tol=1e-12) else f"{ratio:g}"


def _assemble(tables: RunTables, order: _Order, removal: np.ndarray, options: PlanOptions, name: str) -> Plan:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise UsageError(f"plan name {name!r} must be a plain file name (no '/', not starting with '.')")
    kept = tables.width - removal
    gone = (kept == 0).all(axis=1)
    if gone.all():
        raise UsageError(
            f"ratio {options.ratio} would remove every layer; choose a smaller --ratio or keep layers with "
            f"--protect-layers, --min-kv-heads, --min-mlp-channels"
        )
    removed_groups = int((removal * tables.group_params).sum())
    removed = int(_cost(removal, tables).sum())
    from llamaprune import __version__

    return Plan(
        name=name,
        fingerprint=tables.meta["fingerprint"],
        source_table_sha256=tables.sha256,
        criterion=options.criterion,
        strategy=options.strategy.value,
        options=options.to_dict(),
        target_ratio=options.ratio,
        achieved_ratio=removed / tables.total,
        achieved_prunable_ratio=removed_groups / tables.prunable,
        params_before=tables.total,
        params_after=tables.total - removed,
        prunable_before=tables.prunable,
        prunable_after=tables.prunable - removed_groups,
        head_dim=int(tables.meta["head_dim"]),
        layers=tuple(_layer_plan(tables, order, removal, layer, bool(gone[layer])) for layer in range(len(gone))),
        created_by=f"llamaprune {__version__}",
    )


def _layer_plan(tables: RunTables, order: _Order, removal: np.ndarray, layer: int, gone: bool) -> LayerPlan:
    kept = []
    for k in range(2):
        start, end = order.starts[2 * layer + k], order.starts[2 * layer + k + 1]
        keep = np.zeros(end - start, dtype=bool)
        keep[order.index[start + removal[layer, k] : end]] = True  # sorted by index, no sort needed
        kept.append(tuple(np.flatnonzero(keep).tolist()))
    return LayerPlan(
        layer=layer,
        num_attention_heads=int(tables.heads[layer]),
        num_key_value_heads=int(tables.width[layer, 0]),
        intermediate_size=int(tables.width[layer, 1]),
        attn_groups=kept[0],
        mlp_channels=kept[1],
        skip=() if gone else tuple(name for name, ids in zip(SKIPPABLE, kept, strict=True) if not ids),
        removed=gone,
    )


def write_plans(run_dir: Path | str, plans: Iterable[Plan], png: bool = True) -> list[Path]:
    """Write ``RUN_DIR/plans/<name>.json`` (and ``.png``) for each plan; returns the JSON paths."""
    paths = []
    for plan in plans:
        path = Path(run_dir) / PLANS_DIR / f"{plan.name}.json"
        write_plan(plan, path)
        if png:
            from llamaprune.plan_plot import plot_plan

            plot_plan(plan, path.with_suffix(".png"))
        paths.append(path)
    return paths


SUMMARY_COLUMNS = (
    "plan",
    "target",
    "achieved",
    "target_prunable",
    "achieved_prunable",
    "params_before",
    "params_after",
    "heads_kept",
    "mlp_channels_kept",
    "layers_removed",
)


def summary_rows(plans: Iterable[Plan]) -> list[tuple]:
    """One row per plan in ``SUMMARY_COLUMNS`` order; ratios: fractions of total (prunable) params removed."""
    rows = []
    for plan in plans:
        layers = plan.layers
        heads = f"{sum(lp.heads_kept for lp in layers)}/{sum(lp.num_attention_heads for lp in layers)}"
        channels = f"{sum(len(lp.mlp_channels) for lp in layers)}/{sum(lp.intermediate_size for lp in layers)}"
        target_prunable = plan.target_ratio * plan.params_before / plan.prunable_before
        rows.append(
            (
                plan.name,
                round(plan.target_ratio, 4),
                round(plan.achieved_ratio, 4),
                round(target_prunable, 4),
                round(plan.achieved_prunable_ratio, 4),
                plan.params_before,
                plan.params_after,
                heads,
                channels,
                ",".join(str(i) for i in plan.removed_layers) or "-",
            )
        )
    return rows
