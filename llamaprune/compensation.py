"""Error compensation: after a plan removes input columns of o_proj and down_proj, the kept columns and an
output bias take over what the removed ones contributed.

``mean_bias`` (FLAP's) adds the removed columns' mean contribution as an output bias: it needs only the mean
of each input feature, which ``llamaprune score`` records, so a saved plan is compensated on another machine
without calibration text. ``refit`` solves a ridge least-squares problem from the inputs' Gram matrix so the
kept columns and the bias reproduce the unpruned output; ``refit_layers`` runs it sequentially, one decoder
layer at a time (``llamaprune.layer_stream``), each layer fitted on the activations of the already pruned
layers below it (the OBS / SlimGPT family).

    >>> import torch
    >>> x, w = torch.randn(64, 4, dtype=torch.float64), torch.randn(3, 4)
    >>> stats = InputStats.of(4).add(x)
    >>> kept, bias = refit(stats, w, keep=torch.tensor([0, 1, 2, 3]), damp=0.01)
    >>> torch.allclose(kept, w, atol=1e-5), float(bias.abs().max()) < 1e-5
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Compensation(str, Enum):
    """none: slice only; bias: the removed columns' mean as an output bias; lstsq: refit the kept columns."""

    none = "none"
    bias = "bias"
    lstsq = "lstsq"


@dataclass
class InputStats:
    """Running sums of a linear layer's inputs: Gram matrix, per-feature sums, token count (float64)."""

    gram: torch.Tensor
    sums: torch.Tensor
    count: int = 0

    @classmethod
    def of(cls, features: int, device: torch.device | str = "cpu") -> InputStats:
        return cls(
            torch.zeros(features, features, dtype=torch.float64, device=device),
            torch.zeros(features, dtype=torch.float64, device=device),
        )

    def add(self, x: torch.Tensor) -> InputStats:
        """Fold a batch of inputs (..., features); returns self."""
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram.addmm_(flat.T, flat)
        self.sums.add_(flat.sum(dim=0))
        self.count += flat.shape[0]
        return self


def removed_columns(features: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(features, dtype=torch.bool)
    mask[keep.cpu()] = False
    return mask


def mean_bias(
    mean: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept columns unchanged, output bias + W[:, removed] @ mean[removed]): exact when the removed inputs are
    constant over the tokens."""
    removed = removed_columns(weight.shape[1], keep).to(weight.device)
    extra = weight[:, removed].double() @ mean.to(weight.device, torch.float64)[removed]
    if bias is not None:
        extra = extra + bias.double()
    return weight[:, keep.to(weight.device)].contiguous(), extra.to(weight.dtype)


def refit(
    stats: InputStats, weight: torch.Tensor, keep: torch.Tensor, damp: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns W_K' and output bias b' minimizing, over the calibration inputs x,
    ||x_K W_K'^T + b' - (x W^T + b)||^2 + λ ||W_K' - W_K||^2, solved in float64 from the Gram matrix.
    The ridge pulls towards the original columns (keeping every column returns them unchanged); ``damp`` is λ
    relative to the mean diagonal of the kept inputs' Gram matrix."""
    gram, sums, count = stats.gram, stats.sums, float(stats.count)
    keep = keep.to(gram.device)
    k = len(keep)
    w = weight.detach().to(gram.device, torch.float64)
    system = torch.empty(k + 1, k + 1, dtype=torch.float64, device=gram.device)
    system[:k, :k] = gram[keep][:, keep]
    system[:k, k] = sums[keep]
    system[k, :k] = sums[keep]
    system[k, k] = count
    ridge = damp * float(torch.diagonal(system[:k, :k]).mean()) if k else 0.0
    system[:k, :k] += ridge * torch.eye(k, dtype=torch.float64, device=gram.device)
    target = torch.empty(k + 1, w.shape[0], dtype=torch.float64, device=gram.device)
    target[:k] = gram[keep] @ w.T + ridge * w[:, keep].T
    target[k] = sums @ w.T
    if bias is not None:
        b = bias.detach().to(gram.device, torch.float64)
        target[:k] += sums[keep, None] * b[None, :]
        target[k] += count * b
    solution = torch.linalg.solve(system, target)
    return solution[:k].T.to(weight.dtype).contiguous(), solution[k].to(weight.dtype)
