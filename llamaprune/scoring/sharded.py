"""Gradient scoring of a model whose weights and w*G accumulators do not fit one device: FSDP2 ``fully_shard``
splits every decoder layer's parameters (and so their gradients) across the processes of a torchrun job by
rows, and each process keeps the w*G sums of its own rows only.

Each Fisher group of windows is split across the processes, so one backward pass per process makes the group's
gradient: FSDP's reduce-scatter averages over processes, hence each loss is scaled by the number of processes.
The Fisher term and |w*G| are first summed per row or column of each process's shard, then all-reduced and
grouped (``scoring.importance.index_sums``), which is the same number as one process's ``group_sum``.

    $ torchrun --nproc-per-node 8 -m llamaprune score meta-llama/Meta-Llama-3-70B --out run --fsdp
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamaprune.core.arch import ROWS
from llamaprune.core.errors import UsageError
from llamaprune.scoring.accumulators import Accumulators, GradientState, ParamSpec
from llamaprune.scoring.calibration import GradientGroup
from llamaprune.scoring.collectives import Ranks, all_reduce_count, all_reduce_sum
from llamaprune.scoring.importance import index_sums

# The first torch whose FSDP2 the suite checks against one process (tests/test_distributed.py): torch 2.6 has no CPU
# stream events, and 2.8 sums what it is told to average over gloo, which doubles the gradient scores.
FSDP_TORCH = (2, 13)


def check_fsdp_torch(version: str | None = None) -> None:
    """``--fsdp`` on a torch older than ``FSDP_TORCH`` is refused in one line, before any work."""
    version = version or torch.__version__
    if tuple(int(part) for part in version.split("+")[0].split(".")[:2]) < FSDP_TORCH:
        wanted = ".".join(map(str, FSDP_TORCH))
        raise UsageError(f"--fsdp needs torch {wanted} or newer, and this is torch {version}: upgrade torch "
                         f"(`pip install -U 'torch>={wanted}'`) or score without --fsdp (data parallel)")


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model) -> None:
    """Each decoder layer one FSDP unit (gathered only while it runs), the rest (embeddings, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model)


def sharded_groups(windows: torch.Tensor, fisher_windows: int, ranks: Ranks) -> list[GradientGroup]:
    """This process's part of every Fisher group, run as one batch; its loss weight counts the processes, whose
    gradients FSDP averages."""
    groups = []
    for group in windows.split(fisher_windows):
        if len(group) < ranks.world:
            raise UsageError(
                f"--fsdp over {ranks.world} processes splits each group of --fisher-windows windows among them, "
                f"and a group has only {len(group)}; use --fisher-windows and --num-samples that are multiples of "
                f"{ranks.world}"
            )
        mine = group.tensor_split(ranks.world)[ranks.rank]
        groups.append(GradientGroup((mine,), fisher_windows / ranks.world))
    return groups


class ShardedGradients:
    """The w*G and Fisher sums of the rows each process holds, folded after every backward pass."""

    def __init__(self, specs: list[ParamSpec], ranks: Ranks) -> None:
        self.specs, self.ranks = specs, ranks

    def states(self, dtype: torch.dtype) -> dict[str, GradientState]:
        """Zeroed sums: w*G of the local shard (in ``dtype``), the Fisher term per row or column of the whole."""
        states = {}
        for spec in self.specs:
            local = spec.param.to_local()
            states[spec.name] = GradientState(
                wg=torch.zeros(local.shape, dtype=dtype, device=local.device),
                fisher=torch.zeros(_indices(spec), dtype=torch.float64, device=local.device),
            )
        return states

    def _add(self, target: torch.Tensor, sums: torch.Tensor, spec: ParamSpec) -> None:
        if spec.axis == ROWS:
            start = first_row(spec.param.shape[0], self.ranks)
            target[start : start + len(sums)] += sums
        else:
            target += sums

    def fold(self, acc: Accumulators) -> None:
        """Fold every shard's gradient (w*G and 0.5 (w*G)^2 per row or column) and free it."""
        for spec in self.specs:
            state = acc.gradients[spec.name]
            wg = spec.param.to_local().detach().float() * spec.param.grad.to_local().float()
            state.wg.add_(wg)
            self._add(state.fisher, 0.5 * index_sums(wg.square_(), spec.axis), spec)
            spec.param.grad = None

    def reduce(self, acc: Accumulators) -> None:
        """Replace each state by the whole parameter's: per-index |w*G| sums and per-group Fisher sums."""
        for spec in self.specs:
            state = acc.gradients[spec.name]
            first = torch.zeros_like(state.fisher)
            self._add(first, index_sums(state.wg.abs(), spec.axis), spec)
            all_reduce_sum([first, state.fisher])
            acc.gradients[spec.name] = GradientState(first, state.fisher.view(spec.num_groups, -1).sum(dim=1))


def first_row(rows: int, ranks: Ranks) -> int:
    """The first row of this process's shard of a parameter (FSDP2 shards dim 0 as ``torch.chunk`` does)."""
    return min(ranks.rank * -(-rows // ranks.world), rows)


def _indices(spec: ParamSpec) -> int:
    """Rows or columns of the whole parameter along which its groups lie."""
    shape = spec.param.shape
    return shape[0] if spec.axis == ROWS or len(shape) == 1 else shape[1]


def gathered(spec: ParamSpec) -> ParamSpec:
    """``spec`` with its whole parameter (one all-gather), for the formulas that read weights."""
    import dataclasses

    full = spec.param.full_tensor() if hasattr(spec.param, "full_tensor") else spec.param
    return dataclasses.replace(spec, param=full)


def load_sharded(path: Path, config, dtype: torch.dtype, device: str, ranks: Ranks):
    """The model of a safetensors checkpoint directory, sharded across the processes as it loads: built on the
    meta device, sharded, then each process reads only its rows of every tensor, so no process ever holds the
    whole model."""
    from llamaprune.io.layer_stream import compute_buffers, skeleton
    from llamaprune.io.weights import read_slice, tensor_files

    files = tensor_files(path)
    model = skeleton(config, dtype)
    shard_model(model)
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        local = param.to_local()
        start = first_row(param.shape[0], ranks)
        key = name if name in files else f"model.{name}" if f"model.{name}" in files else None
        if key is None and getattr(config, "tie_word_embeddings", False) and name == "lm_head.weight":
            key = "model.embed_tokens.weight"
        if key is None:
            raise UsageError(f"{path} has no tensor {name}; is it a complete checkpoint of this config?")
        with torch.no_grad():
            local.copy_(read_slice(files[key], key, start, start + local.shape[0]).to(dtype))
    compute_buffers(model, device)  # after to_empty, which would leave its computed buffers uninitialized
    return model.eval()


def reduce_accumulators(acc: Accumulators, sharded: ShardedGradients | None = None) -> None:
    """Sum every accumulator of ``acc`` over all processes (w*G before its absolute value), so that the
    per-group reductions see all the windows; ``sharded`` reduces the gradient shards of an FSDP model."""
    if sharded is not None:
        sharded.reduce(acc)
    else:
        all_reduce_sum([t for name in sorted(acc.gradients) for t in (acc.gradients[name].wg,
                                                                       acc.gradients[name].fisher)])
    all_reduce_sum([acc.inputs[key] for key in sorted(acc.inputs)] + [acc.cosines[k] for k in sorted(acc.cosines)])
    acc.tokens = all_reduce_count(acc.tokens)
