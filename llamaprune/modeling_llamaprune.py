"""The ``llamaprune`` model type: a LLaMA-family decoder whose layers differ in width or lack sub-blocks.

A pruned checkpoint whose layers do not all keep the same shape carries transformers' ``per_layer_config``
(``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``skip``) under this model type, and
the layer features of the family it was pruned from as config fields: per-head query/key norms (Qwen3, Gemma 3),
norms after o_proj and down_proj, ``1 + weight`` norms, the embedding scale, the attention scale and sliding
layers (Gemma 3); the activation is ``hidden_act``.
The file imports only torch and transformers: it is copied verbatim into every such checkpoint, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it where llamaprune is not
installed. ``register_auto_classes`` (``llamaprune.register()``) makes the Auto classes know it for a plain
``from_pretrained``.

    >>> config = LlamaPruneConfig(
    ...     hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
    ...     intermediate_size=24, vocab_size=64, allow_global_per_layer_attribute_access=True,
    ...     per_layer_config={0: {"num_attention_heads": 2, "num_key_value_heads": 1}, 1: {"skip": ["mlp"]}},
    ... )
    >>> model = LlamaPruneForCausalLM(config)
    >>> model.model.layers[1].mlp is None, model.model.layers[0].self_attn.k_proj.out_features
    (True, 8)
"""

from __future__ import annotations

import logging

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, LlamaConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextScaledWordEmbedding,
)
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

MODEL_TYPE = "llamaprune"


class _OptedInGlobalReads(logging.Filter):
    """Drop transformers' notice about reading per-layer attributes globally: it is only emitted for configs
    that set ``allow_global_per_layer_attribute_access`` (as ours do on purpose), whenever transformers
    validates or saves one, so it would print on every load and save of a pruned model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Reading global config value for per-layer attribute")


logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").addFilter(_OptedInGlobalReads())


# The fields that carry a family's layer beyond Llama's (written only where a family sets them).
FAMILY_FIELDS = ("layer_types", "head_norms", "post_norms", "norm_offset", "embed_scale", "query_pre_attn_scalar")


@strict
class LlamaPruneConfig(LlamaConfig):
    """A Llama config with per-layer widths; ``base_model_type`` names the architecture it was pruned from.

    Query heads of a layer need not divide ``hidden_size`` (``head_dim`` is explicit). ``sliding_window`` applies
    to every layer with attention when ``layer_types`` is unset (Mistral); otherwise ``layer_types`` gives the
    attention type of each KV-cache slot (the layers with attention, in order; then the last one repeated up to
    ``num_hidden_layers``, for slots no layer uses), so that a cache transformers builds from this config has a
    sliding-window cache exactly where a sliding layer writes. The other fields carry the source family's layer
    (docs/ARTIFACTS.md).
    """

    model_type = MODEL_TYPE
    base_model_type: str = "llama"
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    output_bias: bool = False  # o_proj and down_proj carry output biases (error compensation)
    head_norms: bool = False  # q_norm / k_norm over head_dim after q_proj / k_proj (Qwen3, Gemma 3)
    post_norms: bool = False  # a norm after o_proj and after down_proj, before the residual (Gemma 3)
    norm_offset: bool = False  # every RMSNorm scales by 1 + weight, in float32 (Gemma 3)
    embed_scale: float = 1.0  # input embeddings are multiplied by it (Gemma 3: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power, not head_dim's

    def to_dict(self) -> dict:
        """Without the family fields that keep Llama's defaults, so that a Llama, Mistral or Qwen2 checkpoint's
        config reads as it did before Qwen3 and Gemma 3 came (missing fields load as these defaults)."""
        out = super().to_dict()
        for key in FAMILY_FIELDS:
            if key in out and out[key] == getattr(LlamaPruneConfig, key):
                del out[key]
        return out

    def validate_architecture(self):
        """Each layer with attention must split its query heads evenly over its KV heads."""
        layers = self.per_layer_config if self.is_heterogeneous else [self]
        for index, layer in enumerate(layers):
            if "attention" in (getattr(layer, "skip", None) or ()):
                continue
            heads, kv_heads = layer.num_attention_heads, layer.num_key_value_heads
            if kv_heads <= 0 or heads % kv_heads:
                raise ValueError(
                    f"layer {index}: num_attention_heads ({heads}) must be a positive multiple of "
                    f"num_key_value_heads ({kv_heads})"
                )


def projection_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias): Qwen2 biases q/k/v only, Llama's ``attention_bias`` covers all four; a
    compensated model (``output_bias``) has an o_proj bias."""
    qwen2 = getattr(config, "base_model_type", None) == "qwen2"
    attention = bool(config.attention_bias)
    return attention or qwen2, (attention and not qwen2) or bool(config.output_bias)


def block_norms(config) -> dict[str, tuple[str, str | None]]:
    """Sub-block -> (norm before it, norm after its output projection or None), named as the source family's
    checkpoints name them; core/arch.py's layer table has the same names (tests/test_arch.py holds them together)."""
    if config.post_norms:
        return {"attention": ("input_layernorm", "post_attention_layernorm"),
                "mlp": ("pre_feedforward_layernorm", "post_feedforward_layernorm")}
    return {"attention": ("input_layernorm", None), "mlp": ("post_attention_layernorm", None)}


def rms_norm(config: LlamaPruneConfig, size: int) -> nn.Module:
    """The family's RMSNorm: Gemma's scales by ``1 + weight`` in float32, Llama's by ``weight``."""
    return (Gemma3RMSNorm if config.norm_offset else LlamaRMSNorm)(size, eps=config.rms_norm_eps)


def rope_per_layer_type(config) -> bool:
    """Whether ``rope_parameters`` holds one set per layer type (Gemma 3's local and global rope)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return bool(rope) and set(rope) <= {"full_attention", "sliding_attention"}


class LlamaPruneAttention(LlamaAttention):
    """Llama attention with this layer's head counts, the base architecture's biases, its per-head query/key norms
    (``head_norms``), its score scale and, in a sliding layer, its window."""

    def __init__(self, config: LlamaPruneConfig, layer_idx: int, layer_type: str = "full_attention"):
        super().__init__(config, layer_idx)
        qkv_bias, o_bias = projection_biases(config)
        for proj, bias in (
            (self.q_proj, qkv_bias),
            (self.k_proj, qkv_bias),
            (self.v_proj, qkv_bias),
            (self.o_proj, o_bias),
        ):
            if bias != (proj.bias is not None):
                proj.bias = nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype)) if bias else None
        self.layer_type = layer_type
        self.sliding_window = config.sliding_window if layer_type == "sliding_attention" else None
        if config.query_pre_attn_scalar is not None:
            self.scaling = config.query_pre_attn_scalar**-0.5
        if config.head_norms:
            self.q_norm = rms_norm(config, self.head_dim)
            self.k_norm = rms_norm(config, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.head_norms:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class LlamaPruneDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer whose attention and/or MLP block (with its norms) may be absent (``skip``).

    ``cache_slot`` is the attention's index in the KV cache: layers without attention hold no slot, so slot 0
    is always a layer with attention (transformers reads the cached length from slot 0). ``layer_type``: full or
    sliding attention.
    """

    def __init__(self, config: LlamaPruneConfig, cache_slot: int, layer_type: str = "full_attention"):
        super().__init__()
        skip = set(getattr(config, "skip", None) or ())
        self.hidden_size = config.hidden_size
        self.layer_type = layer_type
        self.norms = block_norms(config)
        self.self_attn = self.mlp = None
        for block, names in self.norms.items():
            present = block not in skip
            for name in names:
                if name is not None:  # a skipped block's norms are absent too (None: no such module)
                    setattr(self, name, rms_norm(config, config.hidden_size) if present else None)
        if "attention" not in skip:
            self.self_attn = LlamaPruneAttention(config, cache_slot, layer_type)
        if "mlp" not in skip:
            self.mlp = LlamaMLP(config)
            if config.output_bias and self.mlp.down_proj.bias is None:
                down = self.mlp.down_proj
                down.bias = nn.Parameter(torch.zeros(down.out_features, dtype=down.weight.dtype))

    def _wrapped(self, block: str, hidden_states: torch.Tensor, run) -> torch.Tensor:
        """``hidden_states`` plus the sub-block ``run`` on its pre-norm, through its post-norm where it has one."""
        pre, post = self.norms[block]
        out = run(getattr(self, pre)(hidden_states))
        return hidden_states + (out if post is None else getattr(self, post)(out))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            hidden_states = self._wrapped("attention", hidden_states, lambda normed: self.self_attn(
                hidden_states=normed,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )[0])
        if self.mlp is not None:
            hidden_states = self._wrapped("mlp", hidden_states, self.mlp)
        return hidden_states


class LlamaPrunePreTrainedModel(LlamaPreTrainedModel):
    config_class = LlamaPruneConfig
    config: LlamaPruneConfig
    _no_split_modules = ["LlamaPruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlamaPruneDecoderLayer, "attentions": LlamaPruneAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Llama's, and the computed buffers of Gemma's modules, which loading leaves unset: the embedding scale,
        and the per-layer-type rotary frequencies (computed again from the config)."""
        super()._init_weights(module)
        if isinstance(module, Gemma3TextScaledWordEmbedding):
            init.constant_(module.embed_scale, module.scalar_embed_scale)
        elif isinstance(module, Gemma3RotaryEmbedding):
            for name, buffer in type(module)(module.config).named_buffers():
                init.copy_(getattr(module, name), buffer)


def cache_slots(layer_configs) -> list[int]:
    """Each layer's KV-cache slot: layers with attention count up from 0; a layer without one gets the slot of
    the next attention layer (it never reads or writes it)."""
    slots, next_slot = [], 0
    for layer in layer_configs:
        slots.append(next_slot)
        if "attention" not in (getattr(layer, "skip", None) or ()):
            next_slot += 1
    return slots


def slot_layer_types(config) -> list[str]:
    """The attention type of each KV-cache slot (``LlamaPruneConfig`` says how ``layer_types`` holds them)."""
    if config.layer_types is not None:
        return list(config.layer_types)
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * config.num_hidden_layers


class LlamaPruneModel(LlamaPrunePreTrainedModel):
    def __init__(self, config: LlamaPruneConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        if config.embed_scale == 1.0:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        else:
            self.embed_tokens = Gemma3TextScaledWordEmbedding(
                config.vocab_size, config.hidden_size, self.padding_idx, embed_scale=config.embed_scale
            )
        layers, types = config.per_layer_config, slot_layer_types(config)
        self.layers = nn.ModuleList(
            [LlamaPruneDecoderLayer(layer, slot, types[slot] if slot < len(types) else "full_attention")
             for layer, slot in zip(layers, cache_slots(layers), strict=True)]
        )
        self.num_cache_slots = sum(layer.self_attn is not None for layer in self.layers)
        self.norm = rms_norm(config, config.hidden_size)
        self.rotary_emb = (Gemma3RotaryEmbedding if rope_per_layer_type(config) else LlamaRotaryEmbedding)(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def has_attention(self) -> bool:
        return self.num_cache_slots > 0

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if not self.has_attention:  # nothing to cache: every step sees the whole sequence
            cache, use_cache = None, False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_functions = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        layer_types = {layer.layer_type for layer in self.layers}
        masks = {
            kind: mask_functions[kind](
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
            for kind in layer_types
        }
        hidden_states = inputs_embeds
        per_type = rope_per_layer_type(self.config)
        position_embeddings = {
            kind: self.rotary_emb(hidden_states, position_ids, *((kind,) if per_type else ()))
            for kind in layer_types
        }
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=masks[decoder_layer.layer_type],
                position_embeddings=position_embeddings[decoder_layer.layer_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class LlamaPruneForCausalLM(LlamaPrunePreTrainedModel, GenerationMixin):
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys
    _tp_plan = LlamaForCausalLM._tp_plan
    _pp_plan = LlamaForCausalLM._pp_plan

    def __init__(self, config: LlamaPruneConfig):
        super().__init__(config)
        self.model = LlamaPruneModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = LlamaForCausalLM.forward

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """A model without any attention layer keeps no cache: it recomputes the (position-free) sequence."""
        if self.model.has_attention:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForCausalLM know this model type (idempotent)."""
    AutoConfig.register(MODEL_TYPE, LlamaPruneConfig, exist_ok=True)
    AutoModel.register(LlamaPruneConfig, LlamaPruneModel, exist_ok=True)
    AutoModelForCausalLM.register(LlamaPruneConfig, LlamaPruneForCausalLM, exist_ok=True)

__all__ = ["LlamaPruneConfig", "LlamaPruneModel", "LlamaPruneForCausalLM", "LlamaPrunePreTrainedModel"]
