"""Importance criteria: one module per criterion, pure tensor math that tests check against closed forms.

Every criterion produces an elementwise score over a weight (or bias) and is reduced to one number per
group with :func:`group_sum` (or, for a score computed from the weight alone, :func:`weight_group_sum`, which
takes it a block of rows at a time); hooks in ``llamaprune.scoring.calibration`` only route tensors here. Each module's
``*_groups`` function is the formula that ``llamaprune.core.criteria`` registers.

    >>> import torch
    >>> group_sum(torch.ones(4, 3), axis=ROWS, num_groups=2)
    tensor([6., 6.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamaprune.core.arch import ROWS

# Tokens summed in float32 before the float64 total (``token_sums``): ~1e-6 relative at worst.
TOKEN_CHUNK = 256


def token_sums(values: torch.Tensor) -> torch.Tensor:
    """Column sums of (tokens, features) ``values`` in float64, from float32 partial sums of at most
    ``TOKEN_CHUNK`` tokens: a float64 reduction over the tokens converts element by element and costs about 4x,
    which each calibration batch's hooks would pay on every layer's inputs. float64 values are summed as they are.

    The partial sums of the whole chunks are one reduction over a (chunks, TOKEN_CHUNK, features) view, not one per
    chunk: the hooks call this on every layer's inputs for every batch, and a batch of 8 windows of 2048 tokens
    would otherwise be 64 reductions (kernel launches on a GPU) per input."""
    if values.dtype == torch.float64:
        return values.sum(dim=0)
    values = values.float()
    tokens, features = values.shape
    whole = tokens - tokens % TOKEN_CHUNK
    parts = []
    if whole:
        parts.append(values[:whole].reshape(-1, TOKEN_CHUNK, features).sum(dim=1))
    if whole < tokens:
        parts.append(values[whole:].sum(dim=0, keepdim=True))
    partial = parts[0] if len(parts) == 1 else torch.cat(parts)
    return partial.sum(dim=0, dtype=torch.float64)


def index_sums(score: torch.Tensor, axis: str) -> torch.Tensor:
    """Sum an elementwise score over each row (or column), in float64: per-index sums add up over shards of a
    weight's other axis, and group into ``group_sum``."""
    if score.dim() == 2:
        return score.sum(dim=1 if axis == ROWS else 0, dtype=torch.float64)
    return score.double()


def group_sum(score: torch.Tensor, axis: str, num_groups: int) -> torch.Tensor:
    """Sum an elementwise score over each group's contiguous block of rows or columns, in float64."""
    return index_sums(score, axis).view(num_groups, -1).sum(dim=1)


# Elements of a weight whose elementwise score is in memory at once (``block_index_sums``): 8 MB in float64.
BLOCK_ELEMENTS = 1 << 20


def block_index_sums(weight: torch.Tensor, axis: str, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``index_sums(score(weight), axis)``, the elementwise ``score`` taken over blocks of the weight's rows, so its
    float32/float64 copy of the weight is never whole in memory: a 2048 x 8192 weight's would be 67/134 MB, more
    than the bfloat16 layer it came from holds in one projection (``score --stream``'s peak). The sums are those of
    the whole score to float64 rounding."""
    if weight.dim() != 2:
        return index_sums(score(weight), axis)
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    parts = [index_sums(score(block), axis) for block in weight.split(rows)]
    if axis == ROWS:
        return torch.cat(parts)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def weight_group_sum(weight: torch.Tensor, axis: str, num_groups: int,
                     score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``group_sum(score(weight), axis, num_groups)``, computed a block of rows at a time (``block_index_sums``)."""
    return block_index_sums(weight, axis, score).view(num_groups, -1).sum(dim=1)
