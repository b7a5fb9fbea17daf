"""Run calibration hidden states through a model one decoder layer at a time.

A pass holds the embedded calibration windows' hidden states and, at any moment, a single decoder layer: from
a safetensors checkpoint each layer's weights are read when its turn comes and dropped after it, so the
pass needs about one layer plus the activations, not the model (error compensation runs on it; so can any
statistic that is gathered layer by layer). A model already in memory is walked the same way.

    >>> stream = LayerStream.from_checkpoint(Path("ckpt"))          # doctest: +SKIP
    >>> hidden = stream.embed(windows)                               # doctest: +SKIP
    >>> for index in range(stream.num_layers):                       # doctest: +SKIP
    ...     with stream.layer(index) as block:
    ...         hidden = stream.run_layer(block, hidden)
    >>> logits = stream.logits(hidden)                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamaprune.core.arch import ATTN, LAYERS_PREFIX, Block, embed_scale, family_of
from llamaprune.io.weights import read_rows, read_tensors, tensor_files

EMBEDDINGS = "model.embed_tokens.weight"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc():
    """glibc, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere). A layer's
    temporaries are freed into heap blocks that glibc keeps (its mmap threshold rises after large frees), so
    without it the resident set grows by tens of MB a layer instead of staying at about one layer."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def unmap_large_frees(threshold: int = 1 << 20) -> None:
    """From now on, give each allocation of ``threshold`` bytes or more its own mapping, returned to the OS as soon
    as it is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``, process-wide; nothing elsewhere). glibc otherwise raises
    that threshold to the size of each large block freed (up to 32 MB), so the MB-sized temporaries of a layer's
    forward and of its criteria then live in the heap, whose free pages only ``trim_heap`` hands back: between
    two trims the resident set held ~0.15 GB more than the layer in the 1.2B benchmark (bench/RESULTS.md)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` on the meta device: its shapes without memory, for weights read in pieces."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def compute_buffers(model: nn.Module, device: str) -> None:
    """Give a skeleton, on ``device``, the buffers computed from the config rather than stored: its rotary
    embedding, and the scale of a scaled embedding (Gemma 3's, whose module keeps it as a buffer)."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    embed = model.model.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale, device=device)


@dataclass
class LayerStream:
    """A model's embeddings, head and decoder layers, the layers materialized one at a time when ``files``
    (safetensors, name -> file) is given, else taken from an in-memory ``model``."""

    model: nn.Module
    files: dict[str, Path] | None = None
    batch_size: int = 8
    device: str = "cpu"

    @classmethod
    def from_model(cls, model: nn.Module, batch_size: int = 8) -> LayerStream:
        return cls(model, None, batch_size, str(next(model.parameters()).device))

    @classmethod
    def from_checkpoint(cls, path: Path, config, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                        device: str = "cpu", head: bool = True):
        """A skeleton of the model on the meta device with its embeddings, final norm and head loaded (on
        ``device``, where each layer goes in its turn). ``head`` False, for a pass that makes no logits
        (scoring, compensation): the final norm and head are never read, nor the embeddings but the rows that
        ``embed`` needs."""
        files = tensor_files(path)
        model = skeleton(config, dtype)
        stream = cls(model, files, batch_size, device)
        compute_buffers(model, device)
        if not head:
            return stream
        outside = {k: v for k, v in files.items() if not k.startswith(LAYERS_PREFIX)}
        stream._load(model, outside, dtype)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        for name in ("embed_tokens", "norm"):
            getattr(model.model, name).to(device)
        model.lm_head.to(device)
        return stream

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def _load(self, module: nn.Module, files: dict[str, Path], dtype: torch.dtype, prefix: str = "") -> None:
        """Read and convert one tensor at a time, so the file's copy of a layer is never held beside ours."""
        state = {key[len(prefix):]: read_tensors(files, [key])[key].to(dtype) for key in files}
        module.load_state_dict(state, strict=False, assign=True)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index``, with its weights, for the duration of the block."""
        block = self.model.model.layers[index]
        if self.files is None:
            yield block
            return
        prefix = f"{LAYERS_PREFIX}{index}."
        dtype = self.model.model.embed_tokens.weight.dtype
        self._load(block, {k: v for k, v in self.files.items() if k.startswith(prefix)}, dtype, prefix)
        block.to(self.device)
        try:
            yield block
        finally:
            self.model.model.layers[index] = block.to("meta")
            trim_heap()

    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """The windows' input embeddings, times the family's scale (``core.arch.embed_scale``, in the weights'
        dtype as transformers applies it). Where the embeddings were left unread (``head`` False), only the rows
        of the tokens the windows use are read, so the vocabulary's matrix is never in memory."""
        weight = self.model.model.embed_tokens.weight
        if not weight.is_meta:
            rows = weight.detach()[windows.to(self.device)]
        else:
            tokens, where = windows.unique(return_inverse=True)
            rows = read_rows(self.files, EMBEDDINGS, tokens.tolist()).to(weight.dtype)
            rows = rows.to(self.device)[where.to(self.device)]
        scale = embed_scale(self.model.config)
        return rows if scale == 1.0 else rows * torch.tensor(scale).to(rows.dtype)

    def context(self, decoder: nn.Module, hidden: torch.Tensor) -> dict:
        """Positions and causal mask of a batch of full windows (no padding, no cache) for the attention of the
        decoder layer ``decoder``: a sliding window where its attention has one, and its layer type's rotary
        embedding where the family's differs per layer type."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = self.model.config
        family = family_of(config)
        module = next(block.module for block in family.blocks if block.kind == ATTN)
        attention = getattr(decoder, module, None)  # Mistral's reads its window from the config
        sliding = getattr(attention, "sliding_window", getattr(config, "sliding_window", None)) is not None
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = (create_sliding_window_causal_mask if sliding else create_causal_mask)(
            config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
        )
        layer_type = ("sliding_attention" if sliding else "full_attention",)
        per_type = family.rope_per_layer_type
        return {
            "position_embeddings": self.model.model.rotary_emb(hidden, positions, *(layer_type if per_type else ())),
            "attention_mask": mask,
        }

    def sub_block(self, decoder: nn.Module, block: Block, hidden: torch.Tensor) -> torch.Tensor:
        """The residual update of ``block`` (a sub-block of the layer table) of the decoder layer ``decoder`` for
        ``hidden``: its norm, the block (attention with the positions and mask), its post-norm where it has one;
        zero where it is skipped."""
        module = getattr(decoder, block.module)
        if module is None:
            return torch.zeros_like(hidden)
        normed = getattr(decoder, block.norm)(hidden)
        out = module(hidden_states=normed, **self.context(decoder, hidden))[0] if block.kind == ATTN else module(normed)
        return self.post_norm(decoder, block, out)

    @staticmethod
    def post_norm(decoder: nn.Module, block: Block, output: torch.Tensor) -> torch.Tensor:
        """The output projection's ``output`` as the residual receives it: through the block's post-norm (Gemma 3)."""
        return output if block.post_norm is None else getattr(decoder, block.post_norm)(output)

    def batches(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return list(hidden.split(self.batch_size))

    def run_layer(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` after the whole layer, batch by batch through the block's own forward, so that its hooks see
        its input and output as in a whole-model pass (scoring's block influence)."""
        with torch.no_grad():
            return torch.cat([block(h, **self.context(block, h)) for h in self.batches(hidden)])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.lm_head(self.model.model.norm(hidden))
