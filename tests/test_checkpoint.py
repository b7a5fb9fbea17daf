"""The pruned checkpoint: config kinds, save -> from_pretrained, remote code, streaming, registration."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    TOL,
    assert_one_error_line,
    ids,
    logits,
    pruned_and_reference,
    random_plan,
    read_tensors,
    remote_outputs,
    tiny_config,
    tiny_model,
    zeroed_reference,
)
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from typer.testing import CliRunner

from llamaprune.apply.command import apply_plan
from llamaprune.apply.streaming import stream_checkpoint
from llamaprune.cli.app import app
from llamaprune.core.plan_file import plan_from_kept
from llamaprune.io.pruned_checkpoint import MODELING_FILE, load_pruned, pruned_config, save_pruned, write_config
from llamaprune.io.weights import SAFE_INDEX, safetensors_files
from llamaprune.modeling_llamaprune import LlamaPruneConfig

HETEROGENEOUS = [([0], [1, 4, 9]), ([], [0, 2]), ([0, 1], list(range(20))), ([1], [])]


def source_checkpoint(path, config, seed: int = 0, max_shard_size="16KB"):
    """A multi-shard safetensors checkpoint of a tiny random model."""
    tiny_model(config, seed).save_pretrained(path, max_shard_size=max_shard_size)
    return path


@pytest.mark.parametrize(
    ("model_type", "config_class"),
    [("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config), ("qwen3", Qwen3Config),
     ("gemma3_text", Gemma3TextConfig)],
)
def test_uniform_plan_gives_a_plain_config_of_the_source_architecture(model_type, config_class):
    config = tiny_config(heads=6, kv_heads=3, layers=3, model_type=model_type)
    plan = plan_from_kept(config, [([0, 2], [1, 2, 3])] * 3, removed=(1,))
    pruned = pruned_config(config, plan)
    assert type(pruned) is config_class
    assert (pruned.num_hidden_layers, pruned.num_attention_heads, pruned.num_key_value_heads) == (2, 4, 2)
    assert (pruned.intermediate_size, pruned.head_dim, pruned.hidden_size) == (3, 8, config.hidden_size)
    if model_type in ("qwen2", "qwen3"):
        assert pruned.layer_types == ["full_attention"] * 2
    if model_type == "gemma3_text":  # layers 0 and 2 of sliding, sliding, full
        assert pruned.layer_types == ["sliding_attention", "full_attention"]
        assert pruned.query_pre_attn_scalar == 10 and pruned.sliding_window == 5


def test_heterogeneous_plan_gives_our_config_with_per_layer_overrides():
    config = tiny_config(heads=4, kv_heads=2, layers=4, model_type="qwen2")
    pruned = pruned_config(config, plan_from_kept(config, HETEROGENEOUS, removed=(2,)))
    assert isinstance(pruned, LlamaPruneConfig)
    assert pruned.base_model_type == "qwen2" and pruned.allow_global_per_layer_attribute_access
    assert pruned.auto_map["AutoModelForCausalLM"] == "modeling_llamaprune.LlamaPruneForCausalLM"
    layers = [
        (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.skip) for c in pruned.per_layer_config
    ]
    # layer 2 is removed; a skipped block keeps the global width, unused
    assert layers == [(2, 1, 3, []), (4, 2, 2, ["attention"]), (2, 1, 24, ["mlp"])]


def test_llama_heads_that_do_not_divide_hidden_size_use_our_config():
    config = tiny_config(heads=4, kv_heads=4, layers=2)  # hidden 32: 3 heads do not divide it
    pruned = pruned_config(config, plan_from_kept(config, [([0, 1, 3], [0, 1])] * 2))
    assert isinstance(pruned, LlamaPruneConfig) and pruned.num_attention_heads == 3


@pytest.mark.parametrize("kept", [[([0, 1], [0, 5, 7])] * 4, HETEROGENEOUS], ids=["uniform", "heterogeneous"])
def test_save_and_from_pretrained_give_identical_logits(tmp_path, kept):
    config = tiny_config(heads=4, kv_heads=2, layers=4, bias=True)
    pruned, _ = pruned_and_reference(config, plan_from_kept(config, kept, removed=(3,)))
    save_pruned(pruned, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = ids(config.vocab_size)
    assert torch.equal(logits(reloaded, x), logits(pruned, x))
    assert torch.equal(logits(load_pruned(tmp_path / "out"), x), logits(pruned, x))
    assert (tmp_path / "out" / MODELING_FILE.name).exists() == (pruned.config.model_type == "llamaprune")


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma3_text"])
def test_trust_remote_code_loads_without_llamaprune(tmp_path, model_type):
    config = tiny_config(heads=6, kv_heads=3, layers=4, model_type=model_type)
    plan = plan_from_kept(
        config, [([0], [1, 4, 9]), ([], [0, 2]), ([0, 2], list(range(20))), ([1, 2], [])], removed=(2,)
    )
    pruned, reference = pruned_and_reference(config, plan)
    x = ids(config.vocab_size)
    result = remote_outputs(pruned, x, tmp_path)
    assert result["class"] == "LlamaPruneForCausalLM"
    assert torch.equal(result["logits"], logits(pruned, x))
    with zeroed_reference(reference, plan):
        assert torch.allclose(result["logits"], logits(reference, x), atol=TOL, rtol=0)
        assert torch.equal(result["tokens"], reference.generate(x[:1], max_new_tokens=6, do_sample=False))


def test_refresh_code_replaces_a_stale_modeling_file(tmp_path):
    config = tiny_config(heads=4, kv_heads=2, layers=3, bias=True)
    pruned, _ = pruned_and_reference(config, plan_from_kept(config, [([], [1, 5]), ([0, 1], [2]), ([1], [])]))
    save_pruned(pruned, tmp_path / "out")
    x = ids(config.vocab_size)
    copy = tmp_path / "out" / MODELING_FILE.name
    copy.write_text(MODELING_FILE.read_text() + "\nraise ImportError('the stale copy of an older release')\n")
    with pytest.raises(AssertionError, match="the stale copy"):  # the copy, not llamaprune, is what loads
        remote_outputs(tmp_path / "out", x, tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["refresh-code", str(tmp_path / "out")])
    assert done.exit_code == 0 and "replaced with llamaprune" in done.output
    assert copy.read_bytes() == MODELING_FILE.read_bytes()
    assert "already" in runner.invoke(app, ["refresh-code", str(tmp_path / "out")]).output
    result = remote_outputs(tmp_path / "out", x, tmp_path)  # the same modules cache as the failed load
    assert torch.equal(result["logits"], logits(pruned, x))


def test_refresh_code_refuses_what_has_no_modeling_file(tmp_path):
    config = tiny_config(heads=4, kv_heads=2, layers=2)
    pruned, _ = pruned_and_reference(config, plan_from_kept(config, [([0], [1, 2])] * 2))
    save_pruned(pruned, tmp_path / "plain")
    runner = CliRunner()
    assert_one_error_line(runner.invoke(app, ["refresh-code", str(tmp_path / "plain")]), "plain 'llama' checkpoint")
    assert_one_error_line(runner.invoke(app, ["refresh-code", str(tmp_path / "none")]), "has no config.json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1]")
    assert_one_error_line(runner.invoke(app, ["refresh-code", str(tmp_path / "list")]), "names no model_type")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert_one_error_line(runner.invoke(app, ["refresh-code", str(tmp_path / "broken")]), "is not valid JSON")
    assert not (tmp_path / "plain" / MODELING_FILE.name).exists()


@pytest.mark.parametrize(("model_type", "tie"), [("llama", False), ("llama", True), ("qwen3", False),
                                                 ("gemma3_text", True)])
def test_streaming_equals_in_memory_tensor_for_tensor(tmp_path, model_type, tie):
    config = tiny_config(heads=4, kv_heads=2, layers=4, bias=model_type == "llama", tie=tie, model_type=model_type)
    plan = random_plan(config, seed=7)
    files = safetensors_files(source_checkpoint(tmp_path / "src", config))
    assert len(files) > 1  # the input is sharded
    (tmp_path / "streamed").mkdir()
    written = stream_checkpoint(files, plan, tmp_path / "streamed", max_shard_size="12KB")
    assert written == plan.params_after
    save_pruned(apply_plan(tiny_model(config), plan), tmp_path / "memory")
    streamed, memory = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for key, tensor in memory.items():
        assert torch.equal(streamed[key], tensor), key
    index = json.loads((tmp_path / "streamed" / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(streamed) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())


def test_streamed_checkpoint_loads_and_matches_zeroed_original(tmp_path):
    config = tiny_config(heads=6, kv_heads=2, layers=4, bias=True)
    plan = plan_from_kept(config, [([1], [0, 3]), ([0, 1], []), ([], [5]), ([0], [1, 2])], removed=(1,))
    files = safetensors_files(source_checkpoint(tmp_path / "src", config))
    out = tmp_path / "out"
    out.mkdir()
    stream_checkpoint(files, plan, out, dtype="bfloat16")
    write_config(pruned_config(config, plan), out)
    assert {t.dtype for t in read_tensors(out).values()} == {torch.bfloat16}
    model = load_pruned(out)  # float32 again
    reference = tiny_model(config)
    with torch.no_grad():  # the reference sees the same bfloat16 rounding
        for param in reference.parameters():
            param.copy_(param.to(torch.bfloat16))
    x = ids(config.vocab_size)
    with zeroed_reference(reference, plan):
        assert torch.allclose(logits(model, x), logits(reference, x), atol=TOL, rtol=0)


def test_streaming_drops_a_stored_tied_head(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config(heads=4, kv_heads=2, layers=2, tie=True)
    tensors = {k: v.clone() for k, v in tiny_model(config).state_dict().items()}
    assert "lm_head.weight" in tensors  # as some checkpoints store it, tied or not
    save_file(tensors, tmp_path / "model.safetensors")
    plan = plan_from_kept(config, [([1], [0, 5])] * 2)
    (tmp_path / "out").mkdir()
    written = stream_checkpoint([tmp_path / "model.safetensors"], plan, tmp_path / "out", tied=True)
    assert written == plan.params_after
    assert "lm_head.weight" not in read_tensors(tmp_path / "out")


def test_streaming_refuses_unknown_layer_tensors_and_wrong_counts(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config(heads=4, kv_heads=2, layers=2)
    plan = plan_from_kept(config, [([0], [1])] * 2)
    odd = tmp_path / "odd.safetensors"
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, odd)
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.q_norm.weight"):
        stream_checkpoint([odd], plan, tmp_path)
    files = safetensors_files(source_checkpoint(tmp_path / "src", config))
    wrong = plan_from_kept(config, [([0], [1, 2])] * 2)
    with pytest.raises(ValueError, match=rf"would have \d+ parameters but plan 'manual' says {plan.params_after}"):
        stream_checkpoint(files, dataclasses.replace(wrong, params_after=plan.params_after), tmp_path)


def run_python(code: str, cwd) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_import_is_light_and_register_is_explicit(tmp_path):
    light = "import sys, llamaprune; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert run_python(light, tmp_path) == "False False"
    unknown = (
        "import llamaprune\nfrom transformers import AutoConfig\n"
        "try:\n    AutoConfig.for_model('llamaprune')\nexcept ValueError:\n    print('unknown')"
    )
    assert run_python(unknown, tmp_path) == "unknown"
    registered = (
        "import llamaprune\nllamaprune.register()\nfrom transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('llamaprune')).__name__)"
    )
    assert run_python(registered, tmp_path) == "LlamaPruneConfig"


def test_load_pruned_registers_the_model_type_itself(tmp_path):
    config = tiny_config(heads=4, kv_heads=2, layers=2)
    plan = plan_from_kept(config, [([0], list(range(24))), ([0, 1], list(range(10)))])
    save_pruned(apply_plan(tiny_model(config), plan), tmp_path / "pruned")
    code = f"import llamaprune\nprint(type(llamaprune.load_pruned({str(tmp_path / 'pruned')!r})).__name__)"
    assert run_python(code, tmp_path) == "LlamaPruneForCausalLM"


def test_a_pruned_checkpoint_with_a_skipped_attention_streams_again(tmp_path):
    """Re-pruning: the table of a model whose layer 1 has no attention lists it with 0 KV heads and 0 query heads."""
    from llamaprune.plan import PlanOptions, load_run, make_plan
    from llamaprune.scoring.command import write_tables
    from llamaprune.scoring.in_memory import score

    config = tiny_config(heads=4, kv_heads=2, layers=3)
    once = plan_from_kept(config, [([0, 1], list(range(24))), ([], list(range(20))), ([0], [1, 2, 3])])
    pruned = apply_plan(tiny_model(config), once)
    save_pruned(pruned, tmp_path / "pruned")
    (tmp_path / "run").mkdir()
    write_tables(tmp_path / "run", score(pruned, [ids(config.vocab_size)], ("magnitude",), progress=False))
    plan = make_plan(load_run(tmp_path / "run"), PlanOptions(ratio=0.05, criterion="magnitude"))
    assert plan.layers[1].num_key_value_heads == 0 and plan.layers[1].skip == ("attention",)
    (tmp_path / "streamed").mkdir()
    written = stream_checkpoint(safetensors_files(tmp_path / "pruned"), plan, tmp_path / "streamed")
    assert written == plan.params_after
    save_pruned(apply_plan(pruned, plan), tmp_path / "memory")
    streamed, memory = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys() and all(torch.equal(streamed[k], memory[k]) for k in memory)
