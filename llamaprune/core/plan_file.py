"""The pruning plan document: what each original layer keeps, as versioned, self-contained JSON.

A plan is made by ``llamaprune plan`` (phase 2) and read by ``apply`` (phase 3), possibly on another
machine with only the plan file and the checkpoint. No torch here.

    >>> plan = read_plan("artifacts/run1/plans/global-taylor-0.20.json")   # doctest: +SKIP
    >>> plan.params_after < plan.params_before, plan.removed_layers        # doctest: +SKIP
    (True, [])
    >>> plan = plan_from_kept(config, [([0, 2], [1, 5, 7]), ([], list(range(64)))])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from llamaprune.core.artifacts import SCHEMA_VERSION, atomic_write_bytes, plain_value
from llamaprune.core.errors import MissingInput, UsageError
from llamaprune.core.groups import LayerShape, ModelShape, config_fingerprint, model_shape
from llamaprune.core.user_files import read_json

PLAN_KIND = "llamaprune-plan"
SKIPPABLE = ("attention", "mlp")


@dataclass(frozen=True)
class LayerPlan:
    """What one original decoder layer keeps; kept indices are sorted and refer to the original layer."""

    layer: int
    num_attention_heads: int  # original width
    num_key_value_heads: int  # original width, for validation
    intermediate_size: int  # original width, for validation
    attn_groups: tuple[int, ...]
    mlp_channels: tuple[int, ...]
    skip: tuple[str, ...] = ()
    removed: bool = False

    @property
    def heads_kept(self) -> int:
        """Query heads kept: each kept KV group brings num_attention_heads / num_key_value_heads of them."""
        if not self.num_key_value_heads:
            return 0
        return len(self.attn_groups) * self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class Plan:
    """A self-contained pruning plan (docs/ARTIFACTS.md); ``layers`` covers every original layer in order."""

    name: str
    fingerprint: dict
    source_table_sha256: str
    criterion: str
    strategy: str
    options: dict
    target_ratio: float
    achieved_ratio: float
    achieved_prunable_ratio: float
    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int
    head_dim: int
    layers: tuple[LayerPlan, ...]
    schema_version: int = SCHEMA_VERSION
    created_by: str = field(default="")
    weights_fingerprint: str | None = None  # of the checkpoint scored (llamaprune.io.weights); None: not known
    # How apply chose the kept indices in its compensation pass (``apply --select obs``); None: as planned.
    selection: dict | None = None

    @property
    def removed_layers(self) -> list[int]:
        return [lp.layer for lp in self.layers if lp.removed]

    @property
    def is_empty(self) -> bool:
        """True when the plan keeps everything (the identity)."""
        return all(
            not lp.removed
            and not lp.skip
            and len(lp.attn_groups) == lp.num_key_value_heads
            and len(lp.mlp_channels) == lp.intermediate_size
            for lp in self.layers
        )

    def to_dict(self) -> dict:
        """Plain JSON values, built by hand: ``dataclasses.asdict`` deep-copies every index (1.3 s at 70B)."""
        doc = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "layers"}
        for name in ("weights_fingerprint", "selection"):  # a plan without them reads as before the fields existed
            if doc[name] is None:
                del doc[name]
        doc["layers"] = [{f.name: plain_value(getattr(lp, f.name)) for f in fields(LayerPlan)} for lp in self.layers]
        doc["kind"] = PLAN_KIND
        doc["removed_layers"] = self.removed_layers
        return doc

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (indices out of range or repeated, ...)."""
        _validate(self)


# The JSON type of each field of a plan (docs/ARTIFACTS.md, "Plans"); another type is refused, never coerced
# (3.9 is not the index 3, "false" is not false).
INT, NUMBER, TEXT, OBJECT, FLAG = "an integer", "a finite number", "a string", "an object", "true or false"
INDICES, NAMES = "a list of integers", "a list of strings"
PLAN_FIELDS = {
    "name": TEXT, "fingerprint": OBJECT, "source_table_sha256": TEXT, "criterion": TEXT, "strategy": TEXT,
    "options": OBJECT, "target_ratio": NUMBER, "achieved_ratio": NUMBER, "achieved_prunable_ratio": NUMBER,
    "params_before": INT, "params_after": INT, "prunable_before": INT, "prunable_after": INT, "head_dim": INT,
    "created_by": TEXT, "weights_fingerprint": TEXT, "selection": OBJECT, "removed_layers": INDICES,
}
LAYER_FIELDS = {
    "layer": INT, "num_attention_heads": INT, "num_key_value_heads": INT, "intermediate_size": INT,
    "attn_groups": INDICES, "mlp_channels": INDICES, "skip": NAMES, "removed": FLAG,
}
OPTIONAL = {"created_by", "weights_fingerprint", "selection", "removed_layers", "skip", "removed"}  # may be left out
NULLABLE = {"weights_fingerprint", "selection"}  # may be null: unknown, or as planned
REMAKE = "make the plan again with `llamaprune plan`"


def _has_type(value, kind: str) -> bool:
    if kind == INT:
        return type(value) is int
    if kind == NUMBER:
        return type(value) in (int, float) and math.isfinite(value)
    if kind == TEXT:
        return isinstance(value, str)
    if kind == OBJECT:
        return isinstance(value, dict)
    if kind == FLAG:
        return type(value) is bool
    item = int if kind == INDICES else str
    return isinstance(value, list) and all(type(i) is item for i in value)


def _check_types(doc: dict, spec: dict[str, str], where: str) -> None:
    for key, kind in spec.items():
        if key not in doc:
            if key not in OPTIONAL:
                raise UsageError(f"{where} has no {key!r}; {REMAKE}")
        elif not (_has_type(doc[key], kind) or (doc[key] is None and key in NULLABLE)):
            raise UsageError(f"{where}: {key} must be {kind}, not {_shown(doc[key])}; {REMAKE}")


def _shown(value) -> str:
    """A JSON value for a message: one line, at most 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def plan_from_dict(doc: dict, origin: str = "plan") -> Plan:
    """A plan from its JSON document, every field of the expected type and the whole consistent (``validate``)."""
    if not isinstance(doc, dict) or doc.get("kind") != PLAN_KIND:
        raise UsageError(f'{origin} is not a llamaprune plan (no "kind": "{PLAN_KIND}")')
    if type(doc.get("schema_version")) is not int or doc["schema_version"] != SCHEMA_VERSION:
        raise UsageError(
            f"{origin} has schema_version {_shown(doc.get('schema_version'))}, this llamaprune reads "
            f"{SCHEMA_VERSION}; "
            f"make the plan again with `llamaprune plan`"
        )
    _check_types(doc, PLAN_FIELDS, origin)
    if not isinstance(doc.get("layers"), list):
        raise UsageError(f"{origin}: layers must be a list with one entry per original layer; {REMAKE}")
    layers = []
    for i, lp in enumerate(doc["layers"]):
        where = f"{origin}: layers[{i}]"
        if not isinstance(lp, dict):
            raise UsageError(f"{where} must be an object; {REMAKE}")
        unknown = sorted(lp.keys() - LAYER_FIELDS.keys())
        if unknown:
            raise UsageError(f"{where} has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(LAYER_FIELDS)}")
        _check_types(lp, LAYER_FIELDS, where)
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in lp.items()}
        layers.append(LayerPlan(**{"skip": (), "removed": False, **values}))
    known = {key: doc[key] for key in PLAN_FIELDS if key in doc and key != "removed_layers"}
    plan = Plan(layers=tuple(layers), **known)
    _validate(plan, origin)
    if doc.get("removed_layers", plan.removed_layers) != plan.removed_layers:
        raise UsageError(
            f"{origin}: removed_layers {_shown(doc['removed_layers'])} disagrees with the layers marked removed "
            f"{_shown(plan.removed_layers)}; {REMAKE}"
        )
    return plan


def _validate(plan: Plan, origin: str = "plan") -> None:
    fp = plan.fingerprint
    if not isinstance(fp, dict) or not {"architecture", "config_hash", "num_parameters"} <= fp.keys():
        raise UsageError(f"{origin} has no model fingerprint (architecture, config_hash, num_parameters)")
    if [lp.layer for lp in plan.layers] != list(range(len(plan.layers))):
        raise UsageError(f"{origin}: layers must list every original layer once, in order 0..n-1")
    if plan.head_dim <= 0:
        raise UsageError(f"{origin}: head_dim must be positive, not {plan.head_dim}; {REMAKE}")
    for lp in plan.layers:
        where = f"{origin}: layer {lp.layer}"
        widths = (lp.num_attention_heads, lp.num_key_value_heads, lp.intermediate_size)
        if min(widths) < 0:  # whether they are the model's, apply checks (check_shape)
            raise UsageError(f"{where}: num_attention_heads, num_key_value_heads, intermediate_size {widths} "
                             f"must not be negative; {REMAKE}")
        for name, kept, width in (
            ("attn_groups", lp.attn_groups, lp.num_key_value_heads),
            ("mlp_channels", lp.mlp_channels, lp.intermediate_size),
        ):
            if list(kept) != sorted(set(kept)):
                raise UsageError(f"{where}: {name} must be sorted and unique")
            if kept and (kept[0] < 0 or kept[-1] >= width):
                raise UsageError(f"{where}: {name} index out of range [0, {width})")
        unknown = set(lp.skip) - set(SKIPPABLE)
        if unknown:
            raise UsageError(f"{where}: unknown skip {sorted(unknown)}; allowed: {', '.join(SKIPPABLE)}")
        if ("attention" in lp.skip) != (not lp.attn_groups) and not lp.removed:
            raise UsageError(f"{where}: attention must be skipped exactly when no attention group is kept")
        if ("mlp" in lp.skip) != (not lp.mlp_channels) and not lp.removed:
            raise UsageError(f"{where}: mlp must be skipped exactly when no MLP channel is kept")
    if all(lp.removed for lp in plan.layers):
        raise UsageError(f"{origin} removes every layer; choose a smaller ratio")
    if not 0 <= plan.params_after <= plan.params_before:
        raise UsageError(f"{origin}: params_after must lie in [0, params_before]")
    if not 0 <= plan.prunable_after <= plan.prunable_before <= plan.params_before or not 0 <= plan.target_ratio < 1:
        raise UsageError(f"{origin}: prunable_after <= prunable_before <= params_before and 0 <= target_ratio < 1 "
                         f"do not hold; {REMAKE}")
    for name, value, removed, before in (
        ("achieved_ratio", plan.achieved_ratio, plan.params_before - plan.params_after, plan.params_before),
        ("achieved_prunable_ratio", plan.achieved_prunable_ratio, plan.prunable_before - plan.prunable_after,
         plan.prunable_before),
    ):
        if not math.isclose(value, removed / before if before else 0.0, rel_tol=0, abs_tol=1e-9):
            raise UsageError(f"{origin}: {name} {value} disagrees with its parameter counts; {REMAKE}")


def check_shape(plan: Plan, config, origin: str = "plan") -> None:
    """Refuse a plan whose layers are not this model's (their count, widths and head counts, ``head_dim``) or
    whose parameter counts are not what its kept lists give on this model: a plan edited by hand may keep its
    fingerprint and still describe another model."""
    shape = model_shape(config)
    fix = "make the plan for this model with `llamaprune score` and `llamaprune plan`"
    if len(plan.layers) != shape.num_hidden_layers:
        raise UsageError(f"{origin} has {len(plan.layers)} layers, the model {shape.num_hidden_layers}; {fix}")
    for lp, layer in zip(plan.layers, shape.layers, strict=True):
        planned = (lp.num_attention_heads, lp.num_key_value_heads, lp.intermediate_size)
        actual = (layer.num_attention_heads if layer.kv_groups else 0, layer.kv_groups, layer.mlp_channels)
        if planned != actual:
            raise UsageError(
                f"{origin}: layer {lp.layer} has (num_attention_heads, num_key_value_heads, intermediate_size) "
                f"{planned}, the model {actual}; {fix}"
            )
    if plan.head_dim != shape.head_dim:
        raise UsageError(f"{origin} has head_dim {plan.head_dim}, the model {shape.head_dim}; {fix}")
    before, after = shape.counts(), kept_shape(shape, plan.layers).counts()
    for name, value, expected in (
        ("params_before", plan.params_before, before.total),
        ("prunable_before", plan.prunable_before, before.prunable),
        ("params_after", plan.params_after, after.total),
        ("prunable_after", plan.prunable_after, after.prunable),
    ):
        if value != expected:
            raise UsageError(f"{origin}: {name} is {value}, but its layers give {expected} on this model; {fix}")


def kept_shape(shape: ModelShape, layers: Sequence[LayerPlan]) -> ModelShape:
    """The shape of ``shape``'s model after the plan ``layers``: removed layers gone, the rest narrowed."""
    kept = [
        LayerShape(lp.heads_kept, len(lp.attn_groups), len(lp.mlp_channels), lp.skip)
        for lp in layers
        if not lp.removed
    ]
    return replace(shape, layers=tuple(kept))


def write_plan(plan: Plan, path: Path) -> None:
    plan.validate()
    atomic_write_bytes(Path(path), plan_json(plan).encode())


def plan_json(plan: Plan) -> str:
    """Indented JSON with one line per layer: readable, and small even with 28672-channel lists."""
    doc = plan.to_dict()
    layers = doc.pop("layers")
    body = ",\n".join("    " + json.dumps(lp) for lp in layers)
    return json.dumps(doc, indent=2)[:-2] + f',\n  "layers": [\n{body}\n  ]\n}}\n'


def read_plan(path: Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"plan not found: {path}; make one with `llamaprune plan RUN_DIR --ratio R`")
    doc = read_json(path, "make the plan again with `llamaprune plan`")
    return plan_from_dict(doc, origin=str(path))


KeptIndices = Sequence[tuple[Sequence[int], Sequence[int]]]


def check_plan(plan: Plan, config, what: str = "plan") -> None:
    """Refuse a plan made for another model, naming both fingerprints, or one whose layers are not this
    model's (``check_shape``)."""
    from llamaprune.core.tables import check_fingerprint

    check_fingerprint(plan.fingerprint, config_fingerprint(config), what)
    check_shape(plan, config, what)


def plan_from_kept(config, kept: KeptIndices, removed: Collection[int] = (), name: str = "manual") -> Plan:
    """A plan from the (KV heads, MLP channels) kept in each original layer, an empty list skipping that
    block: for hand-made plans in notebooks, tests and benchmarks (``llamaprune plan`` makes scored ones)."""
    shape = model_shape(config)
    if len(kept) != shape.num_hidden_layers:
        raise UsageError(f"kept lists {len(kept)} layers, the model has {shape.num_hidden_layers}")
    layers = []
    for i, ((attn, mlp), original) in enumerate(zip(kept, shape.layers, strict=True)):
        skip = tuple(block for block, keep in (("attention", attn), ("mlp", mlp)) if not keep)
        heads = original.num_attention_heads if original.kv_groups else 0
        widths = (heads, original.kv_groups, original.mlp_channels)  # what a layer of the model has (0: skipped)
        layers.append(LayerPlan(i, *widths, tuple(sorted(attn)), tuple(sorted(mlp)), skip, i in removed))
    before, after = shape.counts(), kept_shape(shape, layers).counts()
    plan = Plan(
        name=name,
        fingerprint=config_fingerprint(config),
        source_table_sha256="",
        criterion="manual",
        strategy="manual",
        options={},
        target_ratio=1 - after.total / before.total,
        achieved_ratio=1 - after.total / before.total,
        achieved_prunable_ratio=1 - after.prunable / before.prunable,
        params_before=before.total,
        params_after=after.total,
        prunable_before=before.prunable,
        prunable_after=after.prunable,
        head_dim=shape.head_dim,
        layers=tuple(layers),
    )
    plan.validate()
    return plan
