"""First- and second-order Taylor importance, folded from per-batch gradients as they arrive.

``taylor`` = |w * G| with G the gradient summed over batches; ``taylor2`` adds 0.5 * w^2 * F with F the
Fisher diagonal (sum of squared per-batch gradients). The Fisher term is additive over batches, so it is
reduced to per-group sums at once; |w * G| needs the summed product w*G, kept per weight in float32
(the one weight-sized state of scoring, and only for prunable weights).

    >>> import torch
    >>> state = new_state(torch.ones(2, 2), num_groups=2)
    >>> fold_gradient(torch.ones(2, 2), torch.full((2, 2), 0.5), state, axis="rows", num_groups=2)
    >>> first_order(state, axis="rows", num_groups=2), state.fisher
    (tensor([1., 1.], dtype=torch.float64), tensor([0.2500, 0.2500], dtype=torch.float64))
"""

from __future__ import annotations

import torch

from llamaprune.scoring.accumulators import Accumulators, GradientState, ParamSpec
from llamaprune.scoring.importance import group_sum


def new_state(weight: torch.Tensor, num_groups: int, dtype: torch.dtype = torch.float32) -> GradientState:
    """Zeroed sums for one parameter (w*G in ``dtype``: bfloat16 halves the one weight-sized state); allocated
    before the first backward so they sit together in memory."""
    return GradientState(
        wg=torch.zeros(weight.shape, dtype=dtype, device=weight.device),
        fisher=torch.zeros(num_groups, dtype=torch.float64, device=weight.device),
    )


def fold_gradient(weight: torch.Tensor, grad: torch.Tensor, state: GradientState, axis: str, num_groups: int) -> None:
    """Add one batch's gradient g: w*G += w*g, fisher += per-group sums of 0.5*(w*g)^2 (float32 math)."""
    wg = weight.detach().float() * grad.float()
    state.wg.add_(wg)
    state.fisher.add_(0.5 * group_sum(wg.square_(), axis, num_groups))


def first_order(state: GradientState, axis: str, num_groups: int) -> torch.Tensor:
    """Per-group sum of |w * G|."""
    return group_sum(state.wg.abs(), axis, num_groups)


def taylor_groups(spec: ParamSpec, acc: Accumulators) -> torch.Tensor:
    """The ``taylor`` formula of one parameter: per-group |w * G|."""
    return first_order(acc.gradients[spec.name], spec.axis, spec.num_groups)


def taylor2_groups(spec: ParamSpec, acc: Accumulators) -> torch.Tensor:
    """The ``taylor2`` formula of one parameter: per-group |w * G| plus its Fisher term."""
    state = acc.gradients[spec.name]
    return first_order(state, spec.axis, spec.num_groups) + state.fisher
