"""``llamaprune apply`` end to end: CLI, checkpoint contents, manifest, eval, atomicity, both paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TEST_RAW,
    TOL,
    ForwardClock,
    assert_one_error_line,
    ids,
    logits,
    random_plan,
    read_tensors,
    tiny_config,
    zeroed_reference,
)
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llamaprune.apply.command as apply_module
from llamaprune.apply.command import ApplyOptions, apply
from llamaprune.core.artifacts import atomic_write_json
from llamaprune.core.plan_file import plan_from_kept, write_plan
from llamaprune.evaluate.perplexity import perplexity
from llamaprune.io.text_data import evaluation_windows, load_rows

runner = CliRunner()


def run_cli(*args):
    from llamaprune.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    atomic_write_json(path / "manifest.json", {"schema_version": 1, "history": []})
    return path


def save_plan(run_dir, plan):
    path = run_dir / "plans" / f"{plan.name}.json"
    write_plan(plan, path)
    return path


def checkpoint_config(path):
    return AutoModelForCausalLM.from_pretrained(path).config


def test_cli_apply_writes_a_loadable_checkpoint_with_plan_manifest_and_tokenizer(tmp_path, tiny_checkpoint, run_dir):
    config = checkpoint_config(tiny_checkpoint)
    plan = plan_from_kept(config, [([1], [0, 4, 5, 20]), ([], [3])])
    plan_path = save_plan(run_dir, plan)
    out = tmp_path / "pruned"
    result = run_cli("apply", plan_path, "--model", tiny_checkpoint, "--out", out, "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    assert f"-> {plan.params_after:,} parameters" in result.output and "streamed" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "modeling_llamaprune.py", "plan.json", "manifest.json", "tokenizer.json"} <= names
    assert "model.safetensors.index.json" in names
    assert "streaming" in next(out.glob("logs/*/run.log")).read_text()  # the apply's own log
    assert json.loads((out / "plan.json").read_text()) == json.loads(plan_path.read_text())
    assert json.loads((run_dir / "manifest.json").read_text())["history"][-1]["command"] == "apply"
    assert json.loads((out / "manifest.json").read_text())["history"][-1]["out"] == str(out)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.num_parameters() == plan.params_after
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    x = ids(config.vocab_size)
    with zeroed_reference(reference, plan):
        assert torch.allclose(logits(pruned, x), logits(reference, x), atol=TOL, rtol=0)


def test_cli_refuses_an_existing_out_unless_overwrite(tmp_path, tiny_checkpoint, run_dir):
    plan_path = save_plan(run_dir, random_plan(checkpoint_config(tiny_checkpoint), seed=1))
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("apply", plan_path, "--model", tiny_checkpoint, "--out", out)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert (out / "keep.txt").exists()
    result = run_cli("apply", plan_path, "--model", tiny_checkpoint, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_cli_rejects_a_plan_for_another_model_and_bad_sizes(tmp_path, tiny_checkpoint, run_dir):
    other = tiny_config(heads=4, kv_heads=2, layers=2, intermediate=32)
    plan_path = save_plan(run_dir, random_plan(other, seed=0))
    result = run_cli("apply", plan_path, "--model", tiny_checkpoint, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert (
        "was made for model LlamaForCausalLM/" in result.output
        and "but this model is LlamaForCausalLM/" in result.output
    )
    good = save_plan(run_dir, plan_from_kept(checkpoint_config(tiny_checkpoint), [([0], [1])] * 2))
    result = run_cli("apply", good, "--model", tiny_checkpoint, "--out", tmp_path / "o", "--max-shard-size", "2XB")
    assert result.exit_code == 2 and "--max-shard-size '2XB' is not a size" in result.output
    assert not (tmp_path / "o").exists()


def test_a_plan_made_on_another_family_is_one_line(tmp_path, tiny_checkpoint, run_dir):
    """A Qwen3 of the same widths as the checkpoint (a LLaMA): the plan names the family it was made on."""
    config = checkpoint_config(tiny_checkpoint)
    qwen3 = tiny_config(heads=4, kv_heads=2, vocab=config.vocab_size, layers=2, model_type="qwen3")
    plan_path = save_plan(run_dir, plan_from_kept(qwen3, [([0], [1, 2])] * 2))
    result = run_cli("apply", plan_path, "--model", tiny_checkpoint, "--out", tmp_path / "o")
    assert_one_error_line(result, "was made for model Qwen3ForCausalLM/", "but this model is LlamaForCausalLM/")
    assert not (tmp_path / "o").exists()


def test_cli_eval_reports_perplexity_before_and_after(tmp_path, tiny_checkpoint, run_dir, tokenizer):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEST_RAW.read_text(encoding="utf-8").splitlines()[:200]))
    config = checkpoint_config(tiny_checkpoint)
    plan = plan_from_kept(config, [([0], list(range(0, 24, 2))), ([0, 1], [1, 2])])
    out = tmp_path / "pruned"
    args = ["--eval", text, "--seq-len", 32, "--max-windows", 4, "--batch-size", 2]
    result = run_cli("apply", save_plan(run_dir, plan), "--model", tiny_checkpoint, "--out", out, *args)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "tokens/s" in result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["before"]["num_parameters"] == plan.params_before
    assert report["after"]["num_parameters"] == plan.params_after
    assert report["after"]["windows"] == 4 and report["tokens_per_s_ratio"] > 0 and report["speed_rounds"] == 5
    windows = evaluation_windows(tokenizer, load_rows(str(text)), 32, 4)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert report["before"]["ppl"] == pytest.approx(perplexity(reference, windows, progress=False).ppl, rel=1e-5)
    with zeroed_reference(reference, plan):
        expected = perplexity(reference, windows, progress=False).ppl
    assert report["after"]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert report["ppl_ratio"] == pytest.approx(report["after"]["ppl"] / report["before"]["ppl"])


def eval_text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEST_RAW.read_text(encoding="utf-8").splitlines()[:200]))
    return text


def test_eval_times_both_models_in_turn_so_a_slow_spell_does_not_skew_the_speed(tmp_path, tiny_checkpoint,
                                                                                run_dir):
    """Another job slows the machine while the source's first timed batch runs: measured one model after the
    other, the source looked slower and the ratio was off by that; timed in turn, the median leaves the round out
    and the ratio is the models' own (here, the clock charges each forward its model's size)."""
    plan = plan_from_kept(checkpoint_config(tiny_checkpoint), [([0], list(range(0, 24, 2))), ([0, 1], [1, 2])])
    out = tmp_path / "pruned"
    clock = ForwardClock(slow={2: 5.0})  # after a warm-up batch of each model
    with clock.installed():
        result = run_cli("apply", save_plan(run_dir, plan), "--model", tiny_checkpoint, "--out", out, "--eval",
                         eval_text(tmp_path), "--seq-len", 32, "--max-windows", 6, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    sizes = report["before"]["num_parameters"], report["after"]["num_parameters"]
    assert report["tokens_per_s_ratio"] == pytest.approx(sizes[0] / sizes[1], rel=1e-9)
    assert report["speed_rounds"] == 5
    assert f"(x{sizes[0] / sizes[1]:.2f}, median of 5 batches timed in turn)" in result.output


def test_eval_compares_no_speed_where_the_pruned_model_does_not_fit_beside_the_source(tmp_path, tiny_checkpoint,
                                                                                      run_dir, monkeypatch, caplog):
    plan = plan_from_kept(checkpoint_config(tiny_checkpoint), [([0], list(range(0, 24, 2))), ([0, 1], [1, 2])])
    args = ["--eval", eval_text(tmp_path), "--seq-len", 32, "--max-windows", 4, "--batch-size", 2]
    monkeypatch.setattr(apply_module, "available_bytes", lambda device: 1000)
    out = tmp_path / "pruned"
    result = run_cli("apply", save_plan(run_dir, plan), "--model", tiny_checkpoint, "--out", out, *args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert "tokens_per_s_ratio" not in report and "speed_rounds" not in report
    assert report["before"]["num_parameters"] == plan.params_before
    assert report["after"]["num_parameters"] == plan.params_after
    assert "forward speed not compared (the models were not in memory at once" in result.output
    assert "each is measured alone" in caplog.text
    monkeypatch.setattr(apply_module, "available_bytes", lambda device: 1 << 50)
    again = tmp_path / "again"
    result = run_cli("apply", save_plan(run_dir, plan), "--model", tiny_checkpoint, "--out", again, *args)
    assert result.exit_code == 0, result.output
    paired = json.loads((again / "eval.json").read_text())
    assert paired["speed_rounds"] == 5
    for which in ("before", "after"):  # the same perplexities measured alone or in turn
        assert paired[which]["ppl"] == report[which]["ppl"]


def test_in_memory_path_writes_the_same_tensors_as_streaming(tmp_path, tiny_checkpoint, run_dir, monkeypatch):
    plan_path = save_plan(run_dir, random_plan(checkpoint_config(tiny_checkpoint), seed=3, skip_p=0.3))
    apply(ApplyOptions(plan_path, str(tiny_checkpoint), tmp_path / "streamed"))
    monkeypatch.setattr(apply_module, "safetensors_files", lambda path: None)  # as for a GGUF or hub source
    summary = apply(ApplyOptions(plan_path, str(tiny_checkpoint), tmp_path / "memory"))
    assert summary["streamed"] is False
    streamed, memory = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[key], memory[key]) for key in memory)


def test_interrupted_apply_leaves_no_half_checkpoint(tmp_path, tiny_checkpoint, run_dir, monkeypatch):
    plan_path = save_plan(run_dir, random_plan(checkpoint_config(tiny_checkpoint), seed=2))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply_module, "write_tokenizer_files", fail)
    out = tmp_path / "pruned"
    with pytest.raises(KeyboardInterrupt):
        apply(ApplyOptions(plan_path, str(tiny_checkpoint), out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned")] == []
    assert json.loads((run_dir / "manifest.json").read_text())["history"] == []


def test_bench_smoke_runs_on_a_tiny_checkpoint(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "apply.py"
    cmd = [sys.executable, str(script), "--small", "--dir", str(tmp_path), "--json", str(tmp_path / "f.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["shards"] > 1 and figures["params_after"] < figures["params_before"]
    assert "peak RSS / largest input shard" in done.stdout


def test_a_plan_outside_a_run_directory_gets_a_manifest_of_its_own(tmp_path, tiny_checkpoint):
    config = checkpoint_config(tiny_checkpoint)
    plan = plan_from_kept(config, [([0], [1, 2])] * 2)
    write_plan(plan, tmp_path / "loose.json")
    apply(ApplyOptions(tmp_path / "loose.json", str(tiny_checkpoint), tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == plan.fingerprint and manifest["plan"] == plan.name
    assert [entry["command"] for entry in manifest["history"]] == ["apply"]


def test_cli_apply_then_finetune_keeps_both_checkpoints(tmp_path, tiny_checkpoint, run_dir):
    """`apply --finetune lora` writes the pruned checkpoint beside OUT and the finetuned one at OUT."""
    from conftest import VALID_TXT

    text = tmp_path / "train.txt"
    text.write_text("\n".join(VALID_TXT.read_text().splitlines()[:300]))
    config = checkpoint_config(tiny_checkpoint)
    plan = plan_from_kept(config, [([1], list(range(0, 24, 2))), ([0, 1], list(range(12)))])
    plan_path = save_plan(run_dir, plan)
    out = tmp_path / "tuned"
    args = ["apply", plan_path, "--model", tiny_checkpoint, "--out", out, "--finetune", "lora",
            "--finetune-dataset", text, "--finetune-samples", "16", "--finetune-seq-len", "16",
            "--eval", text, "--seq-len", "16", "--max-windows", "4"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned-pruned")
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert tuned.num_parameters() == pruned.num_parameters() == plan.params_after
    after_pruning = json.loads((tmp_path / "tuned-pruned" / "eval.json").read_text())["after"]["ppl"]
    assert json.loads((out / "eval.json").read_text())["before"]["ppl"] == pytest.approx(after_pruning, rel=1e-5)
    bad = run_cli(*args[:6], "--finetune", "lora", "--finetune-dataset", tmp_path / "no.txt", "--overwrite")
    assert bad.exit_code == 2 and "not found" in bad.output
