"""The criterion registry: what every command reads from it, and that it loads without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llamaprune.core.arch import INPUT_READERS
from llamaprune.core.criteria import (
    CRITERIA,
    DEFAULT_CRITERIA,
    NAMES,
    PARAM,
    REGISTRY,
    TABLE,
    canonical,
    parse_criteria,
)
from llamaprune.scoring.calibration import INPUT_STATISTICS, OUTPUT_GRADIENT_STATISTICS
from llamaprune.seed.prune import ImportanceMethod, PruneOptions


def test_columns_keep_their_names_and_order():
    assert CRITERIA == ("taylor", "taylor2", "wanda", "magnitude", "random", "fluctuation", "obs")
    assert DEFAULT_CRITERIA == CRITERIA[:-1]  # obs holds every layer's Gram matrices: only when asked for


@pytest.mark.parametrize("name", CRITERIA)
def test_every_entry_names_a_formula_and_statistics_that_exist(name):
    entry = REGISTRY[name]
    assert callable(entry.load()) and entry.scope in (PARAM, TABLE) and entry.help
    assert set(entry.input_stats) <= set(INPUT_STATISTICS) | set(OUTPUT_GRADIENT_STATISTICS)
    assert set(entry.inputs) <= set(INPUT_READERS)


def test_aliases_reach_every_command():
    assert NAMES == ("taylor", "taylor_2nd", "taylor2", "wanda", "magnitude", "random", "fluctuation", "obs")
    assert [m.value for m in ImportanceMethod] == list(NAMES)
    seed_name = PruneOptions(importance_method="taylor_2nd")
    assert canonical("taylor_2nd") == "taylor2" == seed_name.score_options().criteria[0]
    with pytest.raises(ValueError, match="choose from taylor, taylor_2nd"):
        canonical("snip")
    with pytest.raises(ValueError, match="unknown criterion taylor_2nd"):
        parse_criteria("taylor_2nd")  # the score command takes the criteria's own names


def test_the_registry_and_the_table_schemas_load_without_torch():
    code = (
        "import sys\n"
        "import llamaprune.core.criteria, llamaprune.core.arch, llamaprune.core.tables, llamaprune.core.groups\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
