"""Phase 1: run calibration batches through the model once and measure every group's importance and cost.

One calibration pass (``llamaprune.scoring.calibration``) collects what every requested criterion needs (its entry in
``llamaprune.core.criteria``); each criterion's formula then turns the accumulators into one score per group.
Embeddings, norms and lm_head get no gradient at all.

    >>> result = score(model, batches, criteria=("taylor", "wanda"))    # doctest: +SKIP
    >>> result.groups.num_rows == layers * (kv_heads + intermediate_size)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum

import pyarrow as pa
import torch

from llamaprune import __version__
from llamaprune.core.arch import ATTN, MLP
from llamaprune.core.artifacts import SCHEMA_VERSION
from llamaprune.core.choices import parse_choice
from llamaprune.core.criteria import (
    DEFAULT_CRITERIA,
    FORWARD_ONLY,
    INPUTS,
    REGISTRY,
    TABLE,
    input_statistics,
    needs_gradients,
    parse_criteria,
)
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.groups import ModelShape, config_fingerprint, group_id, iter_groups, model_shape
from llamaprune.core.tables import groups_schema, layers_schema, with_meta
from llamaprune.io.loading import Device, DType
from llamaprune.runs.peak_memory import PeakMemory
from llamaprune.scoring.accumulators import Accumulators, ParamSpec
from llamaprune.scoring.calibration import (
    RECORDED_STATISTICS,
    TRANSIENT_STATISTICS,
    Statistics,
    calibrate,
    param_specs,
)
from llamaprune.scoring.collectives import Ranks
from llamaprune.scoring.importance.influence import block_influence

STATS_FILE = "stats.safetensors"


@dataclass
class ScoreResult:
    """Phase 1 output: the two tables (with metadata) and the raw accumulators for stats.safetensors."""

    groups: pa.Table
    layers: pa.Table
    stats: dict[str, torch.Tensor] | None  # None: a run scored after a plan (``scoring.after_plan``)
    meta: dict
    seconds: float
    peak_memory_bytes: int
    peak_memory_scope: str  # "scoring", or "process" where the peak could not be reset (llamaprune.runs.peak_memory)
    tokens: int
    accumulator_bytes: int = 0  # what this process's accumulators held (the w*G sums dominate)


class Accumulate(str, Enum):
    """The dtype of the w*G sums: float32, or bfloat16 at half the memory."""

    fp32 = "fp32"
    bf16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self is Accumulate.fp32 else torch.bfloat16


@dataclass(frozen=True)
class ScoreOptions:
    """What ``llamaprune score`` measures and on what calibration text."""

    model: str
    dataset: str = "wikitext2"
    num_samples: int = 128
    seq_len: int = 128
    batch_size: int = 8
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    seed: int = 0
    dtype: DType = DType.float32
    device: Device = Device.cpu
    data_dir: str | None = None
    fisher_windows: int = 8  # windows per gradient group (llamaprune.scoring.calibration): the Fisher term's grouping
    accumulate: Accumulate = Accumulate.fp32  # dtype of the w*G sums of the gradient criteria
    fsdp: bool = False  # under torchrun: parameters, gradients and w*G sums sharded (llamaprune.scoring.sharded)
    stream: bool = False  # read one decoder layer at a time (llamaprune.scoring.streamed): forward-only criteria
    after: str | None = None  # a plan: score the model it leaves, compensated (llamaprune.scoring.after_plan)
    after_samples: int | None = None  # windows the plan's step is refitted on (None: num_samples)

    def __post_init__(self) -> None:
        parse_criteria(",".join(self.criteria))
        if self.after_samples is None:
            object.__setattr__(self, "after_samples", self.num_samples)
        if self.after is not None and (self.stream or self.fsdp):
            raise UsageError(f"{flag('score --after')} refits and scores the compensated model in memory, in one "
                             f"process; drop {flag('score --stream' if self.stream else 'score --fsdp')}")
        object.__setattr__(self, "accumulate", parse_choice(Accumulate, self.accumulate, flag("score --accumulate")))
        if self.stream:
            check_streamable(self.criteria)
        for name in ("num_samples", "seq_len", "batch_size", "fisher_windows", "after_samples"):
            if getattr(self, name) <= 0:
                option = flag(f"score --{name.replace('_', '-')}")
                raise UsageError(f"{option} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"{flag('score --seq-len')} must be at least 2, got {self.seq_len}")


def check_streamable(criteria) -> None:
    """Gradients need the whole model at once: a layer-streamed pass scores only the forward-only criteria."""
    if needs_gradients(criteria):
        backward = ",".join(c for c in criteria if REGISTRY[c].gradients)
        raise UsageError(
            f"--stream runs forward passes only, and {backward} needs gradients; score the forward-only criteria "
            f"with --criteria {','.join(FORWARD_ONLY)}, or drop --stream"
        )


def score(
    model,
    batches,
    criteria: tuple[str, ...] = DEFAULT_CRITERIA,
    seed: int = 0,
    calibration: dict | None = None,
    progress: bool = True,
    weights_fingerprint: str | None = None,
    accumulate: Accumulate = Accumulate.fp32,
    ranks: Ranks | None = None,
) -> ScoreResult:
    """Score every group of ``model`` over ``batches``: ``scoring.calibration.GradientGroup``s, or LongTensor token ids
    (B, L) that are each a group of their own. The tables record ``weights_fingerprint``, that of the checkpoint
    ``model`` was loaded from (``llamaprune.io.weights``). Under torchrun (``ranks``) each process passes its share
    of the batches and gets the table of all of them; a model sharded by ``scoring.sharded.shard_model`` has
    its gradients folded shard by shard."""
    from llamaprune.scoring.sharded import ShardedGradients, gathered, is_sharded, reduce_accumulators

    criteria = parse_criteria(",".join(criteria))
    shape = model_shape(model.config)
    specs = param_specs(model, shape)
    statistics = statistics_of(criteria)
    device = next(model.parameters()).device
    sharded = ShardedGradients(specs, ranks) if is_sharded(model) else None
    peak = PeakMemory(device, "scoring")
    start = time.perf_counter()
    acc = calibrate(model, batches, shape, specs, statistics, needs_gradients(criteria), progress,
                    Accumulate(accumulate).dtype, sharded)
    accumulator_bytes = _nbytes(acc)
    if ranks is not None:
        reduce_accumulators(acc, sharded)
    seconds = time.perf_counter() - start
    peak_bytes, peak_scope = peak.read()
    scores = _group_scores(map(gathered, specs) if sharded else specs, shape, acc, criteria, seed)
    meta = table_meta(model.config, shape, criteria, calibration, weights_fingerprint)
    return score_result(shape, specs, scores, acc, meta, seconds, peak_bytes, peak_scope, accumulator_bytes)


def score_result(shape: ModelShape, specs: list[ParamSpec], scores, acc: Accumulators, meta: dict, seconds: float,
                 peak_bytes: int, peak_scope: str, accumulator_bytes: int | None = None) -> ScoreResult:
    """The tables, with ``meta``, and stats of a finished pass, whole-model or layer-streamed;
    ``accumulator_bytes``: what the accumulators held before any reduction (default: what they hold now)."""
    return ScoreResult(
        groups=with_meta(groups_table(shape, scores, meta["criteria"]), meta),
        layers=with_meta(layers_table(shape, scores, {i: block_influence(c) for i, c in acc.cosines.items()},
                                      meta["criteria"]), meta),
        stats=_stats(specs, scores, acc),
        meta=meta,
        seconds=seconds,
        peak_memory_bytes=peak_bytes,
        peak_memory_scope=peak_scope,
        tokens=acc.tokens,
        accumulator_bytes=_nbytes(acc) if accumulator_bytes is None else accumulator_bytes,
    )


def _nbytes(acc: Accumulators) -> int:
    tensors = [*acc.inputs.values(), *acc.cosines.values()]
    tensors += [t for state in acc.gradients.values() for t in (state.wg, state.fisher)]
    return sum(t.numel() * t.element_size() for t in tensors)


def statistics_of(criteria) -> Statistics:
    """Input name -> the statistics a pass folds on it: those ``criteria`` read there, and those always recorded
    (``scoring.calibration.RECORDED_STATISTICS``, for bias compensation); nothing where nothing reads it."""
    wanted = input_statistics(criteria)
    return {name: tuple(dict.fromkeys((*wanted.get(name, ()), *RECORDED_STATISTICS.get(name, ()))))
            for name in INPUTS if name in wanted or name in RECORDED_STATISTICS}


def table_meta(config, shape: ModelShape, criteria, calibration: dict | None, weights: str | None = None) -> dict:
    counts = shape.counts()
    return {
        "schema_version": SCHEMA_VERSION,
        "llamaprune_version": __version__,
        "fingerprint": config_fingerprint(config),
        "weights_fingerprint": weights,
        "params": asdict(counts),
        "hidden_size": shape.hidden_size,
        "head_dim": shape.head_dim,
        "criteria": list(criteria),
        "calibration": calibration,
    }


def _group_scores(specs: Iterable[ParamSpec], shape: ModelShape, acc: Accumulators, criteria,
                  seed: int) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, kind, criterion) -> float64 per-group scores, each from its registered formula; ``specs`` is
    walked once (a sharded model's are gathered one at a time)."""
    scores = {**param_group_scores(specs, acc, criteria), **table_scores(shape, criteria, seed)}
    check_finite(scores)
    return scores


def param_group_scores(specs: Iterable[ParamSpec], acc: Accumulators,
                       criteria) -> dict[tuple[int, str, str], torch.Tensor]:
    """The per-parameter criteria's scores of ``specs`` (all the model's, or one layer's while only its weights are
    loaded): (layer, kind, criterion) -> float64 per-group scores, a group's weights and biases added up."""
    scores: dict[tuple[int, str, str], torch.Tensor] = {}
    per_param = [(c, REGISTRY[c].load()) for c in criteria if REGISTRY[c].scope != TABLE]
    for spec in specs:
        for criterion, formula in per_param:
            key = (spec.layer, spec.kind, criterion)
            value = formula(spec, acc).cpu()
            scores[key] = value if key not in scores else scores[key] + value
    return scores


def table_scores(shape: ModelShape, criteria, seed: int) -> dict[tuple[int, str, str], torch.Tensor]:
    """The table-scope criteria's scores (random): one draw over every group of the model, in table order."""
    scores: dict[tuple[int, str, str], torch.Tensor] = {}
    for criterion in (c for c in criteria if REGISTRY[c].scope == TABLE):
        draws = torch.from_numpy(REGISTRY[criterion].load()(sum(1 for _ in iter_groups(shape)), seed))
        offset = 0
        for layer, layer_shape in enumerate(shape.layers):
            for kind in (ATTN, MLP):
                count = layer_shape.groups(kind)
                scores[(layer, kind, criterion)] = draws[offset : offset + count]
                offset += count
    return scores


def check_finite(scores: dict[tuple[int, str, str], torch.Tensor]) -> None:
    """A NaN or infinite score is bad input (a dtype too narrow for the model), named by layer and kind."""
    for (layer, kind, criterion), value in scores.items():
        if not torch.isfinite(value).all():
            raise UsageError(
                f"non-finite {criterion} importance in layer {layer} ({kind}); score in float32 "
                f"(--dtype float32) or with a smaller {flag('score --batch-size')}"
            )


def groups_table(shape: ModelShape, scores, criteria) -> pa.Table:
    """groups.parquet's rows: every group of ``shape`` in table order, with its scores by criterion."""
    groups = list(iter_groups(shape))
    columns = {
        "group_id": [g.group_id for g in groups],
        "layer": [g.layer for g in groups],
        "kind": [g.kind for g in groups],
        "index": [g.index for g in groups],
        "params": [g.params for g in groups],
    }
    for criterion in criteria:
        parts = [
            scores[(layer, kind, criterion)]
            for layer, layer_shape in enumerate(shape.layers)
            for kind, count in ((ATTN, layer_shape.kv_groups), (MLP, layer_shape.mlp_channels))
            if count
        ]
        columns[criterion] = torch.cat(parts).tolist() if parts else []
    return pa.Table.from_pydict(columns, schema=groups_schema(criteria))


def layers_table(shape: ModelShape, scores, influence: dict[int, float | None], criteria) -> pa.Table:
    """layers.parquet's rows: each layer's widths and costs, its block ``influence`` and its groups' score sums."""
    rows = []
    for i, layer_shape in enumerate(shape.layers):
        row = {
            "layer": i,
            "num_attention_heads": layer_shape.num_attention_heads if layer_shape.kv_groups else 0,
            "attn_groups": layer_shape.kv_groups,
            "mlp_channels": layer_shape.mlp_channels,
            "attn_group_params": shape.attn_group_cost(i),
            "mlp_group_params": shape.mlp_group_cost(i),
            "attn_fixed_params": shape.attn_fixed_params(i),
            "mlp_fixed_params": shape.mlp_fixed_params(i),
            "block_influence": influence.get(i),
        }
        for criterion in criteria:
            row[criterion] = sum(
                float(scores[(i, kind, criterion)].sum()) for kind in (ATTN, MLP) if (i, kind, criterion) in scores
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=layers_schema(criteria))


def _stats(specs: list[ParamSpec], scores, acc: Accumulators) -> dict[str, torch.Tensor]:
    """Raw accumulators: per-group scores, Fisher sums, input statistics, cosine sums, token count."""
    stats = {f"{group_id(layer, kind, criterion)}": value for (layer, kind, criterion), value in scores.items()}
    for (layer, key, statistic), value in acc.inputs.items():
        if statistic not in TRANSIENT_STATISTICS:
            stats[f"layers.{layer}.{key}.{statistic}"] = value
    for layer, value in acc.cosines.items():
        stats[f"layers.{layer}.cosine_sum_count"] = value
    fisher: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name in acc.gradients:
            state, key = acc.gradients[spec.name], f"layers.{spec.layer}.{spec.kind}.fisher"
            fisher[key] = state.fisher if key not in fisher else fisher[key] + state.fisher
    stats.update(fisher)
    stats["tokens"] = torch.tensor([acc.tokens], dtype=torch.int64)
    return {k: v.detach().cpu().contiguous() for k, v in stats.items()}

