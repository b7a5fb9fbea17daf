"""Scoring across processes with torch.distributed, as launched by ``torchrun``: which process this is, the
share of calibration work each one takes, and sums of tensors over all of them.

Every accumulator of a calibration pass adds up over disjoint shares of the windows (``scoring.accumulators``),
so each process scores its share and the sums are all-reduced before any per-group reduction
(``scoring.sharded.reduce_accumulators``): the table is
that of one process on all the windows, up to float summation order. Process 0 writes the run. Gloo on CPU,
NCCL on CUDA (each process on the GPU of its LOCAL_RANK, which becomes its "cuda"). A process that stops
(killed, out of memory) makes the others' next collective fail; they end with one line saying so, and
nothing is written.

    $ torchrun --nproc-per-node 2 -m llamaprune score smollm2-135m --out artifacts/run1
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from llamaprune.core.errors import UsageError

T = TypeVar("T")
# How long a collective waits for a process that neither answers nor exits (a hung peer, not a dead one).
TIMEOUT = datetime.timedelta(minutes=30)
# What a collective's error says when the process at the other end is gone.
PEER_SIGNS = ("connection", "peer", "timed out", "socket", "broken pipe")


class PeerStopped(UsageError):
    """Another process of the distributed run stopped, so this one cannot finish its share."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks | None:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(ranks: Ranks | None, device: str) -> Iterator[None]:
    """The default process group for the duration of the block (nothing for a single process); a failed
    collective, which means another process stopped, becomes a ``PeerStopped``."""
    if ranks is None:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    except RuntimeError as err:  # DistError is one too; so is what gloo raises when a partner's socket closes
        if not isinstance(err, dist.DistError) and not any(sign in str(err).lower() for sign in PEER_SIGNS):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PeerStopped(
            f"process {ranks.rank} of {ranks.world}: another process of this run stopped ({first}); nothing was "
            f"written: see the other processes' errors, then run the command again"
        ) from err
    finally:
        dist.destroy_process_group()


def agree(ranks: Ranks | None, error: UsageError | None) -> None:
    """Every process learns whether any failed its pre-flight: the one that failed raises its own error, the
    others a line pointing at it, so that no process waits for a partner that has already left."""
    if ranks is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    failed = torch.tensor([0 if error is None else ranks.rank + 1], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise UsageError(f"process {failed.item() - 1} refused the input (see its error line); nothing was written")


def share(items: Sequence[T], ranks: Ranks | None) -> list[T]:
    """This process's contiguous share of ``items`` (sizes differ by at most one)."""
    if ranks is None:
        return list(items)
    start, end = (len(items) * r // ranks.world for r in (ranks.rank, ranks.rank + 1))
    return list(items[start:end])


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place (one collective per tensor, in the same order everywhere);
    a bfloat16 one is summed in float32, which every backend has."""
    import torch.distributed as dist

    for tensor in tensors:
        buffer = tensor if tensor.dtype in (torch.float32, torch.float64, torch.int64) else tensor.float()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        if buffer is not tensor:
            tensor.copy_(buffer)


def all_reduce_count(count: int) -> int:
    import torch.distributed as dist

    total = torch.tensor([count], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())
