"""Phase 2 plan logic on hand-built tables with known answers (properties on random ones: test_plan_properties)."""

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import ATTN_FIXED, TAYLOR, check_accounting, removed_ids, write_run

from llamaprune.core.plan_file import read_plan
from llamaprune.core.tables import file_sha256, write_table
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


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", {"taylor": TAYLOR}, influence=[0.1, 0.4])


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


def test_normalize_standard_ranks_by_z_score_within_layer_and_kind(tmp_path):
    # l0.mlp.0 is a quarter of its partition's mean but only 0.85 deviations below it; l1.mlp.0 is 0.9 of its
    # mean but 1.41 deviations below: relative to the mean l0.mlp.0 goes first, by z-score l1.mlp.0 does
    scores = [([500.0, 600.0], [1.0, 2.0, 3.0, 10.0]), ([500.0, 600.0], [9.0, 10.0, 11.0, 10.0])]
    run = write_run(tmp_path, {"taylor": scores})
    assert removed_ids(make_plan(run, PlanOptions(ratio=0.01, normalize="mean"))) == {"layers.0.mlp.0"}
    assert removed_ids(make_plan(run, PlanOptions(ratio=0.01, normalize="standard"))) == {"layers.1.mlp.0"}
    plan = make_plan(run, PlanOptions(ratio=0.25, normalize="standard"))
    assert plan.name == "global-taylor-0.25-normstandard" and plan.achieved_ratio <= 0.25


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


def test_plan_errors_inside_prune_name_the_seed_flags(run):
    """``prune`` plans under the seed's flags, some options of ``plan`` fixed: errors name only what it has."""
    from llamaprune.core.errors import flags_named
    from llamaprune.seed.prune import SEED_FLAGS

    with flags_named(SEED_FLAGS), pytest.raises(ValueError, match="unreachable") as err:
        make_plan(run, PlanOptions(ratio=0.5, freeze_top_n=1))
    assert "choose --pruning_ratio " in str(err.value) and str(err.value).endswith(", or relax --freeze_top_n_layers, "
                                                                                   "--pruning_distribution")
    with flags_named(SEED_FLAGS), pytest.raises(ValueError, match="--freeze_top_n_layers 2 freezes every one"):
        make_plan(run, PlanOptions(ratio=0.1, freeze_top_n=2))
    with flags_named(SEED_FLAGS), pytest.raises(ValueError, match="--pruning_ratio 2 is outside"):
        PlanOptions(ratio=2)
    with pytest.raises(ValueError, match="relax --protect-layers, --freeze-top-n, --min-kv-heads"):  # plan's own
        make_plan(run, PlanOptions(ratio=0.5, freeze_top_n=1))


def test_global_depth_unreachable_names_what_a_plan_can_remove(tmp_path):
    # one layer (which must stay): attention 5 params, two channels of 9 and MLP fixed 8; min_mlp_channels keeps a
    # channel unless the layer goes, so a plan removes at most attention and one channel: 14 of 31 params
    run = write_run(
        tmp_path, {"taylor": [([1.0], [1.0, 2.0])]}, kv=1, inter=2, attn=5, mlp=9, attn_fixed=0, mlp_fixed=8, embed=0
    )
    options = PlanOptions(ratio=0.9, min_kv_heads=0, min_mlp_channels=1, remove_empty_layers=True)
    assert make_plan(run, replace(options, ratio=0.8)).params_after == 31 - 14
    with pytest.raises(ValueError, match="unreachable") as err:
        make_plan(run, options)
    assert "at most 0.4516 " in str(err.value)  # not 0.8387: all but the attention group


def test_layerwise_depth_unreachable_names_a_ratio_that_makes_a_plan(run):
    options = PlanOptions(
        ratio=0.5,
        strategy="layerwise",
        layer_strategy="uniform",
        min_kv_heads=0,
        min_mlp_channels=1,
        remove_empty_layers=True,
    )
    with pytest.raises(ValueError, match="unreachable") as err:
        make_plan(run, options)
    best = float(str(err.value).split("choose --ratio ")[1].split(" ")[0])
    make_plan(run, replace(options, ratio=best))  # not 0.4872, which is refused in turn


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
