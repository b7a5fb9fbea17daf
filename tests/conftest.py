"""Shared fixtures: tiny random GQA models, a small trained tokenizer, the real text and model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Hypothesis keeps an example cache; tests write nowhere but temporary directories.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="llamaprune-hypothesis-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VALID_TXT = SHARED_DATA / "wikitext-2-tokens" / "valid.txt"
TEST_RAW = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def tiny_config(
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    layers: int = 2,
    intermediate: int = 24,
    vocab: int = 64,
    bias: bool = False,
    tie: bool = False,
    model_type: str = "llama",
):
    """A small random config; ``model_type`` llama, mistral or qwen2 (qwen2 has q/k/v biases)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
    )
    if model_type == "llama":
        return LlamaConfig(attention_bias=bias, mlp_bias=bias, **common)
    if model_type == "mistral":
        return MistralConfig(**common)
    return Qwen2Config(**common)


def tiny_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases and norms, so no group is trivially zero
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on the validation text (vocab 320), no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = VALID_TXT.read_text(encoding="utf-8").splitlines()[:3000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    """A saved tiny GQA llama checkpoint directory (vocab matching the tokenizer)."""
    model = tiny_model(tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def gpt2_checkpoint(tmp_path):
    """A config-only GPT-2 checkpoint directory: an architecture llamaprune does not support."""
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M, in float32 on CPU (fetched into the cache on first use)."""
    from llamaprune.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LLAMAPRUNE_DATA_DIR", raising=False)


def group_slices(model, layer: int, kind: str, index: int):
    """(parameter, index) pairs covering one group, written from DESIGN.md §2 independently of llamaprune."""
    cfg = model.config
    block = model.model.layers[layer]
    d = cfg.head_dim
    r = cfg.num_attention_heads // cfg.num_key_value_heads
    out = []
    if kind == "attn":
        for proj, lo, hi in (
            (block.self_attn.q_proj, index * r * d, (index + 1) * r * d),
            (block.self_attn.k_proj, index * d, (index + 1) * d),
            (block.self_attn.v_proj, index * d, (index + 1) * d),
        ):
            out.append((proj.weight, (slice(lo, hi),)))
            if proj.bias is not None:
                out.append((proj.bias, (slice(lo, hi),)))
        out.append((block.self_attn.o_proj.weight, (slice(None), slice(index * r * d, (index + 1) * r * d))))
    else:
        for proj in (block.mlp.gate_proj, block.mlp.up_proj):
            out.append((proj.weight, (slice(index, index + 1),)))
            if proj.bias is not None:
                out.append((proj.bias, (slice(index, index + 1),)))
        out.append((block.mlp.down_proj.weight, (slice(None), slice(index, index + 1))))
    return out
