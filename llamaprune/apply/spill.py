"""Tensors parked on disk between the step that computes them and the step that writes them: error
compensation refits a checkpoint layer by layer, and holding every refitted o_proj / down_proj until the
checkpoint is written would keep about a third of a large model in memory. Each ``add`` writes one
safetensors file; a tensor is read back when it is looked up, and dropped by the caller after use.

    >>> import tempfile, torch
    >>> spill = SpilledTensors(Path(tempfile.mkdtemp()))
    >>> spill.add({"a.weight": torch.ones(2, 3)})
    >>> list(spill), spill["a.weight"].shape
    (['a.weight'], torch.Size([2, 3]))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llamaprune.io.weights import read_tensors, save_file


class SpilledTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping of name -> tensor whose values live in ``directory`` (in memory when it is None)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.files: dict[str, Path] = {}
        self.held: dict[str, torch.Tensor] = {}
        self.parts = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Park ``tensors`` (one layer's, say); they are not kept in memory when there is a directory."""
        if self.directory is None:
            self.held.update(tensors)
            return
        path = self.directory / f"part-{self.parts:05d}.safetensors"
        self.parts += 1
        save_file(tensors, path)
        self.files.update(dict.fromkeys(tensors, path))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.held:
            return self.held[key]
        return read_tensors({key: self.files[key]}, [key])[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.held
        yield from self.files

    def __len__(self) -> int:
        return len(self.held) + len(self.files)
