"""Structured OBS (optimal brain surgeon, as in ZipLM and SlimGPT) on the Gram matrix of an output projection's
inputs: the error the least-squares refit leaves when groups of input columns go, the greedy removal path that
keeps it low, and the ``obs`` criterion, whose score is a group's place on that path.

The refit (``apply.compensation.refit``) of the kept columns K minimizes
``J(K) = ||x_K W_K'^T + b' - (x W^T + b)||^2 + λ||W_K' - W_K||^2``; with ``G = H + λ I`` (H: the Gram matrix of the
inputs with a constant 1 appended for the bias, λ on the weight columns only) and R the removed columns,
``J = tr(W_R (G^-1)_RR^-1 W_R^T) - λ||W_R||^2`` (OBS's error of removing R, less the ridge's constant). Greedy
removal takes the group of least marginal J, then downdates ``G^-1`` and the weights as if the others were
refitted. ``apply --select obs`` chooses a layer's groups this way in the compensation pass; the ``obs`` criterion
walks the whole path once on the unpruned model, so a plan's per-layer counts can follow the error that remains
after the refit rather than before it.

The criterion weighs each output row by the root of its mean squared loss gradient (the Fisher diagonal of the
residual stream at the projection's output), so ``J`` is a second-order estimate of the loss the refit leaves,
comparable across layers and blocks like taylor2's; a group's score is the largest marginal J on the path up to
its removal, so the scores grow along the path and a knapsack takes each layer's groups in path order.

    >>> x = torch.randn(256, 6, dtype=torch.float64)
    >>> gram = accumulate_gram(x, None)
    >>> problem = Problem.of(gram, torch.randn(3, 6), None, torch.arange(6).view(6, 1), damp=1e-3)
    >>> order, costs = greedy_path(problem, 6)
    >>> sorted(order.tolist()), bool((costs.diff() >= 0).all())
    ([0, 1, 2, 3, 4, 5], True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llamaprune.core.arch import COLS
from llamaprune.core.errors import UsageError
from llamaprune.scoring.importance import token_sums

if TYPE_CHECKING:
    from llamaprune.scoring.accumulators import Accumulators, ParamSpec

# The ridge λ relative to the mean diagonal of the inputs' Gram matrix: apply's default (``apply --damp``), which
# the criterion uses too, so that its path is that of the default refit.
DAMP = 1e-3
# Greedy removals are taken in at most this many steps per projection: each step removes the cheapest groups
# together and downdates once, so the cost stays ~STEPS downdates of the inverse whatever the width.
STEPS = 128


class SingularGram(Exception):
    """The damped Gram matrix has no Cholesky factor (inputs constant or collinear, no ridge); callers say so with
    ``singular``, in their own terms."""


def singular(what: str, fix: str) -> UsageError:
    """The one-line error of a ``SingularGram``: ``what`` could not be done, and the ``fix``."""
    return UsageError(f"{what}: the Gram matrix of its inputs is singular or not finite (inputs constant or "
                      f"collinear on the calibration text); {fix}")


def accumulate_gram(x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """The Gram matrix of (tokens, features) inputs with a constant 1 appended (the bias), added to ``acc``:
    products in float32 at least, sums in float64. All that OBS needs, since the refit's target (the unpruned
    projection's output) is linear in them."""
    x = x.detach().reshape(-1, x.shape[-1])
    n = x.shape[1]
    if acc is None:
        acc = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=x.device)
    x = x.to(acc.device, torch.promote_types(x.dtype, torch.float32))
    sums = token_sums(x)
    acc[:n, :n] += x.T @ x
    acc[n, :n] += sums
    acc[:n, n] += sums
    acc[n, n] += len(x)
    return acc


@dataclass(frozen=True)
class Problem:
    """One projection's selection problem in float64: ``weight`` with the bias as its last column, ``inverse``
    = G^-1, ``ridge`` = λ, and ``groups`` (g, s): the input columns each group owns."""

    weight: torch.Tensor
    inverse: torch.Tensor
    ridge: float
    groups: torch.Tensor

    @classmethod
    def of(cls, gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: torch.Tensor,
           damp: float) -> Problem:
        """Raises ``SingularGram`` where G has no Cholesky factor."""
        n = weight.shape[1]
        system = gram.clone()
        ridge = damp * float(torch.diagonal(system)[:n].mean())
        torch.diagonal(system)[:n] += ridge
        factor, info = torch.linalg.cholesky_ex(system)
        if info:
            raise SingularGram
        bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
        full = torch.cat([weight.double(), bias.to(weight.device)[:, None]], dim=1)
        return cls(full, torch.cholesky_inverse(factor), ridge, groups.to(weight.device))

    def columns(self, chosen: torch.Tensor) -> torch.Tensor:
        return self.groups[chosen].reshape(-1)

    def error(self, removed: torch.Tensor) -> float:
        """J of removing the groups ``removed`` (ids) and refitting the rest."""
        if not len(removed):
            return 0.0
        cols = self.columns(removed)
        w = self.weight[:, cols]
        block = self.inverse[cols][:, cols]
        return float((w * torch.linalg.solve(block, w.T).T).sum()) - self.ridge * float((w * w).sum())

    def costs(self, weight: torch.Tensor, inverse: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Marginal J of removing each group ``alive`` alone, given ``weight`` and ``inverse`` downdated by the
        groups removed so far."""
        cols = self.groups[alive]  # (g, s)
        original = self.weight[:, cols]
        ridge = self.ridge * (original * original).sum(dim=(0, 2))
        if cols.shape[1] == 1:  # one column a group (MLP channels): the classic OBS ratio
            single = cols[:, 0]
            return (weight[:, single] ** 2).sum(dim=0) / inverse.diagonal()[single] - ridge
        w = weight[:, cols].permute(1, 0, 2)  # (g, out, s)
        blocks = inverse[cols[:, :, None], cols[:, None, :]]  # (g, s, s)
        solved = torch.linalg.solve(blocks, w.transpose(1, 2))  # (g, s, out)
        return (w * solved.transpose(1, 2)).sum(dim=(1, 2)) - ridge


def greedy_path(problem: Problem, remove: int, candidates: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``remove`` groups of the greedy path, in removal order, and for each the largest marginal J up to
    its removal (non-decreasing); at most ``STEPS`` steps, each removing the ceil(remove/STEPS) cheapest groups
    and downdating once. ``candidates`` (a mask of the groups, at least ``remove`` true): the only groups it may
    remove; the others still take part in the refit."""
    weight, inverse = problem.weight.clone(), problem.inverse.clone()  # downdated in place: no third copy
    alive = (torch.ones(len(problem.groups), dtype=torch.bool) if candidates is None
             else candidates.clone()).to(weight.device)
    per_step = math.ceil(remove / STEPS) if remove > 0 else 0
    order: list[torch.Tensor] = []
    costs: list[torch.Tensor] = []
    highest = torch.tensor(-math.inf, dtype=torch.float64, device=weight.device)
    while remove > 0:
        ids = alive.nonzero().reshape(-1)
        marginal = problem.costs(weight, inverse, ids)
        cheapest = marginal.argsort()[: min(per_step, remove)]
        take = ids[cheapest]
        step = torch.maximum(marginal[cheapest], highest)
        highest = step.max()
        order.append(take)
        costs.append(step)
        alive[take] = False
        remove -= len(take)
        if remove > 0:  # the last step's downdate would serve nothing
            cols = problem.columns(take)
            rows = inverse[cols]
            solved = torch.linalg.solve(rows[:, cols], rows)
            weight.addmm_(weight[:, cols], solved, alpha=-1)
            inverse.addmm_(rows.T, solved, alpha=-1)
    empty = torch.zeros(0, dtype=torch.long, device=weight.device)
    return (torch.cat(order) if order else empty), (torch.cat(costs) if costs else empty.double())


def obs_groups(spec: ParamSpec, acc: Accumulators) -> torch.Tensor:
    """The ``obs`` formula of one parameter: only the weights of o_proj / down_proj carry it, each group's score
    being the Fisher-weighted J on the greedy path up to its removal (every group walks the path)."""
    if spec.is_bias or spec.axis != COLS:
        return torch.zeros(spec.num_groups, dtype=torch.float64)
    gram = acc.inputs[(spec.layer, spec.input, "gram")]
    fisher = acc.inputs[(spec.layer, spec.input, "out_grad_sq")] / max(acc.tokens, 1)
    weight = spec.param.detach().to(gram.device, torch.float64) * fisher.sqrt().to(gram.device)[:, None]
    groups = torch.arange(weight.shape[1], device=gram.device).view(spec.num_groups, -1)
    try:
        problem = Problem.of(gram, weight, None, groups, DAMP)
    except SingularGram:
        raise singular(f"obs cannot score layer {spec.layer} ({spec.kind})",
                       "score obs on other text, or in float32 (--dtype float32)") from None
    order, costs = greedy_path(problem, spec.num_groups)
    scores = torch.empty(spec.num_groups, dtype=torch.float64, device=gram.device)
    scores[order] = costs
    return scores


def accumulate_out_grad_sq(grad: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """acc[i] += sum over tokens of the loss gradient at output feature i, squared, in float64."""
    sq = token_sums(grad.detach().float().reshape(-1, grad.shape[-1]).square())
    return sq if acc is None else acc.add_(sq)
