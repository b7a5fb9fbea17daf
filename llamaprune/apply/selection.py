"""Which groups a layer loses, chosen knowing the refit: structured OBS (optimal brain surgeon, as in ZipLM and
SlimGPT) on the Gram matrix of an output projection's inputs.

The plan fixes how many groups each layer loses; ``score`` selection keeps the plan's own indices, ``obs``
chooses them again inside the sequential compensation pass, on the activations of the already pruned layers
below. The refit (``apply.compensation.refit``) of the kept columns K minimizes
``J(K) = ||x_K W_K'^T + b' - (x W^T + b)||^2 + λ||W_K' - W_K||^2``; with ``G = H + λ I`` (H: the Gram matrix of the
inputs with a constant 1 appended for the bias, λ on the weight columns only) and R the removed columns,
``J = tr(W_R (G^-1)_RR^-1 W_R^T) - λ||W_R||^2`` (OBS's error of removing R, less the ridge's constant). Greedy
removal takes the group of least marginal J, then downdates ``G^-1`` and the weights as if the others were
refitted; ``swaps`` rounds then exchange a removed group for a kept one, the exchange that lowers J most, while
one does (as OSSCAR's local search). J never rises in a swap, and the plan's own selection is kept where it is
better, so ``obs`` never loses to ``score`` on the calibration inputs' reconstruction error.

    >>> import torch
    >>> x = torch.randn(256, 6, dtype=torch.float64)
    >>> gram = GramSums(6).add(x).system
    >>> groups = torch.arange(6).view(6, 1)
    >>> select(gram, torch.randn(3, 6), None, groups, remove=2, damp=1e-3).shape
    torch.Size([4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from llamaprune.apply.compensation import non_finite
from llamaprune.core.errors import UsageError, flag
from llamaprune.scoring.importance import token_sums

# Greedy removals are taken in at most this many steps per projection: each step removes the cheapest groups
# together and downdates once, so the cost stays ~STEPS downdates of the inverse whatever the width.
STEPS = 128


class Selection(str, Enum):
    """score: the plan's kept indices; obs: chosen again by structured OBS in the compensation pass."""

    score = "score"
    obs = "obs"


@dataclass
class GramSums:
    """The float64 Gram matrix of a projection's inputs with a constant 1 appended (the bias), summed over
    batches: all that OBS needs, since the target (the unpruned projection's output) is linear in them."""

    system: torch.Tensor

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.system = torch.zeros(features + 1, features + 1, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> GramSums:
        """Fold a batch of inputs (..., features); products in float32 at least, sums in float64."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.system.device)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        n = x.shape[1]
        sums = token_sums(x)
        self.system[:n, :n] += x.T @ x
        self.system[n, :n] += sums
        self.system[:n, n] += sums
        self.system[n, n] += len(x)
        return self


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
           damp: float, where: str) -> Problem:
        n = weight.shape[1]
        if not torch.isfinite(gram).all():
            raise non_finite(where)
        system = gram.clone()
        ridge = damp * float(torch.diagonal(system)[:n].mean())
        torch.diagonal(system)[:n] += ridge
        factor, info = torch.linalg.cholesky_ex(system)
        if info:
            raise UsageError(
                f"{flag('apply --select')} obs cannot choose the groups of {where}: the Gram matrix of its inputs is "
                f"singular (inputs constant or collinear on the calibration text, and {flag('apply --damp')} is "
                f"{damp}); give {flag('apply --damp')} a positive value such as 1e-3, or use "
                f"{flag('apply --select')} score"
            )
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


def _greedy(problem: Problem, remove: int) -> torch.Tensor:
    """Remove ``remove`` groups, the cheapest first, downdating after each step of at most ceil(remove/STEPS)."""
    weight, inverse = problem.weight.clone(), problem.inverse.clone()  # downdated in place: no third copy
    alive = torch.ones(len(problem.groups), dtype=torch.bool, device=weight.device)
    per_step = math.ceil(remove / STEPS)
    removed: list[torch.Tensor] = []
    while remove > 0:
        ids = alive.nonzero().reshape(-1)
        take = ids[problem.costs(weight, inverse, ids).argsort()[: min(per_step, remove)]]
        cols = problem.columns(take)
        rows = inverse[cols]
        solved = torch.linalg.solve(rows[:, cols], rows)
        weight.addmm_(weight[:, cols], solved, alpha=-1)
        inverse.addmm_(rows.T, solved, alpha=-1)
        alive[take] = False
        removed.append(take)
        remove -= len(take)
    return torch.cat(removed).sort().values


def _pair_changes(problem: Problem, removed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(r, k): the exact change of J when removed group r comes back and kept group k goes, for one-column groups.
    With M = ((G^-1)_RR)^-1, C = M (G^-1)_RK, U = W_R M, the refitted weights W_K - U (G^-1)_RK and the downdated
    inverse's diagonal P: putting r back lowers J by ||U_r||^2 / M_rr, and then removing k costs
    ||W'_k + U_r C_rk / M_rr||^2 / (P_k + C_rk^2 / M_rr) (the inverse of a submatrix, downdated by one index)."""
    r_cols, k_cols = problem.columns(removed), problem.columns(kept)
    inverse, weight = problem.inverse, problem.weight
    m = torch.linalg.inv(inverse[r_cols][:, r_cols])
    between = inverse[r_cols][:, k_cols]
    c = m @ between
    u = weight[:, r_cols] @ m
    refitted = weight[:, k_cols] - u @ between
    diagonal = inverse.diagonal()[k_cols] - (between * c).sum(dim=0)
    m_rr = m.diagonal()[:, None]
    scale = c / m_rr
    u_norms = (u * u).sum(dim=0)[:, None]
    cost = ((refitted * refitted).sum(dim=0)[None] + 2 * scale * (u.T @ refitted) + scale * scale * u_norms) / (
        diagonal[None] + c * c / m_rr)
    ridge = problem.ridge * (weight * weight).sum(dim=0)
    return cost - u_norms / m_rr - ridge[k_cols][None] + ridge[r_cols][:, None]


def _swap(problem: Problem, removed: torch.Tensor, rounds: int) -> torch.Tensor:
    """Up to ``rounds`` swaps of a removed group for a kept one, each the swap that lowers J most, while one does
    (exactly, for one-column groups; by trying every pair for wider ones, which are few: KV groups)."""
    total = len(problem.groups)
    for _ in range(rounds):
        mask = torch.ones(total, dtype=torch.bool, device=removed.device)
        mask[removed] = False
        kept = mask.nonzero().reshape(-1)
        if problem.groups.shape[1] == 1:
            changes = _pair_changes(problem, removed, kept)
        else:
            now = problem.error(removed)
            changes = torch.tensor([[problem.error(torch.cat([removed[removed != r], k.view(1)])) - now
                                     for k in kept] for r in removed], dtype=torch.float64)
        best = int(changes.argmin())
        if not changes.view(-1)[best] < -1e-9 * max(problem.error(removed), 1e-30):
            break
        r, k = divmod(best, len(kept))
        removed = torch.cat([removed[removed != removed[r]], kept[k].view(1)]).sort().values
    return removed


def select(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: torch.Tensor, remove: int,
           damp: float, swaps: int = 0, planned: torch.Tensor | None = None, where: str = "a layer") -> torch.Tensor:
    """The sorted ids of the groups to keep when ``remove`` of them go from a projection (``weight``, ``bias``)
    whose inputs have the augmented Gram matrix ``gram`` (``GramSums``); ``groups`` (g, s) lists each group's input
    columns. ``planned``: the kept ids of the plan, returned instead where their J is lower."""
    total = len(groups)
    if remove <= 0:
        return torch.arange(total)
    problem = Problem.of(gram, weight, bias, groups, damp, where)
    removed = _greedy(problem, remove)
    if swaps:
        removed = _swap(problem, removed, swaps)
    if planned is not None:
        mask = torch.ones(total, dtype=torch.bool)
        mask[planned.cpu()] = False
        plan_removed = mask.nonzero().reshape(-1).to(removed.device)
        if problem.error(plan_removed) < problem.error(removed):
            removed = plan_removed
    kept = torch.ones(total, dtype=torch.bool)
    kept[removed.cpu()] = False
    return kept.nonzero().reshape(-1)
