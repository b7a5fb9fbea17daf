"""Magnitude importance |w|: data-free baseline.

    >>> import torch
    >>> magnitude_score(torch.tensor([-1.0, 2.0]))
    tensor([1., 2.])
"""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()
