"""Block influence of a decoder layer: 1 - mean cosine similarity of its input and output hidden states.

    >>> import torch
    >>> acc = accumulate_cosine(torch.ones(1, 2, 4), torch.ones(1, 2, 4), None)
    >>> block_influence(acc)
    0.0
"""

from __future__ import annotations

import torch


def accumulate_cosine(x_in: torch.Tensor, x_out: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """acc = [sum of per-token cosines, token count], in float64, added to in place (the count from Python: no
    tensor is built and copied to the device for it each batch)."""
    cos = torch.nn.functional.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)
    if acc is None:
        acc = torch.zeros(2, dtype=torch.float64, device=cos.device)
    acc[0] += cos.sum(dtype=torch.float64)
    acc[1] += cos.numel()
    return acc


def block_influence(acc: torch.Tensor) -> float:
    return float(1.0 - acc[0] / acc[1])
