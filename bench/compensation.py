"""Error compensation on the quality protocol: criterion x allocation x compensation at a ratio, perplexity at
two context lengths on WikiText-2 test and on text of another domain (``heldout_rows``), and what compensation
costs (seconds, peak memory) against one forward pass over its calibration text, timed right before it in the
same process (the machine's load drifts).

The protocol of the quality comparison with the peers (same model, same text, same windows): SmolLM2-135M,
calibration windows from WikiText-2 valid, perplexity on the first 256 windows of 128 tokens and the first 64
windows of 512 tokens of the WikiText-2 raw test split (as ``llamaprune eval --max-windows``). One scoring pass
(``--run``: a run directory from ``llamaprune score``, or scored here) feeds every plan. Compensation time is
given as a ratio to a bare forward pass over the same calibration windows, timed in the same process; the
model is in memory here (the streamed path of ``llamaprune apply`` holds one layer: bench/apply.py).

    python bench/compensation.py --run artifacts/smollm2 --calibration-samples 1024
    python bench/compensation.py --tiny        # tiny random model (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamaprune.apply.command import apply_plan  # noqa: E402
from llamaprune.apply.refit import DEFAULT_DAMP, CompensationOptions  # noqa: E402
from llamaprune.evaluate.perplexity import perplexity  # noqa: E402
from llamaprune.io.loading import LoadedModel, Source, load_model  # noqa: E402
from llamaprune.io.text_data import calibration_windows, evaluation_windows, load_rows  # noqa: E402
from llamaprune.plan import PlanOptions, load_run, make_plan  # noqa: E402
from llamaprune.runs.peak_memory import PeakMemory  # noqa: E402
from llamaprune.scoring.command import write_tables  # noqa: E402
from llamaprune.scoring.in_memory import score  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# (label, plan options, compensation, its other options): today's recipe, each knob alone, FLAP's recipe in our
# code, and the selections of the compensation pass
LSTSQ_OBS = dict(select="obs")
CASES = [
    ("global taylor2", dict(criterion="taylor2"), "none", {}),
    ("global taylor2 + bias", dict(criterion="taylor2"), "bias", {}),
    ("global taylor2 + lstsq", dict(criterion="taylor2"), "lstsq", dict(select="score")),
    ("global fluctuation standard + bias (FLAP's recipe)", dict(criterion="fluctuation", normalize="standard"),
     "bias", {}),
    ("global fluctuation standard + lstsq", dict(criterion="fluctuation", normalize="standard"), "lstsq",
     dict(select="score")),
    ("global taylor2 standard + lstsq", dict(criterion="taylor2", normalize="standard"), "lstsq",
     dict(select="score")),
    ("global taylor2 + lstsq, obs selection", dict(criterion="taylor2"), "lstsq", LSTSQ_OBS),
    ("global taylor2 + lstsq, obs selection + 16 swaps", dict(criterion="taylor2"), "lstsq",
     dict(select="obs", swaps=16)),
    ("global taylor2 + lstsq to the dense output, obs selection", dict(criterion="taylor2"), "lstsq",
     dict(select="obs", target="dense")),
    ("global taylor2 + lstsq to the dense hidden states, obs selection", dict(criterion="taylor2"), "lstsq",
     dict(select="obs", target="residual")),
    ("global obs + lstsq, obs selection", dict(criterion="obs"), "lstsq", LSTSQ_OBS),
    ("global taylor2 + lstsq, obs selection among 1.25x the plan's lowest-scored groups", dict(criterion="taylor2"),
     "lstsq", dict(select="obs", obs_pool=1.25)),
    ("global taylor2 + lstsq to the dense hidden states, obs selection among 1.25x", dict(criterion="taylor2"),
     "lstsq", dict(select="obs", obs_pool=1.25, target="residual")),
    ("global taylor2 + lstsq, obs selection among 1.25x + 16 swaps", dict(criterion="taylor2"), "lstsq",
     dict(select="obs", obs_pool=1.25, swaps=16)),
    ("global taylor2 + lstsq half way to the dense hidden states, obs selection among 1.25x",
     dict(criterion="taylor2"), "lstsq", dict(select="obs", obs_pool=1.25, target="residual", residual_share=0.5)),
    ("global taylor2 + lstsq 0.3 of the way to the dense hidden states, obs selection among 1.25x",
     dict(criterion="taylor2"), "lstsq", dict(select="obs", obs_pool=1.25, target="residual", residual_share=0.3)),
    ("global taylor2 + lstsq 0.3 of the way to the dense hidden states, obs selection among 1.25x + 16 swaps",
     dict(criterion="taylor2"), "lstsq",
     dict(select="obs", obs_pool=1.25, target="residual", residual_share=0.3, swaps=16)),
    ("global obs + lstsq 0.3 of the way to the dense hidden states, obs selection among 1.25x",
     dict(criterion="obs"), "lstsq", dict(select="obs", obs_pool=1.25, target="residual", residual_share=0.3)),
    ("global taylor2 + lstsq 0.3 of the way to the dense hidden states, obs selection",
     dict(criterion="taylor2"), "lstsq", dict(select="obs", target="residual", residual_share=0.3)),
    ("prune's recipe, the counts of a run scored after a 5% step (`score --after`, the step refitted on 128 windows)",
     dict(criterion="taylor2"), "lstsq", dict(select="obs", obs_pool=1.25, target="residual", residual_share=0.3,
                                              after=dict(step=0.05, samples=128))),
]


def forward_pass(model, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Seconds and peak memory (bytes) of one forward pass of the decoder over ``windows``."""
    peak = PeakMemory("cpu", "forward")
    start = time.perf_counter()
    with torch.no_grad():
        for batch in windows.split(batch_size):
            model.model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start, peak.read()[0]


def scored_after(source, run_dir: Path, tables, after: dict, calibration: str, rows: list[str],
                 num_samples: int) -> Path:
    """A run scored after ``after["step"]``'s plan (taylor2, refitted by prune's recipe on ``after["samples"]``
    windows; ``score --after``), on the run's scoring windows, in a temporary directory beside a copy of the run's
    group table (which ranks the step's pool)."""
    import shutil

    from llamaprune.apply.step import compensate_step
    from llamaprune.core.plan_file import write_plan
    from llamaprune.scoring.after_plan import in_original_groups
    from llamaprune.scoring.in_memory import ScoreOptions

    step_run = Path(tempfile.mkdtemp(prefix="llamaprune-bench-step-"))
    shutil.copy(run_dir / "groups.parquet", step_run / "groups.parquet")
    step = make_plan(tables, PlanOptions(ratio=after["step"], criterion="taylor2"))
    write_plan(step, step_run / "plans" / "step.json")
    options = ScoreOptions("bench", calibration, num_samples, 128, criteria=("taylor2",),
                           after=str(step_run / "plans" / "step.json"), after_samples=after["samples"])
    windows = calibration_windows(source.tokenizer, rows, num_samples, 128, 0)
    model, chosen, record = compensate_step(source, step, step_run / "plans" / "step.json", options, rows, False)
    result = in_original_groups(score(model, list(windows.split(8)), ("taylor2",), progress=False), chosen,
                                source.model.config, record)
    out = Path(tempfile.mkdtemp(prefix="llamaprune-bench-after-"))
    write_tables(out, result)
    return out


def heldout_rows() -> tuple[list[str], dict]:
    """English text of another domain than WikiText, which neither scoring nor calibration sees: the Python
    documentation's reference topics (``pydoc_data.topics``, shipped with CPython under the PSF license), in
    sorted topic order; also where it comes from, with the text's sha256 (it changes between Python releases)."""
    import hashlib
    import platform
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    source = {"name": "pydoc_data.topics", "python": platform.python_version(),
              "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return [line + "\n" for line in text.split("\n")], source


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny random model and few windows (smoke test).")
    parser.add_argument("--run", default=None,
                        help="Run directory of `llamaprune score` (default: score here; into --run if it has none).")
    parser.add_argument("--data-dir", default=os.environ.get("LLAMAPRUNE_DATA_DIR") or str(SHARED))
    parser.add_argument("--num-samples", type=int, default=128, help="Scoring windows (when scoring here).")
    parser.add_argument("--calibration-samples", type=int, default=1024, help="lstsq: windows to refit on.")
    parser.add_argument("--calibration-seq-len", type=int, default=128, help="lstsq: tokens per window.")
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--damp", type=float, default=DEFAULT_DAMP, help="lstsq: the ridge (apply --damp).")
    parser.add_argument("--cases", default=None, help="Comma-separated case numbers (default: all).")
    parser.add_argument("--windows", default="256,64", help="Eval windows at 128 and at 512 tokens.")
    parser.add_argument("--out", default=str(ROOT / "bench" / "compensation.json"))
    args = parser.parse_args(argv)
    valid = Path(args.data_dir) / "wikitext-2-tokens" / "valid.txt"
    if args.tiny:
        sys.path.insert(0, str(ROOT / "bench"))
        from quality import load  # the tiny random model with the embedded tokenizer

        model, tokenizer = load(argparse.Namespace(tiny=True, device="cpu", dtype="float32"))
        args.num_samples, args.calibration_samples, args.windows = 8, 8, "4,2"
    else:
        loaded = load_model("smollm2-135m")
        model, tokenizer = loaded.model, loaded.tokenizer
    rows = load_rows(str(valid), split="train")
    run_dir = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="llamaprune-bench-"))
    if not (run_dir / "groups.parquet").is_file():  # scored here (and kept in --run, when given)
        windows = calibration_windows(tokenizer, rows, args.num_samples, 128, 0)
        result = score(model, list(windows.split(8)), criteria=("taylor2", "fluctuation", "obs"), progress=False)
        write_tables(run_dir, result)
    tables = load_run(run_dir)
    calibration = calibration_windows(tokenizer, rows, args.calibration_samples, args.calibration_seq_len, 0)
    n128, n512 = (int(x) for x in args.windows.split(","))
    other_rows, other_source = heldout_rows()
    texts = {"": load_rows("wikitext2", split="test", data_dir=args.data_dir), "other_": other_rows}
    # the other domain at 128 tokens only: the head's 49k-wide logits make each evaluation minutes on two cores
    lengths = {"": ((128, n128), (512, n512)), "other_": ((128, n128),)}
    evals = {f"{prefix}ppl{length}": evaluation_windows(tokenizer, text, length, count)
             for prefix, text in texts.items() for length, count in lengths[prefix]}

    def perplexities(m) -> dict[str, float]:
        return {key: round(perplexity(m, w, 4, progress=False).ppl, 2) for key, w in evals.items()}

    dense = perplexities(model)
    print(f"dense: {dense}", flush=True)
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    source = LoadedModel(model, tokenizer, Source("bench", "dir", ""))
    rows_out = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for label, plan_fields, method, extra in chosen:
            extra = dict(extra)
            after = extra.pop("after", None)
            compensation = CompensationOptions(method, str(valid), args.calibration_samples, args.calibration_seq_len,
                                               damp=args.damp, **extra)
            forward, forward_peak = forward_pass(model, calibration, 8) if method == "lstsq" else (None, None)
            peak = PeakMemory("cpu", "compensation")
            start = time.perf_counter()
            plan_run = run_dir if after is None else scored_after(source, run_dir, tables, after, str(valid), rows,
                                                                  args.num_samples)
            allocation = time.perf_counter() - start
            plan = make_plan(tables if after is None else load_run(plan_run), PlanOptions(ratio=ratio, **plan_fields))
            done = compensation.compensate(plan, model.config, loaded=source, rows=rows, run_dir=plan_run,
                                           progress=False)
            seconds = time.perf_counter() - start
            compensation_peak = peak.read()[0]
            pruned = apply_plan(model, done.plan, done.tensors)
            ppl = perplexities(pruned)
            row = {
                "case": label, "ratio": ratio, "achieved_ratio": round(plan.achieved_ratio, 4),
                "compensation": method, "calibration_samples": args.calibration_samples if method == "lstsq" else 0,
                **({"calibration_seq_len": args.calibration_seq_len} if method == "lstsq" else {}),
                **({"damp": args.damp} if method == "lstsq" else {}),
                **extra, **ppl, **{f"{key}_vs_dense": round(value / dense[key], 3) for key, value in ppl.items()},
                "compensation_seconds": round(seconds, 1),
                **({"after": after, "allocation_seconds": round(allocation, 1)} if after else {}),
            }
            if forward is not None:
                row.update(forward_seconds=round(forward, 1), compensation_vs_forward=round(seconds / forward, 2),
                           compensation_peak_mib=compensation_peak >> 20, forward_peak_mib=forward_peak >> 20)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps({"dense": dense, "heldout": other_source, "rows": rows_out},
                                                 indent=2) + "\n")
    return rows_out


if __name__ == "__main__":
    main()
