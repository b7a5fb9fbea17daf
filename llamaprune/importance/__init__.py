"""Importance criteria: one module per criterion, pure tensor math that tests check against closed forms.

Every criterion produces an elementwise score over a weight (or bias) and is reduced to one number per
group with :func:`group_sum`; hooks in ``llamaprune.calibrate`` only route tensors here. Each module's
``*_groups`` function is the formula that ``llamaprune.criteria`` registers.

    >>> import torch
    >>> group_sum(torch.ones(4, 3), axis=ROWS, num_groups=2)
    tensor([6., 6.], dtype=torch.float64)
"""

from __future__ import annotations

import torch

from llamaprune.arch import ROWS


def index_sums(score: torch.Tensor, axis: str) -> torch.Tensor:
    """Sum an elementwise score over each row (or column), in float64: per-index sums add up over shards of a
    weight's other axis, and group into ``group_sum``."""
    if score.dim() == 2:
        return score.sum(dim=1 if axis == ROWS else 0, dtype=torch.float64)
    return score.double()


def group_sum(score: torch.Tensor, axis: str, num_groups: int) -> torch.Tensor:
    """Sum an elementwise score over each group's contiguous block of rows or columns, in float64."""
    return index_sums(score, axis).view(num_groups, -1).sum(dim=1)
