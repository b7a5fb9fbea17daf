"""Cost of scoring against bare loops over the same batches, in one process: time and peak memory ratios.

Baselines: a bare forward loop (no grad), and a bare forward+backward loop that keeps .grad (a full
gradient copy). Measured: ``score`` with forward-only criteria (wanda, magnitude, random) and with
taylor+taylor2+wanda. Peak memory is the process's resident set sampled every millisecond (CPU) or
torch's peak allocation (CUDA), including the model's weights; freed memory is handed back to the OS
(malloc_trim) before each run so that one run's peak is not another's leftover.

    python bench/score.py --num-samples 32              # SmolLM2-135M, valid.txt calibration
    python bench/score.py --tiny                        # a tiny random model (CI smoke test)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaprune.scoring.in_memory import score  # noqa: E402

VALID_TXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-tokens" / "valid.txt"
GOALS = {"grad_time": 1.25, "grad_peak": 1.1, "forward_time": 1.15}


def _release_freed_memory() -> None:
    """Hand memory freed by earlier runs back to the OS, so each run's RSS peak is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory while the block runs: CUDA peak allocation, or RSS sampled by a thread (CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_freed_memory()
        self._stop = threading.Event()
        self.peak = _rss_bytes()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def bare_forward(model, batches):
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)


def bare_backward(model, batches):
    for b in batches:
        model(input_ids=b, labels=b, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def measure(name, fn, device) -> tuple[float, int]:
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"  {name:<32} {seconds:8.2f} s   peak {peak.peak / 2**20:8.0f} MiB", flush=True)
    return seconds, peak.peak


def load(args):
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                             num_hidden_layers=2, vocab_size=256)
        model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
        windows = torch.randint(0, 256, (args.num_samples, args.seq_len))
        return model, windows
    from llamaprune.io.loading import load_model
    from llamaprune.io.text_data import calibration_windows, load_rows

    loaded = load_model(args.model, args.dtype, args.device)
    windows = calibration_windows(loaded.tokenizer, load_rows(args.dataset), args.num_samples, args.seq_len, 0)
    return loaded.model, windows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(VALID_TXT))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="Interleaved repeats; the fastest of each counts.")
    parser.add_argument("--tiny", action="store_true", help="A tiny random model instead (smoke test).")
    args = parser.parse_args(argv)
    model, windows = load(args)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in windows.split(args.batch_size)]
    print(f"bench/score: {args.num_samples} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{'tiny model' if args.tiny else args.model}, {device}, {next(model.parameters()).dtype}", flush=True)
    bare_forward(model, batches[:1])  # warm-up
    runs = {
        "bare forward": lambda: bare_forward(model, batches),
        "score wanda,magnitude,random": lambda: score(model, batches, ("wanda", "magnitude", "random"),
                                                      progress=False),
        "bare forward+backward (.grad)": lambda: bare_backward(model, batches),
        "score taylor,taylor2,wanda": lambda: score(model, batches, ("taylor", "taylor2", "wanda"), progress=False),
    }
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, peak = measure(name, fn, device)
            old = best.get(name, (float("inf"), 0))
            best[name] = (min(old[0], seconds), max(old[1], peak))
    ratios = {
        "forward_time": best["score wanda,magnitude,random"][0] / best["bare forward"][0],
        "grad_time": best["score taylor,taylor2,wanda"][0] / best["bare forward+backward (.grad)"][0],
        "grad_peak": best["score taylor,taylor2,wanda"][1] / best["bare forward+backward (.grad)"][1],
    }
    print("ratios (goal):")
    for key, value in ratios.items():
        print(f"  {key:<14} {value:6.3f}  (<= {GOALS[key]})  {'ok' if value <= GOALS[key] else 'MISSED'}")
    return ratios


if __name__ == "__main__":
    main()
