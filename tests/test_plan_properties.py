"""Plan properties on random tiny tables: the global planner equals a one-unit-at-a-time greedy written from its
documented semantics, every strategy stays within its target and constraints, and refusals tell the truth.

The reference greedy, as the planner's docstrings and hand-built tests describe it:
- each (layer, kind) loses its groups least important first: by importance per parameter, ties by group_id;
- in steps: one attention group at a time; MLP channels round_to at a time, the first step width % round_to when
  that is not 0, so that the kept width stays a multiple; never below the minimum (rounded up to a multiple);
- --uniform takes a step in every layer at once; --remove-empty-layers adds a unit that removes what a layer's
  minimums keep (the layer goes), placed by the score of what it removes but not before the layer's other units,
  and taken only after all of them;
- units go by score (the mean importance per parameter of their groups), ties by their least important group, a
  whole-layer unit after the regular units of the same score; a unit that would overshoot the budget is skipped
  and cheaper later ones are still taken; emptying a sub-block also removes its fixed params.
Scores are small binary fractions and not normalized, so every sum is exact and ties are true ties.
"""

import itertools
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import check_accounting, removed_ids, write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaprune.plan import PlanOptions, load_run, make_plan

KINDS = ("attn", "mlp")


class Case(NamedTuple):
    scores: list  # per layer: (attention scores, MLP scores)
    costs: tuple  # params of an attention group, an MLP channel, attention's and the MLP's fixed params
    options: PlanOptions
    embed: int
    influence: list

    @property
    def total(self) -> int:
        attn, mlp = len(self.scores[0][0]), len(self.scores[0][1])
        return (
            len(self.scores) * (attn * self.costs[0] + mlp * self.costs[1] + self.costs[2] + self.costs[3]) + self.embed
        )


def budget(ratio, total):
    """The most params a plan may remove, by brute force: removed / total must not exceed the ratio."""
    return max(b for b in range(total + 1) if b / total <= ratio)


def eligible_layers(case):
    """Layers that may lose groups: not protected, not among the freeze_top_n of highest influence."""
    n_layers = len(case.scores)
    protected = {i % n_layers for i in case.options.protect_layers}
    frozen = set(sorted(range(n_layers), key=lambda i: (-case.influence[i], i))[: case.options.freeze_top_n])
    return [i not in protected | frozen for i in range(n_layers)]


def removal_counts(case, layer, k):
    """The removal counts a (layer, kind) may stop at, 0 first."""
    stride = (1, case.options.round_to)[k]
    minimum = (case.options.min_kv_heads, case.options.min_mlp_channels)[k]
    width = len(case.scores[layer][k])
    most = max(width - -(-minimum // stride) * stride, 0) if eligible_layers(case)[layer] else 0
    counts, n = [0], width % stride or stride
    while n <= most:
        counts.append(n)
        n += stride
    return counts


def reference_units(case):
    """Every removal unit in the greedy's order: its cost, group_ids and the units it needs taken first."""
    scores, costs, options = case.scores, case.costs, case.options
    n_layers = len(scores)
    groups = {}  # (layer, kind) -> [(score, group_id, importance)], least important first
    for layer in range(n_layers):
        for k in range(2):
            named = [(v / costs[k], f"layers.{layer}.{KINDS[k]}.{i}", v) for i, v in enumerate(scores[layer][k])]
            groups[layer, k] = sorted(named)
    units = []
    for k in range(2):
        for layer in [None] if options.uniform else range(n_layers):
            layers = range(n_layers) if layer is None else [layer]
            steps = removal_counts(case, layers[0], k)
            for j, (a, b) in enumerate(itertools.pairwise(steps)):
                members = [g for i in layers for g in groups[i, k][a:b]]
                params = (b - a) * costs[k] * len(layers)
                emptied = b == len(scores[0][k])
                units.append(
                    dict(
                        key=(sum(g[2] for g in members) / params, 0, min(groups[i, k][a][:2] for i in layers)),
                        cost=params + (costs[2 + k] * len(layers) if emptied else 0),
                        gids={g[1] for g in members},
                        id=(layer, k, j),
                        needs=[(layer, k, j - 1)] if j else [],
                    )
                )
    if options.remove_empty_layers:
        for layer in range(n_layers):
            kept = [len(scores[layer][k]) - removal_counts(case, layer, k)[-1] for k in range(2)]
            if not eligible_layers(case)[layer] or not any(kept):
                continue
            members = [g for k in range(2) for g in groups[layer, k][len(groups[layer, k]) - kept[k] :]]
            params = sum(kept[k] * costs[k] for k in range(2))
            regular = [u for u in units if u["id"][0] == layer]
            score = max([sum(g[2] for g in members) / params] + [u["key"][0] for u in regular])
            units.append(
                dict(
                    key=(score, 1, (layer,)),
                    cost=params + sum(costs[2 + k] for k in range(2) if kept[k]),
                    gids={g[1] for g in members},
                    id=("layer", layer),
                    needs=[u["id"] for u in regular],
                )
            )
    return sorted(units, key=lambda u: u["key"])


def reference_global(units, left):
    """The greedy: each unit in turn is taken when it fits what is left and the units it needs were taken."""
    taken, removed = set(), set()
    for unit in units:
        if unit["cost"] <= left and all(need in taken for need in unit["needs"]):
            taken.add(unit["id"])
            removed |= unit["gids"]
            left -= unit["cost"]
    return removed


def most_removable(case):
    """The most params any plan within the constraints removes (one layer stays), by enumerating each layer's
    removal counts: no target within it may be refused, and no refused target may be within it."""
    costs = case.costs
    best, best_kept = [], []  # per layer: the most it can lose, and the most it can lose while it stays
    for layer, pair in enumerate(case.scores):
        width = [len(values) for values in pair]
        states = []  # (params removed, whether the layer goes)
        for a in removal_counts(case, layer, 0):
            for m in removal_counts(case, layer, 1):
                removed = a * costs[0] + m * costs[1] + costs[2] * (a == width[0]) + costs[3] * (m == width[1])
                states.append((removed, a == width[0] and m == width[1]))
        if case.options.remove_empty_layers and eligible_layers(case)[layer]:
            states.append((width[0] * costs[0] + width[1] * costs[1] + costs[2] + costs[3], True))
        best.append(max(r for r, _ in states))
        best_kept.append(max(r for r, gone in states if not gone))
    if case.options.uniform:  # every layer has layer 0's shape
        return best_kept[0] * len(case.scores)
    return max(sum(best) - best[i] + best_kept[i] for i in range(len(case.scores)))


def next_unit_costs(case, plan):
    """What each unit the plan could still take would cost: the next step of each (layer, kind) (of every layer
    at once with --uniform) and, with --remove-empty-layers, a layer whose regular steps are all taken."""
    costs, options = case.costs, case.options
    out = []
    for lp in plan.layers:
        if lp.removed:
            continue
        width = (lp.num_key_value_heads, lp.intermediate_size)
        removed = (width[0] - len(lp.attn_groups), width[1] - len(lp.mlp_channels))
        steps = [removal_counts(case, lp.layer, k) for k in range(2)]
        for k in range(2):
            later = [n for n in steps[k] if n > removed[k]]
            if later:
                params = (later[0] - removed[k]) * costs[k] + (costs[2 + k] if later[0] == width[k] else 0)
                out.append(params * (len(plan.layers) if options.uniform else 1))
        kept = [width[k] - steps[k][-1] for k in range(2)]
        regular_done = removed == (steps[0][-1], steps[1][-1])
        if options.remove_empty_layers and eligible_layers(case)[lp.layer] and any(kept) and regular_done:
            out.append(sum(kept[k] * costs[k] + (costs[2 + k] if kept[k] else 0) for k in range(2)))
    return out


@st.composite
def cases(draw):
    n_layers = draw(st.integers(1, 3))
    kv, inter = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    values = st.sampled_from([0.0, 1.0, 2.0, 3.5, 7.0, 10.0])  # few values, so ties happen
    scores = [([draw(values) for _ in range(kv)], [draw(values) for _ in range(inter)]) for _ in range(n_layers)]
    costs = (
        draw(st.integers(5, 60)),
        draw(st.integers(1, 9)),
        draw(st.integers(0, 8)),
        draw(st.integers(0, 8)),
    )
    mode = draw(st.sampled_from(["depth", "plain", "depth", "uniform"]))  # depth has the most to get wrong
    per_layer = mode != "uniform"  # --uniform gives every layer the same shape: nothing protected or frozen
    options = PlanOptions(
        ratio=draw(st.floats(0.01, 0.95)),
        min_kv_heads=draw(st.integers(0, 2)),
        min_mlp_channels=draw(st.integers(0, 2)),
        protect_layers=tuple(draw(st.sets(st.integers(-n_layers, n_layers - 1), max_size=int(per_layer)))),
        freeze_top_n=draw(st.integers(0, n_layers - 1)) if per_layer else 0,
        round_to=draw(st.sampled_from([1, 1, 2, 3, 4])),
        uniform=mode == "uniform",
        remove_empty_layers=mode == "depth",
    )
    influence = [draw(st.floats(0.01, 1.0)) for _ in range(n_layers)]
    return Case(scores, costs, options, draw(st.integers(0, 40)), influence)


def write_case(run_dir, case):
    kv, inter = len(case.scores[0][0]), len(case.scores[0][1])
    attn, mlp, attn_fixed, mlp_fixed = case.costs
    return write_run(
        run_dir,
        {"taylor": case.scores},
        kv=kv,
        inter=inter,
        attn=attn,
        mlp=mlp,
        attn_fixed=attn_fixed,
        mlp_fixed=mlp_fixed,
        embed=case.embed,
        influence=case.influence,
    )


def check_against_the_reference(tables, case, units, removable, target):
    """One global plan removing at most ``target`` params against the reference greedy."""
    options = replace(case.options, ratio=target / case.total)
    try:
        plan = make_plan(tables, options)
    except ValueError as err:
        assert "unreachable" in str(err) or "every layer" in str(err)
        assert target > removable, f"refused {target} params, but a plan within the constraints removes {removable}"
        return
    assert removed_ids(plan) == reference_global(units, target)
    attn, mlp, attn_fixed, mlp_fixed = case.costs
    check_accounting(plan, attn=attn, mlp=mlp, attn_fixed=attn_fixed, mlp_fixed=mlp_fixed)
    shortfall = target - (plan.params_before - plan.params_after)
    assert all(shortfall < cost for cost in next_unit_costs(case, plan))  # within one unit of the target
    inter = len(case.scores[0][1])
    assert all(len(lp.mlp_channels) in (inter, 0) or len(lp.mlp_channels) % options.round_to == 0 for lp in plan.layers)
    if options.uniform:
        assert len({(len(lp.attn_groups), len(lp.mlp_channels)) for lp in plan.layers}) == 1


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.lists(st.floats(0.0, 1.2), min_size=1, max_size=6))
def test_global_equals_the_plain_greedy_and_stays_within_one_unit_of_the_target(case, fractions):
    """Budgets at every boundary between the reference's units and just around it (where their order, the skips
    and the fixed params decide), and a few anywhere up to past what the constraints allow."""
    units = reference_units(case)
    removable = most_removable(case)
    ends = list(itertools.accumulate(unit["cost"] for unit in units))
    targets = {end + d for end in ends for d in (-1, 0, 2)} | {round(f * removable) for f in fractions}
    targets |= {removable, removable + 1}
    with tempfile.TemporaryDirectory() as tmp:
        tables = load_run(write_case(Path(tmp), case))
        for target in sorted(t for t in targets if 0 < t < case.total):
            check_against_the_reference(tables, case, units, removable, target)


def check_refusal(tables, case, err):
    """A refusal tells the truth. A refused global target is beyond every plan within the constraints. The ratio an
    "unreachable" error names (rounded down to 4 decimals) makes a plan, as does any ratio below it (but see below),
    and is the most a global plan can remove. Every ratio clearly above it is refused too, or (global) planned short
    of it: the greedy refuses only targets past all its units but the cheapest emptying one, and with
    --remove-empty-layers a layer that stays may keep more than that unit."""
    message, options = str(err), case.options
    assert "unreachable" in message or "every layer" in message, message
    layerwise = options.strategy.value == "layerwise"
    if not layerwise:
        removable = most_removable(case)
        assert budget(options.ratio, case.total) > removable, f"{message}; a plan removes {removable} params"
    if "unreachable" not in message:
        return
    best = float(message.split("choose --ratio ")[1].split(" ")[0])
    assert best < options.ratio
    if not layerwise:
        assert best == math.floor(removable / case.total * 1e4) / 1e4, f"{message}; a plan removes {removable}"
    # With --remove-empty-layers a layerwise budget that fits can lie above one that does not (a layer that goes
    # frees all it holds, beyond its minimums): the error names the largest budget below the target that fits.
    for ratio in (best,) if layerwise and options.remove_empty_layers else (best, best / 2):
        if ratio > 0:
            assert make_plan(tables, replace(options, ratio=ratio)).achieved_ratio <= ratio, message
    # A layerwise budget splits into whole params, attention's share rounded down: that may let up to
    # total share / attention's share params more through than the continuous bound in the message says.
    kv, inter, n_layers = len(case.scores[0][0]), len(case.scores[0][1]), len(case.scores)
    share = options.distribution or (n_layers * kv * case.costs[0], n_layers * inter * case.costs[1])
    slack = sum(share) / share[0] if layerwise and share[0] else 0
    beyond = best + 1e-4 + (slack + 1) / case.total
    for ratio in (beyond, (beyond + options.ratio) / 2):
        if ratio < options.ratio:
            if layerwise:
                with pytest.raises(ValueError, match="unreachable"):
                    make_plan(tables, replace(options, ratio=ratio))
                continue
            try:
                plan = make_plan(tables, replace(options, ratio=ratio))
            except ValueError as refused:
                assert "unreachable" in str(refused)
            else:
                assert plan.params_before - plan.params_after <= removable, message


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cases(),
    st.sampled_from(["uniform", "inverse"]),
    st.sampled_from([None, (1, 4), (0, 1), (1, 0)]),
    st.sampled_from(["depth", "uniform", None]),
    st.integers(1, 3),
)
def test_layerwise_and_constrained_plans_never_exceed_the_target(case, layer_strategy, distribution, mode, round_to):
    drawn = case.options
    uniform = mode == "uniform" and not drawn.protect_layers and not drawn.freeze_top_n
    options = replace(
        drawn,
        strategy="layerwise",
        layer_strategy=layer_strategy,
        distribution=distribution,
        remove_empty_layers=mode == "depth",
        uniform=uniform,
        round_to=round_to,
    )
    kv, inter = len(case.scores[0][0]), len(case.scores[0][1])
    with tempfile.TemporaryDirectory() as tmp:
        tables = load_run(write_case(Path(tmp), case))
        for opts in (
            options,
            replace(options, strategy="global", normalize="mean" if layer_strategy == "uniform" else "none"),
        ):
            try:
                plan = make_plan(tables, opts)
            except ValueError as err:
                check_refusal(tables, case._replace(options=opts), err)
                continue
            attn, mlp, attn_fixed, mlp_fixed = case.costs
            check_accounting(plan, attn=attn, mlp=mlp, attn_fixed=attn_fixed, mlp_fixed=mlp_fixed)
            eligible = eligible_layers(case._replace(options=opts))
            for lp in plan.layers:
                if not eligible[lp.layer]:  # protected or frozen
                    assert (len(lp.attn_groups), len(lp.mlp_channels)) == (kv, inter)
                elif not lp.removed:
                    assert len(lp.attn_groups) >= min(kv, opts.min_kv_heads)
                    assert len(lp.mlp_channels) >= min(inter, opts.min_mlp_channels)
                    assert len(lp.mlp_channels) in (inter,) or len(lp.mlp_channels) % round_to == 0
            if uniform:
                assert len({(len(lp.attn_groups), len(lp.mlp_channels)) for lp in plan.layers}) == 1
