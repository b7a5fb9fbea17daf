"""Benchmark of ``llamaprune export --format gguf``: llama.cpp speed and file size of a pruned model against its
dense source, both exported by llamaprune in the same type and measured in one process, alternating, and how
closely llama.cpp's logits follow transformers' for each.

Per round and model: prompt processing (one ``eval`` of ``--prompt`` tokens) and generation (``--generate``
greedy tokens after a short prompt), each in tokens/s; the median over ``--rounds`` rounds is reported.
Agreement: max |llama.cpp logit - transformers logit| / max |transformers logit| over the first 64 prompt
tokens, and whether the greedy next token agrees at every position. Needs llama-cpp-python.

    $ llamaprune score smollm2-135m --out run --num-samples 8 --seq-len 64 --criteria taylor
    $ llamaprune plan run --ratio 0.2 --criterion taylor
    $ llamaprune apply run/plans/global-taylor-0.20.json --model smollm2-135m --out pruned
    $ .venv/bin/python bench/gguf_speed.py pruned --dense smollm2-135m --work /tmp/gguf-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def export_both(pruned: Path, dense: str, work: Path, outtype: str) -> dict[str, Path]:
    from llamaprune.export.gguf import ExportOptions, export

    files = {"dense": work / f"dense-{outtype}.gguf", "pruned": work / f"pruned-{outtype}.gguf"}
    for name, source in (("dense", dense), ("pruned", pruned)):
        export(ExportOptions(Path(source), files[name], outtype=outtype, overwrite=True))
    return files


def speeds(llm, prompt: list[int], generate: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one round."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_speed = len(prompt) / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    for count, _ in enumerate(llm.generate(prompt[:8], temp=0.0, top_k=1), start=1):
        if count == generate:
            break
    return prompt_speed, generate / (time.perf_counter() - start)


def agreement(path: Path, source: str, tokens: list[int]) -> dict:
    """llama.cpp's logits of ``path`` against transformers' of the checkpoint it was exported from."""
    import llama_cpp
    import numpy as np
    import torch

    from llamaprune.io.loading import load_model

    model = load_model(source).model
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].double().numpy()
    del model
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=len(tokens) + 8, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    return {"relative_error": float(np.abs(got - want).max() / np.abs(want).max()),
            "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path, help="pruned checkpoint directory (llamaprune apply)")
    parser.add_argument("--dense", default="smollm2-135m", help="its source: checkpoint dir or smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llamaprune-gguf-bench"))
    parser.add_argument("--outtype", default="f32")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per round")
    parser.add_argument("--generate", type=int, default=64, help="generated tokens per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    import llama_cpp

    args.work.mkdir(parents=True, exist_ok=True)
    files = export_both(args.pruned, args.dense, args.work, args.outtype)
    models = {
        name: llama_cpp.Llama(str(path), n_ctx=args.prompt + args.generate + 16, n_threads=args.threads,
                              n_batch=args.prompt, verbose=False)
        for name, path in files.items()
    }
    prompt = [(17 * i + 5) % 40000 + 100 for i in range(args.prompt)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, llm in models.items():  # alternating, so drift of a shared machine hits both
            results[name].append(speeds(llm, prompt, args.generate))
    report = {}
    for name, rounds in results.items():
        report[name] = {
            "file": str(files[name]),
            "bytes": files[name].stat().st_size,
            "prompt_tokens_per_s": round(statistics.median(r[0] for r in rounds), 1),
            "generate_tokens_per_s": round(statistics.median(r[1] for r in rounds), 1),
        }
    for name, source in (("dense", args.dense), ("pruned", str(args.pruned))):
        report[name]["agreement"] = agreement(files[name], source, prompt[:64])
    dense, pruned = report["dense"], report["pruned"]
    report["ratios"] = {
        key: round(pruned[key] / dense[key], 3) for key in ("bytes", "prompt_tokens_per_s", "generate_tokens_per_s")
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
