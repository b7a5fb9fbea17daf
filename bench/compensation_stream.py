"""Benchmark of streamed ``llamaprune apply --compensate lstsq``: what the sequential refit holds in memory.

Builds bench/score_stream.py's synthetic multi-shard bfloat16 llama checkpoint (about 1.2B parameters, with the
embedded model's tokenizer) and bench/apply.py's ~20% heterogeneous plan for it, then applies the plan streamed,
each in a fresh subprocess: (a) plainly sliced, (b) with the least-squares refit on 8 x 64 tokens of WikiText-2
valid, (c) the refit 0.3 of the way to the dense hidden states (``prune``'s target: a dense stream beside the pruned
one), (d) the refit with obs selection. The refit should hold one decoder layer (float32, as it computes), the
fit's float64 state for the widest projection (the augmented Gram matrix of all its inputs, and while it is solved
the kept columns' system and its target) and the calibration activations, on top of what the plain streamed
apply holds; this prints that budget beside the measured peak.

    $ .venv/bin/python bench/compensation_stream.py           # ~2.4 GB of disk under $TMPDIR
    $ .venv/bin/python bench/compensation_stream.py --methods none,lstsq,residual   # no obs (it took 45 min here)
    $ .venv/bin/python bench/compensation_stream.py --tiny    # a tiny checkpoint: a smoke test of the script
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from apply import in_subprocess, make_plan, publish, rss_bytes  # noqa: E402
from score_stream import synthetic_parser  # noqa: E402

BUILDER = ROOT / "bench" / "score_stream.py"


METHODS = ("none", "lstsq", "residual", "obs")


def methods(text: str) -> list[str]:
    """The applies to run, in ``METHODS``' order: the sliced and the plain refit ones always (the others are
    measured against them)."""
    asked = set(text.split(","))
    if not asked <= set(METHODS):
        raise SystemExit(f"--methods takes {', '.join(METHODS)}; got {text}")
    return [m for m in METHODS if m in asked | {"none", "lstsq"}]


def apply_streamed(src: Path, plan: Path, out: Path, method: str, calibration: Path, num_samples: int,
                   seq_len: int) -> dict:
    """``llamaprune apply`` as the CLI runs it, compensating with ``method``."""
    from transformers import AutoTokenizer  # noqa: F401  (the CLI's imports, outside the measured part)

    from llamaprune.apply.command import ApplyOptions, apply
    from llamaprune.apply.refit import DEFAULT_RESIDUAL_SHARE, CompensationOptions
    from llamaprune.io.loading import register

    register()
    imported = rss_bytes()
    start = time.perf_counter()
    extra = {"obs": dict(select="obs"),
             "residual": dict(target="residual", residual_share=DEFAULT_RESIDUAL_SHARE)}.get(method, {})
    compensation = CompensationOptions("none" if method == "none" else "lstsq", str(calibration), num_samples,
                                       seq_len, **extra)
    apply(ApplyOptions(plan=plan, model=str(src), out=out, compensation=compensation))
    return {"seconds": time.perf_counter() - start, "peak_rss": rss_bytes(), "rss_after_imports": imported}


def refit_budget(src: Path, plan_path: Path, tokens: int) -> dict:
    """Bytes of the largest decoder layer in float32, of the largest refit's float64 state (the whole input's
    augmented Gram matrix (n+1)^2, which obs's choice shares, beside the kept inputs' system (k+1)^2 and its target
    (k+1) x out while it is formed) and of the float32 hidden states (three copies at most)."""
    from transformers import AutoConfig

    from llamaprune.apply.slicing import kept_indices
    from llamaprune.core.plan_file import read_plan

    config, plan = AutoConfig.from_pretrained(src), read_plan(plan_path)
    d, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    layer = 4 * (2 * d * config.num_attention_heads * head_dim + 2 * d * config.num_key_value_heads * head_dim
                 + 3 * d * i)
    widest = max(len(kept["mlp"]) for kept in kept_indices(plan).values())
    fit = 8 * ((i + 1) ** 2 + (widest + 1) ** 2 + (widest + 1) * d)
    # obs: the Gram matrix of the widest projection's whole input, its inverse and the greedy's working copy, and
    # the weights twice (float64)
    choice = 8 * (3 * (i + 1) ** 2 + 2 * (i + 1) * d)
    return {"layer_fp32": layer, "largest_fit": fit, "activations": 3 * 4 * tokens * d, "widest_kept": widest,
            "obs_choice": choice}


def run(workdir: Path, tiny: bool, calibration: Path, num_samples: int, seq_len: int, chosen: list[str]) -> dict:
    """Build and plan, then each apply in a fresh interpreter (this one imports no torch: Linux keeps a
    process's peak RSS across fork and exec)."""
    src, plan = workdir / "checkpoint", workdir / "plan.json"
    built = in_subprocess("build", src, int(tiny), script=str(BUILDER))
    planned = in_subprocess("plan", src, plan, script=__file__)
    print(f"built the checkpoint in {built['build_seconds']:.1f} s", flush=True)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    peaks = {method: in_subprocess("apply", src, plan, workdir / f"out-{method}", method, calibration,
                                   num_samples, seq_len, script=__file__) for method in chosen}
    budget = in_subprocess("budget", src, plan, num_samples * seq_len, script=__file__)
    held = peaks["lstsq"]["peak_rss"] - peaks["none"]["peak_rss"]
    refit = sum(budget[k] for k in ("layer_fp32", "largest_fit", "activations"))
    figures = {
        **planned, "checkpoint_bytes": size, "windows": [num_samples, seq_len], "peaks": peaks, "budget": budget,
        "lstsq_over_checkpoint": peaks["lstsq"]["peak_rss"] / size,
        "refit_held_bytes": held,
        "refit_held_over_budget": held / refit,
    }
    # what each apply beyond the plain refit holds besides its budget: the dense stream's hidden states (one more
    # copy of the activations), the choice's float64 state
    for method, extra in (("residual", budget["activations"] / 3), ("obs", budget["obs_choice"])):
        if method in peaks:
            held_by = peaks[method]["peak_rss"] - peaks["none"]["peak_rss"]
            figures.update({f"{method}_held_bytes": held_by, f"{method}_held_over_budget": held_by / (refit + extra),
                            f"{method}_seconds_over_lstsq": peaks[method]["seconds"] / peaks["lstsq"]["seconds"]})
    return figures


def report(figures: dict) -> str:
    gb, size, budget = 1e9, figures["checkpoint_bytes"], figures["budget"]
    refit = sum(budget[k] for k in ("layer_fp32", "largest_fit", "activations"))

    def row(name: str, method: str) -> str:
        peak = figures["peaks"][method]
        return (f"{name:30}{peak['seconds']:9.1f}{peak['peak_rss'] / gb:13.2f}{peak['peak_rss'] / size:14.2f}"
                f"{peak['rss_after_imports'] / gb:22.2f}")

    lines = [
        f"checkpoint: bfloat16, {size / gb:.2f} GB; plan {figures['achieved_ratio']:.1%} removed (heterogeneous); "
        f"calibration {figures['windows'][0]} x {figures['windows'][1]} tokens",
        f"{'':30}{'seconds':>9}{'peak RSS GB':>13}{'/ checkpoint':>14}{'RSS after imports GB':>22}",
        row("apply (streamed, sliced)", "none"),
        row("apply --compensate lstsq", "lstsq"),
        *([row("  --target residual (0.3)", "residual")] if "residual" in figures["peaks"] else []),
        *([row("  --select obs", "obs")] if "obs" in figures["peaks"] else []),
        f"the refit's peak above the sliced apply's: {figures['refit_held_bytes'] / gb:.2f} GB; budget "
        f"{refit / gb:.2f} GB = one layer in float32 "
        f"{budget['layer_fp32'] / gb:.2f} + the widest fit ({budget['widest_kept']} kept inputs) "
        f"{budget['largest_fit'] / gb:.2f} + activations {budget['activations'] / gb:.3f}; held / budget "
        f"{figures['refit_held_over_budget']:.2f}",
    ]
    for method, flag_name, what, extra in (
            ("residual", "--target residual", "the dense stream's hidden states", budget["activations"] / 3),
            ("obs", "--select obs", "the choice's float64 state", budget["obs_choice"])):
        if method in figures["peaks"]:
            lines.append(
                f"with {flag_name}: {figures[f'{method}_held_bytes'] / gb:.2f} GB above the sliced apply's; budget + "
                f"{what} {extra / gb:.3f} GB; held / budget {figures[f'{method}_held_over_budget']:.2f}; time "
                f"x{figures[f'{method}_seconds_over_lstsq']:.2f} the lstsq apply's")
    return "\n".join(lines)


def main() -> None:
    parser = synthetic_parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"Applies to run, comma-separated among {', '.join(METHODS)} (none and lstsq always).")
    args = parser.parse_args()
    if args.measure:
        kind, *rest = args.measure
        if kind == "plan":
            figures = make_plan(Path(rest[0]), Path(rest[1]))
        elif kind == "budget":
            figures = refit_budget(Path(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            src, plan, out, method, calibration, *sizes = rest
            figures = apply_streamed(Path(src), Path(plan), Path(out), method, Path(calibration), *map(int, sizes))
        print(json.dumps(figures))
        return
    calibration = args.data_dir / "wikitext-2-tokens" / "valid.txt"
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-compensation-stream-") as tmp:
        figures = run(Path(tmp), args.tiny, calibration, args.num_samples, args.seq_len, methods(args.methods))
    publish(report(figures), figures, "--tiny" if args.tiny else None, args.json)


if __name__ == "__main__":
    main()
