"""Export a pruned (or plain) llama, mistral, qwen3 or gemma3_text checkpoint to one GGUF file that llama.cpp runs
with nothing else.

Llama / mistral layers that all share one shape (and no output biases) become llama.cpp's ``llama``
architecture; anything else pruned from them becomes ``deci``, whose head counts and MLP widths are per-layer
arrays and whose o_proj / down_proj may carry biases. A plain qwen3 or gemma3_text checkpoint (a uniform plan)
becomes llama.cpp's own ``qwen3`` / ``gemma3``; llama.cpp has no per-layer widths for those, so any other
checkpoint of theirs is refused, naming ``plan --uniform``. Rope is default, linear or llama3 (LLaMA-3.1/3.2),
whose scaling is a ``rope_freqs`` tensor; a mistral sliding window bounds the context length; Gemma 3's sliding
layers, local rope and ``1 + weight`` norms are written as llama.cpp's gemma3 reads them. Tensors are read one at a
time and written straight into the file, which is built in a locked temporary directory beside ``--out`` and
renamed into place.

    >>> export(ExportOptions(Path("artifacts/run1/model"), Path("pruned.gguf")))      # doctest: +SKIP
    {'architecture': 'deci', 'tensors': 215, 'bytes': 431123456, ...}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import gguf
import numpy as np
import torch

from llamaprune.core.arch import family_of, linear_of, split_layer_key
from llamaprune.core.artifacts import manifest_in, refuse_existing
from llamaprune.core.choices import parse_choice
from llamaprune.core.errors import UsageError
from llamaprune.core.groups import LayerShape, model_shape
from llamaprune.core.temporaries import temporary_dir
from llamaprune.export.gguf_vocab import add_vocab
from llamaprune.io.loading import EMBEDDED, Source, embedded_gguf
from llamaprune.io.pruned_checkpoint import PLAN_FILE, TIED_HEAD
from llamaprune.io.weights import read_header, read_tensors, tensor_files
from llamaprune.runs.phase import Phase, preflight

log = logging.getLogger(__name__)
# GGUFWriter logs its internals (endianness, temporary file names) at INFO, which the CLI would print.
logging.getLogger("gguf").setLevel(logging.WARNING)


class ExportFormat(str, Enum):
    gguf = "gguf"


class OutType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


QType = gguf.GGMLQuantizationType
WEIGHT_TYPES = {OutType.f32: QType.F32, OutType.f16: QType.F16, OutType.bf16: QType.BF16, OutType.q8_0: QType.Q8_0}
FILE_TYPES = {
    OutType.f32: gguf.LlamaFileType.ALL_F32,
    OutType.f16: gguf.LlamaFileType.MOSTLY_F16,
    OutType.bf16: gguf.LlamaFileType.MOSTLY_BF16,
    OutType.q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
ROPE_TYPES = ("default", "linear", "llama3")
BASE_TYPES = ("llama", "mistral")
# The llama.cpp architecture of a plain (uniform) checkpoint of each family that export takes.
PLAIN_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3,
               "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
# Architectures whose rope turns adjacent pairs (llama.cpp's NORM rope): HF's rotate-half rows are permuted for them.
NORM_ROPE = (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI)


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    out: Path
    format: str = ExportFormat.gguf.value
    outtype: str = OutType.f32.value
    overwrite: bool = False


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor: read from ``key`` of the checkpoint (q/k rows permuted for ``heads`` heads), or, without a
    key, ``fill`` broadcast to ``shape``: a constant that keeps a deci layer exactly equivalent (see
    ``written_shapes``), or llama3's rope factors (see ``llama3_rope_factors``)."""

    name: str
    shape: tuple[int, ...]  # numpy (row-major) order, as torch stores it
    qtype: QType
    key: str | None = None
    heads: int | None = None
    fill: float | tuple[float, ...] = 0.0
    shift: float = 0.0  # added to the values read: Gemma's norms scale by 1 + weight, llama.cpp's by its weight

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape given to GGUFWriter: quantized types are written as rows of bytes."""
        if self.qtype in (QType.F32, QType.F16):
            return self.shape
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        itemsize = {QType.F32: 4, QType.F16: 2}.get(self.qtype, 1)
        return int(np.prod(self.stored_shape)) * itemsize


def export(options: ExportOptions) -> dict:
    """Pre-flight (format, type, output, checkpoint), then the GGUF file; returns what was written."""
    parse_choice(ExportFormat, options.format, "--format")
    outtype = parse_choice(OutType, options.outtype, "--outtype")
    out = Path(options.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the path of the .gguf file to write")
    checked = preflight(Phase("export", out, options.overwrite, model=str(options.checkpoint), tokenizer=False))
    source, config = checked.source, checked.config
    if source.kind != "dir":
        raise UsageError(
            f"{options.checkpoint} is not a checkpoint directory; export takes the directory `llamaprune apply` wrote "
            f"(or a plain {', '.join(PLAIN_ARCHS)} checkpoint directory)"
        )
    checkpoint = Path(source.path)
    arch = architecture(config)
    shapes = layer_shapes(config)
    warn_unaligned(shapes)
    files = tensor_files(checkpoint)
    tensors = out_tensors(files, config, arch, shapes, WEIGHT_TYPES[outtype])
    with atomic_file(out, options.overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        add_metadata(writer, config, arch, written_shapes(shapes, arch), FILE_TYPES[outtype])
        add_provenance(writer, checkpoint, source)
        log.info("tokenizer from %s", add_vocab(writer, checkpoint, source_gguf(checkpoint, source), config.vocab_size))
        for t in tensors:
            writer.add_tensor_info(t.name, t.stored_shape, _numpy_type(t.qtype), t.nbytes,
                                   None if t.qtype in (QType.F32, QType.F16) else t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(tensor_data(t, files))
        writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": len(tensors), "bytes": out.stat().st_size,
            "outtype": outtype.value, "out": str(out)}


BLOCK = gguf.GGML_QUANT_SIZES[QType.Q8_0][0]  # 32; llama.cpp's tiled float matmuls want multiples of 16 as well


def warn_unaligned(shapes: list[LayerShape]) -> None:
    """Say so where MLP widths are not whole blocks: llama.cpp then runs a batch (a prompt) through slower
    kernels, and q8_0 keeps those down_proj rows in f16 (bench/RESULTS.md: prompt processing 0.84x the dense
    model's speed instead of 1.26x on SmolLM2 at 20%)."""
    odd = [i for i, shape in enumerate(shapes) if shape.mlp_channels % BLOCK]
    if odd:
        log.warning("%d of %d layers have MLP widths that are not multiples of %d, which slows llama.cpp's prompt "
                    "processing and keeps their q8_0 down_proj in f16: plan with --round-to %d for llama.cpp",
                    len(odd), len(shapes), BLOCK, BLOCK)


@contextmanager
def atomic_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """A path in a locked temporary directory beside ``path`` (swept if the process is killed) whose file
    replaces ``path`` only if the block succeeds."""
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_dir(path.parent, path.name) as tmp:
        yield tmp.path / path.name
        os.replace(tmp.path / path.name, path)


def architecture(config) -> gguf.MODEL_ARCH:
    """``llama`` for a plain llama or mistral config (llama.cpp's converter maps MistralForCausalLM to llama too);
    ``deci`` for our heterogeneous or output-biased type pruned from either; ``qwen3`` / ``gemma3`` for a plain
    config of theirs, whose features must be ones llama.cpp's graph has (``check_gemma3``)."""
    base = getattr(config, "base_model_type", config.model_type)
    if base not in PLAIN_ARCHS:
        raise UsageError(
            f"export supports {', '.join(PLAIN_ARCHS)} checkpoints, not {base}; export a checkpoint pruned from one "
            f"of them"
        )
    if config.model_type not in PLAIN_ARCHS and base not in BASE_TYPES:
        raise UsageError(
            f"llama.cpp's {PLAIN_ARCHS[base].name.lower()} architecture has one width for every layer and no output "
            f"biases, and this {base} checkpoint has layers of several shapes or compensation's biases; make the "
            f"plan with `llamaprune plan --uniform` and apply it without --compensate"
        )
    for rope in _ropes(config):
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise UsageError(f"rope type {rope['rope_type']!r} is not exported yet; export supports "
                             f"{', '.join(ROPE_TYPES)}")
    if config.model_type == "gemma3_text":
        check_gemma3(config)
    if config.model_type == "qwen3" and "sliding_attention" in (config.layer_types or ()):
        raise UsageError("llama.cpp's qwen3 architecture has no sliding-window layers, which this checkpoint has")
    return PLAIN_ARCHS.get(config.model_type, gguf.MODEL_ARCH.DECI)


def check_gemma3(config) -> None:
    """Refuse a Gemma 3 config llama.cpp's gemma3 graph would not compute exactly: it scales attention scores by
    head_dim^-1/2 (query_pre_attn_scalar must be head_dim) and has no logit soft-capping."""
    if config.query_pre_attn_scalar != _head_dim(config):
        raise UsageError(
            f"llama.cpp's gemma3 scales attention by head_dim ({_head_dim(config)}) and this checkpoint's "
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar}; it cannot be exported exactly"
        )
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, key, None):
            raise UsageError(f"llama.cpp's gemma3 has no {key} ({getattr(config, key)}), which this checkpoint sets")


def context_length(config) -> int:
    """``max_position_embeddings``, or Mistral's ``sliding_window`` where that is shorter. llama.cpp's llama and deci
    graphs attend to every earlier token; transformers' window lets a token see itself and the ``sliding_window - 1``
    before it, which is every earlier token as long as the sequence is at most ``sliding_window`` long. Within the
    context written here the file computes exactly what transformers does."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "gemma3_text" or window is None or window >= config.max_position_embeddings:
        return config.max_position_embeddings
    log.info("context length %d: the sliding window; llama.cpp attends to all earlier tokens, beyond it transformers "
             "does not", window)
    return window


def layer_shapes(config) -> list[LayerShape]:
    """Each decoder layer's widths as stored in the checkpoint (``core.groups.model_shape``'s)."""
    return list(model_shape(config).layers)


def written_shapes(shapes: list[LayerShape], arch: gguf.MODEL_ARCH) -> list[LayerShape]:
    """The widths llama.cpp is told. Two deci rules of llama.cpp (src/models/deci.cpp, src/llama-model.cpp)
    need stand-ins that change no output:
    - a layer with ``n_ff == 0`` ``continue``s before ``inpL = cur``, dropping its attention output (and, as the
      last layer, skipping the row selection of the outputs): a skipped MLP is written as one channel whose
      gate, up and down weights are zero (silu(0) * 0 = 0, and 0 through down_proj adds nothing);
    - the head size is read only when layer 0 has heads (else it is 0 for every layer): a layer 0 without
      attention gets one KV group whose q, k, v rows and o_proj columns are zero (uniform attention over zero
      values, then a zero projection: exactly 0)."""
    if arch == gguf.MODEL_ARCH.LLAMA:
        return shapes
    out = []
    for index, shape in enumerate(shapes):
        heads, kv_heads = (1, 1) if index == 0 and shape.query_heads == 0 else (shape.query_heads, shape.kv_groups)
        out.append(LayerShape(heads, kv_heads, shape.mlp_channels or 1))
    return out


def out_tensors(files: dict[str, Path], config, arch: gguf.MODEL_ARCH, shapes: list[LayerShape],
                weight_type: QType) -> list[OutTensor]:
    """Every tensor of the file, in order, from the safetensors headers (no data read)."""
    names = gguf.get_tensor_name_map(arch, len(shapes))
    headers = {file: read_header(file) for file in set(files.values())}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    shift = 1.0 if family_of(config).norm_offset else 0.0  # llama.cpp's RMSNorm scales by its weight alone
    for key in sorted(files, key=_tensor_order):
        if key.endswith("rotary_emb.inv_freq") or (tied and key == TIED_HEAD):
            continue  # llama.cpp computes the rotary frequencies; a tied head is the embedding
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"tensor {key} of the checkpoint has no GGUF counterpart in llama.cpp's "
                             f"{gguf.MODEL_ARCH_NAMES[arch]} architecture")
        shape = tuple(headers[files[key]].tensors[key]["shape"])
        parts = split_layer_key(key)
        linear = linear_of(parts[2]) if parts else None
        heads = None
        if linear is not None and linear.rotary and arch in NORM_ROPE:  # rope pairs rows otherwise: permuted
            shape_of = shapes[parts[1]]
            heads = shape_of.query_heads if linear.index == "q" else shape_of.kv_groups
        norm = key.endswith("norm.weight")
        out.append(OutTensor(name, shape, _tensor_type(shape, weight_type), key, heads, shift=shift if norm else 0.0))
    if arch == gguf.MODEL_ARCH.DECI:
        out += stand_ins(shapes, config, weight_type)
    rope = _rope(config)
    if rope.get("rope_type") == "llama3":  # first, where llama.cpp's converter writes its generated tensors
        factors = llama3_rope_factors(rope, _head_dim(config))
        name = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"
        out.insert(0, OutTensor(name, factors.shape, QType.F32, fill=tuple(factors.tolist())))
    return out


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama3 rope as llama.cpp takes it: ``head_dim / 2`` float32 divisors of the rotation frequencies
    ``rope_theta ** (-2i / head_dim)`` (``rope_freqs.weight``, which llama.cpp's llama and deci graphs hand to
    ggml_rope_ext). With ``L = original_max_position_embeddings``, a frequency whose wavelength ``2 pi / f`` is
    under ``L / high_freq_factor`` keeps its value (1), one over ``L / low_freq_factor`` is divided by ``factor``,
    and one between by ``1 / ((1 - s) / factor + s)``, ``s = (L / wavelength - low_freq_factor) / (high_freq_factor
    - low_freq_factor)``: transformers' llama3 frequencies are exactly the default ones divided by these."""
    freqs = rope["rope_theta"] ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelength = 2 * np.pi / freqs
    factors = np.where(wavelength > original / low, factor, 1.0)
    between = (wavelength >= original / high) & (wavelength <= original / low)
    smooth = (original / wavelength[between] - low) / (high - low)
    factors[between] = 1 / ((1 - smooth) / factor + smooth)
    return factors.astype(np.float32)


def stand_ins(shapes: list[LayerShape], config, weight_type: QType) -> list[OutTensor]:
    """The zero KV group of an attention-free layer 0 and the zero MLP channel of MLP-free layers
    (``written_shapes`` says why); their norms are ones."""
    hidden, head_dim = config.hidden_size, _head_dim(config)
    T = gguf.MODEL_TENSOR

    def zeros(kind: gguf.MODEL_TENSOR, index: int, shape: tuple[int, int]) -> OutTensor:
        return OutTensor(_name(kind, index), shape, _tensor_type(shape, weight_type))

    out = []
    for index, shape in enumerate(shapes):
        if index == 0 and shape.query_heads == 0:
            out.append(OutTensor(_name(T.ATTN_NORM, 0), (hidden,), QType.F32, fill=1.0))
            out += [zeros(kind, 0, (head_dim, hidden)) for kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)]
            out.append(zeros(T.ATTN_OUT, 0, (hidden, head_dim)))
        if shape.mlp_channels == 0:
            out.append(OutTensor(_name(T.FFN_NORM, index), (hidden,), QType.F32, fill=1.0))
            out += [zeros(kind, index, (1, hidden)) for kind in (T.FFN_GATE, T.FFN_UP)]
            out.append(zeros(T.FFN_DOWN, index, (hidden, 1)))
    return out


def _name(kind: gguf.MODEL_TENSOR, layer: int) -> str:
    return f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.weight"


def tensor_data(t: OutTensor, files: dict[str, Path]) -> np.ndarray:
    """The tensor's bytes in its GGUF type; q/k rows permuted from HF's rotate-half layout to the interleaved
    pairs of llama.cpp's NORM rope (as convert_hf_to_gguf.py's LlamaModel.permute)."""
    if t.key is None:
        data = np.full(t.shape, t.fill, dtype=np.float32)
    else:
        tensor = read_tensors(files, [t.key])[t.key].to(torch.float32)
        if t.heads:
            tensor = tensor.reshape(t.heads, 2, tensor.shape[0] // t.heads // 2, *tensor.shape[1:])
            tensor = tensor.swapaxes(1, 2).reshape(t.shape)
        data = (tensor + t.shift).numpy()
    return gguf.quants.quantize(data, t.qtype)


def add_metadata(writer: gguf.GGUFWriter, config, arch: gguf.MODEL_ARCH, shapes: list[LayerShape],
                 file_type: gguf.LlamaFileType) -> None:
    """Hyperparameters (per-layer arrays for deci), rope and the file type."""
    per_layer = arch == gguf.MODEL_ARCH.DECI

    def value(field: str):
        values = [getattr(shape, field) for shape in shapes]
        return values if per_layer else values[0]

    head_dim = _head_dim(config)
    writer.add_block_count(len(shapes))
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(value("mlp_channels"))
    writer.add_head_count(value("query_heads"))
    writer.add_head_count_kv(value("kv_groups"))
    # Always explicit: llama.cpp's default head size is hidden_size / heads, which pruning breaks.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    # llama3 writes no rope.scaling.* key (as llama.cpp's converter): its scaling is the rope_freqs tensor.
    if arch == gguf.MODEL_ARCH.GEMMA3:  # local layers: a window and their own rope base, unscaled
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_provenance(writer: gguf.GGUFWriter, checkpoint: Path, source: Source) -> None:
    """``general.name`` (the source model as the manifest records it, and the plan), and ``llamaprune.plan``
    with the plan's target and achieved ratios when the checkpoint has its plan."""
    from llamaprune import __version__
    from llamaprune.core.plan_file import read_plan

    manifest = manifest_in(checkpoint) or {}
    name = Path((manifest.get("model") or {}).get("source") or source.name).name
    writer.add_string("llamaprune.version", __version__)
    if not (checkpoint / PLAN_FILE).is_file():
        writer.add_name(name)
        return
    plan = read_plan(checkpoint / PLAN_FILE)
    writer.add_name(f"{name} pruned ({plan.name})")
    writer.add_string("llamaprune.plan", plan.name)
    writer.add_float32("llamaprune.plan.target_ratio", plan.target_ratio)
    writer.add_float32("llamaprune.plan.achieved_ratio", plan.achieved_ratio)


def source_gguf(checkpoint: Path, source: Source) -> Path | None:
    """The GGUF file the checkpoint's tokenizer came from: the manifest's ``model.gguf_file``, or the embedded
    default's (named by the manifest or given by name); None for a checkpoint of its own tokenizer."""
    manifest = manifest_in(checkpoint) or {}
    model = manifest.get("model") or {}
    if model.get("gguf_file"):
        path = Path(model["path"]) / model["gguf_file"]
        if path.is_file():
            return path
        log.warning("the source GGUF %s is gone; the tokenizer comes from %s/tokenizer.json", path, checkpoint)
        return None
    if EMBEDDED in (model.get("source"), source.name):
        return embedded_gguf()
    return None


def _ropes(config) -> list[dict]:
    """Every rope of the config: one, or one per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return list(rope.values()) if family_of(config).rope_per_layer_type else [rope]


def _rope(config) -> dict:
    """The rope of the config, or of its full-attention layers (Gemma 3's global rope)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope["full_attention"] if family_of(config).rope_per_layer_type else rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _tensor_type(shape: tuple[int, ...], weight_type: QType) -> QType:
    """Norms and biases stay f32 (as llama.cpp's converter keeps them). A q8_0 row must be whole blocks of 32:
    a narrower one (a stand-in MLP channel's down_proj) is f16, as the converter falls back."""
    if len(shape) == 1:
        return QType.F32
    if weight_type == QType.Q8_0 and shape[-1] % BLOCK:
        return QType.F16
    return weight_type


def _numpy_type(qtype: QType) -> type:
    return {QType.F32: np.float32, QType.F16: np.float16}.get(qtype, np.uint8)


def _tensor_order(key: str) -> tuple[int, str]:
    """Embeddings, then the layers in order, then the final norm and head: a file that reads front to back."""
    parts = split_layer_key(key)
    if parts is not None:
        return (1 + parts[1], key)
    return (0 if "embed" in key else 1 << 30, key)
