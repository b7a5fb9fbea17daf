"""Run every benchmark and write ``bench/RESULTS.md``: quality (bench/quality.py) and cost (score,
plan, apply, streamed scoring).

    python bench/run.py --quick      # about 16 minutes on 2 CPU cores (make bench)
    python bench/run.py              # full: every test window, seq_len 128 and 512, larger cost runs
    python bench/run.py --tiny       # tiny random model and small checkpoints (CI smoke test)

Every figure is printed as it is measured; RESULTS.md is written at the end from that same run.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402


def cost_runs(args) -> list[tuple[str, list[str]]]:
    """The cost benchmarks as (title, command); each prints its own figures and ratios."""
    py = sys.executable
    device = ["--device", args.device, "--dtype", args.dtype]
    if args.tiny:
        return [
            ("Scoring cost (bench/score.py --tiny)", [py, str(BENCH / "score.py"), "--tiny", "--num-samples", "8",
                                                      "--seq-len", "32"]),
            ("Planning cost (bench/plan.py --only 8b)", [py, str(BENCH / "plan.py"), "--only", "8b", "--repeat", "1"]),
            ("Apply cost (bench/apply.py --small)", [py, str(BENCH / "apply.py"), "--small"]),
            ("Streamed scoring memory (bench/score_stream.py --tiny)", [py, str(BENCH / "score_stream.py"), "--tiny"]),
        ]
    samples, repeat = ("16", "1") if args.quick else ("128", "3")
    return [
        (f"Scoring cost (bench/score.py, SmolLM2-135M, {samples} x 128 tokens)",
         [py, str(BENCH / "score.py"), "--num-samples", samples, *device]),
        (f"Planning cost (bench/plan.py, 8B- and 70B-shaped tables, best of {repeat})",
         [py, str(BENCH / "plan.py"), "--repeat", repeat]),
        ("Apply cost (bench/apply.py, synthetic ~1B-parameter multi-shard checkpoint)",
         [py, str(BENCH / "apply.py")]),
        ("Streamed scoring memory (bench/score_stream.py, the same synthetic checkpoint, 8 x 64 tokens)",
         [py, str(BENCH / "score_stream.py")]),
    ]


def run_cost(title: str, command: list[str]) -> str:
    print(f"\n== {title}\n$ {' '.join(Path(c).name if c == sys.executable else c for c in command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    output = "\n".join(line for line in done.stdout.splitlines() if line.strip())
    print(output, flush=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{title} failed with exit code {done.returncode}")
    return output


def quality_table(report: dict) -> str:
    seq_lens = list(report["eval"])
    head = "| plan | achieved | params | " + " | ".join(f"ppl@{L}" for L in seq_lens) + " | tok/s vs dense | plan ms |"
    lines = [head, "|" + "---|" * (5 + len(seq_lens))]
    dense = report["dense"]
    lines.append(f"| dense | 0% | {dense[seq_lens[0]]['params']:,} | "
                 + " | ".join(f"{dense[L]['ppl']:.2f}" for L in seq_lens) + " | 1.00 | |")
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['label']} | unreachable | | " + " | ".join("" for _ in seq_lens) + " | | |")
            continue
        lora = f" ({row['lora']['steps']} LoRA steps, {row['lora']['seconds']:.0f} s)" if "lora" in row else ""
        lines.append(
            f"| {row['label']}{lora} | {row['achieved_ratio']:.1%} | {row['params']:,} | "
            + " | ".join(f"{row[f'ppl@{L}']:.2f}" for L in seq_lens)
            + f" | {row['speedup']:.2f} | {row['plan_seconds'] * 1000:.0f} |"
        )
    return "\n".join(lines)


def write_results(path: Path, args, report: dict, costs: list[tuple[str, str]], seconds: float) -> None:
    mode = "--tiny" if args.tiny else "--quick" if args.quick else "(full)"
    evals = ", ".join(f"{e['windows']} windows x {e['seq_len']} tokens" for e in report["eval"].values())
    calib = report["calibration"]
    text = [
        "# Benchmark results",
        "",
        f"Produced by `python bench/run.py {mode}` in {seconds / 60:.1f} min on {platform.machine()} "
        f"({torch.get_num_threads()} threads, {report['device']}, {report['dtype']}); torch {torch.__version__}.",
        "",
        f"## Quality ({report['model']})",
        "",
        f"Calibration: {calib['num_samples']} x {calib['seq_len']} tokens of `{calib['source']}`, scored once "
        f"({report['score_seconds']:.0f} s for all five criteria); every plan below comes from that one table. "
        f"Perplexity on the WikiText-2 raw test split: {evals}. Ratios are of total parameters. "
        f"Forward speed: tokens/s of the pruned model over the dense one, both timed back to back on "
        f"{report['speed_windows']} windows.",
        "",
        quality_table(report),
        "",
        "![perplexity against ratio](ppl_vs_ratio.png)",
    ]
    for title, output in costs:
        text += ["", f"## {title}", "", "```", output, "```"]
    path.write_text("\n".join(text) + "\n" + kept_part(path))


KEPT = "<!-- Below: figures from benchmarks run on their own"


def kept_part(path: Path) -> str:
    """What an earlier RESULTS.md holds from the ``KEPT`` marker on: the figures of benchmarks that take longer
    than this run (error compensation, streamed memory, llama.cpp), which a rerun must not erase."""
    old = path.read_text() if path.exists() else ""
    start = old.find(KEPT)
    return "\n" + old[start:] if start >= 0 else ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=str(BENCH), help="Where RESULTS.md, quality.json and the plot go.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    flags = ["--quick"] if args.quick else []
    flags += ["--tiny"] if args.tiny else []
    report = quality.main([*flags, "--device", args.device, "--dtype", args.dtype, "--out", args.out])
    costs = [(title, run_cost(title, command)) for title, command in cost_runs(args)]
    out = Path(args.out)
    write_results(out / "RESULTS.md", args, report, costs, time.perf_counter() - start)
    print(f"\nwrote {out / 'RESULTS.md'} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
