"""Phase 2 plan logic on hand-built tables with known answers; properties checked against a plain greedy."""

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import ATTN, ATTN_FIXED, MLP, MLP_FIXED, TAYLOR, write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaprune.plan import (
    PlanOptions,
    default_plan_name,
    load_run,
    make_plan,
    make_plans,
    parse_distribution,
    parse_layers,
    parse_ratios,
    write_plans,
)
from llamaprune.pruning_plan import read_plan
from llamaprune.table import file_sha256, write_table


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", {"taylor": TAYLOR}, influence=[0.1, 0.4])


def removed_ids(plan):
    """group_ids a plan removes, from its kept lists (independent of how the plan was made)."""
    out = set()
    for lp in plan.layers:
        out |= {f"layers.{lp.layer}.attn.{i}" for i in set(range(lp.num_key_value_heads)) - set(lp.attn_groups)}
        out |= {f"layers.{lp.layer}.mlp.{i}" for i in set(range(lp.intermediate_size)) - set(lp.mlp_channels)}
    return out


def params_removed(plan, attn=ATTN, mlp=MLP, attn_fixed=ATTN_FIXED, mlp_fixed=MLP_FIXED):
    """The accounting rule, recomputed: removed groups, plus the fixed params of every emptied sub-block."""
    total = 0
    for lp in plan.layers:
        total += (lp.num_key_value_heads - len(lp.attn_groups)) * attn
        total += (lp.intermediate_size - len(lp.mlp_channels)) * mlp
        total += attn_fixed * (lp.removed or "attention" in lp.skip)
        total += mlp_fixed * (lp.removed or "mlp" in lp.skip)
    return total


def check_accounting(plan, **costs):
    removed = params_removed(plan, **costs)
    assert plan.params_before - plan.params_after == removed
    assert plan.achieved_ratio == pytest.approx(removed / plan.params_before, rel=1e-12)
    assert removed / plan.params_before <= plan.target_ratio
    plan.validate()


# ---------------------------------------------------------------- global


def test_global_takes_the_least_important_per_parameter_and_hits_the_budget(run):
    plan = make_plan(run, PlanOptions(ratio=0.03))
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.2"}
    assert plan.achieved_ratio == 0.03 and plan.params_after == 970
    plan = make_plan(run, PlanOptions(ratio=0.135))
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.2", "layers.0.attn.1"}
    check_accounting(plan)


def test_global_skips_a_group_that_overshoots_and_still_takes_smaller_ones(run):
    plan = make_plan(run, PlanOptions(ratio=0.125))  # l0.attn.1 (100) would make 130 > 125
    assert removed_ids(plan) == {f"layers.{layer}.mlp.{i}" for layer in (0, 1) for i in range(3)}
    assert plan.params_after == 1000 - 60
    check_accounting(plan)


def test_ties_are_broken_by_group_id(tmp_path):
    run = write_run(tmp_path, {"taylor": [([1.0], [7.0] * 12)]}, kv=1, inter=12, embed=0)  # total 225
    plan = make_plan(run, PlanOptions(ratio=30.5 / 225))  # three channels of 10 params
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.10"}  # string order


def test_emptied_sub_blocks_are_skipped_and_their_fixed_params_counted(run):
    plan = make_plan(run, PlanOptions(ratio=0.45, min_kv_heads=0, min_mlp_channels=0))
    check_accounting(plan)
    assert plan.layers[0].removed and plan.removed_layers == [0]
    assert plan.layers[0].attn_groups == () and plan.layers[0].mlp_channels == ()
    # 450 params: layer 0 entire (240 groups + 5 fixed), l1.mlp.0-3 (40 + mlp fixed 2), l1.attn.0 (100);
    # l1.attn.1 (100 + attn fixed 3) does not fit
    assert plan.params_before - plan.params_after == 245 + 42 + 100
    assert plan.layers[1].skip == ("mlp",) and plan.layers[1].attn_groups == (1,)
    with pytest.raises(ValueError, match="at most 0.4780 .* choose --ratio 0.478 or less"):  # one layer stays
        make_plan(run, PlanOptions(ratio=0.5, min_kv_heads=0, min_mlp_channels=0))


def test_fixed_params_can_make_the_emptying_group_not_fit(tmp_path):
    run = write_run(tmp_path, {"taylor": [([1.0], [1.0, 2.0])]}, kv=1, inter=2, embed=0, mlp_fixed=50)
    total = 100 + 20 + ATTN_FIXED + 50
    plan = make_plan(run, PlanOptions(ratio=25 / total, min_mlp_channels=0))  # 2nd channel would cost 10 + 50
    assert removed_ids(plan) == {"layers.0.mlp.0"}
    plan = make_plan(run, PlanOptions(ratio=70.5 / total, min_mlp_channels=0))
    assert plan.layers[0].skip == ("mlp",) and plan.params_before - plan.params_after == 70


def test_protect_layers_and_minimums_are_honoured(run):
    plan = make_plan(run, PlanOptions(ratio=0.1, protect_layers=(-2,)))  # -2 is layer 0
    assert removed_ids(plan) == {"layers.1.mlp.0", "layers.1.mlp.1", "layers.1.mlp.2"}
    plan = make_plan(run, PlanOptions(ratio=0.04, min_kv_heads=2, min_mlp_channels=2))
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.1.mlp.0", "layers.1.mlp.1"}
    with pytest.raises(ValueError, match="out of range for a model with 2 layers"):
        make_plan(run, PlanOptions(ratio=0.1, protect_layers=(2,)))


def test_round_to_keeps_mlp_widths_multiples(run):
    plan = make_plan(run, PlanOptions(ratio=0.06, round_to=2))
    assert [len(lp.mlp_channels) for lp in plan.layers] == [2, 2]
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.1.mlp.0", "layers.1.mlp.1"}
    plan = make_plan(run, PlanOptions(ratio=0.03, round_to=2))  # only one pair of channels fits
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1"}


def test_uniform_gives_every_layer_the_same_shape(run):
    plan = make_plan(run, PlanOptions(ratio=0.135, uniform=True))
    assert {(len(lp.attn_groups), len(lp.mlp_channels)) for lp in plan.layers} == {(2, 1)}
    assert removed_ids(plan) == {f"layers.{layer}.mlp.{i}" for layer in (0, 1) for i in range(3)}
    check_accounting(plan)
    with pytest.raises(ValueError, match="--uniform"):
        PlanOptions(ratio=0.1, uniform=True, protect_layers=(0,))


def test_remove_empty_layers_removes_a_layer_the_minimums_would_keep(tmp_path):
    scores = [([1.0, 2.0], [0.1, 0.2, 0.3, 0.4]), ([900.0, 800.0], [50.0, 60.0, 70.0, 80.0])]
    run = write_run(tmp_path, {"taylor": scores})
    # layer 0: attn.0 (100) and mlp.0-2 (30) go first; what the minimums keep costs 100 + 10 + 3 + 2 = 115
    plan = make_plan(run, PlanOptions(ratio=0.245, remove_empty_layers=True))
    assert plan.removed_layers == [0] and plan.params_after == 755
    check_accounting(plan)
    plain = make_plan(run, PlanOptions(ratio=0.245))
    assert plain.removed_layers == [] and len(plain.layers[0].attn_groups) == 1
    assert make_plan(run, PlanOptions(ratio=0.2, remove_empty_layers=True)).removed_layers == []


def test_normalize_mean_compares_attention_and_mlp_on_their_own_scale(tmp_path):
    # per parameter attention looks far more important; normalized within (layer, kind) l0.attn.0 is least
    scores = [([100.0, 900.0], [1.0, 1.0, 1.0, 1.0]), ([500.0, 500.0], [1.0, 1.0, 1.0, 1.0])]
    run = write_run(tmp_path, {"taylor": scores})
    plain = {f"layers.{layer}.mlp.{i}" for layer in (0, 1) for i in range(3)}  # 0.1 per param < l0.attn.0's 1
    assert removed_ids(make_plan(run, PlanOptions(ratio=0.1))) == plain
    plan = make_plan(run, PlanOptions(ratio=0.1, normalize="mean"))
    assert removed_ids(plan) == {"layers.0.attn.0"}


def test_normalize_mean_ranks_by_relative_importance_whatever_a_group_costs(tmp_path):
    # relative to their (layer, kind) means: l0.mlp.0 0.1, l0.attn.0 0.5, everything else 1 or more
    scores = [([50.0, 150.0], [0.1, 1.3, 1.3, 1.3]), ([100.0, 100.0], [1.0, 1.0, 1.0, 1.0])]
    run = write_run(tmp_path, {"taylor": scores})
    # a budget of one attention group: the channel goes first, then l0.attn.0 would overshoot (0.5 / 100 params
    # per parameter would have taken l0.attn.0 alone)
    removed = removed_ids(make_plan(run, PlanOptions(ratio=0.1, normalize="mean")))
    assert "layers.0.mlp.0" in removed and "layers.0.attn.0" not in removed


# ---------------------------------------------------------------- layerwise


def test_layerwise_uniform_mlp_only_takes_the_same_count_per_layer(run):
    options = PlanOptions(ratio=0.04, strategy="layerwise", layer_strategy="uniform", distribution=(0, 10))
    plan = make_plan(run, options)
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.1.mlp.0", "layers.1.mlp.1"}
    check_accounting(plan)


def test_layerwise_inverse_prunes_the_less_important_layer_more(run):
    # block influence 0.1 and 0.4: shares 32 and 8 of 40 params; layer 0 is capped at 3 channels, 10 go to layer 1
    plan = make_plan(run, PlanOptions(ratio=0.04, strategy="layerwise", distribution=(0, 10)))
    assert removed_ids(plan) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.2", "layers.1.mlp.0"}
    by_sum = make_plan(
        run, PlanOptions(ratio=0.04, strategy="layerwise", distribution=(0, 10), layer_importance="taylor")
    )
    assert by_sum.name == "layerwise-taylor-0.04-a0m10-bytaylor"


def test_layerwise_attention_only_and_freeze_top_n(run):
    plan = make_plan(run, PlanOptions(ratio=0.2, strategy="layerwise", layer_strategy="uniform", distribution=(10, 0)))
    assert removed_ids(plan) == {"layers.0.attn.1", "layers.1.attn.0"}
    frozen = make_plan(run, PlanOptions(ratio=0.03, strategy="layerwise", freeze_top_n=1, distribution=(0, 1)))
    assert removed_ids(frozen) == {"layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.2"}  # layer 1 is frozen
    with pytest.raises(ValueError, match="unreachable"):
        make_plan(run, PlanOptions(ratio=0.04, strategy="layerwise", freeze_top_n=1, distribution=(0, 1)))


def test_layerwise_remove_empty_layers_drops_a_useless_layer(tmp_path):
    run = write_run(tmp_path, {"taylor": TAYLOR}, influence=[0.001, 1.0])
    # 300 params split by size, attention 250 : MLP 50; layer 0's shares (~250, ~50) cover all it holds
    # (203 and 42), so it goes; layer 1 gets the rest: no attention group (47 < 100), 3 channels (47 + 8 = 55)
    plan = make_plan(run, PlanOptions(ratio=0.3, strategy="layerwise", remove_empty_layers=True))
    assert plan.removed_layers == [0] and plan.params_after == 1000 - 245 - 30
    assert plan.layers[1].attn_groups == (0, 1) and plan.layers[1].mlp_channels == (3,)
    check_accounting(plan)


def test_layerwise_needs_block_influence_or_a_criterion(run, tmp_path):
    no_influence = write_run(tmp_path / "b", {"taylor": TAYLOR})
    with pytest.raises(ValueError, match="no block_influence for layers \\[0, 1\\]; choose another"):
        make_plan(no_influence, PlanOptions(ratio=0.1, strategy="layerwise"))
    with pytest.raises(ValueError, match="choose one of: block_influence, taylor"):
        make_plan(run, PlanOptions(ratio=0.1, strategy="layerwise", layer_importance="wanda"))


# ---------------------------------------------------------------- errors, names, files


def test_unreachable_target_names_the_largest_reachable_ratio(run):
    with pytest.raises(ValueError, match="unreachable") as err:
        make_plan(run, PlanOptions(ratio=0.5, protect_layers=(1,)))
    best = float(str(err.value).split("choose --ratio ")[1].split(" ")[0])
    assert best == 0.13  # layer 0 without its minimums: 100 + 3 * 10
    assert make_plan(run, PlanOptions(ratio=best, protect_layers=(1,))).achieved_ratio == best


def test_bad_options_and_criteria_are_named(run):
    for ratio in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="outside \\(0, 1\\)"):
            PlanOptions(ratio=ratio)
    with pytest.raises(ValueError, match="criterion 'wanda' is not in .*; it has: taylor"):
        make_plan(run, PlanOptions(ratio=0.1, criterion="wanda"))
    with pytest.raises(ValueError, match="strategy 'best' is not one of: global, layerwise"):
        PlanOptions(ratio=0.1, strategy="best")
    with pytest.raises(FileNotFoundError, match="groups.parquet not found"):
        load_run(run / "nowhere")
    with pytest.raises(ValueError, match="plain file name"):
        make_plan(run, PlanOptions(ratio=0.1), name="../elsewhere")


def test_tables_that_disagree_are_refused(run):
    path = run / "groups.parquet"
    table = pq.read_table(path)
    for broken, where in (
        (table.filter(pc.not_equal(table["group_id"], "layers.1.mlp.2")), "layer 1 mlp"),  # a channel missing
        (
            table.set_column(3, "index", pc.cast(pc.min_element_wise(table["index"], 2), pa.int32())),
            "layer 0 mlp",
        ),
        (table.set_column(4, "params", pc.add(table["params"], pa.scalar(1, pa.int64()))), "layer 0 attn"),
    ):
        write_table(broken, path)
        with pytest.raises(ValueError, match=f"does not match layers.parquet in {where}"):
            make_plan(run, PlanOptions(ratio=0.1))
    nan = table.set_column(5, "taylor", pa.array([None] + table["taylor"].to_pylist()[1:], pa.float64()))
    write_table(nan, path)
    with pytest.raises(ValueError, match="1 null or NaN taylor scores"):
        make_plan(run, PlanOptions(ratio=0.1))


def test_parsers():
    assert parse_ratios("0.05:0.5:0.05") == [round(0.05 * i, 10) for i in range(1, 11)]
    assert parse_layers("0, -1") == (0, -1) and parse_layers("") == ()
    assert parse_distribution("2:8") == (2, 8)
    for bad in ("0.1:0.2", "a:b:c", "0.5:0.1:0.1"):
        with pytest.raises(ValueError, match="--ratios"):
            parse_ratios(bad)
    with pytest.raises(ValueError, match="--distribution"):
        parse_distribution("2-8")


def test_default_names_tag_options_that_differ():
    assert default_plan_name(PlanOptions(ratio=0.2)) == "global-taylor-0.20"
    assert (
        default_plan_name(
            PlanOptions(ratio=0.125, criterion="wanda", normalize="mean", round_to=64, remove_empty_layers=True)
        )
        == "global-wanda-0.125-normmean-round64-depth"
    )
    assert default_plan_name(
        PlanOptions(
            ratio=0.3,
            strategy="layerwise",
            distribution=(2, 8),
            layer_strategy="uniform",
            protect_layers=(0, -1),
        )
    ) == ("layerwise-taylor-0.30-a2m8-layeruniform-protect0_-1")


def test_plans_fill_every_field_and_round_trip_through_files(run):
    tables = load_run(run)
    plans = make_plans(tables, PlanOptions(ratio=0.1, min_mlp_channels=0), ratios=[0.03, 0.135, 0.25], name="sweep")
    assert len(tables.orders) == 1  # the group table was queried once for three ratios
    assert [p.name for p in plans] == ["sweep-0.03", "sweep-0.135", "sweep-0.25"]
    paths = write_plans(run, plans)
    for plan, path in zip(plans, paths, strict=True):
        assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        again = read_plan(path)
        assert again == plan
        doc = json.loads(path.read_text())
        assert doc["removed_layers"] == plan.removed_layers and doc["kind"] == "llamaprune-plan"
    plan = plans[0]
    assert plan.source_table_sha256 == file_sha256(run / "groups.parquet")
    assert plan.fingerprint["config_hash"] == "cafe" and plan.created_by.startswith("llamaprune ")
    assert plan.options == {**PlanOptions(ratio=0.03, min_mlp_channels=0).to_dict()}
    assert (plan.params_before, plan.prunable_before, plan.head_dim) == (1000, 480, 4)
    assert plan.prunable_before - plan.prunable_after == 30
    assert plan.achieved_prunable_ratio == pytest.approx(30 / 480)
    lp = plan.layers[0]
    assert (lp.num_attention_heads, lp.num_key_value_heads, lp.intermediate_size) == (4, 2, 4)
    assert lp.heads_kept == 4 and lp.mlp_channels == (3,)


# ---------------------------------------------------------------- properties against a plain greedy


def budget(ratio, total):
    """The most params a plan may remove, by brute force: removed / total must not exceed the ratio."""
    return max(b for b in range(total + 1) if b / total <= ratio)


def reference_global(scores, costs, options, total):
    """The global greedy written the obvious way: one group at a time in (score, group_id) order."""
    n_layers = len(scores)
    protected = {i % n_layers for i in options.protect_layers}
    order = []
    for layer, pair in enumerate(scores):
        for k, (kind, values) in enumerate(zip(("attn", "mlp"), pair, strict=True)):
            for i, value in enumerate(values):
                order.append((value / costs[k], f"layers.{layer}.{kind}.{i}", layer, k))
    order.sort()
    left = budget(options.ratio, total)
    taken, count = set(), {}
    minimum = (options.min_kv_heads, options.min_mlp_channels)
    for _, gid, layer, k in order:
        width = len(scores[layer][k])
        done = count.get((layer, k), 0)
        if layer in protected or done >= width - minimum[k]:
            continue
        cost = costs[k] + (costs[2 + k] if done + 1 == width else 0)
        if cost <= left:
            taken.add(gid)
            count[(layer, k)] = done + 1
            left -= cost
    return taken, left


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
    options = PlanOptions(
        ratio=draw(st.floats(0.01, 0.95)),
        min_kv_heads=draw(st.integers(0, 2)),
        min_mlp_channels=draw(st.integers(0, 2)),
        protect_layers=tuple(draw(st.sets(st.integers(-n_layers, n_layers - 1), max_size=1))),
    )
    return scores, costs, kv, inter, options, draw(st.integers(0, 40))


def write_case(run_dir, scores, costs, kv, inter, embed, influence=None):
    return write_run(
        run_dir,
        {"taylor": scores},
        kv=kv,
        inter=inter,
        attn=costs[0],
        mlp=costs[1],
        attn_fixed=costs[2],
        mlp_fixed=costs[3],
        embed=embed,
        influence=influence,
    )


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_global_equals_the_plain_greedy_and_stays_within_one_group_of_the_target(case):
    scores, costs, kv, inter, options, embed = case
    with tempfile.TemporaryDirectory() as tmp:
        tables = load_run(write_case(Path(tmp), scores, costs, kv, inter, embed))
        expected, left = reference_global(scores, costs, options, tables.total)
        kept_nothing = all(
            sum(g.startswith(f"layers.{layer}.") for g in expected) == kv + inter for layer in range(len(scores))
        )
        try:
            plan = make_plan(tables, options)
        except ValueError as err:
            assert "unreachable" in str(err) or "every layer" in str(err)
            assert left > 0 or kept_nothing  # the plain greedy could not spend the budget either
            return
        assert removed_ids(plan) == expected
        assert plan.achieved_ratio <= options.ratio
        check_accounting(plan, attn=costs[0], mlp=costs[1], attn_fixed=costs[2], mlp_fixed=costs[3])
        shortfall = budget(options.ratio, tables.total) - (plan.params_before - plan.params_after)
        protected = {i % len(scores) for i in options.protect_layers}
        for lp in plan.layers:  # every group still removable costs more than what is left
            for kept, minimum, cost, fixed in (
                (len(lp.attn_groups), options.min_kv_heads, costs[0], costs[2]),
                (len(lp.mlp_channels), options.min_mlp_channels, costs[1], costs[3]),
            ):
                if lp.layer not in protected and kept > minimum and not lp.removed:
                    assert shortfall < cost + (fixed if kept == 1 else 0)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cases(),
    st.sampled_from(["uniform", "inverse"]),
    st.sampled_from([None, (1, 4), (0, 1), (1, 0)]),
    st.sampled_from(["depth", "uniform", None]),
    st.integers(1, 3),
)
def test_layerwise_and_constrained_plans_never_exceed_the_target(case, layer_strategy, distribution, mode, round_to):
    scores, costs, kv, inter, options, embed = case
    uniform = mode == "uniform" and not options.protect_layers
    options = PlanOptions(
        **{
            **options.to_dict(),
            "strategy": "layerwise",
            "layer_strategy": layer_strategy,
            "distribution": distribution,
            "remove_empty_layers": mode == "depth",
            "uniform": uniform,
            "round_to": round_to,
        }
    )
    influence = np.random.default_rng(len(scores) * 7 + kv).random(len(scores)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        run = write_case(Path(tmp), scores, costs, kv, inter, embed, influence=influence)
        for opts in (
            options,
            replace(options, strategy="global", normalize="mean" if layer_strategy == "uniform" else "none"),
        ):
            try:
                plan = make_plan(run, opts)
            except ValueError as err:
                assert "unreachable" in str(err) or "every layer" in str(err)
                continue
            check_accounting(plan, attn=costs[0], mlp=costs[1], attn_fixed=costs[2], mlp_fixed=costs[3])
            protected = {i % len(scores) for i in options.protect_layers}
            for lp in plan.layers:
                if lp.layer in protected:
                    assert (len(lp.attn_groups), len(lp.mlp_channels)) == (kv, inter)
                elif not lp.removed:
                    assert len(lp.attn_groups) >= min(kv, options.min_kv_heads)
                    assert len(lp.mlp_channels) >= min(inter, options.min_mlp_channels)
                    assert len(lp.mlp_channels) in (inter,) or len(lp.mlp_channels) % round_to == 0
            if uniform:
                assert len({(len(lp.attn_groups), len(lp.mlp_channels)) for lp in plan.layers}) == 1
