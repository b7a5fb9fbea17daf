"""The obs criterion: the greedy OBS path (first step the brute-force best, scores non-decreasing, every group once),
its scores rebuilt from the layer's own inputs and loss gradients, what the run keeps of it, and plans that take
each layer's groups in path order."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_selection import DAMP, layer_inputs

from llamaprune.core.arch import BLOCKS, output_linear
from llamaprune.core.errors import UsageError
from llamaprune.plan import PlanOptions, load_run, make_plan
from llamaprune.scoring.calibration import gradient_groups
from llamaprune.scoring.command import write_tables
from llamaprune.scoring.importance.obs import Problem, accumulate_gram, greedy_path
from llamaprune.scoring.in_memory import score


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("seed", range(3))
def test_the_path_starts_with_the_cheapest_group_and_its_scores_grow(seed, size):
    x, w, b = layer_inputs(seed)
    groups = torch.arange(12).view(-1, size)
    problem = Problem.of(accumulate_gram(x, None), w, b, groups, DAMP)
    order, costs = greedy_path(problem, len(groups))
    assert sorted(order.tolist()) == list(range(len(groups)))
    assert bool((costs.diff() >= 0).all())
    singles = [problem.error(torch.tensor([g])) for g in range(len(groups))]
    assert int(order[0]) == min(range(len(groups)), key=singles.__getitem__)
    assert float(costs[0]) == pytest.approx(min(singles), rel=1e-9)


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = tiny_model(tiny_config(heads=6, kv_heads=3, layers=2, intermediate=20, bias=True))
    batches = list(torch.randint(0, model.config.vocab_size, (12, 16)).split(4))
    return model, batches, score(model, batches, criteria=("taylor2", "obs"), progress=False)


def test_obs_scores_are_the_path_of_each_projections_own_inputs_and_gradients(scored):
    """Independently of the scoring hooks: capture each output projection's inputs and output gradients over the
    same batches (each its own gradient group; the gradient of the summed token loss), and walk the
    Fisher-weighted path from them."""
    model, batches, result = scored
    captured: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for block in BLOCKS:
            proj = layer.get_submodule(output_linear(block).path)
            key = (i, block.kind)

            def hook(module, args, output, key=key):
                captured.setdefault(key, [[], []])[0].append(args[0].detach().reshape(-1, args[0].shape[-1]))
                output.register_hook(lambda g, key=key: captured[key][1].append(g.reshape(-1, g.shape[-1]) * scale))

            handles.append(proj.register_forward_hook(hook))
    for batch in batches:
        scale = batch.shape[0] * (batch.shape[1] - 1)  # predicted tokens: the loss is their mean
        model(input_ids=batch, labels=batch).loss.backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    table = result.groups.to_pandas()
    tokens = sum(b.numel() for b in batches)
    for (i, kind), (inputs, grads) in captured.items():
        x, g = torch.cat(inputs).double(), torch.cat(grads).double()
        proj = model.model.layers[i].get_submodule(output_linear(next(b for b in BLOCKS if b.kind == kind)).path)
        weight = proj.weight.detach().double() * (g.square().sum(0) / tokens).sqrt()[:, None]
        rows = table[(table.layer == i) & (table.kind == kind)].sort_values("index")
        groups = torch.arange(weight.shape[1]).view(len(rows), -1)
        order, costs = greedy_path(Problem.of(accumulate_gram(x, None), weight, None, groups, DAMP), len(groups))
        expected = torch.empty(len(groups), dtype=torch.float64)
        expected[order] = costs
        torch.testing.assert_close(torch.tensor(rows.obs.to_numpy()), expected, rtol=1e-4, atol=0)


def test_a_run_keeps_the_output_gradients_but_not_the_gram_matrices(scored):
    _, _, result = scored
    kept = {key.split(".", 2)[-1] for key in result.stats if key.startswith("layers.") and key.count(".") == 3}
    assert {"o_in.out_grad_sq", "down_in.out_grad_sq"} <= kept
    assert not [key for key in result.stats if "gram" in key]
    assert result.accumulator_bytes > 2 * (21 * 21 + 19 * 19) * 8  # the Gram matrices were held in the pass


def test_an_obs_plan_takes_each_layers_groups_in_path_order(scored, tmp_path):
    """A knapsack on the obs column keeps, in each layer, the groups last on its path: the highest scores."""
    _, _, result = scored
    write_tables(tmp_path, result)
    plan = make_plan(load_run(tmp_path), PlanOptions(ratio=0.3, criterion="obs"))
    table = result.groups.to_pandas()
    assert 0.25 < plan.achieved_ratio < 0.35
    for layer in plan.layers:
        for kind, field in (("attn", "attn_groups"), ("mlp", "mlp_channels")):
            scores = table[(table.layer == layer.layer) & (table.kind == kind)].sort_values("index").obs.to_numpy()
            kept = list(getattr(layer, field))
            removed = sorted(set(range(len(scores))) - set(kept))
            if kept and removed:
                assert scores[removed].max() <= scores[kept].min()


def test_obs_does_not_depend_on_how_a_group_is_batched(scored):
    """The output gradients are those of the summed token loss, so splitting each Fisher group into smaller
    batches (or across FSDP processes: tests/test_distributed.py) gives the same scores."""
    model, batches, result = scored
    windows = torch.cat(batches)
    halves = score(model, gradient_groups(windows, 4, 2), criteria=("obs",), progress=False)
    torch.testing.assert_close(torch.tensor(halves.groups.column("obs").to_numpy()),
                               torch.tensor(result.groups.column("obs").to_numpy()), rtol=1e-4, atol=0)


def test_a_run_without_obs_names_the_score_that_adds_it(scored, tmp_path):
    model, batches, _ = scored
    write_tables(tmp_path, score(model, batches[:1], criteria=("taylor2",), progress=False))
    with pytest.raises(UsageError, match=r"'obs' is not in .*--criteria obs"):
        make_plan(load_run(tmp_path), PlanOptions(ratio=0.3, criterion="obs"))
