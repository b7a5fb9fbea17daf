"""Streamed apply: a safetensors checkpoint sliced by a plan tensor by tensor into a new one (docs/ARTIFACTS.md,
"Pruned checkpoint"), so the whole model is never in memory; error compensation's tensors are written in place
of the sliced ones they replace.

    >>> plan = read_plan("artifacts/run1/plans/global-taylor-0.20.json")             # doctest: +SKIP
    >>> stream_checkpoint(safetensors_files(Path(src)), plan, Path("out"))         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaprune.apply.slicing import kept_indices, slice_tensor, sliced_shape, tensor_route
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import Plan
from llamaprune.io.loading import DType
from llamaprune.io.pruned_checkpoint import TIED_HEAD
from llamaprune.io.weights import (
    FLOAT_CODES,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    SAFETENSORS_DTYPES,
    header_bytes,
    read_header,
    read_tensors,
)

DTYPE_CODES = {DType.float32: "F32", DType.bfloat16: "BF16", DType.float16: "F16"}


@dataclass(frozen=True)
class TensorSlice:
    """One output tensor of a streamed checkpoint: where it comes from and what it becomes."""

    source: Path
    key: str
    out_key: str
    source_dtype: str  # safetensors dtype code in the source
    dtype: str  # safetensors dtype code of the output
    shape: tuple[int, ...]
    layer: int | None  # original layer index, None outside decoder layers
    rest: str = ""  # name inside the layer
    computed: bool = False  # written from the ``replace`` tensors of stream_checkpoint, not read from ``source``

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES[self.dtype].itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan_tensors(
    files: list[Path], plan: Plan, indices: dict[int, dict], dtype: DType | None = None, tied: bool = False
) -> list[TensorSlice]:
    """Every output tensor, in input order, with its output name, dtype and shape (headers only, no data).
    With ``tied`` embeddings a stored ``lm_head.weight`` is dropped: transformers ties it on load."""
    out = []
    for path in files:
        header = read_header(path)
        for key in sorted(header.tensors):
            if tied and key == TIED_HEAD:
                continue
            info = header.tensors[key]
            source_code = info["dtype"]
            if source_code not in SAFETENSORS_DTYPES:
                raise UsageError(
                    f"{path.name}: tensor {key} has dtype {source_code}; llamaprune streams only "
                    f"{', '.join(SAFETENSORS_DTYPES)} (dequantize the checkpoint first)"
                )
            code = source_code
            if dtype is not None and code in FLOAT_CODES:
                code = DTYPE_CODES[DType(dtype)]
            codes = (source_code, code)
            route = tensor_route(key, plan, path.name)
            if route is None:
                continue
            out_key, layer, rest = route
            shape = info["shape"] if layer is None else sliced_shape(rest, info["shape"], indices[layer])
            out.append(TensorSlice(path, key, out_key, *codes, tuple(shape), layer, rest))
    return out


def with_replacements(
    tensors: list[TensorSlice], replace: Mapping[str, torch.Tensor], dtype: DType | None
) -> tuple[list[TensorSlice], int]:
    """``tensors`` with those named in ``replace`` marked as computed, and the ones only ``replace`` has
    appended (in the dtype of their layer's weights); also the parameters those new ones add."""
    by_key = {t.out_key: t for t in tensors}
    out = []
    for t in tensors:
        if t.out_key in replace:
            if tuple(replace[t.out_key].shape) != t.shape:
                raise RuntimeError(f"{t.out_key}: compensated to {tuple(replace[t.out_key].shape)}, expected {t.shape}")
            t = dataclasses.replace(t, computed=True)
        out.append(t)
    added = 0
    for key in replace:
        if key in by_key:
            continue
        tensor = replace[key]
        weight = by_key[key.rsplit(".", 1)[0] + ".weight"]
        code = weight.dtype if dtype is None else DTYPE_CODES[DType(dtype)]
        out.append(TensorSlice(weight.source, key, key, code, code, tuple(tensor.shape), weight.layer, computed=True))
        added += tensor.numel()
    return out, added


def parameter_count(tensors: list[TensorSlice]) -> int:
    """Parameters among planned tensors (weights and biases; buffers such as inv_freq do not count)."""
    total = 0
    for t in tensors:
        if t.out_key.endswith((".weight", ".bias")):
            total += t.numel
    return total


def shard_tensors(tensors: list[TensorSlice], max_shard_size: int | str) -> dict[str, list[TensorSlice]]:
    """Output file name -> its tensors, split as transformers splits a state dict."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_key = {t.out_key: t for t in tensors}
    split = split_state_dict_into_shards_factory(
        by_key,
        get_storage_size=lambda t: t.nbytes,
        filename_pattern=SAFE_WEIGHTS.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    return {name: [by_key[k] for k in keys] for name, keys in split.filename_to_tensors.items()}


def read_sliced(t: TensorSlice, indices: dict[int, dict], scratch: torch.Tensor,
                replace: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Read one tensor and slice it into ``scratch`` (valid until the next call), or take it from ``replace``.
    The file is opened per tensor, so at most one tensor is ever mapped."""
    if t.computed:
        return replace[t.out_key].to(SAFETENSORS_DTYPES[t.dtype]).contiguous()
    tensor = read_tensors({t.key: t.source}, [t.key])[t.key]
    if t.layer is not None:
        out = scratch[: t.numel * tensor.element_size()].view(tensor.dtype).view(t.shape)
        tensor = slice_tensor(t.rest, tensor, indices[t.layer], out=out)
    return tensor.to(SAFETENSORS_DTYPES[t.dtype]).contiguous()


def scratch_buffer(tensors: list[TensorSlice]) -> torch.Tensor:
    """One buffer for every sliced tensor: fresh memory per tensor costs a page fault per 4 KiB."""
    sizes = [
        t.numel * SAFETENSORS_DTYPES[t.source_dtype].itemsize for t in tensors if t.layer is not None and not t.computed
    ]
    return torch.empty(max(sizes, default=0), dtype=torch.uint8)


def write_shard(path: Path, tensors: list[TensorSlice], indices: dict[int, dict], scratch: torch.Tensor,
                replace: Mapping[str, torch.Tensor]) -> None:
    """Write a safetensors file tensor by tensor: the plan gives the header before any data is read."""
    with open(path, "wb") as f:
        f.write(header_bytes([(t.out_key, t.dtype, t.shape, t.nbytes) for t in tensors]))
        for t in tensors:
            tensor = read_sliced(t, indices, scratch, replace)
            if tuple(tensor.shape) != t.shape:
                raise RuntimeError(f"{t.key}: sliced to {tuple(tensor.shape)}, expected {t.shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def stream_checkpoint(
    files: list[Path],
    plan: Plan,
    out: Path,
    max_shard_size: int | str = "2GB",
    dtype: DType | None = None,
    tied: bool = False,
    replace: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Slice safetensors ``files`` by ``plan`` into ``out`` (shards + index); returns parameters written.
    ``replace`` (output name -> tensor: error compensation's o_proj / down_proj weights and output biases) is
    written instead of the sliced tensor of that name, or added where the source has none."""
    replace = replace or {}
    indices = kept_indices(plan)
    tensors, added = with_replacements(plan_tensors(files, plan, indices, dtype, tied), replace, dtype)
    check_params(parameter_count(tensors) - added, plan)
    shards = shard_tensors(tensors, max_shard_size)
    scratch = scratch_buffer(tensors)
    for name, shard in shards.items():
        write_shard(Path(out) / name, shard, indices, scratch, replace)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.out_key: name for name, shard in shards.items() for t in shard},
        }
        (Path(out) / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return parameter_count(tensors)


def check_params(count: int, plan: Plan) -> None:
    """The pruned model must have exactly the parameters the plan promised."""
    if count != plan.params_after:
        raise UsageError(
            f"the pruned model would have {count} parameters but plan {plan.name!r} says "
            f"{plan.params_after}: it does not fit this checkpoint; make it again with `llamaprune plan`"
        )
