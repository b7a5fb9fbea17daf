"""The Parquet schemas of a run directory (docs/ARTIFACTS.md): build, write, read and validate.

``groups.parquet`` has one row per prunable group, ``layers.parquet`` one row per decoder layer; both
carry the same key-value metadata under ``llamaprune``: schema_version, fingerprint, params (total,
prunable, fixed), hidden_size, head_dim, criteria, calibration. No torch here: planning reads these
tables on machines without it.

    >>> meta = read_table_meta("artifacts/run1/groups.parquet")        # doctest: +SKIP
    >>> meta["fingerprint"]["architecture"]                             # doctest: +SKIP
    'LlamaForCausalLM'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llamaprune.core.artifacts import SCHEMA_VERSION, atomic_write_bytes
from llamaprune.core.criteria import CRITERIA
from llamaprune.core.errors import MissingInput, UsageError
from llamaprune.core.user_files import parquet_errors, parse_json

GROUPS_FILE = "groups.parquet"
LAYERS_FILE = "layers.parquet"
META_KEY = b"llamaprune"

GROUP_COLUMNS = pa.schema(
    [
        ("group_id", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("index", pa.int32()),
        ("params", pa.int64()),
    ]
)
LAYER_COLUMNS = pa.schema(
    [
        ("layer", pa.int32()),
        ("num_attention_heads", pa.int32()),
        ("attn_groups", pa.int32()),
        ("mlp_channels", pa.int32()),
        ("attn_group_params", pa.int64()),
        ("mlp_group_params", pa.int64()),
        ("attn_fixed_params", pa.int64()),
        ("mlp_fixed_params", pa.int64()),
        ("block_influence", pa.float64()),
    ]
)


def groups_schema(criteria: tuple[str, ...]) -> pa.Schema:
    return _with_criteria(GROUP_COLUMNS, criteria)


def layers_schema(criteria: tuple[str, ...]) -> pa.Schema:
    return _with_criteria(LAYER_COLUMNS, criteria)


def _with_criteria(base: pa.Schema, criteria: tuple[str, ...]) -> pa.Schema:
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise UsageError(f"unknown criterion {', '.join(unknown)}; choose from {', '.join(CRITERIA)}")
    return pa.schema(list(base) + [(c, pa.float64()) for c in criteria])


def with_meta(table: pa.Table, meta: dict) -> pa.Table:
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_table(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


def criteria_of(schema: pa.Schema) -> tuple[str, ...]:
    return tuple(name for name in schema.names if name in CRITERIA)


def read_table_meta(path: Path) -> dict:
    """The ``llamaprune`` metadata of a table, after checking the file and its schema version."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} not found; create it with `llamaprune score MODEL --out {path.parent}`")
    with parquet_errors(path, f"re-run `llamaprune score MODEL --out {path.parent} --overwrite`"):
        schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    try:
        meta = parse_json(raw, path) if raw is not None else None
    except UsageError:
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} has no llamaprune metadata; it was not written by `llamaprune score`")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(
            f"{path} has schema_version {meta.get('schema_version')}, this llamaprune reads {SCHEMA_VERSION}; "
            f"re-run `llamaprune score` to rebuild it"
        )
    base = GROUP_COLUMNS if path.name == GROUPS_FILE else LAYER_COLUMNS
    expected = _with_criteria(base, criteria_of(schema))
    if not schema.remove_metadata().equals(expected):
        raise UsageError(f"{path} does not have the expected columns ({', '.join(expected.names)})")
    return meta


def read_table(path: Path) -> pa.Table:
    read_table_meta(path)
    return pq.read_table(path)


def check_fingerprint(made_for: dict | None, fingerprint: dict, what: str) -> None:
    """Refuse a table or plan ``what``, made for the model ``made_for``, on a model of another fingerprint."""
    if made_for != fingerprint:
        raise UsageError(
            f"{what} was made for model {_describe(made_for)}, but this model is "
            f"{_describe(fingerprint)}; score this model first with `llamaprune score`"
        )


def _describe(fp: dict | None) -> str:
    if not fp:
        return "<no fingerprint>"
    return f"{fp.get('architecture')}/{fp.get('config_hash')} ({fp.get('num_parameters')} params)"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
