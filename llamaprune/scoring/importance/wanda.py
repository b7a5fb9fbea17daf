"""Wanda importance |w| * ||x||_2, with ||x|| the L2 norm of each input feature over all calibration tokens.

A bias is a weight on a constant input of 1, so its norm is sqrt(number of tokens).

    >>> import torch
    >>> acc = accumulate_sq_norm(torch.ones(2, 3, 4), None)      # 6 tokens of 4 features
    >>> wanda_score(torch.ones(2, 4), acc).sum()
    tensor(19.5959)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamaprune.scoring.importance import group_sum, token_sums, weight_group_sum

if TYPE_CHECKING:
    from llamaprune.scoring.accumulators import Accumulators, ParamSpec


def accumulate_sq_norm(x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """acc[j] += sum over tokens of x[..., j]^2, in float64: the fluctuation criterion subtracts the squared
    mean from it, which float32 sums over many tokens would not survive."""
    sq = token_sums(x.detach().float().reshape(-1, x.shape[-1]).square())
    return sq if acc is None else acc.add_(sq)


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Elementwise |W_ij| * ||x_j|| for a (out, in) weight."""
    return weight.detach().float().abs() * sq_norm.sqrt().float()[None, :]


def wanda_bias_score(bias: torch.Tensor, tokens: int) -> torch.Tensor:
    return bias.detach().float().abs() * (float(tokens) ** 0.5)


def wanda_groups(spec: ParamSpec, acc: Accumulators) -> torch.Tensor:
    """The ``wanda`` formula of one parameter: a weight against its input's norms, a bias against sqrt(tokens)."""
    if spec.is_bias:
        return group_sum(wanda_bias_score(spec.param, acc.tokens), spec.axis, spec.num_groups)
    sq_norm = acc.inputs[(spec.layer, spec.input, "sq_norm")]
    return weight_group_sum(spec.param, spec.axis, spec.num_groups, lambda block: wanda_score(block, sq_norm))
