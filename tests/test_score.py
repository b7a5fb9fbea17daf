"""Phase 1: each criterion against an independent brute-force computation, the tables, the run directory."""

import json
import logging
import resource

import pyarrow.parquet as pq
import pytest
import torch
from conftest import VALID_TXT, group_slices, tiny_config, tiny_model
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.criteria import parse_criteria
from llamaprune.core.groups import config_fingerprint, iter_groups, model_shape
from llamaprune.core.tables import check_fingerprint, read_table, read_table_meta
from llamaprune.runs import peak_memory
from llamaprune.scoring.calibration import gradient_groups
from llamaprune.scoring.in_memory import STATS_FILE, score

GQA = [dict(heads=4, kv_heads=4), dict(heads=4, kv_heads=2, bias=True), dict(heads=6, kv_heads=2),
       dict(heads=8, kv_heads=2, bias=True, tie=True), dict(heads=6, kv_heads=2, model_type="qwen2")]


def _batches(vocab: int, n: int = 3, batch: int = 2, length: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(n)]


def _brute_force(model, batches):
    """taylor / taylor2 / wanda / magnitude / fluctuation of every group, from whole-loss autograd and explicit
    captures."""
    params = [p for p in model.parameters()]
    grad_sum = [torch.zeros_like(p) for p in params]
    fisher = [torch.zeros_like(p) for p in params]
    inputs: dict[int, list] = {}
    handles = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(id(m), []).append(a[0].detach()))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for b in batches:
        loss = model(input_ids=b, labels=b, use_cache=False).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                grad_sum[i] += g
                fisher[i] += g * g
    for h in handles:
        h.remove()
    index = {id(p): i for i, p in enumerate(params)}
    norms, variances = {}, {}
    tokens = sum(b.numel() for b in batches)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m) in inputs:
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[id(m)]]).double()
            norms[id(m.weight)] = x.pow(2).sum(0).sqrt()
            variances[id(m.weight)] = x.var(dim=0, unbiased=False)
            if m.bias is not None:
                norms[id(m.bias)] = None
    expected = {}
    for group in iter_groups(model_shape(model.config)):
        sums = dict.fromkeys(("taylor", "taylor2", "wanda", "magnitude", "fluctuation"), 0.0)
        for param, where in group_slices(model, group.layer, group.kind, group.index):
            w = param.detach().double()
            i = index[id(param)]
            G, F = grad_sum[i].double(), fisher[i].double()
            first = (w * G).abs()[where].sum().item()
            sums["taylor"] += first
            sums["taylor2"] += first + (0.5 * w * w * F)[where].sum().item()
            sums["magnitude"] += w.abs()[where].sum().item()
            norm = norms[id(param)]
            wanda = w.abs() * tokens**0.5 if norm is None else w.abs() * norm[None, :]
            sums["wanda"] += wanda[where].sum().item()
            if len(where) == 2:  # the columns of o_proj / down_proj: FLAP's var(x_j) * ||W[:, j]||^2
                sums["fluctuation"] += (w * w * variances[id(param)][None, :])[where].sum().item()
        expected[group.group_id] = sums
    return expected


# fluctuation's variance is E[x^2] - mean^2 from float32 token sums: it keeps fewer digits than the others where the
# mean is large (1.6e-5 relative seen on torch 2.6, whose float32 sums add up in another order)
REL = {"taylor": 1e-5, "taylor2": 1e-5, "wanda": 1e-5, "magnitude": 1e-5, "fluctuation": 1e-4}


@pytest.mark.parametrize("kwargs", GQA, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_criteria_match_brute_force(kwargs):
    model = tiny_model(tiny_config(layers=2, **kwargs))
    batches = _batches(model.config.vocab_size)
    result = score(model, batches, criteria=("taylor", "taylor2", "wanda", "magnitude", "fluctuation"), progress=False)
    expected = _brute_force(model, batches)
    table = result.groups.to_pylist()
    assert [r["group_id"] for r in table] == list(expected)
    for row in table:
        for criterion, value in expected[row["group_id"]].items():
            assert row[criterion] == pytest.approx(value, rel=REL[criterion]), (row["group_id"], criterion)
    for p in model.parameters():  # scoring leaves no gradient behind and restores requires_grad
        assert p.grad is None and p.requires_grad


def test_weight_criteria_taken_a_few_rows_at_a_time_match_brute_force(monkeypatch):
    from llamaprune.scoring import importance

    monkeypatch.setattr(importance, "BLOCK_ELEMENTS", 50)  # blocks of one to a few rows, the last one ragged
    model = tiny_model(tiny_config(layers=2))
    batches = _batches(model.config.vocab_size)
    result = score(model, batches, criteria=("wanda", "magnitude", "fluctuation"), progress=False)
    expected = _brute_force(model, batches)
    for row in result.groups.to_pylist():
        for criterion in ("wanda", "magnitude", "fluctuation"):
            assert row[criterion] == pytest.approx(expected[row["group_id"]][criterion], rel=1e-5), row["group_id"]


def test_block_influence_and_layer_sums():
    model = tiny_model(tiny_config(layers=3))
    batches = _batches(model.config.vocab_size)
    captured = {i: [] for i in range(3)}
    hooks = [layer.register_forward_hook(
        lambda m, a, k, out, i=i: captured[i].append((k["hidden_states"] if not a else a[0], out)), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    result = score(model, batches, criteria=("magnitude", "random"), progress=False)
    layers = result.layers.to_pylist()
    groups = result.groups.to_pylist()
    for i, row in enumerate(layers):
        cos = torch.cat([torch.nn.functional.cosine_similarity(x, y, dim=-1).flatten() for x, y in captured[i]])
        assert row["block_influence"] == pytest.approx(1 - cos.double().mean().item(), rel=1e-5)
        assert row["magnitude"] == pytest.approx(sum(g["magnitude"] for g in groups if g["layer"] == i))


def test_rows_costs_and_counts():
    config = tiny_config(heads=6, kv_heads=3, layers=3, intermediate=10, bias=True)
    model = tiny_model(config)
    result = score(model, _batches(config.vocab_size), criteria=("wanda",), progress=False)
    assert result.groups.num_rows == 3 * (3 + 10)
    shape = model_shape(config)
    assert sum(result.groups.column("params").to_pylist()) == shape.counts().prunable
    assert result.meta["params"]["total"] == model.num_parameters()
    assert result.groups.column_names == ["group_id", "layer", "kind", "index", "params", "wanda"]
    assert result.tokens == 3 * 2 * 12


def test_forward_only_criteria_run_no_backward():
    model = tiny_model(tiny_config())
    calls = []
    model.model.layers[0].mlp.down_proj.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    score(model, _batches(model.config.vocab_size), criteria=("wanda", "magnitude"), progress=False)
    assert calls == []


def test_random_is_seeded():
    model = tiny_model(tiny_config())
    a = score(model, [], criteria=("random",), seed=3, progress=False).groups.column("random").to_pylist()
    b = score(model, [], criteria=("random",), seed=3, progress=False).groups.column("random").to_pylist()
    c = score(model, [], criteria=("random",), seed=4, progress=False).groups.column("random").to_pylist()
    assert a == b and a != c


def test_non_finite_scores_name_the_layer():
    model = tiny_model(tiny_config(layers=2))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 1"):
        score(model, [], criteria=("magnitude",), progress=False)


def test_parse_criteria():
    assert parse_criteria("wanda, taylor") == ("taylor", "wanda")
    with pytest.raises(ValueError, match="choose from"):
        parse_criteria("taylor,snip")


def _write_calibration(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(VALID_TXT.read_text().splitlines()[:200]))
    return path


def test_cli_score_writes_a_run_directory(tmp_path, tiny_checkpoint):
    calib = _write_calibration(tmp_path)
    run = tmp_path / "run"
    args = ["score", str(tiny_checkpoint), "--out", str(run), "--dataset", str(calib), "--num-samples", "4",
            "--seq-len", "16", "--batch-size", "2", "--criteria", "taylor,taylor2,wanda,magnitude,random"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in run.iterdir()} >= {"manifest.json", "groups.parquet", "layers.parquet", STATS_FILE, "logs"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["calibration"] == {"source": str(calib), "n_samples": 4, "seq_len": 16, "seed": 0, "batch_size": 2,
                                       "fisher_windows": 8}
    from transformers import AutoConfig
    fingerprint = config_fingerprint(AutoConfig.from_pretrained(tiny_checkpoint))
    assert manifest["model"]["fingerprint"] == fingerprint
    assert manifest["peak_memory_bytes"] > 0 and manifest["peak_memory_scope"] in ("scoring", "process")
    assert read_table_meta(run / "groups.parquet")["fingerprint"] == fingerprint
    first = read_table(run / "groups.parquet")
    # Refused without --overwrite; with it, the same seed gives an identical table.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0
    assert pq.read_table(run / "groups.parquet").equals(first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no temporary left behind


def test_the_run_log_holds_info_records_whatever_the_root_level(tmp_path, tiny_checkpoint, monkeypatch):
    """As for a library caller whose root logger stays at WARNING (under pytest the CLI's basicConfig is a no-op)."""
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    run = tmp_path / "run"
    args = ["score", str(tiny_checkpoint), "--out", str(run), "--dataset", str(_write_calibration(tmp_path)),
            "--num-samples", "2", "--seq-len", "16", "--criteria", "magnitude"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (log,) = run.glob("logs/*/run.log")
    assert "INFO llamaprune.scoring.command: scoring" in log.read_text()
    assert logging.getLogger("llamaprune").level == logging.NOTSET  # as it was before the command


def test_the_scoring_peak_leaves_out_what_came_before():
    """Where the OS lets the peak be reset (Linux), a larger allocation freed before scoring is not in it."""
    model = tiny_model(tiny_config())
    spike = torch.ones(400 * 2**20, dtype=torch.uint8)  # 400 MiB, resident while it lives
    del spike
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = score(model, _batches(model.config.vocab_size), criteria=("magnitude",), progress=False)
    if result.peak_memory_scope == "process":
        pytest.skip("this OS does not let a process reset its peak resident set")
    assert result.peak_memory_scope == "scoring"
    assert 0 < result.peak_memory_bytes < lifetime - 200 * 2**20


def test_the_peak_is_the_process_s_where_it_cannot_be_reset(monkeypatch, tmp_path):
    monkeypatch.setattr(peak_memory, "CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    model = tiny_model(tiny_config())
    result = score(model, _batches(model.config.vocab_size), criteria=("magnitude",), progress=False)
    assert result.peak_memory_scope == "process"
    assert 0 < result.peak_memory_bytes <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_table_from_another_model_is_rejected(tmp_path):
    model = tiny_model(tiny_config())
    meta = score(model, [], criteria=("magnitude",), progress=False).meta
    other = config_fingerprint(tiny_config(intermediate=32))
    with pytest.raises(ValueError, match=f"{meta['fingerprint']['config_hash']}.*{other['config_hash']}"):
        check_fingerprint(meta["fingerprint"], other, "groups.parquet")


def test_cli_score_bad_input(tmp_path, tiny_checkpoint):
    runner = CliRunner()
    bad = runner.invoke(app, ["score", str(tiny_checkpoint), "--out", str(tmp_path / "r"), "--criteria", "snip"])
    assert bad.exit_code == 2 and "choose from" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["score", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "not found" in missing.output


@pytest.mark.real
def test_real_model_table_against_its_config_and_a_brute_force_layer(real_model):
    """SmolLM2-135M: 30 layers of 3 KV groups (9 query heads of 64) and 1536 channels, hidden size 576."""
    import numpy as np

    from llamaprune.io.text_data import calibration_windows, load_rows

    model, layer = real_model.model, 7
    windows = calibration_windows(real_model.tokenizer, load_rows(str(VALID_TXT)), 4, 32, seed=0)
    result = score(model, windows.split(2), seed=5, progress=False)
    groups = result.groups.to_pydict()
    assert len(groups["group_id"]) == 30 * (3 + 1536)
    hidden, heads, kv, head_dim, inter = 576, 9, 3, 64, 1536
    assert sum(groups["params"]) == 30 * (kv * (2 * heads // kv + 2) * head_dim * hidden + inter * 3 * hidden)
    taylor, taylor2 = np.array(groups["taylor"]), np.array(groups["taylor2"])
    assert (taylor > 0).all() and (taylor2 >= taylor).all() and (taylor2 > taylor).mean() > 0.99  # Fisher >= 0
    assert groups["random"] == np.random.default_rng(5).random(len(taylor)).tolist()

    inputs: dict[int, list] = {}
    linears = [m for m in model.model.layers[layer].modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(id(m.weight), []).append(a[0]))
               for m in linears]
    with torch.no_grad():
        for batch in windows.split(2):
            model.model(input_ids=batch)
    for handle in handles:
        handle.remove()
    norms = {key: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().square().sum(0).sqrt()
             for key, xs in inputs.items()}
    absolute = {id(m.weight): m.weight.detach().double().abs() for m in linears}
    weighted = {key: w * norms[key][None, :] for key, w in absolute.items()}
    rows = {g: i for i, g in enumerate(groups["group_id"])}
    for kind, count in (("attn", kv), ("mlp", inter)):
        for index in range(count):
            wanda = magnitude = 0.0
            for param, where in group_slices(model, layer, kind, index):
                wanda += weighted[id(param)][where].sum().item()
                magnitude += absolute[id(param)][where].sum().item()
            row = rows[f"layers.{layer}.{kind}.{index}"]
            assert groups["wanda"][row] == pytest.approx(wanda, rel=1e-5), (kind, index)
            assert groups["magnitude"][row] == pytest.approx(magnitude, rel=1e-6), (kind, index)


def test_the_package_level_call_scores():
    """``llamaprune.score(model, batches, ...)`` is the phase function, also once its module is imported."""
    import llamaprune
    import llamaprune.scoring.in_memory  # noqa: F401

    model = tiny_model(tiny_config())
    expected = score(model, [], criteria=("magnitude",), progress=False).groups
    assert llamaprune.score(model, [], criteria=("magnitude",), progress=False).groups.equals(expected)


def test_taylor_tables_do_not_depend_on_the_batch_size():
    """The same tokens give the same table: batch sizes 1, 3 and 8 over 11 windows (groups of 8 and 3) agree to
    1e-6 relative, float32 rounding being all that differs."""
    model = tiny_model(tiny_config(layers=2, bias=True))
    windows = torch.randint(0, model.config.vocab_size, (11, 12), generator=torch.Generator().manual_seed(5))
    tables = {size: score(model, gradient_groups(windows, 8, size), ("taylor", "taylor2"), progress=False).groups
              for size in (1, 3, 8)}
    for criterion in ("taylor", "taylor2"):
        reference = torch.tensor(tables[8].column(criterion).to_pylist(), dtype=torch.float64)
        for size in (1, 3):
            other = torch.tensor(tables[size].column(criterion).to_pylist(), dtype=torch.float64)
            assert torch.allclose(other, reference, rtol=1e-6, atol=0), (criterion, size)


def test_full_groups_at_the_default_batch_size_give_the_per_batch_table_of_before():
    """With --batch-size equal to the group (8, the default) each group is one batch folded at once, weight 1: the
    table of a batch-by-batch fold, to the bit."""
    model = tiny_model(tiny_config(layers=2, heads=6, kv_heads=2))
    windows = torch.randint(0, model.config.vocab_size, (16, 12), generator=torch.Generator().manual_seed(6))
    grouped = score(model, gradient_groups(windows, 8, 8), ("taylor", "taylor2"), progress=False)
    per_batch = score(model, list(windows.split(8)), ("taylor", "taylor2"), progress=False)
    assert grouped.groups.equals(per_batch.groups)
    last = gradient_groups(windows[:11], 8, 3)[-1]
    assert [len(b) for b in last.batches] == [3] and last.full == 8  # the last group weighs by its windows
