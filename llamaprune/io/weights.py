"""Safetensors weights: a checkpoint's files checked and fingerprinted before any weights load, and the one place
where tensors are read from and written to safetensors files (whole, by rows, by slices; headers).

Safetensors files are read by their headers: a truncated or foreign file, or tensors whose shapes are not the
ones config.json describes, is refused in one line that names the file. The fingerprint hashes the headers
(names, dtypes, shapes, offsets), the file sizes and a few bytes from the start, middle and end of every
tensor's data, so that a plan scored on one checkpoint is not applied unnoticed to another of the same shapes
(a finetuned one, or the same model in another dtype). ``.bin`` (pickle) files are only checked as they load.

    >>> source = resolve_source("smollm2-135m")                           # doctest: +SKIP
    >>> check_weights(source, load_config(source))                        # doctest: +SKIP
    'sha256:5e3b0c0f9a1d2c47'
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaprune.core.errors import UsageError
from llamaprune.core.user_files import parse_json, read_json

# Safetensors dtype codes llamaprune reads and writes; --dtype casts only the floating ones.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAMPLE_BYTES = 64  # hashed at the start, middle and end of each tensor's data
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header
DOWNLOAD = "download it again"


@dataclass(frozen=True)
class Header:
    """One safetensors file as its header describes it: tensor name -> (dtype, shape, data offsets)."""

    path: Path
    size: int
    raw: bytes
    tensors: dict[str, dict]

    @property
    def data_start(self) -> int:
        return 8 + len(self.raw)


def safetensors_files(path: Path) -> list[Path] | None:
    """The safetensors files of a checkpoint directory in index order, or None when it has none."""
    path = Path(path)
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = read_json(index, DOWNLOAD)["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (KeyError, TypeError, AttributeError):
            raise UsageError(f"{index} is not a safetensors index (no weight_map); {DOWNLOAD}") from None
        return [path / name for name in names]
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    return None


def read_header(path: Path) -> Header:
    """The header of one safetensors file, checked against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} is missing (the checkpoint's index lists it); {DOWNLOAD}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(length) if 0 <= length <= min(size - 8, MAX_HEADER) else b""
    try:
        doc = parse_json(raw, path) if raw else None
    except UsageError:
        doc = None
    tensors = _tensors(doc)
    if tensors is None:
        raise UsageError(f"{path} is truncated or not a safetensors file (its header does not parse); {DOWNLOAD}")
    end = 8 + len(raw) + max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if end > size:
        raise UsageError(f"{path} is truncated ({size} bytes, its header needs {end}); {DOWNLOAD}")
    return Header(path, size, raw, tensors)


def _tensors(doc) -> dict[str, dict] | None:
    """The tensor entries of a parsed header, or None when any is malformed."""
    if not isinstance(doc, dict):
        return None
    tensors = {key: info for key, info in doc.items() if key != "__metadata__"}
    for info in tensors.values():
        if not isinstance(info, dict):
            return None
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (
            isinstance(info.get("dtype"), str)
            and isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            return None
    return tensors


def tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of checkpoint directory ``path`` that holds it (headers only)."""
    from safetensors import safe_open

    files = {}
    for file in safetensors_files(Path(path)) or ():
        with safe_open(file, framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


def read_tensors(files: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of a checkpoint (``files`` from ``tensor_files``)."""
    from safetensors import safe_open

    out = {}
    for key in keys:
        with safe_open(files[key], framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def read_rows(files: dict[str, Path], key: str, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of the checkpoint's 2-D tensor ``key``, each read at its offset in the file: the rest of the
    tensor is never read (a safetensors slice reads the whole tensor first)."""
    header = read_header(files[key])
    info = header.tensors[key]
    dtype, width = SAFETENSORS_DTYPES[info["dtype"]], info["shape"][1]
    size, start = width * dtype.itemsize, header.data_start + info["data_offsets"][0]
    out = bytearray(len(rows) * size)
    with open(files[key], "rb") as f:
        for i, row in enumerate(rows):
            f.seek(start + row * size)
            out[i * size : (i + 1) * size] = f.read(size)
    return torch.frombuffer(out, dtype=dtype).view(len(rows), width)


def read_slice(file: Path, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (first dimension) of the tensor ``key`` of one file."""
    from safetensors import safe_open

    with safe_open(file, framework="pt", device="cpu") as f:
        return f.get_slice(key)[start:stop]


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a small safetensors file (a run's statistics, a spilled layer)."""
    from safetensors.torch import load_file as load

    return load(str(path))


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` (made contiguous)."""
    from safetensors.torch import save_file as save

    save({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path), metadata=metadata)


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The header of a safetensors file holding ``entries`` (key, dtype code, shape, bytes) in order, padded to 8
    bytes: what a writer puts before the tensors' data, back to back."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def fingerprint(headers: list[Header]) -> str:
    """sha256 over each file's name, size and header, and SAMPLE_BYTES at three points of each tensor."""
    digest = hashlib.sha256()
    for header in headers:
        digest.update(f"{header.path.name}\0{header.size}\0".encode())
        digest.update(header.raw)
        with open(header.path, "rb") as f:
            for info in sorted(header.tensors.values(), key=lambda info: info["data_offsets"][0]):
                begin, end = info["data_offsets"]
                for at in sorted({begin, (begin + end) // 2, max(begin, end - SAMPLE_BYTES)}):
                    f.seek(header.data_start + at)
                    digest.update(f.read(min(SAMPLE_BYTES, end - at)))
    return "sha256:" + digest.hexdigest()[:16]


def check_weights(source, config) -> str | None:
    """Check a checkpoint directory's safetensors files against themselves and ``config``; their fingerprint,
    or None for a source that has none (GGUF file, hub id, .bin checkpoint: not fingerprinted)."""
    files = safetensors_files(Path(source.path)) if source.kind == "dir" else None
    if not files:
        return None
    headers = [read_header(path) for path in files]
    check_shapes(headers, config, Path(source.path) / "config.json")
    return fingerprint(headers)


def check_shapes(headers: list[Header], config, config_path: Path) -> None:
    """Every tensor the model of ``config`` has must be in the files with the shape it expects (transformers
    would fill a missing one with random values); names the model does not know are left to the loader."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamaprune.modeling_llamaprune import register_auto_classes

    register_auto_classes()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    found = {key: (header.path, info["shape"]) for header in headers for key, info in header.tensors.items()}
    if not found.keys() & expected.keys():
        return  # another naming scheme: the loader maps it, or says what is wrong
    fix = f"the weights and {config_path.name} are of different models; download the checkpoint again"
    for key, (path, shape) in found.items():
        if key in expected and tuple(shape) != expected[key]:
            raise UsageError(f"{path}: {key} has shape {list(shape)}, {config_path} says {list(expected[key])}; {fix}")
    missing = sorted(expected.keys() - found.keys())
    if missing:
        raise UsageError(
            f"{config_path} describes {len(missing)} tensor(s) the weights lack (e.g. {missing[0]}); {fix}"
        )


@contextmanager
def pickle_errors(source) -> Iterator[None]:
    """A ``.bin`` weight file that torch refuses to unpickle (it holds code, not tensors) or cannot read is bad
    input: one line naming the checkpoint, not torch's traceback."""
    where = f"{source.name}: a .bin weight file"
    try:
        yield
    except pickle.UnpicklingError:
        raise UsageError(
            f"{where} holds Python objects besides tensors (refused: unpickling them could run code); use a "
            f"safetensors checkpoint from a trusted source"
        ) from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err):
            raise
        raise UsageError(f"{where} is truncated or not a PyTorch checkpoint; {DOWNLOAD}") from None
