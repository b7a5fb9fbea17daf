"""Magnitude importance |w|: data-free baseline.

    >>> import torch
    >>> magnitude_score(torch.tensor([-1.0, 2.0]))
    tensor([1., 2.])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamaprune.scoring.importance import weight_group_sum

if TYPE_CHECKING:
    from llamaprune.scoring.accumulators import Accumulators, ParamSpec


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def magnitude_groups(spec: ParamSpec, acc: Accumulators) -> torch.Tensor:
    """The ``magnitude`` formula of one parameter: per-group sum of |w|."""
    return weight_group_sum(spec.param, spec.axis, spec.num_groups, magnitude_score)
