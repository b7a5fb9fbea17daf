"""Benchmark of ``llamaprune score --stream``: its peak memory against a full load of the same checkpoint.

Builds bench/apply.py's synthetic multi-shard bfloat16 llama checkpoint, with the embedded model's tokenizer and
vocabulary (about 1.2B parameters), then measures the peak RSS of each path in a fresh subprocess: (a) a full
load, what an in-memory ``score`` needs at least (``from_pretrained`` and one forward pass over the calibration
windows), and (b) ``score --stream`` with the forward-only criteria on the same windows (8 x 64 tokens of
WikiText-2 valid). Goal: streamed peak RSS <= 0.3 x the checkpoint's size.

    $ .venv/bin/python bench/score_stream.py           # ~1.2B parameters, ~2.4 GB of disk under $TMPDIR
    $ .venv/bin/python bench/score_stream.py --tiny    # a tiny checkpoint: a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from apply import LARGE, SMALL, build_checkpoint, in_subprocess, publish, rss_bytes  # noqa: E402

PEAK_GOAL = 0.3  # streamed peak RSS / checkpoint size
SHARED = ROOT.parent / "shared" / "data"


def build(src: Path, tiny: bool) -> dict:
    """The checkpoint, with a vocabulary the size of the embedded tokenizer's, which goes in with it."""
    from transformers import AutoTokenizer

    from llamaprune.io.loading import embedded_checkpoint
    from llamaprune.io.pruned_checkpoint import write_tokenizer_files

    start = time.perf_counter()
    vocab = len(AutoTokenizer.from_pretrained(embedded_checkpoint()))
    build_checkpoint(src, dataclasses.replace(SMALL if tiny else LARGE, vocab_size=vocab))
    write_tokenizer_files(str(embedded_checkpoint()), src)
    return {"build_seconds": time.perf_counter() - start}


def full_load(src: Path, calibration: Path, num_samples: int, seq_len: int, batch_size: int) -> dict:
    """``from_pretrained`` of the whole checkpoint (in its dtype) and a forward pass over the windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaprune.io.text_data import calibration_windows, load_rows

    imported = rss_bytes()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows = calibration_windows(tokenizer, load_rows(str(calibration), split="train"), num_samples, seq_len, 0)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for batch in windows.split(batch_size):
            model.model(input_ids=batch, use_cache=False)
    return {"seconds": time.perf_counter() - start, "peak_rss": rss_bytes(), "rss_after_imports": imported}


def stream_score(src: Path, calibration: Path, num_samples: int, seq_len: int, batch_size: int) -> dict:
    """``llamaprune score --stream`` as the CLI runs it, in the checkpoint's dtype."""
    import shutil

    from llamaprune.core.criteria import FORWARD_ONLY
    from llamaprune.io.loading import DType
    from llamaprune.scoring.command import score_run
    from llamaprune.scoring.in_memory import ScoreOptions

    imported = rss_bytes()
    out = src.parent / "run"
    start = time.perf_counter()
    options = ScoreOptions(str(src), str(calibration), num_samples, seq_len, batch_size, FORWARD_ONLY,
                           dtype=DType.bfloat16, stream=True)
    result = score_run(options, out)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "peak_rss": rss_bytes(), "rss_after_imports": imported,
            "scoring_peak": result.peak_memory_bytes, "scoring_peak_scope": result.peak_memory_scope}


MEASURES = {"full": full_load, "stream": stream_score}


def run(workdir: Path, tiny: bool, calibration: Path, num_samples: int, seq_len: int, batch_size: int) -> dict:
    """Build, then each path in a fresh interpreter; this process imports no torch, whose RSS the children
    would inherit."""
    src = workdir / "checkpoint"
    built = in_subprocess("build", src, int(tiny), script=__file__)
    print(f"built the checkpoint in {built['build_seconds']:.1f} s", flush=True)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    args = (src, calibration, num_samples, seq_len, batch_size)
    peaks = {kind: in_subprocess(kind, *args, script=__file__) for kind in MEASURES}
    return {
        **built,
        "checkpoint_bytes": size,
        "shards": len(list(src.glob("*.safetensors"))),
        "windows": [num_samples, seq_len],
        "peaks": peaks,
        "full_over_checkpoint": peaks["full"]["peak_rss"] / size,
        "stream_over_checkpoint": peaks["stream"]["peak_rss"] / size,
        "stream_over_full": peaks["stream"]["peak_rss"] / peaks["full"]["peak_rss"],
    }


def report(figures: dict) -> str:
    gb, size = 1e9, figures["checkpoint_bytes"]

    def row(name: str, kind: str) -> str:
        peak = figures["peaks"][kind]
        return (f"{name:34}{peak['seconds']:9.1f}{peak['peak_rss'] / gb:13.2f}{peak['peak_rss'] / size:14.2f}"
                f"{peak['rss_after_imports'] / gb:22.2f}")

    ratio = figures["stream_over_checkpoint"]
    verdict = "ok" if ratio <= PEAK_GOAL else "MISSED"
    return "\n".join([
        f"checkpoint: bfloat16, {figures['shards']} shards, {size / gb:.2f} GB; calibration "
        f"{figures['windows'][0]} x {figures['windows'][1]} tokens",
        f"{'':34}{'seconds':>9}{'peak RSS GB':>13}{'/ checkpoint':>14}{'RSS after imports GB':>22}",
        row("full load + forward (in-memory)", "full"),
        row("score --stream (forward-only)", "stream"),
        f"streamed peak RSS / checkpoint size: {ratio:.2f} (goal <= {PEAK_GOAL}) {verdict}; "
        f"/ full load's peak: {figures['stream_over_full']:.2f}",
    ])


def synthetic_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark on this synthetic checkpoint (and its internal ``--measure`` step)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A tiny checkpoint (smoke test of this script).")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LLAMAPRUNE_DATA_DIR") or SHARED))
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dir", type=Path, help="Work directory (default: a temporary one, removed at the end).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = synthetic_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.measure:
        kind, path, *rest = args.measure
        if kind == "build":
            figures = build(Path(path), bool(int(rest[0])))
        else:
            figures = MEASURES[kind](Path(path), Path(rest[0]), *map(int, rest[1:]))
        print(json.dumps(figures))
        return
    calibration = args.data_dir / "wikitext-2-tokens" / "valid.txt"
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-score-stream-") as tmp:
        figures = run(Path(tmp), args.tiny, calibration, args.num_samples, args.seq_len, args.batch_size)
    publish(report(figures), figures, "--tiny" if args.tiny else None, args.json)


if __name__ == "__main__":
    main()
