"""Quality of every criterion and strategy on one model, from ONE scoring pass: perplexity, params, speed.

Scores the model once (all five criteria), makes every plan from that one table, applies each plan in
memory to a copy of the dense model and measures WikiText-2 perplexity, and forward tokens/s against
the dense model timed back to back in the same process. Writes ``quality.json`` and ``ppl_vs_ratio.png`` into ``--out``.

    python bench/quality.py --quick            # SmolLM2-135M, 48 eval windows of 128 tokens
    python bench/quality.py --tiny             # tiny random model (CI smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamaprune.apply.command import apply_plan  # noqa: E402
from llamaprune.apply.refit import CompensationOptions  # noqa: E402
from llamaprune.core.criteria import DEFAULT_CRITERIA  # noqa: E402
from llamaprune.evaluate.perplexity import perplexity  # noqa: E402
from llamaprune.io.text_data import calibration_windows, evaluation_windows, load_rows  # noqa: E402
from llamaprune.plan import PlanOptions, load_run, make_plan  # noqa: E402
from llamaprune.scoring.command import write_tables  # noqa: E402
from llamaprune.scoring.in_memory import score  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
RATIOS = (0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Case:
    """One row of the results: a label, the plan options, the error compensation applied with the plan
    (lstsq refits on the scoring windows), whether a LoRA finetune follows, and whether it belongs to the
    criterion x ratio sweep that the plot shows. The full criterion x allocation x compensation ablation, on the
    peers' protocol, is bench/compensation.py's."""

    label: str
    options: PlanOptions
    lora: bool = False
    sweep: bool = False
    compensation: str = "none"


def cases() -> list[Case]:
    out = [Case(f"global {c} {r:.0%}", PlanOptions(ratio=r, criterion=c), sweep=True)
           for c in DEFAULT_CRITERIA for r in RATIOS]
    layerwise = dict(criterion="taylor2", strategy="layerwise", distribution=(2, 8))
    out += [
        Case("layerwise 2:8 inverse taylor2 20%", PlanOptions(ratio=0.2, layer_strategy="inverse", **layerwise)),
        Case("layerwise 2:8 uniform taylor2 20%", PlanOptions(ratio=0.2, layer_strategy="uniform", **layerwise)),
        Case("global taylor2 30% --remove-empty-layers",
             PlanOptions(ratio=0.3, criterion="taylor2", remove_empty_layers=True, min_kv_heads=0,
                         min_mlp_channels=0)),
        Case("global taylor2 20% --uniform", PlanOptions(ratio=0.2, criterion="taylor2", uniform=True)),
        Case("global wanda 20% --normalize mean", PlanOptions(ratio=0.2, criterion="wanda", normalize="mean")),
        Case("global taylor2 20% + LoRA", PlanOptions(ratio=0.2, criterion="taylor2"), lora=True),
        Case("global taylor2 20% + bias", PlanOptions(ratio=0.2, criterion="taylor2"), compensation="bias"),
        Case("global taylor2 20% + lstsq", PlanOptions(ratio=0.2, criterion="taylor2"), compensation="lstsq"),
    ]
    return out


def load(args):
    """Model and tokenizer: the real model, or a tiny random one with the embedded model's tokenizer."""
    from llamaprune.io.loading import load_model

    if not args.tiny:
        loaded = load_model(args.model, args.dtype, args.device)
        return loaded.model, loaded.tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llamaprune.io.loading import embedded_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                         intermediate_size=2048, num_hidden_layers=4, vocab_size=len(tokenizer),
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval(), tokenizer


def measure(model, windows, batch_size: int) -> dict:
    result = perplexity(model, windows, batch_size=batch_size, progress=False)
    return {"ppl": result.ppl, "params": model.num_parameters()}


def forward_seconds(model, windows, batch_size: int) -> float:
    """Wall time of a forward pass over ``windows`` after one warm-up batch."""
    with torch.inference_mode():
        model(input_ids=windows[:batch_size], use_cache=False)
        if windows.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
        if windows.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def speedup(dense, pruned, windows, batch_size: int) -> float:
    """Forward tokens/s of ``pruned`` over ``dense``, timed back to back so that machine noise mostly cancels."""
    return forward_seconds(dense, windows, batch_size) / forward_seconds(pruned, windows, batch_size)


def lora_recover(model, tokenizer, args) -> tuple[object, dict]:
    from llamaprune.recover.finetune import FinetuneOptions, finetune, merge_lora

    options = FinetuneOptions(dataset=args.calibration, samples=args.lora_samples, seq_len=args.lora_seq_len,
                              epochs=1, batch_size=8, seed=0)
    start = time.perf_counter()
    result = finetune(model, tokenizer, options, progress=False)
    info = {"samples": args.lora_samples, "seq_len": args.lora_seq_len, "steps": result.steps,
            "seconds": time.perf_counter() - start}
    return merge_lora(result.model), info


def compensate(method: str, model, tokenizer, plan, run: Path, args) -> dict:
    """The o_proj / down_proj tensors that ``method`` writes; lstsq refits on the scoring windows."""
    from llamaprune.io.loading import LoadedModel, Source

    options = CompensationOptions(method, args.calibration, args.num_samples, args.seq_len)
    loaded = LoadedModel(model, tokenizer, Source("bench", "dir", ""))
    return options.compensate(plan, model.config, loaded=loaded, rows=options.rows(run, plan.criterion), run_dir=run,
                              progress=False).tensors


def plot(rows: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for criterion in DEFAULT_CRITERIA:
        points = sorted((r["ratio"], r["ppl"]) for r in rows if r["criterion"] == criterion and r["sweep"])
        ax.plot([0] + [p[0] for p in points], [dense_ppl] + [p[1] for p in points], marker="o", label=criterion)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of total parameters removed (global plan)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="48 eval windows and 240 LoRA samples; the default is every window and 400.")
    parser.add_argument("--tiny", action="store_true", help="Tiny random model, few windows (smoke test).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default=None,
                        help="Calibration text (default: wikitext-2-tokens/valid.txt under --data-dir).")
    parser.add_argument("--data-dir", default=os.environ.get("LLAMAPRUNE_DATA_DIR") or str(SHARED),
                        help="Local copy of the datasets (default: $LLAMAPRUNE_DATA_DIR, else ../shared/data).")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-lens", default=None, help="Comma-separated; default 128 (quick) or 128,512.")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-samples", type=int, default=400)
    parser.add_argument("--lora-seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    args = parser.parse_args(argv)
    args.calibration = args.calibration or str(Path(args.data_dir) / "wikitext-2-tokens" / "valid.txt")
    if args.tiny:
        args.num_samples, args.seq_len, args.lora_samples, args.lora_seq_len = 8, 32, 16, 32
        args.max_windows = args.max_windows or 4
    elif args.quick:
        args.max_windows = args.max_windows or 48
        args.lora_samples = min(args.lora_samples, 240)
    seq_lens = [int(s) for s in (args.eval_seq_lens or ("128" if args.quick or args.tiny else "128,512")).split(",")]

    model, tokenizer = load(args)
    test_rows = load_rows("wikitext2", split="test", data_dir=args.data_dir)
    windows = {L: evaluation_windows(tokenizer, test_rows, L, args.max_windows) for L in seq_lens}
    windows = {L: w.to(model.device) for L, w in windows.items()}
    print(f"bench/quality: {args.model if not args.tiny else 'tiny random model'}; eval "
          + ", ".join(f"{w.shape[0]} windows x {L} tokens" for L, w in windows.items())
          + " of the WikiText-2 raw test split", flush=True)

    dense = {L: measure(model, w, args.batch_size) for L, w in windows.items()}
    speed_windows = windows[seq_lens[0]][: 2 * args.batch_size]
    print(f"  dense: params {dense[seq_lens[0]]['params']:,}  "
          + "  ".join(f"ppl@{L} {d['ppl']:.2f}" for L, d in dense.items()), flush=True)

    calib = calibration_windows(tokenizer, load_rows(args.calibration), args.num_samples, args.seq_len, seed=0)
    result = score(model, calib.split(args.batch_size), DEFAULT_CRITERIA, progress=False)
    print(f"  score ({','.join(DEFAULT_CRITERIA)}; {args.num_samples} x {args.seq_len} tokens): {result.seconds:.1f} s",
          flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        write_tables(run, result)
        tables = load_run(run)
        for case in cases():
            start = time.perf_counter()
            try:
                plan = make_plan(tables, case.options)
            except ValueError as err:  # e.g. a ratio a tiny model cannot reach
                print(f"  {case.label:<42} skipped: {err}", flush=True)
                rows.append({"label": case.label, "criterion": case.options.criterion, "sweep": False,
                             "error": str(err)})
                continue
            plan_seconds = time.perf_counter() - start
            extra = {}
            replace = {}
            if case.compensation != "none":
                start = time.perf_counter()
                replace = compensate(case.compensation, model, tokenizer, plan, run, args)
                extra["compensation_seconds"] = time.perf_counter() - start
            pruned = apply_plan(copy.deepcopy(model), plan, replace)
            if case.lora:
                pruned, extra["lora"] = lora_recover(pruned, tokenizer, args)
            row = {"label": case.label, "criterion": case.options.criterion, "ratio": case.options.ratio,
                   "sweep": case.sweep,
                   "achieved_ratio": plan.achieved_ratio, "plan_seconds": plan_seconds,
                   "removed_layers": len(plan.removed_layers), **extra}
            for L, w in windows.items():
                m = measure(pruned, w, args.batch_size)
                row.update({f"ppl@{L}": m["ppl"], "params": m["params"]})
            row["ppl"] = row[f"ppl@{seq_lens[0]}"]
            row["speedup"] = speedup(model, pruned, speed_windows, args.batch_size)
            rows.append(row)
            print(f"  {case.label:<42} achieved {plan.achieved_ratio:6.1%}  plan {plan_seconds * 1000:6.0f} ms  "
                  + "  ".join(f"ppl@{L} {row[f'ppl@{L}']:9.2f}" for L in windows)
                  + f"  forward x{row['speedup']:.2f} tok/s"
                  + (f"  (LoRA {extra['lora']['steps']} steps, {extra['lora']['seconds']:.0f} s)" if case.lora else ""),
                  flush=True)
            del pruned

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": "tiny" if args.tiny else args.model,
        "device": str(model.device), "dtype": str(model.dtype),
        "calibration": {"source": Path(args.calibration).name, "num_samples": args.num_samples,
                        "seq_len": args.seq_len},
        "eval": {str(L): {"windows": int(w.shape[0]), "seq_len": L} for L, w in windows.items()},
        "score_seconds": result.seconds,
        "dense": {str(L): d for L, d in dense.items()},
        "speed_windows": int(speed_windows.shape[0]),
        "rows": rows,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, dense[seq_lens[0]]["ppl"], out / "ppl_vs_ratio.png")
    print(f"  wrote {out / 'quality.json'} and {out / 'ppl_vs_ratio.png'}", flush=True)
    return report


if __name__ == "__main__":
    main()
