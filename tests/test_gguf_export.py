"""GGUF export: pruned checkpoints of every shape run in llama.cpp with the logits and greedy tokens of
transformers; the file's metadata says what llama.cpp needs; bad input is one line and writes nothing."""

from __future__ import annotations

import copy
import itertools

import gguf
import numpy as np
import pytest
import torch
from conftest import VALID_TXT, assert_one_error_line, tiny_config, tiny_model
from typer.testing import CliRunner

from llamaprune.apply.command import ApplyOptions, apply
from llamaprune.apply.refit import CompensationOptions
from llamaprune.core.artifacts import atomic_write_json
from llamaprune.core.plan_file import plan_from_kept, write_plan
from llamaprune.export.gguf import ExportOptions, export
from llamaprune.io.pruned_checkpoint import load_pruned

TOKENS = [5, 71, 200, 13, 44, 301, 9, 120, 66, 250, 17, 88]
LONG_TOKENS = [(37 * i * i + 11 * i + 5) % 317 for i in range(48)]  # far enough for llama3's slow pairs to turn
# LLaMA-3.1's rope type, scaled to head size 8: wavelengths 2 pi * 100^(i/4) = 6.3, 19.9, 62.8, 199 against the
# bounds 128 / 8 = 16 and 128 / 1 = 128, so the factors are 1, two interpolated ones (about 1.24 and 4.0) and 8.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 128}
REL_TOL = 1e-3  # max |llama.cpp - transformers| over all logits, divided by max |transformers logit|
SHAPES = {
    # name: (layers, kept (KV heads, MLP channels) per layer, removed layers, compensation)
    "uniform": (2, [([0], list(range(12))), ([1], list(range(4, 16)))], (), None),
    "heterogeneous": (3, [([0, 1], list(range(24))), ([1], [3, 7, 9]), ([0], list(range(0, 24, 2)))], (), None),
    "skips": (4, [([], list(range(10))), ([0], []), ([1], [1, 2]), ([0, 1], [5, 6, 7])], (2,), None),
    "compensated": (2, [([1], [0, 4, 5, 20]), ([], [3, 7])], (), "lstsq"),
}


def pruned_checkpoint(tmp_path, tokenizer, shape: str, rope: dict | None = None, init_std: float = 0.02,
                      model_type: str = "llama", sliding_window: int | None = None):
    layers, kept, removed, compensation = SHAPES[shape]
    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=layers, rope=rope, model_type=model_type)
    config.initializer_range = init_std
    if sliding_window is not None:
        config.sliding_window = sliding_window
    source = tmp_path / "source"
    tiny_model(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    run = tmp_path / "run"
    atomic_write_json(run / "manifest.json", {"schema_version": 1, "history": []})
    plan_path = run / "plans" / f"{shape}.json"
    write_plan(plan_from_kept(config, kept, removed, name=shape), plan_path)
    options = CompensationOptions(compensation or "none", str(VALID_TXT) if compensation else None, 8, 16)
    apply(ApplyOptions(plan_path, str(source), tmp_path / "pruned", compensation=options))
    return tmp_path / "pruned"


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize(
    "shape, arch", [("uniform", "llama"), ("heterogeneous", "deci"), ("skips", "deci"), ("compensated", "deci")]
)
def test_metadata_says_what_llama_cpp_needs(tmp_path, tokenizer, shape, arch):
    pruned = pruned_checkpoint(tmp_path, tokenizer, shape)
    summary = export(ExportOptions(pruned, tmp_path / "m.gguf"))
    meta = fields(tmp_path / "m.gguf")
    assert summary["architecture"] == meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.key_length"] == meta[f"{arch}.rope.dimension_count"] == 8
    assert meta["llamaprune.plan"] == shape and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(tokenizer)
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    if shape == "skips":  # layer 0: a zero KV group stands in; layer 1: one zero MLP channel; layer 2 removed
        assert meta["deci.attention.head_count"] == [1, 2, 4]
        assert meta["deci.attention.head_count_kv"] == [1, 1, 2]
        assert meta["deci.feed_forward_length"] == [10, 1, 3]
    if shape == "compensated":
        names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
        assert {"blk.0.attn_output.bias", "blk.0.ffn_down.bias", "blk.1.ffn_down.bias"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]


def graph_logits(path, tokens: list[int], rope_freqs: bool = True) -> np.ndarray:
    """llama.cpp's llama / deci graph (src/models/deci.cpp) read back from an f32 file in numpy: NORM rope on
    adjacent pairs, each pair's frequency divided by its ``rope_freqs.weight`` factor where the file has one
    (ggml_rope_ext's freq_factors), per-layer widths, ``n_head == 0`` taking the layer input unnormed, ``n_ff == 0``
    skipping the rest of the layer. It checks the file's conventions (of any type) where llama.cpp itself is not
    installed. ``rope_freqs=False`` computes what the file would without that tensor."""
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    weights = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    arch = meta["general.architecture"]
    n_layers, d = meta[f"{arch}.block_count"], meta[f"{arch}.attention.key_length"]
    eps, base = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]

    def per_layer(key: str, layer: int) -> int:
        value = meta[f"{arch}.{key}"]
        return value[layer] if isinstance(value, list) else value

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    factors = weights.get("rope_freqs.weight") if rope_freqs else None
    freqs = base ** (-np.arange(0, d, 2) / d) / (1.0 if factors is None else factors)

    def rope(x):  # (tokens, heads, d): pairs (2i, 2i+1) turn by pos * base^(-2i/d) / factor_i
        angle = np.arange(len(x))[:, None] * freqs[None]
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        return np.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)

    def linear(x, name):
        out = x @ weights[f"{name}.weight"].T
        return out + weights[f"{name}.bias"] if f"{name}.bias" in weights else out

    x, n = weights["token_embd.weight"][tokens], len(tokens)
    for i in range(n_layers):
        heads, kv_heads, n_ff = (per_layer(k, i) for k in ("attention.head_count", "attention.head_count_kv",
                                                            "feed_forward_length"))
        cur = x if heads == 0 else norm(x, weights[f"blk.{i}.attn_norm.weight"])
        if heads:
            q = rope(linear(cur, f"blk.{i}.attn_q").reshape(n, heads, d))
            k = rope(linear(cur, f"blk.{i}.attn_k").reshape(n, kv_heads, d)).repeat(heads // kv_heads, 1)
            v = linear(cur, f"blk.{i}.attn_v").reshape(n, kv_heads, d).repeat(heads // kv_heads, 1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.triu(np.full((n, n), -np.inf), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            attn = np.einsum("hqk,khd->qhd", probs / probs.sum(-1, keepdims=True), v).reshape(n, heads * d)
            cur = linear(attn, f"blk.{i}.attn_output")
        if n_ff == 0:
            continue
        ffn_in = cur + x if heads else cur
        h = norm(ffn_in, weights[f"blk.{i}.ffn_norm.weight"])
        gate = linear(h, f"blk.{i}.ffn_gate")
        x = linear(gate / (1 + np.exp(-gate)) * linear(h, f"blk.{i}.ffn_up"), f"blk.{i}.ffn_down") + ffn_in
    head = weights.get("output.weight", weights["token_embd.weight"])
    return norm(x, weights["output_norm.weight"]) @ head.T


def transformers_logits(pruned, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return load_pruned(pruned)(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_file_computes_what_transformers_does_in_llama_cpp_s_graph(tmp_path, tokenizer, shape):
    pruned = pruned_checkpoint(tmp_path, tokenizer, shape)
    export(ExportOptions(pruned, tmp_path / "m.gguf"))
    assert relative_error(graph_logits(tmp_path / "m.gguf", TOKENS), transformers_logits(pruned, TOKENS)) < 1e-5


def llama_cpp_logits(path, tokens: list[int], f32_cache: bool = False) -> np.ndarray:
    """llama.cpp's logits of ``tokens``; ``f32_cache``: keys and values cached in float32, not llama.cpp's default
    float16, whose rounding alone moves a tiny random Gemma 3's logits by 2e-3 (measured: 1.9e-3 against 3e-4)."""
    import llama_cpp  # the dev extra's llama-cpp-python: scripts/test.sh builds it once

    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, verbose=False, seed=0, **cache)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)]), llm


@pytest.mark.parametrize("shape", list(SHAPES))
def test_llama_cpp_runs_the_export_like_transformers(tmp_path, tokenizer, shape):
    pruned = pruned_checkpoint(tmp_path, tokenizer, shape)
    export(ExportOptions(pruned, tmp_path / "m.gguf"))
    got, llm = llama_cpp_logits(tmp_path / "m.gguf", TOKENS)
    assert relative_error(got, transformers_logits(pruned, TOKENS)) < REL_TOL
    llm.reset()
    model = load_pruned(pruned)
    greedy = list(itertools.islice(llm.generate(TOKENS[:4], temp=0.0, top_k=1), 8))
    expected = model.generate(torch.tensor([TOKENS[:4]]), max_new_tokens=8, do_sample=False)[0, 4:].tolist()
    assert greedy == expected


def family_checkpoint(tmp_path, tokenizer, model_type: str, kept, removed=()):
    """A tiny random Qwen3 or Gemma 3 checkpoint applied with ``kept`` (three layers: Gemma 3's sliding, sliding,
    full, a window of 5 tokens; its attention scale head_dim's, as llama.cpp's gemma3 has it)."""
    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=3, model_type=model_type,
                         tie=model_type == "gemma3_text")
    config.initializer_range = 0.02
    if model_type == "gemma3_text":
        config.query_pre_attn_scalar = config.head_dim
    tiny_model(config).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    write_plan(plan_from_kept(config, kept, removed, name="p"), tmp_path / "p.json")
    apply(ApplyOptions(tmp_path / "p.json", str(tmp_path / "source"), tmp_path / "pruned"))
    return tmp_path / "pruned"


@pytest.mark.parametrize("model_type, arch", [("qwen3", "qwen3"), ("gemma3_text", "gemma3")])
def test_a_uniform_plan_of_qwen3_and_gemma3_runs_in_llama_cpp_s_own_architecture(tmp_path, tokenizer, model_type,
                                                                                   arch):
    """Layer 1 is removed: Gemma 3's layers are then sliding, full, which llama.cpp reads from the file's pattern
    (not its default of five sliding layers to one full)."""
    pruned = family_checkpoint(tmp_path, tokenizer, model_type, [([0], list(range(4, 16)))] * 3, removed=(1,))
    summary = export(ExportOptions(pruned, tmp_path / "m.gguf"))
    meta = fields(tmp_path / "m.gguf")
    assert summary["architecture"] == meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.key_length"] == 8 and meta[f"{arch}.embedding_length"] == 40
    if arch == "gemma3":
        assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert meta["gemma3.attention.sliding_window"] == 5
    got, llm = llama_cpp_logits(tmp_path / "m.gguf", TOKENS, f32_cache=True)
    assert relative_error(got, transformers_logits(pruned, TOKENS)) < REL_TOL
    llm.reset()
    greedy = list(itertools.islice(llm.generate(TOKENS[:4], temp=0.0, top_k=1), 8))
    expected = load_pruned(pruned).generate(torch.tensor([TOKENS[:4]]), max_new_tokens=8, do_sample=False)
    assert greedy == expected[0, 4:].tolist()


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_qwen3_and_gemma3_of_several_shapes_are_refused_naming_the_uniform_plan(tmp_path, tokenizer, model_type):
    from llamaprune.cli.app import app

    pruned = family_checkpoint(tmp_path, tokenizer, model_type, [([0], [1, 2]), ([0, 1], [3]), ([1], [4, 5])])
    result = CliRunner().invoke(app, ["export", str(pruned), "--out", str(tmp_path / "m.gguf")])
    assert_one_error_line(result, "has one width for every layer", "plan --uniform")
    assert not (tmp_path / "m.gguf").exists()


def test_llama3_factors_divide_transformers_default_frequencies():
    """rope_freqs.weight is the default frequencies over transformers' llama3 ones, for LLaMA-3.1-8B's parameters
    and the tiny ones, whose four factors take each branch (kept, interpolated twice, divided by ``factor``)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llamaprune.export.gguf import llama3_rope_factors

    llama31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for rope, heads, head_dim in ((llama31, 32, 128), (LLAMA3, 4, 8)):
        config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, rope_parameters=rope)
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double()
        default = rope["rope_theta"] ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        factors = llama3_rope_factors(rope, head_dim)
        assert factors.dtype == np.float32 and factors.shape == (head_dim // 2,)
        np.testing.assert_allclose(factors, (default / scaled).numpy(), rtol=1e-6)
    tiny = llama3_rope_factors(LLAMA3, 8)
    assert tiny[0] == 1 and 1 < tiny[1] < tiny[2] < 8 and tiny[3] == 8


@pytest.mark.parametrize("shape, arch", [("uniform", "llama"), ("heterogeneous", "deci")])
def test_llama3_rope_is_the_rope_freqs_tensor_llama_cpp_applies(tmp_path, tokenizer, shape, arch):
    from llamaprune.export.gguf import llama3_rope_factors

    # Weights of std 0.1, not transformers' 0.02: attention then depends on positions enough that the file without
    # its factors is off by about 0.1 of the largest logit (0.002 at 0.02), 100 times REL_TOL.
    pruned = pruned_checkpoint(tmp_path, tokenizer, shape, rope=LLAMA3, init_std=0.1)
    export(ExportOptions(pruned, tmp_path / "m.gguf"))
    meta = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == arch and meta[f"{arch}.rope.freq_base"] == LLAMA3["rope_theta"]
    assert not [key for key in meta if ".rope.scaling." in key]  # as llama.cpp's converter: the tensor is all
    factors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["rope_freqs.weight"]
    assert factors.tensor_type.name == "F32"
    np.testing.assert_array_equal(factors.data, llama3_rope_factors(LLAMA3, 8))
    want = transformers_logits(pruned, LONG_TOKENS)
    assert relative_error(graph_logits(tmp_path / "m.gguf", LONG_TOKENS), want) < 1e-5
    assert relative_error(graph_logits(tmp_path / "m.gguf", LONG_TOKENS, rope_freqs=False), want) > 30 * REL_TOL
    got, llm = llama_cpp_logits(tmp_path / "m.gguf", LONG_TOKENS)
    assert relative_error(got, want) < REL_TOL
    llm.reset()
    prompt = LONG_TOKENS[:40]
    greedy = list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1), 8))
    model = load_pruned(pruned)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert greedy == expected


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_smaller_types_stay_close(tmp_path, tokenizer, outtype, monkeypatch):
    pruned = pruned_checkpoint(tmp_path, tokenizer, "skips")
    export(ExportOptions(pruned, tmp_path / "m.gguf", outtype=outtype))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.2.ffn_up.weight"] == outtype.upper()
    assert types["blk.1.ffn_down.weight"] == ("F16" if outtype == "q8_0" else outtype.upper())  # 1 column
    want = transformers_logits(pruned, TOKENS)
    assert relative_error(graph_logits(tmp_path / "m.gguf", TOKENS), want) < 0.02
    if outtype == "q8_0":
        without_amx_repacking(monkeypatch)
    assert relative_error(llama_cpp_logits(tmp_path / "m.gguf", TOKENS)[0], want) < 0.02


def without_amx_repacking(monkeypatch) -> None:
    """Load models without llama.cpp's extra buffer types. Its AMX int8 matmul (ggml_backend_amx_mul_mat), taken by
    every Q8_0 weight whose rows and columns are whole blocks once a batch has 2+ tokens, faults on CPUs with AMX
    when built by GCC 12: that compiler's _tile_loadconfig declares 8 bytes read, so ggml_tile_config_init's
    rows/colsb stores are dropped and ldtilecfg loads garbage (llama.cpp issue 20824). Any q8_0 file, a plain llama
    one included, crashes the same way; without the repacking llama.cpp runs this file through its ordinary kernels."""
    import llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tokenizer, gpt2_checkpoint):
    from llamaprune.cli.app import app

    pruned = pruned_checkpoint(tmp_path, tokenizer, "uniform")
    runner = CliRunner()
    out = tmp_path / "out" / "m.gguf"

    def invoke(*args):
        return runner.invoke(app, ["export", *map(str, args)])

    assert_one_error_line(invoke(pruned, "--format", "onnx", "--out", out), "--format 'onnx' is not one of: gguf")
    assert_one_error_line(invoke(pruned, "--out", out, "--outtype", "q4_0"), "--outtype 'q4_0'")
    assert_one_error_line(invoke(tmp_path / "nowhere", "--out", out), "model not found")
    assert_one_error_line(invoke(gpt2_checkpoint, "--out", out), "unsupported architecture GPT2LMHeadModel")
    assert_one_error_line(invoke(pruned, "--out", pruned / "m.gguf"), "lies inside the input")
    assert not out.parent.exists()
    out.parent.mkdir()
    out.write_bytes(b"old")
    assert_one_error_line(invoke(pruned, "--out", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"old"
    result = invoke(pruned, "--out", out, "--overwrite", "--outtype", "f16")
    assert result.exit_code == 0, result.output
    assert fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
     "original_max_position_embeddings": 64},
])
def test_other_rope_types_are_one_line(tmp_path, tokenizer, rope):
    from llamaprune.cli.app import app

    checkpoint = tmp_path / "tiny"
    tiny_model(tiny_config(vocab=len(tokenizer), rope=rope)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "m.gguf")])
    assert_one_error_line(result, f"rope type {rope['rope_type']!r} is not exported yet", "default, linear, llama3")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("shape, arch, window", [("uniform", "llama", None), ("heterogeneous", "deci", 8)])
def test_mistral_exports_as_llama_within_its_sliding_window(tmp_path, tokenizer, shape, arch, window):
    """Mistral is llama with a sliding window (as llama.cpp's converter maps it); llama.cpp attends to every earlier
    token, which is what the window shows up to ``sliding_window`` tokens, so that bounds the context length."""
    pruned = pruned_checkpoint(tmp_path, tokenizer, shape, init_std=0.1, model_type="mistral", sliding_window=window)
    export(ExportOptions(pruned, tmp_path / "m.gguf"))
    meta = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.context_length"] == (window or 256)  # tiny_config: 256 positions, Mistral's window 4096
    tokens = TOKENS[:window]
    want = transformers_logits(pruned, tokens)
    assert relative_error(graph_logits(tmp_path / "m.gguf", tokens), want) < 1e-5
    assert relative_error(llama_cpp_logits(tmp_path / "m.gguf", tokens)[0], want) < REL_TOL
    if window:  # one token past the window, transformers no longer sees the first token (off by about 0.2)
        longer = TOKENS[: window + 1]
        beyond = relative_error(graph_logits(tmp_path / "m.gguf", longer), transformers_logits(pruned, longer))
        assert beyond > 30 * REL_TOL


def unigram_checkpoint(path):
    """A checkpoint whose tokenizer.json is a Unigram model (T5's kind), which export does not build."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(c, -1.0) for c in "abcde"], 0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tiny_model(tiny_config(vocab=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("source, message", [
    ("qwen2", "export supports llama, mistral, qwen3, gemma3_text checkpoints, not qwen2"),
    ("unigram", "is a Unigram tokenizer; export supports byte-level BPE"),
])
def test_unsupported_sources_are_one_line(tmp_path, tokenizer, source, message):
    from llamaprune.cli.app import app

    checkpoint = tmp_path / source
    if source == "qwen2":
        tiny_model(tiny_config(vocab=len(tokenizer), model_type="qwen2")).save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
    else:
        unigram_checkpoint(checkpoint)
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "m.gguf")])
    assert_one_error_line(result, message)
    assert not (tmp_path / "m.gguf").exists()


# Texts on which llama.cpp must give the checkpoint's ids: runs of spaces, a tab, newlines, digits (split one by one),
# accents, and characters outside the vocabulary that fall back to their UTF-8 bytes.
SPM_TEXTS = [
    "Hello world",
    "The  quick\tbrown fox.\nNew line\n\n  indented   ",
    "In 1997 , 3.14159 and 2,048 @-@ numbers",
    "Unicode: café naïve Ærø 日本語 🦙 €",
    "",
]


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    """A LLaMA-style SentencePiece BPE model trained on the validation text (<unk>, <s>, </s> at 0-2, the 256 byte
    pieces, byte fallback, digits split) and the transformers LlamaTokenizer of it, with the merges transformers
    derives from a tokenizer.model (every two-piece split of a piece, ordered by the piece's score)."""
    import io

    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    lines = [line for line in VALID_TXT.read_text(encoding="utf-8").splitlines() if line.strip()][:100]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=512, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: processor.get_score(i) for i, piece in enumerate(pieces)})
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, chat_template=template), processor


def with_normalizers(tokenizer):
    """The tokenizer as LLaMA-2's own tokenizer.json writes it: Prepend and Replace normalizers instead of a
    Metaspace pre-tokenizer, loaded as the file says (not rebuilt as a LlamaTokenizer)."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("pipeline", ["LlamaTokenizer", "normalizers", "no BOS"])
def test_a_sentencepiece_tokenizer_tokenizes_in_llama_cpp_as_in_transformers(tmp_path, sentencepiece_tokenizer,
                                                                              pipeline):
    """LLaMA-2's kind of tokenizer is llama.cpp's ``llama`` model: llama.cpp's ids are the checkpoint's (and
    sentencepiece's), its text the checkpoint's, and the model's logits those of transformers. ``no BOS``: a
    LlamaTokenizer that adds none, which llama.cpp's llama model would add unless the file says otherwise."""
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer, processor = sentencepiece_tokenizer
    if pipeline == "normalizers":
        tokenizer = with_normalizers(tokenizer)
    if pipeline == "no BOS":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_bos_token = False
    bos = [] if pipeline == "no BOS" else [1]
    pruned = pruned_checkpoint(tmp_path, tokenizer, "uniform")
    export(ExportOptions(pruned, tmp_path / "m.gguf"))
    meta = fields(tmp_path / "m.gguf")
    T = gguf.TokenType
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.token_type"][:259] == [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is bool(bos) and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta.get("tokenizer.chat_template") == tokenizer.chat_template
    scores = meta["tokenizer.ggml.scores"]  # pieces made by merges: in the order of sentencepiece's own scores
    made = [i for i, score in enumerate(scores) if score > min(scores)]
    assert sorted(made, key=lambda i: -scores[i]) == sorted(made, key=lambda i: -processor.get_score(i))

    checkpoint = AutoTokenizer.from_pretrained(pruned)
    vocab = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        ids = checkpoint(text)["input_ids"]
        assert vocab.tokenize(text.encode()) == ids == bos + processor.encode(text), text
        if bos:  # llama-cpp-python's detokenize drops the prefixed space only after a BOS
            assert vocab.detokenize(ids).decode() == checkpoint.decode(ids, skip_special_tokens=True) == text
    assert any(T.BYTE == meta["tokenizer.ggml.token_type"][i] for i in checkpoint(SPM_TEXTS[3])["input_ids"])
    for text in (" one space", "  two spaces"):
        ids = vocab.tokenize(text.encode())
        assert ids == bos + processor.encode(text) and (not bos or vocab.detokenize(ids).decode() == text)
        if pipeline == "normalizers":
            assert checkpoint(text)["input_ids"] == ids
        else:  # transformers 5's LlamaTokenizer (Metaspace) folds a leading space into the one it prefixes
            assert checkpoint(text)["input_ids"] == vocab.tokenize(text[1:].encode()) != ids
    # After a special token llama.cpp prefixes a space, as the normalizers do; LlamaTokenizer's Metaspace does not.
    parsed = vocab.tokenize(b"Hello</s>world", special=True)
    assert (checkpoint("Hello</s>world")["input_ids"] == parsed) == (pipeline == "normalizers")

    tokens = checkpoint(SPM_TEXTS[1])["input_ids"]
    got = llama_cpp_logits(tmp_path / "m.gguf", tokens)[0]
    assert relative_error(got, transformers_logits(pruned, tokens)) < REL_TOL


@pytest.mark.real
def test_the_pre_tokenizer_is_named_as_llama_cpp_s_converter_names_it():
    """The hash of CHECK_TEXT's tokens names SmolLM2's pre-tokenizer as its own GGUF file does."""
    from transformers import AutoTokenizer

    from llamaprune.export.gguf_vocab import pre_tokenizer
    from llamaprune.io.loading import embedded_checkpoint, embedded_gguf

    assert pre_tokenizer(AutoTokenizer.from_pretrained(embedded_checkpoint())) == "smollm"
    assert fields(embedded_gguf())["tokenizer.ggml.pre"] == "smollm"


def test_mlp_widths_off_llama_cpp_s_blocks_are_named_with_the_fix(caplog):
    from llamaprune.core.groups import LayerShape
    from llamaprune.export.gguf import warn_unaligned

    warn_unaligned([LayerShape(4, 2, 64), LayerShape(0, 0, 0), LayerShape(4, 2, 96)])
    assert not caplog.records
    warn_unaligned([LayerShape(4, 2, 64), LayerShape(4, 2, 24)])
    assert "1 of 2 layers" in caplog.text and "--round-to 32" in caplog.text
