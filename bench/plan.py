"""Planning speed and memory on synthetic run directories shaped like LLaMA-3-8B and LLaMA-3-70B (issue 4).

Each figure is measured in a fresh process (the best of ``--repeat`` runs, tables already on disk, times
including ``load_run`` and the Parquet read) and printed beside its goal; figure / goal <= 1 meets it.
Peak memory is the child process's ru_maxrss (tracemalloc cannot see DuckDB's or Arrow's allocations).

    $ .venv/bin/python bench/plan.py                 # both shapes, about a minute on 2 cores
    $ .venv/bin/python bench/plan.py --only 8b --repeat 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llamaprune.core.artifacts import atomic_write_json
from llamaprune.core.groups import LayerShape, ModelShape
from llamaprune.core.tables import groups_schema, layers_schema, with_meta, write_table

SHAPES = {  # layers, query heads, KV heads, intermediate size, hidden size (head_dim 128, vocab 128256)
    "8b": (32, 32, 8, 14336, 4096),
    "70b": (80, 64, 8, 28672, 8192),
}
CRITERIA = ("taylor", "wanda")
SWEEP = [round(0.025 * i, 3) for i in range(1, 21)]  # 20 ratios, 0.025 .. 0.5
TASKS = {  # what a child process measures
    "one": "one global plan (load + plan)",
    "sweep": "20 ratios in one call",
    "layerwise": "one layerwise plan (load + plan)",
    "write": "one global plan, again",
}
GOALS = {  # (shape, task) -> goal in seconds (or GiB for memory)
    ("8b", "one"): 0.3,
    ("8b", "sweep"): 3.0,
    ("70b", "one"): 2.0,
    ("70b", "memory"): 1.0,
    ("cli", "help"): 1.0,
}


def model_shape(name: str) -> ModelShape:
    layers, heads, kv, inter, hidden = SHAPES[name]
    return ModelShape(
        hidden_size=hidden,
        head_dim=128,
        vocab_size=128256,
        layers=(LayerShape(heads, kv, inter),) * layers,
        attention_bias=False,
        o_proj_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )


def write_synthetic_run(run_dir: Path, shape: ModelShape, seed: int = 0) -> None:
    """groups.parquet / layers.parquet / manifest.json with log-normal scores, built column-wise in numpy."""
    rng = np.random.default_rng(seed)
    n_layers, (kv, inter) = shape.num_hidden_layers, (shape.layers[0].kv_groups, shape.layers[0].mlp_channels)
    per_layer = kv + inter
    layer = np.repeat(np.arange(n_layers, dtype=np.int32), per_layer)
    is_mlp = np.tile(np.r_[np.zeros(kv, bool), np.ones(inter, bool)], n_layers)
    index = np.tile(np.r_[np.arange(kv), np.arange(inter)].astype(np.int32), n_layers)
    params = np.where(is_mlp, shape.mlp_group_cost(0), shape.attn_group_cost(0)).astype(np.int64)
    kind = pa.array(np.where(is_mlp, "mlp", "attn"))
    group_id = pc.binary_join_element_wise(
        "layers", pc.cast(pa.array(layer), pa.string()), kind, pc.cast(pa.array(index), pa.string()), "."
    )
    columns = {"group_id": group_id, "layer": layer, "kind": kind, "index": index, "params": params}
    for c in CRITERIA:
        columns[c] = rng.lognormal(sigma=1.5, size=len(layer)) * params * rng.uniform(0.5, 2.0, n_layers)[layer]
    counts = shape.counts()
    meta = {
        "schema_version": 1,
        "fingerprint": {
            "architecture": "LlamaForCausalLM",
            "config_hash": f"synthetic-{n_layers}",
            "num_parameters": counts.total,
        },
        "params": {"total": counts.total, "prunable": counts.prunable, "fixed": counts.fixed},
        "hidden_size": shape.hidden_size,
        "head_dim": shape.head_dim,
        "criteria": list(CRITERIA),
        "calibration": None,
    }
    write_table(with_meta(pa.table(columns, schema=groups_schema(CRITERIA)), meta), run_dir / "groups.parquet")
    rows = [
        {
            "layer": i,
            "num_attention_heads": shape.layers[i].num_attention_heads,
            "attn_groups": kv,
            "mlp_channels": inter,
            "attn_group_params": shape.attn_group_cost(i),
            "mlp_group_params": shape.mlp_group_cost(i),
            "attn_fixed_params": shape.attn_fixed_params(i),
            "mlp_fixed_params": shape.mlp_fixed_params(i),
            "block_influence": float(rng.uniform(0.02, 0.3)),
            **{c: float(columns[c][layer == i].sum()) for c in CRITERIA},
        }
        for i in range(n_layers)
    ]
    write_table(
        with_meta(pa.Table.from_pylist(rows, schema=layers_schema(CRITERIA)), meta),
        run_dir / "layers.parquet",
    )
    atomic_write_json(run_dir / "manifest.json", {"schema_version": 1})


def child(run_dir: str, task: str) -> None:
    """Run one task in this (fresh) process and print its seconds and peak RSS as JSON."""
    from llamaprune.core.plan_file import plan_json
    from llamaprune.plan import PlanOptions, iter_plans, load_run, make_plan

    start, cpu = time.perf_counter(), time.process_time()
    if task == "sweep":
        made = sum(1 for _ in iter_plans(load_run(run_dir), PlanOptions(ratio=SWEEP[0]), SWEEP))  # as the CLI does
        assert made == len(SWEEP)
    elif task == "layerwise":
        make_plan(run_dir, PlanOptions(ratio=0.2, strategy="layerwise"))
    else:
        plan = make_plan(run_dir, PlanOptions(ratio=0.2))
        assert plan.achieved_ratio <= 0.2
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = {}
    if task == "write":
        start = time.perf_counter()
        plan.validate()
        text = plan_json(plan)
        extra = {"write_s": time.perf_counter() - start, "json_mib": len(text) / 2**20}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss": rss, "torch": "torch" in sys.modules, **extra}))


def measure(run_dir: Path, task: str, repeat: int) -> dict:
    results = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(run_dir), task],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout))
    best = min(results, key=lambda r: r["seconds"])
    return {**best, "rss": max(r["rss"] for r in results)}


def cli_seconds(args: list[str], repeat: int) -> float:
    """Wall time of a whole ``llamaprune`` process (interpreter start and imports included); no torch."""
    code = (
        f"import sys\nfrom llamaprune.cli.app import app\ntry:\n    app({args!r})\n"
        "except SystemExit as e:\n    assert not e.code, e.code\nassert 'torch' not in sys.modules\n"
    )
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def report(label: str, value: float, unit: str, goal: float | None, cpu: float | None = None) -> None:
    ratio = f"{value / goal:5.2f}" if goal else "    -"
    goal_text = f"<= {goal:g} {unit}" if goal else ""
    cpu_text = f"(cpu {cpu:.3f})" if cpu is not None else ""
    print(f"{label:<56} {value:7.3f} {unit:<4} {cpu_text:<12} {goal_text:<11} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SHAPES), action="append")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(
        f"{'figure (best of ' + str(args.repeat) + ' fresh processes)':<56} {'value':>7}      {'':<12} "
        f"{'goal':<11} figure/goal"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or sorted(SHAPES, key=lambda s: SHAPES[s][0]):
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            start = time.perf_counter()
            write_synthetic_run(run_dir, model_shape(name))
            rows = SHAPES[name][0] * (SHAPES[name][2] + SHAPES[name][3])
            print(f"-- {name}: {rows:,} groups, tables written in {time.perf_counter() - start:.1f} s")
            results = {}
            for task, label in TASKS.items():
                results[task] = result = measure(run_dir, task, 1 if task == "write" else args.repeat)
                report(f"{name} {label}", result["seconds"], "s", GOALS.get((name, task)), result["cpu"])
            write = results["write"]
            report(
                f"{name} validate + serialize that plan ({write['json_mib']:.0f} MiB)",
                write["write_s"],
                "s",
                None,
            )
            peak = max(results["one"]["rss"], results["layerwise"]["rss"]) / 2**30
            report(f"{name} peak RSS, one plan", peak, "GiB", GOALS.get((name, "memory")))
            sweep = results["sweep"]["rss"] / 2**30
            report(f"{name} peak RSS, 20 ratios (one plan held at a time)", sweep, "GiB", None)
            assert not any(r["torch"] for r in results.values()), "planning imported torch"
            cli = cli_seconds(["plan", str(run_dir), "--ratio", "0.2"], 1)
            report(f"{name} `llamaprune plan --ratio 0.2` (process, JSON + PNG)", cli, "s", None)
    help_seconds = cli_seconds(["plan", "--help"], args.repeat)
    report("`llamaprune plan --help` startup (no torch)", help_seconds, "s", GOALS[("cli", "help")])


if __name__ == "__main__":
    main()
