"""Every phase on a LLaMA-3-8B-shaped random-weight checkpoint, through the CLI: seconds and peak memory each.

Builds a random bfloat16 safetensors checkpoint of the shape (bench/apply.py's builder) with the embedded model's
tokenizer, then runs, each in its own process: ``score --stream`` (forward-only criteria, one layer at a time),
``score --criteria taylor2`` (gradients; under ``torchrun --nproc-per-node N ... --fsdp`` with ``--nproc N``),
``plan --ratio 0.2``, ``apply --compensate lstsq`` and ``eval`` on a few windows. It checks that the large-model
paths run end to end and what they cost; the weights are random, so the perplexities say nothing.

Memory: the scoring peak is what ``score`` records in its manifest (``peak_memory_bytes``: the CUDA allocator's
peak on a GPU, the resident set's on CPU); for every phase, the process's peak resident set (``wait4``) and, on
CUDA, the most GPU memory ``nvidia-smi`` saw in use while it ran (sampled every 200 ms; it includes the CUDA
context). This process imports no torch, so that the children's peaks are their own.

    python bench/scale.py --device cuda                 # 8B shape on one GPU: about 8 minutes on an H200
    python bench/scale.py --device cuda --nproc 8       # gradient scoring under torchrun --fsdp on 8 GPUs
    python bench/scale.py --shape tiny --device cpu     # a few MB (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLI = ROOT / "cli.py"  # what `-m llamaprune` runs; a script path also works under torchrun


def data_dir() -> Path:
    """$LLAMAPRUNE_DATA_DIR, else ../shared/data beside the checkout (as bench/gpu.sh and the tests do)."""
    return Path(os.environ.get("LLAMAPRUNE_DATA_DIR") or ROOT.parent / "shared" / "data")


def shapes() -> dict:
    """Name -> bench/apply.py Size. The tiny vocabulary is the embedded tokenizer's (49,152), so its ids fit."""
    sys.path.insert(0, str(BENCH))
    from apply import Size  # noqa: E402  (bench/apply.py; imports no torch at module level)

    return {
        "8b": Size(4096, 32, 32, 8, 14336, 128256, "5GB"),  # LLaMA-3-8B: 8.03e9 parameters, 16 GB in bfloat16
        # Tied, so the 49,152-row embedding (the tokenizer's) leaves a third of the parameters prunable.
        "tiny": Size(32, 4, 4, 2, 2048, 49152, "4MB", tie_word_embeddings=True),  # 2.4e6 parameters, 5 MB
    }


def build(path: Path, shape: str, device: str) -> None:
    """The checkpoint and the embedded model's tokenizer files (run in a child: it imports torch)."""
    from apply import build_checkpoint
    from transformers import AutoTokenizer

    from llamaprune.io.loading import embedded_checkpoint

    build_checkpoint(path, shapes()[shape], "cuda" if device == "cuda" else "cpu")
    AutoTokenizer.from_pretrained(embedded_checkpoint()).save_pretrained(path)


class GpuSampler:
    """Most GPU memory in use (MiB, per GPU) while a phase runs, from ``nvidia-smi``; None without one."""

    def __init__(self, enabled: bool) -> None:
        self.proc = None
        if enabled and shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate()
        values = [int(v) for v in out.split() if v.isdigit()]
        return max(values) * 2**20 if values else None


def run_phase(name: str, cmd: list[str], gpu: bool) -> dict:
    """Run one phase in a child; its wall seconds, peak RSS (wait4) and the sampled GPU peak."""
    print(f"-- {name}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sampler = GpuSampler(gpu)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    gpu_peak = sampler.stop()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{name} failed (exit {child.returncode}): {' '.join(cmd)}")
    return {"phase": name, "seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "gpu_used_bytes": gpu_peak}


def recorded(out: Path) -> dict:
    """What a phase's manifest says it cost: score's seconds and peak memory, apply's seconds and refit seconds."""
    doc = json.loads((out / "manifest.json").read_text())
    entry = doc.get("history", [{}])[-1]
    if entry.get("command") == "apply":
        return {"recorded_seconds": entry.get("seconds"),
                "compensation_seconds": (entry.get("compensation") or {}).get("seconds")}
    return {"recorded_seconds": doc.get("timings", {}).get("score_seconds"),
            "recorded_peak_bytes": doc.get("peak_memory_bytes"), "recorded_peak_scope": doc.get("peak_memory_scope")}


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    """The phases in order; each row adds what the phase's manifest records."""
    py, gpu = sys.executable, args.device == "cuda"
    ckpt, fwd, run_dir, pruned = work / "checkpoint", work / "run-stream", work / "run", work / "pruned"
    valid = data_dir() / "wikitext-2-tokens" / "valid.txt"
    dtype = "bfloat16" if gpu else "float32"
    calib = ["--dataset", str(valid), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
             "--batch-size", str(args.batch_size), "--dtype", dtype, "--device", args.device]
    grad_score = [py, str(CLI)]
    if args.nproc > 1:
        grad_score = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc), str(CLI)]
    score = ["score", str(ckpt), "--out"]
    phases = [  # name, command, the directory whose manifest it writes
        ("build", [py, __file__, "--build", str(ckpt), "--shape", args.shape, "--device", args.device], None),
        ("score --stream (forward-only)",
         [py, str(CLI), *score, str(fwd), "--stream", "--criteria", "wanda,magnitude,random,fluctuation", *calib], fwd),
        ("score taylor2" + (f" (torchrun x{args.nproc} --fsdp)" if args.nproc > 1 else ""),
         [*grad_score, *score, str(run_dir), "--criteria", "taylor2", "--accumulate", args.accumulate, *calib,
          *(["--fsdp"] if args.nproc > 1 else [])], run_dir),
        ("plan --ratio 0.2", [py, str(CLI), "plan", str(run_dir), "--ratio", "0.2", "--criterion", "taylor2"], None),
        ("apply --compensate lstsq",
         [py, str(CLI), "apply", str(run_dir / "plans" / "global-taylor2-0.20.json"), "--model", str(ckpt), "--out",
          str(pruned), "--compensate", "lstsq", "--calibration", str(valid), "--calibration-samples",
          str(args.num_samples), "--calibration-seq-len", str(args.seq_len), "--device", args.device], pruned),
        ("eval", [py, str(CLI), "eval", str(pruned), "--dataset", "wikitext2", "--data-dir", str(data_dir()),
                  "--max-windows", str(args.eval_windows), "--seq-len", str(args.seq_len), "--batch-size",
                  str(args.batch_size), "--dtype", dtype, "--device", args.device, "--out", str(work / "eval.json")],
         None),
    ]
    rows = []
    for name, cmd, out in phases:
        row = run_phase(name, cmd, gpu)
        if out is not None:
            row.update(recorded(out))
        if name == "build":
            row["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        rows.append(row)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> str:
    def gib(value) -> str:
        return f"{value / 2**30:8.2f}" if value else f"{'-':>8}"

    def sec(value) -> str:
        return f"{value:9.1f}" if value is not None else f"{'-':>9}"

    lines = [f"bench/scale: shape {args.shape}, {args.device}, {args.num_samples} x {args.seq_len} calibration "
             f"tokens, eval {args.eval_windows} windows, gradient scoring on {args.nproc} process(es), "
             f"accumulate {args.accumulate}",
             f"{'phase':44}{'wall s':>9}{'phase s':>9}{'refit s':>9}{'RSS GiB':>9}{'GPU GiB':>9}{'recorded GiB':>14}"]
    for r in rows:
        lines.append(f"{r['phase']:44}{sec(r['seconds'])}{sec(r.get('recorded_seconds'))}"
                     f"{sec(r.get('compensation_seconds'))} {gib(r['peak_rss_bytes'])} {gib(r['gpu_used_bytes'])}"
                     f"      {gib(r.get('recorded_peak_bytes'))}")
    lines.append("wall s: the process, startup and loading included; phase s: what its manifest records; refit s: "
                 "apply's lstsq compensation; RSS: peak resident set; GPU: nvidia-smi's most memory in use (sampled, "
                 "CUDA context included); recorded: score's peak_memory_bytes (its peak_memory_scope in --json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--nproc", type=int, default=1, help="Gradient scoring under torchrun --fsdp on N ranks.")
    parser.add_argument("--accumulate", choices=("fp32", "bf16"), default="fp32", help="w*G accumulator dtype.")
    parser.add_argument("--num-samples", type=int, default=32, help="Calibration windows (score and lstsq).")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--dir", type=Path, help="Work directory (default: a temporary one, removed at the end).")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build(args.build, args.shape, args.device)
        return []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-scale-") as tmp:
        rows = run(args, Path(tmp))
    print(report(rows, args), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
