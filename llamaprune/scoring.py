"""Phase 1: run calibration batches through the model once and measure every group's importance and cost.

One pass computes every requested criterion: forward pre-hooks collect input norms (wanda) and layer
in/out cosines (block influence); when a gradient criterion is asked for, each batch's loss is
backpropagated and a post-accumulate-grad hook folds each parameter's gradient into running sums and
frees it at once. Embeddings, norms and lm_head get no gradient at all.

    >>> result = score(model, batches, criteria=("taylor", "wanda"))    # doctest: +SKIP
    >>> result.groups.num_rows == layers * (kv_heads + intermediate_size)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import torch

from llamaprune import __version__
from llamaprune.artifacts import SCHEMA_VERSION
from llamaprune.errors import UsageError
from llamaprune.groups import ATTN, MLP, ModelShape, group_id, iter_groups, model_shape
from llamaprune.importance import COLS, ROWS, group_sum
from llamaprune.importance.influence import accumulate_cosine, block_influence
from llamaprune.importance.magnitude import magnitude_score
from llamaprune.importance.random import random_scores
from llamaprune.importance.taylor import GradientState, first_order, fold_gradient, new_state
from llamaprune.importance.wanda import accumulate_sq_norm, wanda_bias_score, wanda_score
from llamaprune.model import Device, DType, config_fingerprint
from llamaprune.peak_memory import PeakMemory
from llamaprune.table import CRITERIA, groups_schema, layers_schema, with_meta

GRADIENT_CRITERIA = ("taylor", "taylor2")
STATS_FILE = "stats.safetensors"


@dataclass(frozen=True)
class ParamSpec:
    """A prunable weight or bias: which layer and kind of group owns it, along which axis, and whose
    input norm wanda uses (``input_key``: "attn_in", "o_in", "mlp_in", "down_in")."""

    name: str
    param: torch.nn.Parameter
    layer: int
    kind: str
    axis: str
    input_key: str
    num_groups: int

    @property
    def is_bias(self) -> bool:
        return self.param.dim() == 1


@dataclass
class ScoreResult:
    """Phase 1 output: the two tables (with metadata) and the raw accumulators for stats.safetensors."""

    groups: pa.Table
    layers: pa.Table
    stats: dict[str, torch.Tensor]
    meta: dict
    seconds: float
    peak_memory_bytes: int
    peak_memory_scope: str  # "scoring", or "process" where the peak could not be reset (llamaprune.peak_memory)
    tokens: int


@dataclass(frozen=True)
class ScoreOptions:
    """What ``llamaprune score`` measures and on what calibration text."""

    model: str
    dataset: str = "wikitext2"
    num_samples: int = 128
    seq_len: int = 128
    batch_size: int = 8
    criteria: tuple[str, ...] = CRITERIA
    seed: int = 0
    dtype: DType = DType.float32
    device: Device = Device.cpu
    data_dir: str | None = None

    def __post_init__(self) -> None:
        parse_criteria(",".join(self.criteria))
        for name in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.seq_len}")


def parse_criteria(text: str) -> tuple[str, ...]:
    """``"taylor,wanda"`` -> ("taylor", "wanda") in canonical order; unknown names are an error."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CRITERIA]
    if unknown or not names:
        raise UsageError(f"unknown criterion {', '.join(unknown) or '(none)'}; choose from {', '.join(CRITERIA)}")
    return tuple(c for c in CRITERIA if c in names)


def param_specs(model, shape: ModelShape) -> list[ParamSpec]:
    """Every prunable weight and bias of the decoder layers, with the group axis it is cut along."""
    specs = []
    layers = model.base_model.layers
    for i, layer_shape in enumerate(shape.layers):
        block = layers[i]
        parts = []
        if layer_shape.kv_groups:
            attn = block.self_attn
            qkv = ("q_proj", "k_proj", "v_proj")
            parts += [(f"self_attn.{n}", getattr(attn, n), ATTN, ROWS, "attn_in") for n in qkv]
            parts.append(("self_attn.o_proj", attn.o_proj, ATTN, COLS, "o_in"))
        if layer_shape.mlp_channels:
            mlp = block.mlp
            parts += [(f"mlp.{n}", getattr(mlp, n), MLP, ROWS, "mlp_in") for n in ("gate_proj", "up_proj")]
            parts.append(("mlp.down_proj", mlp.down_proj, MLP, COLS, "down_in"))
        for name, linear, kind, axis, key in parts:
            groups = layer_shape.kv_groups if kind == ATTN else layer_shape.mlp_channels
            specs.append(ParamSpec(f"layers.{i}.{name}.weight", linear.weight, i, kind, axis, key, groups))
            if linear.bias is not None and axis == ROWS:  # an output bias of o/down belongs to no group
                specs.append(ParamSpec(f"layers.{i}.{name}.bias", linear.bias, i, kind, axis, key, groups))
    return specs


@dataclass
class _Accumulators:
    """Everything the hooks fold batches into."""

    sq_norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    cosines: dict[int, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, GradientState] = field(default_factory=dict)
    tokens: int = 0


def _install_hooks(model, shape: ModelShape, specs: list[ParamSpec], acc: _Accumulators, need_grad: bool):
    handles = []
    layers = model.base_model.layers

    def norm_hook(key):
        def hook(module, args):
            acc.sq_norms[key] = accumulate_sq_norm(args[0], acc.sq_norms.get(key))

        return hook

    def influence_hook(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            acc.cosines[i] = accumulate_cosine(x_in, x_out, acc.cosines.get(i))

        return hook

    for i, layer_shape in enumerate(shape.layers):
        block = layers[i]
        handles.append(block.register_forward_hook(influence_hook(i), with_kwargs=True))
        if layer_shape.kv_groups:
            handles.append(block.self_attn.q_proj.register_forward_pre_hook(norm_hook((i, "attn_in"))))
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(norm_hook((i, "o_in"))))
        if layer_shape.mlp_channels:
            handles.append(block.mlp.gate_proj.register_forward_pre_hook(norm_hook((i, "mlp_in"))))
            handles.append(block.mlp.down_proj.register_forward_pre_hook(norm_hook((i, "down_in"))))

    if need_grad:
        for spec in specs:
            acc.gradients[spec.name] = new_state(spec.param, spec.num_groups)

            def grad_hook(param, spec=spec):
                fold_gradient(param, param.grad, acc.gradients[spec.name], spec.axis, spec.num_groups)
                param.grad = None

            handles.append(spec.param.register_post_accumulate_grad_hook(grad_hook))
    return handles


def score(
    model,
    batches,
    criteria: tuple[str, ...] = CRITERIA,
    seed: int = 0,
    calibration: dict | None = None,
    progress: bool = True,
) -> ScoreResult:
    """Score every group of ``model`` over ``batches`` (LongTensor token ids, each (B, L))."""
    from tqdm.auto import tqdm

    criteria = parse_criteria(",".join(criteria))
    shape = model_shape(model.config)
    specs = param_specs(model, shape)
    need_grad = any(c in GRADIENT_CRITERIA for c in criteria)
    device = next(model.parameters()).device
    acc = _Accumulators()
    saved_requires_grad = {p: p.requires_grad for p in model.parameters()}
    prunable = {id(s.param) for s in specs}
    for p in model.parameters():
        p.requires_grad_(need_grad and id(p) in prunable)
    handles = _install_hooks(model, shape, specs, acc, need_grad)
    was_training = model.training
    model.eval()
    peak = PeakMemory(device, "scoring")
    start = time.perf_counter()
    try:
        for step, batch in enumerate(tqdm(batches, desc="score", unit="batch", disable=not progress)):
            batch = batch.to(device)
            acc.tokens += batch.numel()
            if need_grad:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise UsageError(
                        f"calibration loss is {loss.item()} at batch {step}; score in float32 "
                        f"(--dtype float32) or with a smaller --batch-size"
                    )
                loss.backward()
            else:
                with torch.no_grad():
                    model.base_model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_requires_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    seconds = time.perf_counter() - start
    peak_bytes, peak_scope = peak.read()
    scores = _group_scores(specs, shape, acc, criteria, seed)
    meta = table_meta(model.config, shape, criteria, calibration)
    return ScoreResult(
        groups=with_meta(_groups_table(shape, scores, criteria), meta),
        layers=with_meta(_layers_table(shape, scores, acc, criteria), meta),
        stats=_stats(scores, acc),
        meta=meta,
        seconds=seconds,
        peak_memory_bytes=peak_bytes,
        peak_memory_scope=peak_scope,
        tokens=acc.tokens,
    )


def table_meta(config, shape: ModelShape, criteria, calibration: dict | None) -> dict:
    counts = shape.counts()
    return {
        "schema_version": SCHEMA_VERSION,
        "llamaprune_version": __version__,
        "fingerprint": config_fingerprint(config),
        "params": asdict(counts),
        "hidden_size": shape.hidden_size,
        "head_dim": shape.head_dim,
        "criteria": list(criteria),
        "calibration": calibration,
    }


def _group_scores(specs, shape, acc: _Accumulators, criteria, seed) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, kind, criterion) -> float64 per-group scores."""
    scores: dict[tuple[int, str, str], torch.Tensor] = {}

    def add(spec: ParamSpec, criterion: str, value: torch.Tensor) -> None:
        key = (spec.layer, spec.kind, criterion)
        scores[key] = value.cpu() if key not in scores else scores[key] + value.cpu()

    for spec in specs:
        w, axis, n = spec.param, spec.axis, spec.num_groups
        if "magnitude" in criteria:
            add(spec, "magnitude", group_sum(magnitude_score(w), axis, n))
        if "wanda" in criteria:
            if spec.is_bias:
                value = wanda_bias_score(w, acc.tokens)
            else:
                value = wanda_score(w, acc.sq_norms[(spec.layer, spec.input_key)])
            add(spec, "wanda", group_sum(value, axis, n))
        state = acc.gradients.get(spec.name)
        if "taylor" in criteria or "taylor2" in criteria:
            first = first_order(state, axis, n)
            if "taylor" in criteria:
                add(spec, "taylor", first)
            if "taylor2" in criteria:
                add(spec, "taylor2", first + state.fisher.cpu())
    if "random" in criteria:
        draws = torch.from_numpy(random_scores(sum(1 for _ in iter_groups(shape)), seed))
        offset = 0
        for layer, layer_shape in enumerate(shape.layers):
            for kind, count in ((ATTN, layer_shape.kv_groups), (MLP, layer_shape.mlp_channels)):
                scores[(layer, kind, "random")] = draws[offset : offset + count]
                offset += count
    for (layer, kind, criterion), value in scores.items():
        if not torch.isfinite(value).all():
            raise UsageError(
                f"non-finite {criterion} importance in layer {layer} ({kind}); score in float32 "
                f"(--dtype float32) or with a smaller --batch-size"
            )
    return scores


def _groups_table(shape: ModelShape, scores, criteria) -> pa.Table:
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


def _layers_table(shape: ModelShape, scores, acc: _Accumulators, criteria) -> pa.Table:
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
            "block_influence": block_influence(acc.cosines[i]) if i in acc.cosines else None,
        }
        for criterion in criteria:
            row[criterion] = sum(
                float(scores[(i, kind, criterion)].sum()) for kind in (ATTN, MLP) if (i, kind, criterion) in scores
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=layers_schema(criteria))


def _stats(scores, acc: _Accumulators) -> dict[str, torch.Tensor]:
    """Raw accumulators: per-group scores, Fisher sums, input square norms, cosine sums, token count."""
    stats = {f"{group_id(layer, kind, criterion)}": value for (layer, kind, criterion), value in scores.items()}
    for (layer, key), value in acc.sq_norms.items():
        stats[f"layers.{layer}.{key}.sq_norm"] = value
    for layer, value in acc.cosines.items():
        stats[f"layers.{layer}.cosine_sum_count"] = value
    fisher: dict[str, torch.Tensor] = {}
    for name, state in acc.gradients.items():
        layer, kind = _owner(name)
        key = f"layers.{layer}.{kind}.fisher"
        fisher[key] = state.fisher if key not in fisher else fisher[key] + state.fisher
    stats.update(fisher)
    stats["tokens"] = torch.tensor([acc.tokens], dtype=torch.int64)
    return {k: v.detach().cpu().contiguous() for k, v in stats.items()}


def _owner(param_name: str) -> tuple[int, str]:
    parts = param_name.split(".")
    return int(parts[1]), ATTN if parts[2] == "self_attn" else MLP
