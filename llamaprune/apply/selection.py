"""Which groups a layer loses, chosen knowing the refit: structured OBS (``scoring.importance.obs``: the refit's
error J, its greedy removal path) inside the sequential compensation pass, on the activations of the already pruned
layers below.

The plan fixes how many groups each layer loses; ``score`` selection keeps the plan's own indices, ``obs``
chooses them again: the greedy path's first groups, then ``swaps`` rounds that exchange a removed group for a kept
one, the exchange that lowers J most, while one does (as OSSCAR's local search). J never rises in a swap, and the
plan's own selection is kept where it is better, so ``obs`` never loses to ``score`` on the calibration inputs'
reconstruction error.

J is measured on the calibration text alone, and a group it calls cheap may carry text of another domain: obs alone
fits the calibration domain at the expense of others (bench/RESULTS.md). ``pool`` keeps the plan's criterion as a
guard: obs then chooses only among the ``pool`` x count lowest-scored groups of each block (1: the plan's own).

    >>> import torch
    >>> from llamaprune.scoring.importance.obs import accumulate_gram
    >>> x = torch.randn(256, 6, dtype=torch.float64)
    >>> gram = accumulate_gram(x, None)
    >>> groups = torch.arange(6).view(6, 1)
    >>> select(gram, torch.randn(3, 6), None, groups, remove=2, damp=1e-3).shape
    torch.Size([4])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from llamaprune.apply.compensation import non_finite
from llamaprune.core.errors import UsageError, flag
from llamaprune.core.tables import GROUPS_FILE
from llamaprune.scoring.importance.obs import Problem, SingularGram, greedy_path, singular

# The pool of ``prune``'s recipe: on SmolLM2 it beat the plan's own groups on WikiText and on text of another
# domain at 20% and 30%, where wider pools gained more on WikiText and lost the other domain (bench/RESULTS.md).
DEFAULT_POOL = 1.25


class Selection(str, Enum):
    """score: the plan's kept indices; obs: chosen again by structured OBS in the compensation pass."""

    score = "score"
    obs = "obs"


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


def candidates(scores: torch.Tensor, remove: int, pool: float) -> torch.Tensor:
    """The mask of the ``ceil(pool * remove)`` groups of lowest ``scores`` (a block's, by the plan's criterion):
    those obs may remove."""
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[scores.argsort(stable=True)[: min(len(scores), math.ceil(pool * remove))]] = True
    return mask


@dataclass(frozen=True)
class Pool:
    """obs's guard (``apply --obs-pool``): ``factor`` x a block's count of its groups of lowest score, ``scores``
    mapping (layer, kind) to every group's score by the plan's criterion, in group order."""

    factor: float
    scores: Mapping[tuple[int, str], torch.Tensor]

    def allowed(self, layer: int, kind: str, remove: int) -> torch.Tensor:
        return candidates(self.scores[(layer, kind)], remove, self.factor)

    @staticmethod
    def table_of(run_dir: Path | None, criterion: str) -> Path:
        """The run's group table, checked to hold the scores by ``criterion`` (apply checks it before loading)."""
        import pyarrow.parquet as pq

        path = run_dir / GROUPS_FILE if run_dir is not None else None
        if path is None or not path.is_file():
            raise UsageError(f"{flag('apply --obs-pool')} ranks each block's groups by the plan's criterion in its "
                             f"run's {GROUPS_FILE}, and this plan has none; keep the plan in RUN/plans/ or drop "
                             f"{flag('apply --obs-pool')}")
        if criterion not in pq.read_schema(path).names:
            raise UsageError(f"{flag('apply --obs-pool')} needs the plan's criterion {criterion!r} in {path}, which "
                             f"lacks it; plan from a run scored with it, or drop {flag('apply --obs-pool')}")
        return path

    @classmethod
    def of_run(cls, factor: float, run_dir: Path | None, criterion: str) -> Pool:
        """The pool of a plan made from the run ``run_dir`` by ``criterion``: its scores come from the run's group
        table, which must be there."""
        import pyarrow.parquet as pq

        table = pq.read_table(cls.table_of(run_dir, criterion),
                              columns=["layer", "kind", "index", criterion]).to_pydict()
        rows: dict[tuple[int, str], dict[int, float]] = {}
        for layer, kind, index, score in zip(*table.values(), strict=True):
            rows.setdefault((layer, kind), {})[index] = score
        return cls(factor, {key: torch.tensor([by[i] for i in sorted(by)], dtype=torch.float64)
                            for key, by in rows.items()})


def _swap(problem: Problem, removed: torch.Tensor, rounds: int, allowed: torch.Tensor | None) -> torch.Tensor:
    """Up to ``rounds`` swaps of a removed group for a kept one (among ``allowed``, if given), each the swap that
    lowers J most, while one does (exactly, for one-column groups; by trying every pair for wider ones, which are
    few: KV groups)."""
    total = len(problem.groups)
    for _ in range(rounds):
        mask = torch.ones(total, dtype=torch.bool, device=removed.device) if allowed is None else allowed.clone()
        mask[removed] = False
        kept = mask.nonzero().reshape(-1)
        if not len(kept):  # a pool as small as the count: nothing to swap in
            break
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
           damp: float, swaps: int = 0, planned: torch.Tensor | None = None, where: str = "a layer",
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The sorted ids of the groups to keep when ``remove`` of them go from a projection (``weight``, ``bias``)
    whose inputs have the augmented Gram matrix ``gram`` (``accumulate_gram``); ``groups`` (g, s) lists each
    group's input columns. ``planned``: the kept ids of the plan, returned instead where their J is lower.
    ``allowed`` (``candidates``): a mask of the only groups that may go."""
    total = len(groups)
    if remove <= 0:
        return torch.arange(total)
    if not torch.isfinite(gram).all():
        raise non_finite(where)
    try:
        problem = Problem.of(gram, weight, bias, groups, damp)
    except SingularGram:
        raise singular(f"{flag('apply --select')} obs cannot choose the groups of {where}",
                       f"{flag('apply --damp')} is {damp}: give it a positive value such as 1e-3, or use "
                       f"{flag('apply --select')} score") from None
    if allowed is not None:
        allowed = allowed.to(problem.weight.device)
    removed = greedy_path(problem, remove, allowed)[0].sort().values
    if swaps:
        removed = _swap(problem, removed, swaps, allowed)
    if planned is not None:
        mask = torch.ones(total, dtype=torch.bool)
        mask[planned.cpu()] = False
        plan_removed = mask.nonzero().reshape(-1).to(removed.device)
        if problem.error(plan_removed) < problem.error(removed):
            removed = plan_removed
    kept = torch.ones(total, dtype=torch.bool)
    kept[removed.cpu()] = False
    return kept.nonzero().reshape(-1)
