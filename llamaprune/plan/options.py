"""Planning options: the strategies, ``PlanOptions`` (checked on creation) and parsers for the CLI's option strings.

``ratio`` is always the fraction of the model's *total* parameters to remove.

    >>> PlanOptions(ratio=0.2, strategy="layerwise", distribution=parse_distribution("2:8")).distribution
    (2, 8)
    >>> parse_ratios("0.1:0.3:0.1")
    [0.1, 0.2, 0.3]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum

from llamaprune.core.artifacts import plain_value
from llamaprune.core.choices import parse_choice
from llamaprune.core.errors import UsageError, flag

BLOCK_INFLUENCE = "block_influence"


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
    group (hundreds of times an MLP channel's cost) before any MLP channel. ``standard``: a group's score is its
    z-score within its layer and kind (FLAP's adaptive structure search), so every layer and kind is ranked on the
    same scale, its spread included."""

    none = "none"
    mean = "mean"
    standard = "standard"


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
            object.__setattr__(self, name, parse_choice(enum, getattr(self, name), _flag(name)))
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
            f"{_flag('ratio')} {options.ratio} is outside (0, 1): it is the fraction of the model's total parameters "
            f"to remove, e.g. {_flag('ratio')} 0.2"
        )
    for name in ("freeze_top_n", "min_kv_heads", "min_mlp_channels"):
        if getattr(options, name) < 0:
            raise UsageError(f"{_flag(name)} {getattr(options, name)} is negative; use 0 or more")
    if options.round_to < 1:
        raise UsageError(f"{_flag('round_to')} {options.round_to} must be 1 or more (1 keeps any MLP width)")
    dist = options.distribution
    if dist is not None and (len(dist) != 2 or min(dist) < 0 or sum(dist) == 0):
        shown = ":".join(map(str, dist))
        raise UsageError(f"{_flag('distribution')} {shown} must be two non-negative shares A:M, not both 0, e.g. 2:8")
    if options.uniform and (options.protect_layers or options.freeze_top_n or options.remove_empty_layers):
        raise UsageError(
            f"{_flag('uniform')} gives every layer the same shape, so it cannot be combined with "
            f"{_flag('protect_layers')}, {_flag('freeze_top_n')} or {_flag('remove_empty_layers')}; drop one of them"
        )


def _flag(name: str) -> str:
    """The flag of the option ``name`` of PlanOptions, as the running command spells it."""
    return flag(f"plan --{name.replace('_', '-')}")


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
        raise UsageError(f"{_flag('distribution')} {spec!r} is not A:M with integer shares, e.g. 2:8 or 0:10") from None
    return attn, mlp
