"""What a calibration pass accumulates, and the prunable parameters it accumulates for: plain data shared by the
hooks (``scoring.calibration``), the formulas (``scoring.importance``) and the collectives that add shards up.

    >>> acc = Accumulators()
    >>> acc.tokens, acc.inputs
    (0, {})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamaprune.core.arch import Linear


@dataclass
class GradientState:
    """Running sums for one parameter: w*G elementwise (float32 unless asked otherwise), and the per-group Fisher
    term. Sharded scoring (``llamaprune.scoring.sharded``) hands the formulas ``wg`` already reduced to per-index
    sums of |w*G|, which group the same way."""

    wg: torch.Tensor
    fisher: torch.Tensor


@dataclass(frozen=True)
class ParamSpec:
    """A prunable weight or bias of one layer, with the module (``linear``) it belongs to."""

    name: str
    param: torch.nn.Parameter
    layer: int
    linear: Linear
    num_groups: int

    @property
    def kind(self) -> str:
        return self.linear.kind

    @property
    def axis(self) -> str:
        return self.linear.axis

    @property
    def input(self) -> str:
        return self.linear.input

    @property
    def is_bias(self) -> bool:
        return self.param.dim() == 1


@dataclass
class Accumulators:
    """Everything the hooks fold batches into. Each entry adds up over shards of calibration data (a gradient
    state keeps the summed w*G itself: |w*G| is taken only when the scores are made)."""

    inputs: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)  # (layer, input, statistic)
    cosines: dict[int, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, GradientState] = field(default_factory=dict)  # by ParamSpec.name
    tokens: int = 0
