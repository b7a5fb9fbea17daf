"""Error compensation: after a plan removes input columns of o_proj and down_proj, the kept columns and an
output bias take over what the removed ones contributed.

``mean_bias`` (FLAP's) adds the removed columns' mean contribution as an output bias: it needs only the mean
of each input feature, which ``llamaprune score`` records, so a saved plan is compensated on another machine
without calibration text. ``refit`` solves a ridge least-squares problem from the inputs' Gram matrix so the
kept columns and the bias reproduce the unpruned output; ``refit_layers`` runs it sequentially, one decoder
layer at a time (``llamaprune.io.layer_stream``), each layer fitted on the activations of the already pruned
layers below it (the OBS / SlimGPT family).

    >>> import torch
    >>> x, w = torch.randn(64, 4, dtype=torch.float64), torch.randn(3, 4)
    >>> sums = FitSums.of(w).add(x)
    >>> kept, bias = refit(sums, keep=torch.tensor([0, 1, 2, 3]), damp=0.01)
    >>> torch.allclose(kept, w, atol=1e-5), float(bias.abs().max()) < 1e-5
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from llamaprune.core.errors import UsageError, flag
from llamaprune.scoring.importance import token_sums
from llamaprune.scoring.importance.obs import accumulate_gram


class Compensation(str, Enum):
    """none: slice only; bias: the removed columns' mean as an output bias; lstsq: refit the kept columns."""

    none = "none"
    bias = "bias"
    lstsq = "lstsq"


@dataclass
class FitSums:
    """Running float64 sums for refitting one linear layer: ``gram``, the Gram matrix of all its inputs with a
    constant 1 appended (the bias, ``accumulate_gram``), and, for a target other than the layer's own output on
    those inputs, ``cross``: the augmented inputs times that target. The own output's cross term is the Gram's
    G [W b]^T, so one pass over the calibration inputs serves both the choice of the columns to keep
    (``apply.selection``, on the same Gram) and the refit of whichever are kept. The refit's target is ``share`` of
    the way from the own output to the given one."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gram: torch.Tensor | None  # None once refit has spent it
    cross: torch.Tensor | None
    share: float = 1.0

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, target: bool = False,
           share: float = 1.0) -> FitSums:
        """Empty sums for ``weight``; ``target``: batches will come with a target of their own."""
        (outputs, inputs), device = weight.shape, weight.device
        cross = torch.zeros(inputs + 1, outputs, dtype=torch.float64, device=device) if target else None
        return cls(weight.detach(), None if bias is None else bias.detach(), None, cross, share if target else 0.0)

    def add(self, x: torch.Tensor, target: torch.Tensor | None = None) -> FitSums:
        """Fold a batch of the layer's inputs (..., in_features) and, for sums made with a target, that target's
        batch (..., out_features); returns self. A batch's products are formed in the inputs' dtype, float32 at
        least (a GPU's float64 is a small fraction of its float32 rate), and summed in float64."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.weight.device)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        self.gram = accumulate_gram(x, self.gram)
        if (target is None) != (self.cross is None):
            raise ValueError("a target batch goes with sums made for a target, and only with those")
        if target is not None:
            target = target.detach().reshape(-1, self.weight.shape[0]).to(self.weight.device, x.dtype)
            self.cross[:-1] += x.T @ target
            self.cross[-1] += token_sums(target)
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


def non_finite(where: str) -> UsageError:
    return UsageError(
        f"the calibration activations became NaN or infinite at {where}: check that the checkpoint's weights are "
        f"finite, or compensate with {flag('apply --compensate')} bias or other calibration text"
    )


ROW_BLOCK = 2048  # rows of the Gram matrix refit multiplies at once (16 MB of float64 per 1,000 inputs)


def refit(sums: FitSums, keep: torch.Tensor, damp: float, where: str = "a layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns W_K' and output bias b' minimizing, over the calibration inputs x,
    ||x_K W_K'^T + b' - t||^2 + λ ||W_K' - W_K||^2, solved in float64 (Cholesky) from ``sums``, where t is the sums'
    target (the unpruned output x W^T + b, or ``share`` of the way from it to the target they were given). The
    ridge pulls towards the original columns (keeping every column returns them unchanged under the own target);
    ``damp`` is λ relative to the mean diagonal of the kept inputs' Gram matrix. ``sums`` is spent: its Gram is
    dropped. ``where`` names the layer in errors."""
    gram, k = sums.gram, len(keep)
    if gram is None or not torch.isfinite(gram[-1]).all():  # the inputs' sums: any NaN or infinity is there
        raise non_finite(where)
    rows = torch.cat([keep.to(gram.device), torch.tensor([len(gram) - 1], device=gram.device)])
    bias = torch.zeros(sums.weight.shape[0], dtype=torch.float64, device=gram.device) if sums.bias is None else \
        sums.bias.to(gram.device, torch.float64)
    own = torch.cat([sums.weight.to(gram.device, torch.float64), bias[:, None]], dim=1)
    # the unpruned output's cross term, a block of rows at a time: never a (k+1) x (n+1) copy of the Gram's rows
    target = torch.cat([gram[block] @ own.T for block in rows.split(ROW_BLOCK)])
    if sums.cross is not None:
        target = torch.lerp(target, sums.cross[rows], sums.share)
    system = gram[rows[:, None], rows]
    sums.gram = gram = None  # the kept system replaces it
    ridge = damp * float(torch.diagonal(system)[:k].mean()) if k else 0.0
    torch.diagonal(system)[:k] += ridge
    target[:k].add_(own[:, rows[:k]].T, alpha=ridge)
    factor, info = torch.linalg.cholesky_ex(system)
    system = None  # the factor replaces it: one (k+1)^2 matrix fewer while solving
    if info:
        damp_flag = flag("apply --damp")
        raise UsageError(
            f"the least-squares refit of {where} is singular (some of its {k} kept inputs are constant or "
            f"collinear on the calibration text, and {damp_flag} is {damp}): give {damp_flag} a positive value such "
            f"as 1e-3"
        )
    solution = torch.cholesky_solve(target, factor)
    dtype = sums.weight.dtype
    return solution[:k].T.to(dtype).contiguous(), solution[k].to(dtype)
