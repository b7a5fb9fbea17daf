"""The pruned checkpoint format (docs/ARTIFACTS.md, "Pruned checkpoint"): config, save, load, its modeling file.

A plan whose kept layers all have the same shape gives a plain config of the source architecture (llama,
mistral, qwen2) with new widths and an explicit ``head_dim``; any other plan gives a ``llamaprune`` config
with transformers' ``per_layer_config``, an ``auto_map`` and a copy of ``modeling_llamaprune.py``, so
``trust_remote_code=True`` loads it without llamaprune. The weights are written by ``apply.streaming`` (a
safetensors source, tensor by tensor) or by ``save_pruned`` (a model in memory).

    >>> plan = read_plan("artifacts/run1/plans/global-taylor-0.20.json")             # doctest: +SKIP
    >>> config = pruned_config(load_config(resolve_source("smollm2-135m")), plan)   # doctest: +SKIP
    >>> write_config(config, Path("out"))                                            # doctest: +SKIP
    >>> model = load_pruned("out")                                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from llamaprune.core.arch import source_model_type
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import Plan
from llamaprune.io.loading import Device, DType, register, resolve_device, resolve_source, torch_dtype

log = logging.getLogger(__name__)

MODEL_TYPE = "llamaprune"
MODELING_FILE = Path(__file__).parents[1] / "modeling_llamaprune.py"
AUTO_MAP = {
    "AutoConfig": "modeling_llamaprune.LlamaPruneConfig",
    "AutoModel": "modeling_llamaprune.LlamaPruneModel",
    "AutoModelForCausalLM": "modeling_llamaprune.LlamaPruneForCausalLM",
}
PLAN_FILE = "plan.json"
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
    from llamaprune.core.user_files import read_json

    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{checkpoint} has no config.json: give a checkpoint written by `llamaprune apply`")
    config = read_json(config_file, "give a checkpoint written by `llamaprune apply`")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise UsageError(f"{config_file} names no model_type: give a checkpoint written by `llamaprune apply`")
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


def load_pruned(path: str | Path, dtype: str | DType = DType.float32, device: str | Device = Device.cpu):
    """Load a pruned checkpoint (either config kind) for inference, in eval mode."""
    from transformers import AutoModelForCausalLM

    register()
    source = resolve_source(str(path))
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype(dtype))
    return model.to(resolve_device(device)).eval()
