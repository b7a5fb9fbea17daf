"""Benchmark of streaming ``llamaprune apply``: peak memory and wall time against a plain read-and-rewrite.

Builds a synthetic multi-shard llama safetensors checkpoint of about 1B parameters (random bfloat16 weights,
written shard by shard), makes a ~20% heterogeneous plan for it, then measures (a) reading every shard with
safetensors and writing it back and (b) ``llamaprune.apply.command.apply`` streaming the plan onto the checkpoint:
the peak RSS of each in a fresh subprocess (``resource.getrusage``), and their times alternating in one
subprocess. Goals (issue 5): peak <= largest input shard + 25%, time <= 2x the read-and-rewrite.

    $ .venv/bin/python bench/apply.py            # ~1B parameters, a few GB of disk under $TMPDIR
    $ .venv/bin/python bench/apply.py --small    # a tiny checkpoint: a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_GOAL = 1.25  # peak RSS / largest input shard
TIME_GOAL = 2.0  # apply time / read-and-rewrite time


@dataclasses.dataclass(frozen=True)
class Size:
    """Shape of the synthetic checkpoint and how it is sharded."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    shard_size: str
    repeats: int = 1
    tie_word_embeddings: bool = False


LARGE = Size(2048, 16, 32, 8, 8192, 32000, "1GB", repeats=5)  # 1.1e9 parameters, 2.2 GB in bfloat16
SMALL = Size(64, 3, 4, 2, 96, 128, "40KB", repeats=1)


def llama_config(size: Size):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        intermediate_size=size.intermediate_size,
        vocab_size=size.vocab_size,
        tie_word_embeddings=size.tie_word_embeddings,
        dtype="bfloat16",
    )


def build_checkpoint(path: Path, size: Size, device: str = "cpu") -> None:
    """Random bfloat16 weights, generated and written one shard at a time (never the whole model); drawn on
    ``device`` (an 8B checkpoint draws in seconds on a GPU, minutes on a few CPU cores)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(size)
    with torch.device("meta"):
        shapes = LlamaForCausalLM(config).to(torch.bfloat16).state_dict()
    if size.tie_word_embeddings:
        del shapes["lm_head.weight"]  # the embedding is the head: stored once
    split = split_torch_state_dict_into_shards(shapes, max_shard_size=size.shard_size)
    generator = torch.Generator(device).manual_seed(0)
    path.mkdir(parents=True)
    for name, keys in split.filename_to_tensors.items():
        shard = {
            k: torch.randn(shapes[k].shape, generator=generator, device=device).mul_(0.02).to(torch.bfloat16).cpu()
            for k in keys
        }
        save_file(shard, path / name, metadata={"format": "pt"})
        del shard
    index = {
        "metadata": {"total_size": sum(t.numel() * 2 for t in shapes.values())},
        "weight_map": split.tensor_to_filename,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)


def make_plan(checkpoint: Path, out: Path, seed: int = 0) -> dict:
    """A heterogeneous plan removing about 20% of the parameters: random KV heads and channels per layer."""
    from transformers import AutoConfig

    from llamaprune.core.plan_file import plan_from_kept, write_plan

    config, rng = AutoConfig.from_pretrained(checkpoint), random.Random(seed)
    heads, channels = config.num_key_value_heads, config.intermediate_size
    kept = [
        (
            rng.sample(range(heads), max(1, heads - 1 - i % 2)),
            rng.sample(range(channels), int(channels * 0.765)),
        )
        for i in range(config.num_hidden_layers)
    ]
    plan = plan_from_kept(config, kept, name="bench-20")
    write_plan(plan, out)
    return {
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "achieved_ratio": plan.achieved_ratio,
    }


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(work) -> dict:
    """Run ``work`` after flushing dirty pages; time it to the page cache and until the data is on disk."""
    os.sync()  # earlier runs' dirty pages would otherwise throttle this run's writes
    start = time.perf_counter()
    work()
    written = time.perf_counter()
    os.sync()
    return {"seconds": written - start, "seconds_synced": time.perf_counter() - start}


def rewrite(src: Path, out: Path) -> None:
    """The reference: read each shard with safetensors and write it back unchanged."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(shard), out / shard.name, metadata={"format": "pt"})


def stream_apply(src: Path, out: Path, plan: Path) -> None:
    """``llamaprune apply`` as the CLI runs it."""
    from llamaprune.apply.command import ApplyOptions, apply

    apply(ApplyOptions(plan=plan, model=str(src), out=out))


def import_apply() -> None:
    """What the CLI imports before it applies (transformers and our model type), kept out of the timings."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # noqa: F401

    from llamaprune.io.loading import register

    register()


def measure_peak(kind: str, src: Path, out: Path, plan: Path) -> dict:
    """Peak RSS of one path in this fresh interpreter, and how much of it the imports already took."""
    if kind == "apply":
        import_apply()
    else:
        import safetensors.torch  # noqa: F401
    imported = rss_bytes()
    figures = timed(lambda: stream_apply(src, out, plan) if kind == "apply" else rewrite(src, out))
    return {**figures, "peak_rss": rss_bytes(), "rss_after_imports": imported}


def measure_times(src: Path, out: Path, plan: Path, repeats: int) -> dict:
    """Both paths in one interpreter, alternating, after one untimed round. The page cache of this virtual
    machine makes the first large write of a fresh process several times slower than the next ones, so
    timings from separate processes compare luck rather than code."""
    import_apply()
    runs: dict[str, list[dict]] = {"rewrite": [], "apply": []}
    work = {"rewrite": lambda: rewrite(src, out), "apply": lambda: stream_apply(src, out, plan)}
    for i in range(repeats + 1):
        for kind in ("rewrite", "apply") if i % 2 == 0 else ("apply", "rewrite"):
            figures = timed(work[kind])
            shutil.rmtree(out)
            if i > 0:
                runs[kind].append(figures)
    return runs


def in_subprocess(kind: str, *args, script: str = __file__) -> dict:
    """Run one step of ``script`` (``--measure KIND ARGS``) in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, script, "--measure", kind, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build(workdir: Path, small: str) -> dict:
    """The checkpoint and its plan (a step of its own, so that the parent process stays small)."""
    src = workdir / "checkpoint"
    start = time.perf_counter()
    build_checkpoint(src, SMALL if small == "small" else LARGE)
    return {**make_plan(src, workdir / "plan.json"), "build_seconds": time.perf_counter() - start}


def run(size: Size, workdir: Path) -> dict:
    """Build, then measure each path's peak in a fresh interpreter and both paths' times in a third. This
    process imports neither torch nor transformers: Linux keeps a process's peak RSS across fork and exec, so
    a large parent would inflate the children's peaks."""
    src, plan, out = workdir / "checkpoint", workdir / "plan.json", workdir / "out"
    planned = in_subprocess("build", workdir, "small" if size is SMALL else "large")
    print(f"built the checkpoint in {planned['build_seconds']:.1f} s", flush=True)
    shards = sorted(src.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    peaks = {}
    for kind in ("rewrite", "apply"):
        peaks[kind] = in_subprocess(f"peak-{kind}", src, out, plan)
        shutil.rmtree(out)
    runs = in_subprocess("times", src, out, plan, size.repeats)
    best = {kind: min(r["seconds"] for r in kind_runs) for kind, kind_runs in runs.items()}
    synced = {kind: min(r["seconds_synced"] for r in kind_runs) for kind, kind_runs in runs.items()}
    apply_peak = peaks["apply"]
    return {
        **planned,
        "shards": len(shards),
        "largest_shard_bytes": largest,
        "input_bytes": sum(p.stat().st_size for p in shards),
        "peaks": peaks,
        "runs": runs,
        "best_seconds": best,
        "best_seconds_synced": synced,
        "peak_over_largest_shard": apply_peak["peak_rss"] / largest,
        "peak_above_imports_over_largest_shard": (apply_peak["peak_rss"] - apply_peak["rss_after_imports"]) / largest,
        "time_over_rewrite": best["apply"] / best["rewrite"],
        "synced_time_over_rewrite": synced["apply"] / synced["rewrite"],
    }


def report(figures: dict) -> str:
    gb = 1e9

    def row(name: str, kind: str) -> str:
        peak, times = figures["peaks"][kind], sorted(r["seconds"] for r in figures["runs"][kind])
        return (
            f"{name:26}{times[0]:9.2f}{times[len(times) // 2]:9.2f}{figures['best_seconds_synced'][kind]:10.2f}"
            f"{peak['seconds']:8.2f}{peak['peak_rss'] / gb:13.2f}{peak['rss_after_imports'] / gb:22.2f}"
        )

    def verdict(ratio: float, goal: float) -> str:
        return f"{ratio:.2f} (goal <= {goal}) {'ok' if ratio <= goal else 'MISSED'}"

    return "\n".join(
        [
            f"checkpoint: {figures['params_before']:,} parameters, bfloat16, {figures['shards']} shards, "
            f"{figures['input_bytes'] / gb:.2f} GB; largest {figures['largest_shard_bytes'] / gb:.2f} GB",
            f"plan: {figures['params_before']:,} -> {figures['params_after']:,} parameters "
            f"({figures['achieved_ratio']:.1%} removed, heterogeneous)",
            f"seconds: best and median of {len(figures['runs']['apply'])} alternating runs in one process, best "
            "with the final sync, and one run in a fresh process (whose peak RSS is given)",
            f"{'':26}{'best':>9}{'median':>9}{'+ sync':>10}{'fresh':>8}{'peak RSS GB':>13}{'RSS after imports GB':>22}",
            row("read-and-rewrite", "rewrite"),
            row("llamaprune apply (stream)", "apply"),
            f"peak RSS / largest input shard: {verdict(figures['peak_over_largest_shard'], PEAK_GOAL)}; "
            f"above the imports' RSS: {figures['peak_above_imports_over_largest_shard']:.2f}",
            f"apply time / read-and-rewrite time: {verdict(figures['time_over_rewrite'], TIME_GOAL)}; "
            f"with the final sync: {verdict(figures['synced_time_over_rewrite'], TIME_GOAL)}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="A tiny checkpoint (smoke test of this script).")
    parser.add_argument("--dir", type=Path, help="Work directory (default: a temporary one, removed at the end).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, *paths = args.measure
        if kind == "build":
            figures = build(Path(paths[0]), paths[1])
        elif kind == "times":
            figures = measure_times(*map(Path, paths[:3]), int(paths[3]))
        else:
            figures = measure_peak(kind.removeprefix("peak-"), *map(Path, paths))
        print(json.dumps(figures))
        return
    size = SMALL if args.small else LARGE
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-apply-") as tmp:
        figures = run(size, Path(tmp))
    publish(report(figures), figures, "--small" if args.small else None, args.json)


def publish(text: str, figures: dict, smoke: str | None, out: Path | None) -> None:
    """Print the report, saying so where a smoke-test flag (``smoke``) made its ratios meaningless, and write the
    figures to ``out`` where asked."""
    print(text)
    if smoke:
        print(f"({smoke}: a smoke test of this script; fixed costs dominate, so the ratios say nothing)")
    if out:
        out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
