"""The one table of a LLaMA-family decoder layer: its linear modules, its two blocks and their norms, and what
each source architecture (family: llama, mistral, qwen2, qwen3, gemma3_text) adds to it as data: norms after
the projections and per-head query/key norms, the bias rule, the activation, the embedding scale. No torch here.

Everything that walks a layer reads it from here: scoring (which weights a group owns, which input each
linear reads for activation statistics), slicing and streaming (which kept index cuts which tensor along which
dimension, what goes with a skipped block), the layer stream and the refit (which norms wrap a block), LoRA
targets, the pruned model type's config. The group rules are docs/ARTIFACTS.md, "Groups".

    >>> [linear.name for linear in LINEARS if linear.kind == MLP]
    ['gate_proj', 'up_proj', 'down_proj']
    >>> linear = LINEARS[3]
    >>> linear.path, linear.axis, linear.index, linear.input
    ('self_attn.o_proj', 'cols', 'q', 'o_in')
    >>> INPUT_READERS["mlp_in"].path
    'mlp.gate_proj'
    >>> [block.post_norm for block in FAMILIES["gemma3_text"].blocks]
    ['post_attention_layernorm', 'post_feedforward_layernorm']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATTN = "attn"  # group kind: one KV head with its query heads
MLP = "mlp"  # group kind: one intermediate channel
ROWS = "rows"  # groups own output rows (q/k/v/gate/up weights and their biases)
COLS = "cols"  # groups own input columns (o_proj, down_proj); their output bias belongs to no group


@dataclass(frozen=True)
class Linear:
    """One linear module of a decoder layer.

    ``index`` names the kept index that slices it ("q": query rows, "kv": key/value rows, "mlp": channels);
    ``input`` names the activation it reads, whose statistics are collected once per layer under that name."""

    path: str
    block: str
    kind: str
    axis: str
    index: str
    input: str
    rotary: bool = False  # its output rows carry rotary position embeddings (query and key)

    @property
    def name(self) -> str:
        """The module's own name (``q_proj``): what peft's ``target_modules`` matches."""
        return self.path.rsplit(".", 1)[1]

    @property
    def dim(self) -> int:
        """The weight dimension the groups cut: 0 for output rows, 1 for input columns."""
        return 0 if self.axis == ROWS else 1


@dataclass(frozen=True)
class Block:
    """A skippable sub-block: its module, the norm in front of it, and its group kind. ``post_norm`` is the norm
    its output passes through before the residual (Gemma 3), which goes with it when it is skipped. ``buffers``
    are per-layer tensors kept whole (older transformers keep a rotary buffer in every attention module)."""

    name: str
    module: str
    norm: str
    kind: str
    buffers: tuple[str, ...] = ()
    post_norm: str | None = None

    @property
    def norms(self) -> tuple[str, ...]:
        """The block's own norms (modules of the decoder layer), in the order the block runs them."""
        return (self.norm,) if self.post_norm is None else (self.norm, self.post_norm)


BLOCKS = (
    Block("attention", "self_attn", "input_layernorm", ATTN, ("self_attn.rotary_emb.inv_freq",)),
    Block("mlp", "mlp", "post_attention_layernorm", MLP),
)
# Gemma 3: a norm before and after each sub-block; its "post_attention_layernorm" is the attention's output norm.
SANDWICH_BLOCKS = (
    Block("attention", "self_attn", "input_layernorm", ATTN, post_norm="post_attention_layernorm"),
    Block("mlp", "mlp", "pre_feedforward_layernorm", MLP, post_norm="post_feedforward_layernorm"),
)
LINEARS = (
    Linear("self_attn.q_proj", "attention", ATTN, ROWS, "q", "attn_in", rotary=True),
    Linear("self_attn.k_proj", "attention", ATTN, ROWS, "kv", "attn_in", rotary=True),
    Linear("self_attn.v_proj", "attention", ATTN, ROWS, "kv", "attn_in"),
    Linear("self_attn.o_proj", "attention", ATTN, COLS, "q", "o_in"),
    Linear("mlp.gate_proj", "mlp", MLP, ROWS, "mlp", "mlp_in"),
    Linear("mlp.up_proj", "mlp", MLP, ROWS, "mlp", "mlp_in"),
    Linear("mlp.down_proj", "mlp", MLP, COLS, "mlp", "down_in"),
)
LINEAR_NAMES = tuple(linear.name for linear in LINEARS)
# Norms over one head's dimension inside the attention (Qwen3, Gemma 3), shared by all heads: kept whole.
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class Family:
    """A source architecture as data over the layer table: its blocks (and their norms), whether its attention
    has per-head query/key norms (``head_norms``) and q/k/v biases whatever the config says (``qkv_bias``), the
    config key of its MLP activation, whether its embeddings are scaled by sqrt(hidden_size) and its RMSNorm
    scales by ``1 + weight`` (``norm_offset``), and whether its rotary embedding differs per layer type."""

    model_type: str
    architecture: str
    blocks: tuple[Block, ...] = BLOCKS
    head_norms: bool = False
    qkv_bias: bool = False
    activation_key: str = "hidden_act"
    embed_scale: bool = False
    norm_offset: bool = False
    rope_per_layer_type: bool = False

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Every norm module of a decoder layer, per-head ones included."""
        heads = HEAD_NORMS if self.head_norms else ()
        return tuple(norm for block in self.blocks for norm in block.norms) + heads

    def block_of(self, rest: str) -> Block | None:
        """The block the layer tensor ``rest`` belongs to (its module, its norms), if any."""
        top = rest.split(".", 1)[0]
        return next((block for block in self.blocks if top == block.module or top in block.norms), None)


FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", "LlamaForCausalLM"),
        Family("mistral", "MistralForCausalLM"),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
        Family("qwen3", "Qwen3ForCausalLM", head_norms=True),
        Family("gemma3_text", "Gemma3ForCausalLM", SANDWICH_BLOCKS, head_norms=True,
               activation_key="hidden_activation", embed_scale=True, norm_offset=True, rope_per_layer_type=True),
    )
}
PRUNED_MODEL_TYPE = "llamaprune"
# model_type -> the transformers class of every architecture llamaprune takes (its own pruned type included)
SUPPORTED_MODEL_TYPES = {**{t: f.architecture for t, f in FAMILIES.items()}, PRUNED_MODEL_TYPE: "LlamaPruneForCausalLM"}


# Where a checkpoint keeps its decoder layers, and a tensor key's parts: (prefix, layer, name inside the layer).
LAYERS_PREFIX = "model.layers."
LAYER_KEY = re.compile(r"^(?P<prefix>.*\blayers\.)(?P<layer>\d+)\.(?P<rest>.+)$")


def split_layer_key(key: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up.weight`` -> (``model.layers.``, 3, ``mlp.up.weight``); None outside layers."""
    match = LAYER_KEY.match(key)
    if match is None:
        return None
    return match["prefix"], int(match["layer"]), match["rest"]


def linear_of(rest: str) -> Linear | None:
    """The linear that owns the layer tensor ``rest`` (its weight or bias), if any."""
    return next((linear for linear in LINEARS if rest.startswith(linear.path + ".")), None)


def output_linear(block: Block) -> Linear:
    """The projection that ends ``block`` (o_proj, down_proj): the one whose input columns the groups cut."""
    return next(linear for linear in LINEARS if linear.block == block.name and linear.axis == COLS)


def _first_readers() -> dict[str, Linear]:
    readers: dict[str, Linear] = {}
    for linear in LINEARS:
        readers.setdefault(linear.input, linear)
    return readers


# Input name -> the first linear that reads it: one hook there sees the input of all its readers.
INPUT_READERS = _first_readers()


def source_model_type(config) -> str:
    """The architecture a (possibly already pruned) config descends from: one of ``FAMILIES``."""
    model_type = getattr(config, "model_type", "llama")
    if model_type == PRUNED_MODEL_TYPE:  # a pruned model keeps the layout of its source architecture
        return getattr(config, "base_model_type", "llama")
    return model_type


def family_of(config) -> Family:
    """The family of a (possibly already pruned) config; loading has refused any other architecture."""
    return FAMILIES[source_model_type(config)]


def family_named(architecture: str) -> Family | None:
    """The family whose transformers class is ``architecture`` (a fingerprint's), or None."""
    return next((family for family in FAMILIES.values() if family.architecture == architecture), None)


def embed_scale(config) -> float:
    """What the input embeddings are multiplied by: sqrt(hidden_size) where the family scales them, else 1."""
    return config.hidden_size**0.5 if family_of(config).embed_scale else 1.0


def linear_biases(config) -> dict[str, bool]:
    """Linear path -> whether it has a bias. Qwen2 biases q/k/v and not o_proj; Llama's ``attention_bias``
    covers all four attention projections and ``mlp_bias`` the three MLP ones; a compensated pruned model
    (``output_bias``) has o_proj and down_proj biases whatever its source.

    modeling_llamaprune.projection_biases applies the same rule (that file may import only torch and
    transformers); tests/test_arch.py checks that the two agree."""
    rule = bias_rule(config)
    return {linear.path: rule[(linear.kind, linear.axis)] for linear in LINEARS}


def bias_rule(config) -> dict[tuple[str, str], bool]:
    """(group kind, axis) -> whether those linears have a bias (``linear_biases`` says why)."""
    qkv = family_of(config).qkv_bias
    attention = bool(getattr(config, "attention_bias", False))
    mlp = bool(getattr(config, "mlp_bias", False))
    output = bool(getattr(config, "output_bias", False))
    return {
        (ATTN, ROWS): attention or qkv,
        (ATTN, COLS): (attention and not qkv) or output,
        (MLP, ROWS): mlp,
        (MLP, COLS): mlp or output,
    }
