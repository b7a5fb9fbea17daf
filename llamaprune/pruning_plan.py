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
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from llamaprune.artifacts import SCHEMA_VERSION, atomic_write_bytes, plain_value
from llamaprune.errors import MissingInput, UsageError
from llamaprune.groups import LayerShape, model_shape
from llamaprune.model import config_fingerprint

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
        doc["layers"] = [{f.name: plain_value(getattr(lp, f.name)) for f in fields(LayerPlan)} for lp in self.layers]
        doc["kind"] = PLAN_KIND
        doc["removed_layers"] = self.removed_layers
        return doc

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (indices out of range or repeated, ...)."""
        _validate(self)


def plan_from_dict(doc: dict, origin: str = "plan") -> Plan:
    if not isinstance(doc, dict) or doc.get("kind") != PLAN_KIND:
        raise UsageError(f'{origin} is not a llamaprune plan (no "kind": "{PLAN_KIND}")')
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(
            f"{origin} has schema_version {doc.get('schema_version')}, this llamaprune reads "
            f"{SCHEMA_VERSION}; "
            f"make the plan again with `llamaprune plan`"
        )
    try:
        layers = tuple(
            LayerPlan(
                layer=int(lp["layer"]),
                num_attention_heads=int(lp["num_attention_heads"]),
                num_key_value_heads=int(lp["num_key_value_heads"]),
                intermediate_size=int(lp["intermediate_size"]),
                attn_groups=tuple(int(i) for i in lp["attn_groups"]),
                mlp_channels=tuple(int(i) for i in lp["mlp_channels"]),
                skip=tuple(lp.get("skip", ())),
                removed=bool(lp.get("removed", False)),
            )
            for lp in doc["layers"]
        )
        fields = {k: doc[k] for k in Plan.__dataclass_fields__ if k in doc and k != "layers"}
        plan = Plan(layers=layers, **fields)
    except (KeyError, TypeError) as err:
        raise UsageError(f"{origin} is missing or has a malformed field: {err}") from None
    _validate(plan, origin)
    return plan


def _validate(plan: Plan, origin: str = "plan") -> None:
    fp = plan.fingerprint
    if not isinstance(fp, dict) or not {"architecture", "config_hash", "num_parameters"} <= fp.keys():
        raise UsageError(f"{origin} has no model fingerprint (architecture, config_hash, num_parameters)")
    if [lp.layer for lp in plan.layers] != list(range(len(plan.layers))):
        raise UsageError(f"{origin}: layers must list every original layer once, in order 0..n-1")
    for lp in plan.layers:
        where = f"{origin}: layer {lp.layer}"
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
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err})") from None
    return plan_from_dict(doc, origin=str(path))


KeptIndices = Sequence[tuple[Sequence[int], Sequence[int]]]


def plan_from_kept(config, kept: KeptIndices, removed: Collection[int] = (), name: str = "manual") -> Plan:
    """A plan from the (KV heads, MLP channels) kept in each original layer, an empty list skipping that
    block: for hand-made plans in notebooks, tests and benchmarks (``llamaprune plan`` makes scored ones)."""
    shape = model_shape(config)
    if len(kept) != shape.num_hidden_layers:
        raise UsageError(f"kept lists {len(kept)} layers, the model has {shape.num_hidden_layers}")
    layers, shapes = [], []
    for i, ((attn, mlp), original) in enumerate(zip(kept, shape.layers, strict=True)):
        skip = tuple(block for block, keep in (("attention", attn), ("mlp", mlp)) if not keep)
        widths = (original.num_attention_heads, original.num_key_value_heads, original.intermediate_size)
        lp = LayerPlan(i, *widths, tuple(sorted(attn)), tuple(sorted(mlp)), skip, i in removed)
        layers.append(lp)
        if not lp.removed:
            shapes.append(LayerShape(lp.heads_kept, len(attn), len(mlp), skip))
    before, after = shape.counts(), replace(shape, layers=tuple(shapes)).counts()
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
