"""Structured OBS selection: against brute force on tiny layers, never worse than the plan's own groups, the
identity when nothing goes, the chosen plan recorded so that it re-applies bit for bit, and bad input in one
line."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
from conftest import VALID_TXT, assert_one_error_line, ids, tiny_config, tiny_model
from typer.testing import CliRunner

from llamaprune.apply.command import apply_plan
from llamaprune.apply.compensation import FitSums, refit
from llamaprune.apply.refit import CompensationOptions, refit_layers
from llamaprune.apply.selection import Selection, candidates, select
from llamaprune.core.artifacts import atomic_write_json
from llamaprune.core.errors import UsageError
from llamaprune.core.plan_file import plan_from_kept, read_plan, write_plan
from llamaprune.io.layer_stream import LayerStream
from llamaprune.scoring.importance.obs import accumulate_gram

DAMP = 1e-3


def layer_inputs(seed: int, features: int = 12, outputs: int = 6, tokens: int = 300):
    """Correlated inputs with unequal scales, a weight and a bias: a layer where the best group to drop is not
    the one of smallest weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * torch.rand(features, generator=g)
    x = torch.randn(tokens, features, generator=g) @ mix + torch.randn(features, generator=g)
    return x, torch.randn(outputs, features, generator=g), torch.randn(outputs, generator=g)


def refit_error(x, w, b, kept_columns) -> float:
    """The refit's objective for keeping ``kept_columns``: the squared error on ``x`` plus the ridge, from the
    refit itself (``compensation.refit``), not from OBS's algebra."""
    keep = torch.tensor(kept_columns)
    sums = FitSums.of(w, b).add(x)
    ridge = DAMP * float(torch.diagonal(sums.gram)[keep].mean())
    weight, bias = refit(sums, keep, DAMP)
    target = x.double() @ w.double().T + b.double()
    error = (x.double()[:, keep] @ weight.double().T + bias.double() - target).square().sum()
    return float(error + ridge * (weight.double() - w.double()[:, keep]).square().sum())


def kept_columns(groups: torch.Tensor, kept_groups) -> list[int]:
    return groups[torch.as_tensor(kept_groups)].reshape(-1).tolist()


@pytest.mark.parametrize("size", [1, 3])  # MLP channels; KV groups of several o_proj columns
@pytest.mark.parametrize("seed", range(4))
def test_greedy_obs_removes_the_single_group_a_brute_force_refit_finds_best(seed, size):
    x, w, b = layer_inputs(seed)
    groups = torch.arange(12).view(-1, size)
    gram = accumulate_gram(x, None)
    kept = select(gram, w, b, groups, remove=1, damp=DAMP)
    errors = {g: refit_error(x, w, b, kept_columns(groups, [i for i in range(len(groups)) if i != g]))
              for g in range(len(groups))}
    best = min(errors, key=errors.get)
    assert sorted(set(range(len(groups))) - set(kept.tolist())) == [best]
    # the ridge uses the kept inputs' mean energy in the refit, the whole layer's in OBS: equal to ~1e-3
    assert errors[best] < sorted(errors.values())[1]


@pytest.mark.parametrize("swaps", [0, 8])
@pytest.mark.parametrize("seed", range(6))
def test_obs_never_loses_to_the_plan_s_own_groups_and_swaps_never_hurt(seed, swaps):
    x, w, b = layer_inputs(seed, features=10)
    groups = torch.arange(10).view(-1, 1)
    gram = accumulate_gram(x, None)
    planned = torch.tensor(sorted(torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:6].tolist()))
    chosen = select(gram, w, b, groups, remove=4, damp=DAMP, swaps=swaps, planned=planned)
    greedy = select(gram, w, b, groups, remove=4, damp=DAMP)
    assert len(chosen) == 6
    error = refit_error(x, w, b, chosen.tolist())
    assert error <= refit_error(x, w, b, planned.tolist()) * (1 + 1e-6)
    assert error <= refit_error(x, w, b, greedy.tolist()) * (1 + 1e-6)
    best = min(refit_error(x, w, b, list(kept)) for kept in itertools.combinations(range(10), 6))
    assert error <= best * 1.5  # near the optimum of all 210 choices


def test_swaps_find_a_better_set_than_greedy_somewhere():
    """Swaps are not a no-op: over a few layers at least one greedy choice is improved."""
    gains = []
    for seed in range(12):
        x, w, b = layer_inputs(seed, features=10)
        gram = accumulate_gram(x, None)
        groups = torch.arange(10).view(-1, 1)
        greedy = refit_error(x, w, b, select(gram, w, b, groups, 5, DAMP).tolist())
        swapped = refit_error(x, w, b, select(gram, w, b, groups, 5, DAMP, swaps=8).tolist())
        assert swapped <= greedy * (1 + 1e-9)
        gains.append(greedy - swapped)
    assert max(gains) > 0


def test_a_pool_keeps_obs_among_the_lowest_scored_groups_and_a_pool_of_one_is_the_plan_s_choice():
    outside = 0
    for seed in range(6):
        x, w, b = layer_inputs(seed, features=10)
        gram = accumulate_gram(x, None)
        groups = torch.arange(10).view(-1, 1)
        scores = torch.rand(10, generator=torch.Generator().manual_seed(seed))
        planned = scores.argsort()[4:].sort().values  # the plan keeps the 6 highest scores
        pool = candidates(scores, 4, 1.5)
        assert pool.sum() == 6 and pool[planned].sum() == 2
        for swaps in (0, 8):
            kept = select(gram, w, b, groups, 4, DAMP, swaps, planned, allowed=pool)
            removed = sorted(set(range(10)) - set(kept.tolist()))
            assert len(kept) == 6 and pool[removed].all()
            assert refit_error(x, w, b, kept.tolist()) <= refit_error(x, w, b, planned.tolist()) * (1 + 1e-6)
        alone = select(gram, w, b, groups, 1, DAMP, allowed=candidates(scores, 4, 1.0))
        assert torch.equal(select(gram, w, b, groups, 4, DAMP, 8, allowed=candidates(scores, 4, 1.0)), planned)
        assert len(alone) == 9
        free = sorted(set(range(10)) - set(select(gram, w, b, groups, 4, DAMP).tolist()))
        outside += not pool[free].all()
    assert outside  # the pool is not a no-op: unrestricted obs goes outside it somewhere


def test_nothing_to_remove_is_the_identity():
    x, w, b = layer_inputs(0)
    assert select(accumulate_gram(x, None), w, b, torch.arange(12).view(-1, 1), 0, DAMP).tolist() == list(range(12))
    config = tiny_config(layers=2)
    model = tiny_model(config)
    plan = plan_from_kept(config, [(list(range(2)), list(range(24)))] * 2)
    windows = ids(config.vocab_size, batch=4)
    obs = refit_layers(LayerStream.from_model(model), plan, windows, DAMP, False, selection=Selection.obs)
    score = refit_layers(LayerStream.from_model(model), plan, windows, DAMP, False)
    assert obs.plan.layers == plan.layers and obs.tensors.keys() == score.tensors.keys()
    for key in score.tensors:
        assert torch.equal(obs.tensors[key], score.tensors[key]), key
    x = ids(config.vocab_size, seed=1)
    assert torch.equal(apply_plan(model, obs.plan, obs.tensors)(input_ids=x).logits, model(input_ids=x).logits)


def test_a_singular_gram_and_nan_inputs_name_the_fix():
    x, w, b = layer_inputs(1)
    x[:, 3] = 0.0  # a dead input: its row of the Gram matrix is zero
    groups = torch.arange(12).view(-1, 1)
    with pytest.raises(UsageError, match="singular.*--damp.*--select score"):
        select(accumulate_gram(x, None), w, b, groups, 2, damp=0.0, where="layer 3 (mlp)")
    x[0, 1] = float("nan")
    with pytest.raises(UsageError, match="NaN or infinite at layer 3"):
        select(accumulate_gram(x, None), w, b, groups, 2, damp=DAMP, where="layer 3 (mlp)")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_the_plan_obs_chose_re_applies_bit_for_bit_with_score_selection(tmp_path, tokenizer, model_type):
    from llamaprune.cli.app import app

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2, intermediate=32, model_type=model_type)
    model = tiny_model(config)
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "model")
    plan = plan_from_kept(config, [([0], list(range(20))), ([1], list(range(8, 32)))])
    run = tmp_path / "run"
    atomic_write_json(run / "manifest.json", {"schema_version": 1, "history": []})
    write_plan(plan, run / "plans" / "p.json")
    runner = CliRunner()
    lstsq = ["--model", str(tmp_path / "model"), "--compensate", "lstsq", "--calibration", str(VALID_TXT),
             "--calibration-samples", "16", "--calibration-seq-len", "16"]

    def apply(plan_path, out, *extra):
        result = runner.invoke(app, ["apply", str(plan_path), "--out", str(tmp_path / out), *lstsq, *extra])
        assert result.exit_code == 0, result.output
        return tmp_path / out

    chosen = apply(run / "plans" / "p.json", "obs", "--select", "obs", "--swaps", "2")
    recorded = read_plan(chosen / "plan.json")
    assert recorded.selection["method"] == "obs" and recorded.selection["num_samples"] == 16
    assert [lp.mlp_channels for lp in recorded.layers] != [lp.mlp_channels for lp in plan.layers]
    assert [len(lp.mlp_channels) for lp in recorded.layers] == [20, 24]
    assert recorded.params_after == plan.params_after
    history = json.loads((chosen / "manifest.json").read_text())["history"][-1]
    assert history["compensation"]["select"] == "obs" and history["selected_plan"].endswith("plan.json")
    again = apply(chosen / "plan.json", "again", "--select", "score")
    for name in sorted(p.name for p in chosen.glob("*.safetensors")):
        assert (again / name).read_bytes() == (chosen / name).read_bytes(), name
    assert (again / "plan.json").read_bytes() == (chosen / "plan.json").read_bytes()
    planned = apply(run / "plans" / "p.json", "score", "--select", "score")
    assert read_plan(planned / "plan.json").selection is None


def test_an_obs_pool_reads_the_plan_s_run_and_is_recorded(tmp_path, tokenizer, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llamaprune.cli.app import app

    config = tiny_config(heads=4, kv_heads=2, vocab=len(tokenizer), layers=2, intermediate=32)
    tiny_model(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    kept = [([0, 1], list(range(8, 32))), ([0, 1], list(range(0, 24)))]
    plan = replace(plan_from_kept(config, kept), criterion="taylor2")
    run = tmp_path / "run"
    atomic_write_json(run / "manifest.json", {"schema_version": 1, "history": []})
    write_plan(plan, run / "plans" / "p.json")
    outside = tmp_path / "p.json"
    write_plan(plan, outside)
    rows = [(layer, "mlp", i, float(i in keep)) for layer, (_, keep) in enumerate(kept) for i in range(32)]
    rows += [(layer, "attn", i, 1.0) for layer in range(2) for i in range(2)]
    layer, kind, index, score = zip(*rows, strict=True)
    pq.write_table(pa.table({"layer": pa.array(layer, pa.int32()), "kind": kind, "index": pa.array(index, pa.int32()),
                             "taylor2": score}), run / "groups.parquet")
    runner = CliRunner()
    base = ["--model", str(tmp_path / "model"), "--compensate", "lstsq", "--calibration", str(VALID_TXT),
            "--calibration-samples", "16", "--calibration-seq-len", "16", "--select", "obs"]

    def apply(plan_path, out, *extra):
        return runner.invoke(app, ["apply", str(plan_path), "--out", str(tmp_path / out), *base, *extra])

    for factor, out in (("1", "one"), ("1.5", "wider")):
        result = apply(run / "plans" / "p.json", out, "--obs-pool", factor)
        assert result.exit_code == 0, result.output
        recorded = read_plan(tmp_path / out / "plan.json")
        assert recorded.selection["pool"] == float(factor)
        for lp, (_, keep) in zip(recorded.layers, kept, strict=True):
            planned_removed = set(range(32)) - set(keep)
            removed = set(range(32)) - set(lp.mlp_channels)
            assert len(removed) == 8
            if factor == "1":
                assert removed == planned_removed
            else:  # the 12 lowest: the 8 planned and the 4 kept of lowest index (stable ties)
                assert removed <= planned_removed | set(sorted(keep)[:4])
    assert_one_error_line(apply(outside, "lost", "--obs-pool", "1.5"), "--obs-pool", "RUN/plans/")
    assert_one_error_line(apply(run / "plans" / "p.json", "lost", "--obs-pool", "0.5"), "--obs-pool", "at least 1")
    write_plan(replace(plan, criterion="wanda"), run / "plans" / "wanda.json")

    def compensate(*args, **kwargs):
        raise AssertionError("the run's table is checked before the compensation pass starts")

    monkeypatch.setattr(CompensationOptions, "compensate", compensate)
    assert_one_error_line(apply(run / "plans" / "wanda.json", "lost", "--obs-pool", "1.5"), "--obs-pool", "'wanda'")
    assert not (tmp_path / "lost").exists()


def test_select_swaps_and_target_need_the_least_squares_refit(tmp_path, tiny_checkpoint):
    from llamaprune.cli.app import app

    plan = tmp_path / "p.json"
    write_plan(plan_from_kept(tiny_config(heads=4, kv_heads=2, layers=2), [([0], [1, 2]), ([1], [3])]), plan)
    runner = CliRunner()
    base = ["apply", str(plan), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    assert_one_error_line(runner.invoke(app, [*base, "--select", "obs"]), "--select obs", "--compensate lstsq")
    assert_one_error_line(runner.invoke(app, [*base, "--compensate", "lstsq", "--calibration", str(VALID_TXT),
                                              "--select", "best"]), "--select 'best' is not one of")
    assert_one_error_line(runner.invoke(app, [*base, "--swaps", "3"]), "--swaps")
    assert_one_error_line(runner.invoke(app, [*base, "--obs-pool", "1.5"]), "--obs-pool", "--select")
    assert_one_error_line(runner.invoke(app, [*base, "--target", "dense"]), "--target", "--compensate lstsq")
    assert not (tmp_path / "out").exists()
    assert CompensationOptions("lstsq", "x", select="obs").select is Selection.obs
