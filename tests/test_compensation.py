"""Error compensation: the least-squares refit and the mean bias against closed forms, the layer-streamed pass
against the full model, and compensated checkpoints through apply (streamed and in memory), save and load."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    FAMILIES,
    TEST_RAW,
    VALID_TXT,
    assert_one_error_line,
    ids,
    logits,
    random_plan,
    read_tensors,
    tiny_config,
    tiny_model,
)
from typer.testing import CliRunner

from llamaprune.apply.command import ApplyOptions, apply, apply_plan
from llamaprune.apply.compensation import FitSums, mean_bias, refit
from llamaprune.apply.refit import CompensationOptions, refit_layers
from llamaprune.core.artifacts import atomic_write_json
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import plan_from_kept, write_plan
from llamaprune.io.layer_stream import LayerStream

KEEP = torch.tensor([0, 2, 3, 6])


def inputs_and_weight(seed: int = 0, tokens: int = 200, features: int = 8, outputs: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g, dtype=torch.float64) @ torch.randn(features, features, generator=g,
                                                                                       dtype=torch.float64)
    return x + 0.5, torch.randn(outputs, features, generator=g), torch.randn(outputs, generator=g)


def squared_error(x, w_kept, b_kept, w, b):
    return float(((x[:, KEEP] @ w_kept.double().T + b_kept.double()) - (x @ w.double().T + b.double())).square().sum())


def test_refit_equals_numpy_least_squares_and_never_loses_to_none_or_bias():
    x, w, b = inputs_and_weight()
    kept, bias = refit(FitSums.of(w, b).add(x), KEEP, damp=0.0)
    design = np.hstack([x[:, KEEP].numpy(), np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, (x @ w.double().T + b.double()).numpy(), rcond=None)[0]
    np.testing.assert_allclose(kept.double().numpy(), solution[:-1].T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bias.double().numpy(), solution[-1], rtol=1e-6, atol=1e-6)
    error = squared_error(x, kept, bias, w, b)
    assert error <= squared_error(x, w[:, KEEP], b, w, b)  # none
    assert error <= squared_error(x, *mean_bias(x.mean(dim=0), w, KEEP, b), w, b)  # bias


def test_refit_to_a_target_of_its_own_is_least_squares_onto_that_share_of_the_way():
    x, w, b = inputs_and_weight(seed=4)
    other = torch.randn(len(x), w.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sums = FitSums.of(w, b, target=True, share=0.3)
    for rows in range(0, len(x), 100):  # the sums fold batch by batch
        sums.add(x[rows:rows + 100], other[rows:rows + 100])
    kept, bias = refit(sums, KEEP, damp=0.0)
    wanted = torch.lerp(x @ w.double().T + b.double(), other, 0.3)
    design = np.hstack([x[:, KEEP].numpy(), np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, wanted.numpy(), rcond=None)[0]
    np.testing.assert_allclose(kept.double().numpy(), solution[:-1].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias.double().numpy(), solution[-1], rtol=1e-5, atol=1e-5)


def test_refit_keeping_everything_is_the_identity_and_the_ridge_pulls_towards_it():
    x, w, b = inputs_and_weight(seed=1)
    kept, bias = refit(FitSums.of(w, b).add(x), torch.arange(8), damp=0.1)
    torch.testing.assert_close(kept, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, b, rtol=0, atol=1e-6)
    far = refit(FitSums.of(w).add(x), KEEP, damp=1e6)[0]
    torch.testing.assert_close(far, w[:, KEEP], rtol=0, atol=1e-3)


def test_a_singular_refit_without_damping_names_the_fix():
    x, w, b = inputs_and_weight(seed=3)
    x[:, KEEP[1]] = 0.0  # a dead kept input: its row of the Gram matrix is zero
    with pytest.raises(UsageError, match="singular.*give --damp a positive value"):
        refit(FitSums.of(w, b).add(x), KEEP, damp=0.0, where="layer 3")
    kept, _ = refit(FitSums.of(w, b).add(x), KEEP, damp=1e-3)
    assert torch.isfinite(kept).all()


def test_mean_bias_is_exact_when_the_removed_inputs_are_constant():
    x, w, b = inputs_and_weight(seed=2)
    removed = [i for i in range(8) if i not in KEEP]
    x[:, removed] = torch.arange(len(removed), dtype=torch.float64) - 1.5
    kept, bias = mean_bias(x.mean(dim=0), w, KEEP, b)
    assert squared_error(x, kept, bias, w, b) < 1e-8


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_layer_streamed_pass_reproduces_the_full_model(tmp_path, model_type):
    config = tiny_config(layers=3, model_type=model_type, tie=model_type in ("llama", "gemma3_text"))
    model = tiny_model(config)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="16KB")
    x = ids(config.vocab_size, batch=5, length=10)
    expected = logits(model, x)
    streams = LayerStream.from_model(model, 2), LayerStream.from_checkpoint(tmp_path / "ckpt", config, batch_size=2)
    for stream in streams:
        hidden = stream.embed(x)
        for index in range(stream.num_layers):
            with stream.layer(index) as block:
                hidden = stream.run_layer(block, hidden)
        torch.testing.assert_close(stream.logits(hidden), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_compensating_a_plan_that_keeps_everything_changes_nothing(model_type):
    config = tiny_config(layers=2, model_type=model_type)
    model = tiny_model(config)
    plan = plan_from_kept(config, [(list(range(2)), list(range(24)))] * 2)
    tensors = refit_layers(LayerStream.from_model(model), plan, ids(config.vocab_size, batch=4), damp=1e-3,
                           progress=False).tensors
    x = ids(config.vocab_size, seed=1)
    assert torch.equal(logits(apply_plan(model, plan, tensors), x), logits(model, x))


def test_the_refit_reduces_each_layer_s_error_on_its_calibration_inputs():
    """After compensation the pruned model is closer to the dense one on the calibration windows than the plainly
    sliced one, and than the bias-compensated one."""
    config = tiny_config(layers=3, heads=4, kv_heads=2, intermediate=32)
    model = tiny_model(config)
    plan = plan_from_kept(config, [([0], list(range(0, 32, 2))), ([1], list(range(16))), ([0, 1], list(range(20)))])
    windows = ids(config.vocab_size, batch=16, length=16, seed=3)
    dense = logits(model, windows)
    refitted = apply_plan(model, plan, refit_layers(LayerStream.from_model(model), plan, windows, 1e-6, False).tensors)
    plain = apply_plan(model, plan)
    assert (logits(refitted, windows) - dense).square().sum() < (logits(plain, windows) - dense).square().sum()


def test_refitted_layers_wait_on_disk_one_file_per_layer(tmp_path):
    """With a spill directory nothing refitted stays in memory, and what is read back equals the in-memory fit."""
    config = tiny_config(layers=3, heads=4, kv_heads=2, intermediate=32)
    model = tiny_model(config)
    plan = plan_from_kept(config, [([0], list(range(0, 32, 2))), ([1], list(range(16))), ([0, 1], list(range(20)))])
    windows = ids(config.vocab_size, batch=4, length=16, seed=3)
    held = refit_layers(LayerStream.from_model(model), plan, windows, 1e-3, False).tensors
    spilled = refit_layers(LayerStream.from_model(model), plan, windows, 1e-3, False, spill=tmp_path / "spill").tensors
    assert not spilled.held and len(list((tmp_path / "spill").iterdir())) == 3
    assert sorted(spilled) == sorted(held)
    for key in held:
        assert torch.equal(spilled[key], held[key]), key


def write_checkpoint(tmp_path, tokenizer, config):
    model = tiny_model(config)
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


SKIPPED_ATTENTION = [([1], [0, 4, 5, 20]), ([], [3, 7])]
NARROWED = [([0], list(range(12))), ([0], [5])]


@pytest.mark.parametrize(("model_type", "kept"), [("llama", SKIPPED_ATTENTION), ("llama", NARROWED),
                                                  ("qwen3", NARROWED), ("gemma3_text", SKIPPED_ATTENTION)])
def test_compensated_checkpoints_stream_like_in_memory_and_load_back(tmp_path, tokenizer, model_type, kept):
    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2, model_type=model_type)
    model, path = write_checkpoint(tmp_path, tokenizer, config)
    plan = plan_from_kept(config, kept)
    run = tmp_path / "run"
    atomic_write_json(run / "manifest.json", {"schema_version": 1, "history": []})
    plan_path = run / "plans" / "p.json"
    write_plan(plan, plan_path)
    compensation = CompensationOptions("lstsq", str(VALID_TXT), num_samples=8, seq_len=16)
    streamed = apply(ApplyOptions(plan_path, str(path), tmp_path / "streamed", compensation=compensation))
    assert streamed["streamed"] and streamed["compensation"]["method"] == "lstsq"
    assert not (tmp_path / "streamed" / ".compensation").exists()
    from llamaprune.io.loading import LoadedModel, Source

    loaded = LoadedModel(model, tokenizer, Source("m", "dir", str(path)))
    in_memory = compensation.compensate(plan, config, str(path), loaded, compensation.rows(None, plan.criterion), None,
                                        False).tensors
    memory_model = apply_plan(model, plan, in_memory)
    stored = read_tensors(tmp_path / "streamed")
    assert stored.keys() == dict(memory_model.state_dict()).keys() - {"lm_head.weight"} or stored.keys() == \
        dict(memory_model.state_dict()).keys()
    for key, tensor in memory_model.state_dict().items():
        if key in stored:
            torch.testing.assert_close(stored[key], tensor, rtol=1e-6, atol=1e-6)
    from llamaprune.io.pruned_checkpoint import load_pruned

    reloaded = load_pruned(tmp_path / "streamed")
    x = ids(config.vocab_size)
    torch.testing.assert_close(logits(reloaded, x), logits(memory_model, x), rtol=0, atol=1e-5)
    assert reloaded.config.output_bias and reloaded.model.layers[0].mlp.down_proj.bias is not None
    assert reloaded.num_parameters() == plan.params_after + sum(
        t.numel() for k, t in in_memory.items() if k.endswith(".bias"))
    assert reloaded.generate(x[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
    remote = (
        "import sys, torch\nsys.modules['llamaprune'] = None\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'streamed')!r}, trust_remote_code=True)\n"
        f"x = torch.tensor({x.tolist()})\nprint(m(input_ids=x).logits.sum().item())"
    )
    done = subprocess.run([sys.executable, "-c", remote], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == pytest.approx(float(logits(reloaded, x).sum()), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bias_compensation_from_the_run_s_input_means(tmp_path, tokenizer, model_type):
    from llamaprune.cli.app import app

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2, model_type=model_type)
    _, path = write_checkpoint(tmp_path, tokenizer, config)
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["score", path, "--out", run, "--dataset", VALID_TXT, "--num-samples", 4, "--seq-len", 16,
            "--criteria", "fluctuation"]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    assert runner.invoke(app, ["plan", str(run), "--ratio", "0.2", "--criterion", "fluctuation"]).exit_code == 0
    plan = next((run / "plans").glob("*.json"))
    out = tmp_path / "biased"
    result = runner.invoke(app, ["apply", str(plan), "--model", str(path), "--out", str(out), "--compensate", "bias",
                                 "--eval", str(TEST_RAW), "--max-windows", "2", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["history"][-1]["compensation"]["method"] == "bias"
    assert json.loads((out / "config.json").read_text())["output_bias"] is True


READ_BY = {  # the input statistics a run records: what its criteria read, and the sums bias compensation reads
    ("magnitude",): {"o_in.sum", "down_in.sum"},
    ("taylor", "random"): {"o_in.sum", "down_in.sum"},
    ("wanda", "magnitude", "random"): {"attn_in.sq_norm", "o_in.sq_norm", "mlp_in.sq_norm", "down_in.sq_norm",
                                       "o_in.sum", "down_in.sum"},
    ("fluctuation",): {"o_in.sq_norm", "down_in.sq_norm", "o_in.sum", "down_in.sum"},
}


class Reads(dict):
    """Stats that remember which keys were read."""

    def __init__(self, stats: dict):
        super().__init__(stats)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("criteria", list(READ_BY), ids=",".join)
def test_a_run_records_input_statistics_only_where_something_reads_them(tmp_path, tokenizer, criteria):
    """No sum of attn_in / mlp_in (nothing reads them) and no square norms without wanda or fluctuation; the
    output projections' sums are always there, equal to any run's, and bias compensation reads nothing else."""
    from safetensors.torch import save_file

    from llamaprune.apply.refit import mean_biases
    from llamaprune.scoring.in_memory import score

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2)
    model, path = write_checkpoint(tmp_path, tokenizer, config)
    batches = list(ids(config.vocab_size, batch=6, length=16, seed=4).split(3))
    stats = score(model, batches, criteria, progress=False).stats
    recorded = {key for key in stats if key.endswith((".sq_norm", ".sum"))}
    assert recorded == {f"layers.{layer}.{name}" for layer in range(2) for name in READ_BY[criteria]}
    full = score(model, batches, ("wanda", "fluctuation"), progress=False).stats
    for key in recorded:
        assert torch.equal(stats[key], full[key]), key
    plan = plan_from_kept(config, [([1], [0, 4, 5, 20]), ([0], [3, 7, 9])])
    state = model.state_dict()
    reads = Reads(stats)
    biases = mean_biases(plan, reads, state.__getitem__, config, "run")
    sums = {f"layers.{layer}.{name}" for layer in range(2) for name in ("o_in.sum", "down_in.sum")}
    assert reads.read == {"tokens"} | sums
    expected = mean_biases(plan, full, state.__getitem__, config, "run")
    assert biases.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(biases[key], value), key
    run = tmp_path / "run"  # through apply: a run scored with these criteria is one that bias compensates
    atomic_write_json(run / "manifest.json", {"schema_version": 1, "history": []})
    save_file(stats, str(run / "stats.safetensors"))
    write_plan(plan, run / "plans" / "p.json")
    summary = apply(ApplyOptions(run / "plans" / "p.json", str(path), tmp_path / "out",
                                 compensation=CompensationOptions("bias")))
    assert summary["compensation"]["method"] == "bias"
    written = read_tensors(tmp_path / "out")
    for key, value in expected.items():
        assert torch.equal(written[key], value), key


def test_bad_compensation_input_is_one_line_and_writes_nothing(tmp_path, tokenizer):
    from llamaprune.cli.app import app

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2)
    _, path = write_checkpoint(tmp_path, tokenizer, config)
    plan = random_plan(config, seed=0)
    run = tmp_path / "run"
    atomic_write_json(run / "manifest.json", {"schema_version": 1, "history": []})
    write_plan(plan, run / "plans" / "p.json")
    out = tmp_path / "out"
    runner = CliRunner()

    def invoke(*extra):
        return runner.invoke(app, ["apply", str(run / "plans" / "p.json"), "--model", str(path), "--out", str(out),
                                   *map(str, extra)])

    assert_one_error_line(invoke("--compensate", "lstsq"), "--calibration TEXT")
    assert_one_error_line(invoke("--compensate", "bias"), "stats.safetensors")
    (run / "stats.safetensors").write_bytes(b"")  # a run scored before compensation: no input sums
    from safetensors.torch import save_file

    save_file({"tokens": torch.tensor([4])}, str(run / "stats.safetensors"))
    assert_one_error_line(invoke("--compensate", "bias"), "no input means", "llamaprune score")
    assert_one_error_line(invoke("--compensate", "ridge"), "--compensate 'ridge' is not one of")
    lstsq = ("--compensate", "lstsq", "--calibration", VALID_TXT)
    assert_one_error_line(invoke(*lstsq, "--residual-share", 0.5), "--residual-share", "--target residual",
                          "target pruned")
    assert_one_error_line(invoke(*lstsq, "--target", "residual", "--residual-share", 1.5), "--residual-share",
                          "(0, 1]", "got 1.5")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_nan_activations_are_one_line(tmp_path, tokenizer, monkeypatch):
    from llamaprune.cli.app import app

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2)
    model, path = write_checkpoint(tmp_path, tokenizer, config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.fill_(float("nan"))
    model.save_pretrained(path, max_shard_size="20KB")
    plan = random_plan(config, seed=1, skip_p=0, remove_p=0)
    write_plan(plan, tmp_path / "p.json")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["apply", str(tmp_path / "p.json"), "--model", str(path), "--out", str(out),
                                      "--compensate", "lstsq", "--calibration", str(VALID_TXT),
                                      "--calibration-samples", "2", "--calibration-seq-len", "8"])
    lines = result.stderr.strip().splitlines()  # after the progress bar: one error line, no traceback
    assert result.exit_code == 2 and lines[-1].startswith("error: ") and "NaN or infinite at layer 0" in lines[-1]
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(("target", "model_type"), [("dense", "llama"), ("residual", "llama"),
                                                   ("dense", "gemma3_text")])
def test_dense_targets_are_the_pruned_one_until_error_is_carried_up(target, model_type):
    """With nothing pruned below a block, the dense model's output there is the unpruned block's on the pruned
    model's inputs: every target fits the same tensors (to float32 rounding: the pruned target's cross term comes
    from the Gram matrix, the others' from the outputs). Once a lower layer is pruned they differ. Gemma 3's refit
    fits the projection's own output, before the norm that follows it: the dense target is the dense projection's."""
    from llamaprune.apply.refit import Target

    config = tiny_config(layers=3, heads=4, kv_heads=2, intermediate=32, model_type=model_type)
    model = tiny_model(config)
    windows = ids(config.vocab_size, batch=8, length=16, seed=3)
    full = ([0, 1], list(range(32)))
    last_only = plan_from_kept(config, [full, full, ([0, 1], list(range(0, 32, 2)))])
    stream = LayerStream.from_model(model, 4)
    pruned = refit_layers(stream, last_only, windows, 1e-3, False).tensors
    dense = refit_layers(stream, last_only, windows, 1e-3, False, target=Target(target)).tensors
    assert pruned.keys() == dense.keys()
    for key in pruned:
        torch.testing.assert_close(pruned[key], dense[key], rtol=1e-4, atol=1e-6, msg=key)
    below = plan_from_kept(config, [([0, 1], list(range(16))), full, ([1], list(range(0, 32, 2)))])
    pruned = refit_layers(stream, below, windows, 1e-3, False).tensors
    dense = refit_layers(stream, below, windows, 1e-3, False, target=Target(target)).tensors
    first, last = "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"
    torch.testing.assert_close(pruned[first], dense[first], rtol=1e-4, atol=1e-6)
    assert (pruned[last] - dense[last]).abs().max() > 1e-3


def test_a_residual_share_goes_that_share_of_the_way_from_the_pruned_target():
    """The refit is linear in its target. Below layer 0's MLP only its attention is pruned, and its refit is the
    same for every target (nothing is carried up to it yet): so the MLP's refit with a share s of the residual
    target is (1 - s) times the pruned target's plus s times the residual's."""
    from llamaprune.apply.refit import Target

    config = tiny_config(layers=2, heads=4, kv_heads=2, intermediate=32)
    model = tiny_model(config)
    windows = ids(config.vocab_size, batch=8, length=16, seed=3)
    plan = plan_from_kept(config, [([1], list(range(16))), ([0, 1], list(range(8, 32)))])
    stream = LayerStream.from_model(model, 4)

    def fit(target: str, share: float = 1.0) -> dict[str, torch.Tensor]:
        return refit_layers(stream, plan, windows, 1e-3, False, target=Target(target), share=share).tensors

    pruned, residual, quarter = fit("pruned"), fit("residual"), fit("residual", 0.25)

    def off_line(key: str) -> float:
        """How far the quarter share's tensor is from the line between the two targets', relative to their gap."""
        gap = (residual[key] - pruned[key]).abs().max()
        return float((quarter[key] - torch.lerp(pruned[key], residual[key], 0.25)).abs().max() / gap)

    assert off_line("model.layers.0.mlp.down_proj.weight") < 1e-3
    assert off_line("model.layers.0.mlp.down_proj.bias") < 1e-3
    assert off_line("model.layers.1.mlp.down_proj.weight") > 1e-2  # above, the inputs differ too


def test_the_residual_target_through_a_norm_after_the_projection_is_one_line(tmp_path, tokenizer):
    """Gemma 3's o_proj / down_proj output passes through a norm before the residual: the hidden states' difference
    is no linear target for the projection, so --target residual is refused before any weights load."""
    from llamaprune.cli.app import app

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2, model_type="gemma3_text")
    _, path = write_checkpoint(tmp_path, tokenizer, config)
    write_plan(plan_from_kept(config, NARROWED), tmp_path / "p.json")
    result = CliRunner().invoke(app, ["apply", str(tmp_path / "p.json"), "--model", str(path), "--out",
                                      str(tmp_path / "out"), "--compensate", "lstsq", "--calibration", str(VALID_TXT),
                                      "--target", "residual"])
    assert_one_error_line(result, "--target residual", "Gemma3ForCausalLM", "--target pruned or dense")
    assert not (tmp_path / "out").exists()
