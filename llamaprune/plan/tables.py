"""The checked tables of one run directory (``groups.parquet`` and ``layers.parquet``, docs/ARTIFACTS.md) as
numpy arrays; every (layers, 2) array holds attention groups in column 0 and MLP channels in column 1.

    >>> tables = load_run("artifacts/run1")           # doctest: +SKIP
    >>> tables.num_layers, tables.criteria            # doctest: +SKIP
    (30, ('taylor', 'wanda'))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamaprune.core.errors import UsageError
from llamaprune.core.tables import GROUPS_FILE, LAYERS_FILE, check_fingerprint, file_sha256, read_table_meta
from llamaprune.core.user_files import parquet_errors
from llamaprune.plan.options import BLOCK_INFLUENCE

KINDS = ("attn", "mlp")  # column 0 and 1 of every (layers, 2) array, in the order of SKIPPABLE


@dataclass
class RunTables:
    """The checked tables of one run directory; group orderings are computed once per criterion and reused."""

    groups_path: Path
    meta: dict
    sha256: str
    criteria: tuple[str, ...]
    width: np.ndarray  # (layers, 2): attention groups (KV heads) and MLP channels
    group_params: np.ndarray  # (layers, 2): cost of one attention group / one MLP channel
    fixed_params: np.ndarray  # (layers, 2): params that vanish with the sub-block (norm, output bias)
    heads: np.ndarray  # (layers,): query heads
    layer_scores: dict[str, np.ndarray]  # block_influence and each criterion's per-layer sum
    orders: dict = field(default_factory=dict, repr=False)  # (criterion, normalize) -> Order
    units: tuple | None = field(default=None, repr=False)  # (options but ratio, Units): the last greedy's units

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def total(self) -> int:
        return int(self.meta["params"]["total"])

    @property
    def prunable(self) -> int:
        return int(self.meta["params"]["prunable"])


def load_run(run_dir: Path | str) -> RunTables:
    """Read ``layers.parquet`` and check it against the metadata; ``groups.parquet`` is read (and checked
    against it) once per criterion, when a plan first needs it."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    groups_path, layers_path = run_dir / GROUPS_FILE, run_dir / LAYERS_FILE
    meta = read_table_meta(groups_path)
    check_fingerprint(read_table_meta(layers_path).get("fingerprint"), meta.get("fingerprint"), str(layers_path))
    with parquet_errors(layers_path, f"re-run `llamaprune score MODEL --out {run_dir} --overwrite`"):
        table = pq.ParquetFile(layers_path).read()  # read_table and to_numpy would import pandas (+0.3 s)
    cols = {name: np.array(table.column(name).to_pylist(), dtype=float) for name in table.column_names}
    if not np.array_equal(cols["layer"], np.arange(table.num_rows)):  # (a null becomes NaN)
        raise UsageError(f"{layers_path} must list layers 0..n-1 in order; re-run `llamaprune score`")
    criteria = tuple(c for c in meta.get("criteria", ()) if c in cols)
    tables = RunTables(
        groups_path=groups_path,
        meta=meta,
        sha256=file_sha256(groups_path),
        criteria=criteria,
        width=_pair(cols, "attn_groups", "mlp_channels"),
        group_params=_pair(cols, "attn_group_params", "mlp_group_params"),
        fixed_params=_pair(cols, "attn_fixed_params", "mlp_fixed_params"),
        heads=cols["num_attention_heads"].astype(np.int64),
        layer_scores={name: cols[name].astype(np.float64) for name in (BLOCK_INFLUENCE, *criteria)},
    )
    prunable = int((tables.width * tables.group_params).sum())
    if prunable != tables.prunable:
        raise UsageError(
            f"{layers_path}: its layers hold {prunable} prunable params, the metadata {tables.prunable}; "
            f"re-run `llamaprune score`"
        )
    return tables


def _pair(cols: dict, attn: str, mlp: str) -> np.ndarray:
    return np.stack([cols[attn], cols[mlp]], axis=1).astype(np.int64)
