"""FLAP's fluctuation importance: how much an output projection's input channel varies over the calibration
tokens, weighted by the squared norm of the weight column it feeds, var(x_j) * ||W[:, j]||^2, summed over a
group's columns of o_proj / down_proj. A channel that barely moves is well replaced by its mean (an output
bias), so it is cheap to remove when compensated.

    >>> import torch
    >>> x = torch.tensor([[[1.0, 2.0], [3.0, 2.0]]])          # channel 0 varies, channel 1 is constant
    >>> sums, sq = accumulate_sum(x, None), (x ** 2).sum(dim=(0, 1))
    >>> fluctuation_score(torch.ones(3, 2), sq, sums, tokens=2).tolist()
    [3.0, 0.0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamaprune.core.arch import COLS
from llamaprune.scoring.importance import block_index_sums, group_sum, token_sums

if TYPE_CHECKING:
    from llamaprune.scoring.accumulators import Accumulators, ParamSpec


def accumulate_sum(x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """acc[j] += sum over tokens of x[..., j], in float64 (means are taken from it)."""
    total = token_sums(x.detach().reshape(-1, x.shape[-1]))
    return total if acc is None else acc.add_(total)


def fluctuation_score(weight: torch.Tensor, sq_norm: torch.Tensor, sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per input column j of a (out, in) weight: the variance of x_j over the tokens times ||W[:, j]||^2."""
    mean = sums / tokens
    variance = (sq_norm.double() / tokens - mean.square()).clamp_(min=0)
    return variance * block_index_sums(weight, COLS, lambda block: block.detach().double().square())


def fluctuation_groups(spec: ParamSpec, acc: Accumulators) -> torch.Tensor:
    """The ``fluctuation`` formula of one parameter: only the weights of o_proj / down_proj carry it."""
    if spec.is_bias or spec.axis != COLS:
        return torch.zeros(spec.num_groups, dtype=torch.float64)
    stats = [acc.inputs[(spec.layer, spec.input, name)] for name in ("sq_norm", "sum")]
    return group_sum(fluctuation_score(spec.param, *stats, acc.tokens), spec.axis, spec.num_groups)
