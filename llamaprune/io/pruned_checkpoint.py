"""The pruned checkpoint format (docs/ARTIFACTS.md, "Pruned checkpoint"): config, streaming slicing, save, load.

A plan whose kept layers all have the same shape gives a plain config of the source architecture (llama,
mistral, qwen2) with new widths and an explicit ``head_dim``; any other plan gives a ``llamaprune`` config
with transformers' ``per_layer_config``, an ``auto_map`` and a copy of ``modeling_llamaprune.py``, so
``trust_remote_code=True`` loads it without llamaprune. Safetensors checkpoints are sliced tensor by tensor.

    >>> plan = read_plan("artifacts/run1/plans/global-taylor-0.20.json")             # doctest: +SKIP
    >>> config = pruned_config(load_config(resolve_source("smollm2-135m")), plan)   # doctest: +SKIP
    >>> stream_checkpoint(safetensors_files(Path(src)), plan, Path("out"))         # doctest: +SKIP
    >>> write_config(config, Path("out"))                                            # doctest: +SKIP
    >>> model = load_pruned("out")                                                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaprune.apply.slicing import kept_indices, slice_tensor, sliced_shape, tensor_route
from llamaprune.core.arch import source_model_type
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import Plan
from llamaprune.io.loading import Device, DType, register, resolve_device, resolve_source, torch_dtype
from llamaprune.io.weights import SAFE_INDEX, SAFE_WEIGHTS, safetensors_files  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODEL_TYPE = "llamaprune"
MODELING_FILE = Path(__file__).parents[1] / "modeling_llamaprune.py"
AUTO_MAP = {
    "AutoConfig": "modeling_llamaprune.LlamaPruneConfig",
    "AutoModel": "modeling_llamaprune.LlamaPruneModel",
    "AutoModelForCausalLM": "modeling_llamaprune.LlamaPruneForCausalLM",
}
PLAN_FILE = "plan.json"
# Safetensors dtype codes this module reads and writes; --dtype casts only the floating ones.
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
DTYPE_CODES = {DType.float32: "F32", DType.bfloat16: "BF16", DType.float16: "F16"}
TIED_HEAD = "lm_head.weight"
# Keys of a source config that describe its own layer layout or origin, rebuilt for the pruned model.
LAYOUT_KEYS = (
    "transformers_version",
    "architectures",
    "model_type",
    "_name_or_path",
    "per_layer_config",
    "auto_map",
    "base_model_type",
    "allow_global_per_layer_attribute_access",
    "serialize_explicit_per_layer_config",
    "layer_types",
)
# Qwen2 fields that only place sliding-window layers; the llamaprune type has a global sliding_window instead.
QWEN2_WINDOW_KEYS = ("use_sliding_window", "max_window_layers")


def kept_layer_overrides(plan: Plan) -> list[dict]:
    """Per kept layer, its widths and skipped blocks in the ``per_layer_config`` schema."""
    overrides = []
    for lp in plan.layers:
        if lp.removed:
            continue
        entry: dict = {}
        if lp.attn_groups:
            entry["num_attention_heads"] = lp.heads_kept
            entry["num_key_value_heads"] = len(lp.attn_groups)
        if lp.mlp_channels:
            entry["intermediate_size"] = len(lp.mlp_channels)
        if lp.skip:
            entry["skip"] = sorted(lp.skip)
        overrides.append(entry)
    return overrides


def pruned_config(config, plan: Plan, output_bias: bool = False):
    """The config of ``config``'s model after ``plan``: plain if all kept layers share a shape, else ours. With
    ``output_bias`` (error compensation) it is always ours: o_proj and down_proj get output biases, which no
    plain Llama layout has alone."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    overrides = kept_layer_overrides(plan)
    base_type = source_model_type(config)
    fields = {k: v for k, v in config.to_dict().items() if k not in LAYOUT_KEYS}
    fields.update(num_hidden_layers=len(overrides), head_dim=plan.head_dim)
    if output_bias:
        fields["output_bias"] = True
    uniform = all(entry == overrides[0] and "skip" not in entry for entry in overrides)
    if uniform and output_bias:
        fields.update(overrides[0])
        return _llamaprune_config(config, fields, base_type)
    if uniform:
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            kept = [lp.layer for lp in plan.layers if not lp.removed]
            fields["layer_types"] = [layer_types[i] for i in kept]
        fields.update(overrides[0])
        try:
            return AutoConfig.for_model(base_type, **fields)
        except (ValueError, StrictDataclassError):
            pass  # e.g. Llama insists on hidden_size % num_attention_heads == 0: our type has no such rule
        return _llamaprune_config(config, fields, base_type)
    return _llamaprune_config(config, fields, base_type, per_layer_config=dict(enumerate(overrides)))


def _llamaprune_config(config, fields: dict, base_type: str, **per_layer):
    from llamaprune.modeling_llamaprune import LlamaPruneConfig

    windows = set(getattr(config, "layer_types", None) or ["full_attention"])
    if windows != {"full_attention"}:
        raise UsageError(
            f"layer types {sorted(windows)} cannot be pruned into the llamaprune model type (it knows full "
            f"attention and Mistral's global sliding window); use a plan that gives every layer one shape"
        )
    fields = {k: v for k, v in fields.items() if k not in QWEN2_WINDOW_KEYS + ("layer_types",)}
    if per_layer:
        per_layer.update(allow_global_per_layer_attribute_access=True, serialize_explicit_per_layer_config=True)
    return LlamaPruneConfig(**fields, **per_layer, base_model_type=base_type, auto_map=AUTO_MAP)


def copy_modeling_file(config, out: Path) -> None:
    """Our model type loads with ``trust_remote_code`` from the modeling file next to its config."""
    if config.model_type == MODEL_TYPE:
        shutil.copyfile(MODELING_FILE, Path(out) / MODELING_FILE.name)


def refresh_modeling_file(checkpoint: Path) -> bool:
    """Replace a ``llamaprune`` checkpoint's copy of the modeling file with this release's; True if it changed.

    ``trust_remote_code`` runs the copy a checkpoint was written with, so a checkpoint made before a fix (one
    that a newer transformers needs, say) keeps the old code until its copy is replaced; weights and config stay.
    """
    from llamaprune.core.artifacts import atomic_write_bytes

    config_file = Path(checkpoint) / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise UsageError(f"{checkpoint} has no config.json: give a checkpoint written by `llamaprune apply`") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{config_file} is not a JSON config ({err})") from None
    if model_type != MODEL_TYPE:
        raise UsageError(
            f"{checkpoint} is a plain {model_type!r} checkpoint: transformers loads it without a modeling file, "
            f"so there is nothing to refresh"
        )
    target, code = Path(checkpoint) / MODELING_FILE.name, MODELING_FILE.read_bytes()
    if target.is_file() and target.read_bytes() == code:
        return False
    atomic_write_bytes(target, code)
    return True


def write_config(config, out: Path) -> None:
    config.save_pretrained(out)
    copy_modeling_file(config, out)


def save_pruned(model, out: Path, max_shard_size: int | str = "2GB") -> None:
    """Save an in-memory pruned model (weights, config, generation config, modeling file)."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    copy_modeling_file(model.config, out)


def write_tokenizer_files(source_path: str, out: Path) -> None:
    """Tokenizer and generation config of a checkpoint directory, re-saved next to the pruned weights."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        AutoTokenizer.from_pretrained(source_path).save_pretrained(out)
    except (OSError, ValueError) as err:
        log.warning(
            "no tokenizer written: %s has none that transformers can load (%s); copy the tokenizer files of the "
            "model it came from into the output", source_path, " ".join(str(err).split())[:300],
        )
    try:
        GenerationConfig.from_pretrained(source_path).save_pretrained(out)
    except OSError:
        pass  # the source has no generation_config.json; transformers derives one from config.json


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
    from safetensors import safe_open

    out = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if tied and key == TIED_HEAD:
                    continue
                info = f.get_slice(key)
                source_code = info.get_dtype()
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
                shape = info.get_shape() if layer is None else sliced_shape(rest, info.get_shape(), indices[layer])
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


def safetensors_header(tensors: list[TensorSlice]) -> bytes:
    """The header of a safetensors file holding ``tensors`` in order, padded to 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.out_key] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def read_sliced(t: TensorSlice, indices: dict[int, dict], scratch: torch.Tensor,
                replace: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Read one tensor and slice it into ``scratch`` (valid until the next call), or take it from ``replace``.
    The file is opened per tensor, so at most one tensor is ever mapped."""
    from safetensors import safe_open

    if t.computed:
        return replace[t.out_key].to(SAFETENSORS_DTYPES[t.dtype]).contiguous()
    with safe_open(t.source, framework="pt") as f:
        tensor = f.get_tensor(t.key)
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
        f.write(safetensors_header(tensors))
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


def load_pruned(path: str | Path, dtype: str | DType = DType.float32, device: str | Device = Device.cpu):
    """Load a pruned checkpoint (either config kind) for inference, in eval mode."""
    from transformers import AutoModelForCausalLM

    register()
    source = resolve_source(str(path))
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype(dtype))
    return model.to(resolve_device(device)).eval()
