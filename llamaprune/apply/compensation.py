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
    >>> sums = FitSums.of(w, keep=torch.tensor([0, 1, 2, 3])).add(x)
    >>> kept, bias = refit(sums, damp=0.01)
    >>> torch.allclose(kept, w, atol=1e-5), float(bias.abs().max()) < 1e-5
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from llamaprune.core.errors import UsageError, flag
from llamaprune.scoring.importance import token_sums


class Compensation(str, Enum):
    """none: slice only; bias: the removed columns' mean as an output bias; lstsq: refit the kept columns."""

    none = "none"
    bias = "bias"
    lstsq = "lstsq"


@dataclass
class FitSums:
    """Running float64 sums for refitting one linear layer's kept input columns ``keep``: ``system``, the Gram
    matrix of the kept inputs with a constant 1 appended (the bias), and ``cross``, that augmented input times the
    unpruned layer's output. Only the kept columns' Gram is held, never the whole layer's: (k+1)^2 + (k+1)·out
    numbers, the most compensation keeps besides the layer itself."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    keep: torch.Tensor
    system: torch.Tensor | None  # None once refit has factored it
    cross: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None) -> FitSums:
        k, (outputs, _) = len(keep), weight.shape
        zeros = dict(dtype=torch.float64, device=weight.device)
        return cls(weight.detach(), None if bias is None else bias.detach(), keep.to(weight.device),
                   torch.zeros(k + 1, k + 1, **zeros), torch.zeros(k + 1, outputs, **zeros))

    def add(self, x: torch.Tensor, output: torch.Tensor | None = None) -> FitSums:
        """Fold a batch of the layer's inputs (..., in_features) and, where the caller has it, the unpruned layer's
        output for them (else it is computed); returns self. A batch's products are formed in the inputs' dtype,
        float32 at least (a GPU's float64 is a small fraction of its float32 rate), and summed in float64."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.weight.device)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if output is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            output = torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)
        output = output.detach().reshape(-1, self.weight.shape[0]).to(self.weight.device, x.dtype)
        kept, k = x[:, self.keep], len(self.keep)
        sums = token_sums(kept)
        self.system[:k, :k] += kept.T @ kept
        self.system[k, :k] += sums
        self.system[:k, k] += sums
        self.system[k, k] += len(x)
        self.cross[:k] += kept.T @ output
        self.cross[k] += token_sums(output)
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


def refit(sums: FitSums, damp: float, where: str = "a layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns W_K' and output bias b' minimizing, over the calibration inputs x,
    ||x_K W_K'^T + b' - (x W^T + b)||^2 + λ ||W_K' - W_K||^2, solved in float64 (Cholesky) from ``sums``.
    The ridge pulls towards the original columns (keeping every column returns them unchanged); ``damp`` is λ
    relative to the mean diagonal of the kept inputs' Gram matrix. ``sums`` is spent: its system is dropped.
    ``where`` names the layer in errors."""
    system, target, k = sums.system, sums.cross, len(sums.keep)
    if not torch.isfinite(system[k]).all():  # the inputs' sums: any NaN or infinity among the inputs is there
        raise non_finite(where)
    ridge = damp * float(torch.diagonal(system)[:k].mean()) if k else 0.0
    torch.diagonal(system)[:k] += ridge
    target[:k].add_(sums.weight[:, sums.keep].T, alpha=ridge)
    factor, info = torch.linalg.cholesky_ex(system)
    sums.system = system = None  # the factor replaces it: one (k+1)^2 matrix fewer while solving
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
