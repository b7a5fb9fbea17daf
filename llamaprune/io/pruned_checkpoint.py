"""The pruned checkpoint format (docs/ARTIFACTS.md, "Pruned checkpoint"): config, save, load, its modeling file.

A plan whose kept layers all have the same shape gives a plain config of the source architecture (llama,
mistral, qwen2, qwen3, gemma3_text) with new widths and an explicit ``head_dim``; any other plan gives a
``llamaprune`` config with transformers' ``per_layer_config``, the source family's layer features
(``family_fields``), an ``auto_map`` and a copy of ``modeling_llamaprune.py``, so ``trust_remote_code=True``
loads it without llamaprune. The weights are written by ``apply.streaming`` (a
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

from llamaprune.core.arch import PRUNED_MODEL_TYPE, embed_scale, family_of, source_model_type
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import Plan
from llamaprune.io.loading import Device, DType, register, resolve_device, resolve_source, torch_dtype

log = logging.getLogger(__name__)

MODEL_TYPE = PRUNED_MODEL_TYPE
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
# Fields that only place sliding-window layers (Qwen2, Qwen3); the llamaprune type lists its layers' types.
WINDOW_KEYS = ("use_sliding_window", "max_window_layers")
# Source fields the llamaprune type has its own field for (``family_fields``), or cannot carry (``UNCARRIED``).
FAMILY_KEYS = ("hidden_activation", "sliding_window_pattern", "_sliding_window_pattern")
FULL, SLIDING = "full_attention", "sliding_attention"
# Gemma features the llamaprune type does not implement: a set value is refused, naming plan --uniform.
UNCARRIED = ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention")


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
        return _llamaprune_config(config, fields, base_type, plan)
    if uniform:
        if getattr(config, "layer_types", None) is not None:
            types = layer_types_of(config)
            fields["layer_types"] = [types[lp.layer] for lp in plan.layers if not lp.removed]
        fields.update(overrides[0])
        try:
            return AutoConfig.for_model(base_type, **fields)
        except (ValueError, StrictDataclassError):
            pass  # e.g. Llama insists on hidden_size % num_attention_heads == 0: our type has no such rule
        return _llamaprune_config(config, fields, base_type, plan)
    return _llamaprune_config(config, fields, base_type, plan, per_layer_config=dict(enumerate(overrides)))


def _llamaprune_config(config, fields: dict, base_type: str, plan: Plan, **per_layer):
    from llamaprune.modeling_llamaprune import LlamaPruneConfig

    fields = {k: v for k, v in fields.items() if k not in WINDOW_KEYS + FAMILY_KEYS + UNCARRIED}
    fields.update(family_fields(config), layer_types=slot_layer_types(config, plan))
    if fields["layer_types"] is None and getattr(config, "layer_types", None) is not None:
        fields["sliding_window"] = None  # every layer is full attention; only Mistral's window covers them all
    if per_layer:
        per_layer.update(allow_global_per_layer_attribute_access=True, serialize_explicit_per_layer_config=True)
    return LlamaPruneConfig(**fields, **per_layer, base_model_type=base_type, auto_map=AUTO_MAP)


def family_fields(config) -> dict:
    """The llamaprune config fields that carry the layer of ``config``'s family (``core.arch.FAMILIES``): its norms,
    activation, embedding scale and attention scale. A feature the type does not implement is refused."""
    family = family_of(config)
    for key in UNCARRIED:
        if getattr(config, key, None):
            raise UsageError(
                f"the llamaprune model type does not implement {key} ({getattr(config, key)}), which this "
                f"{family.architecture} sets; make the plan with `llamaprune plan --uniform` for a plain checkpoint"
            )
    return {
        "head_norms": family.head_norms,
        "post_norms": family.blocks[0].post_norm is not None,
        "norm_offset": family.norm_offset,
        "embed_scale": embed_scale(config),
        "hidden_act": getattr(config, family.activation_key),
        "query_pre_attn_scalar": getattr(config, "query_pre_attn_scalar", None),
    }


def layer_types_of(config) -> list[str]:
    """Each layer's attention type (full or sliding) in ``config``, of the source's type or ours (whose
    ``layer_types`` are per KV-cache slot; a layer without attention is full: it has none to slide)."""
    if config.model_type != MODEL_TYPE:
        return list(getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers)
    from llamaprune.modeling_llamaprune import cache_slots, slot_layer_types

    layers = config.per_layer_config if config.is_heterogeneous else [config] * config.num_hidden_layers
    types = slot_layer_types(config)
    return [FULL if "attention" in (getattr(layer, "skip", None) or ()) else types[slot]
            for layer, slot in zip(layers, cache_slots(layers), strict=True)]


def slot_layer_types(config, plan: Plan) -> list[str] | None:
    """The ``layer_types`` of the llamaprune config of ``config`` after ``plan``: the type of each kept layer with
    attention, in order, then the last of them again up to the kept layer count, for cache slots no layer uses
    (modeling_llamaprune.LlamaPruneConfig says why per cache slot; repeating a type brings in no rope the source
    lacks); None where every layer is full attention, or Mistral's window covers them all."""
    types = layer_types_of(config)
    if set(types) == {FULL}:
        return None
    kept = [lp for lp in plan.layers if not lp.removed]
    slots = [types[lp.layer] for lp in kept if "attention" not in lp.skip] or [FULL]
    return (slots + slots[-1:] * len(kept))[: len(kept)]


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
