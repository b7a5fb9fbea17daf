"""GGUF export: pruned checkpoints of every shape run in llama.cpp with the logits and greedy tokens of
transformers; the file's metadata says what llama.cpp needs; bad input is one line and writes nothing."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import VALID_TXT, assert_one_error_line, tiny_config, tiny_model
from typer.testing import CliRunner

from llamaprune.apply import ApplyOptions, apply
from llamaprune.artifacts import atomic_write_json
from llamaprune.checkpoint import load_pruned
from llamaprune.compensate import CompensationOptions
from llamaprune.gguf_export import ExportOptions, export
from llamaprune.pruning_plan import plan_from_kept, write_plan

TOKENS = [5, 71, 200, 13, 44, 301, 9, 120, 66, 250, 17, 88]
REL_TOL = 1e-3  # max |llama.cpp - transformers| over all logits, divided by max |transformers logit|
SHAPES = {
    # name: (layers, kept (KV heads, MLP channels) per layer, removed layers, compensation)
    "uniform": (2, [([0], list(range(12))), ([1], list(range(4, 16)))], (), None),
    "heterogeneous": (3, [([0, 1], list(range(24))), ([1], [3, 7, 9]), ([0], list(range(0, 24, 2)))], (), None),
    "skips": (4, [([], list(range(10))), ([0], []), ([1], [1, 2]), ([0, 1], [5, 6, 7])], (2,), None),
    "compensated": (2, [([1], [0, 4, 5, 20]), ([], [3, 7])], (), "lstsq"),
}


def pruned_checkpoint(tmp_path, tokenizer, shape: str):
    layers, kept, removed, compensation = SHAPES[shape]
    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=layers)
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


def llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: llama.cpp checks skipped")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, verbose=False, seed=0)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)]), llm


@pytest.mark.parametrize("shape", list(SHAPES))
def test_llama_cpp_runs_the_export_like_transformers(tmp_path, tokenizer, shape):
    pruned = pruned_checkpoint(tmp_path, tokenizer, shape)
    export(ExportOptions(pruned, tmp_path / "m.gguf"))
    got, llm = llama_cpp_logits(tmp_path / "m.gguf", TOKENS)
    model = load_pruned(pruned)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < REL_TOL
    llm.reset()
    greedy = [t for t, _ in zip(llm.generate(TOKENS[:4], temp=0.0, top_k=1), range(8))]
    expected = model.generate(torch.tensor([TOKENS[:4]]), max_new_tokens=8, do_sample=False)[0, 4:].tolist()
    assert greedy == expected


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_smaller_types_load_and_stay_close(tmp_path, tokenizer, outtype):
    pruned = pruned_checkpoint(tmp_path, tokenizer, "skips")
    export(ExportOptions(pruned, tmp_path / "m.gguf", outtype=outtype))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.2.ffn_up.weight"] == outtype.upper()
    got, _ = llama_cpp_logits(tmp_path / "m.gguf", TOKENS)
    with torch.no_grad():
        want = load_pruned(pruned)(input_ids=torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 0.05


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tokenizer, gpt2_checkpoint):
    from llamaprune.cli import app

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
