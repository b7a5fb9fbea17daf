"""The benchmark scripts run end to end on a tiny model, so they cannot rot. Timings are not asserted; what the tiny
runs must produce is: the tiny model's size, every plan's parameters from its achieved ratio, finite positive
perplexities and ratios, and the same figures in the JSON, the printed lines and RESULTS.md."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bench/quality.py --tiny: a random LLaMA of hidden size 192, 6 query and 2 KV heads of 32, MLP 2048, 4 layers and
# tied embeddings of the embedded tokenizer's 49,152 tokens; 8 x 32 calibration tokens, 4 windows of 128 to evaluate.
HIDDEN, LAYERS, VOCAB = 192, 4, 49152
TINY_PARAMS = VOCAB * HIDDEN + LAYERS * (HIDDEN * 32 * (2 * 6 + 2 * 2) + 3 * HIDDEN * 2048 + 2 * HIDDEN) + HIDDEN
CRITERIA = ["taylor", "taylor2", "wanda", "magnitude", "random", "fluctuation"]
LABELS = [f"global {c} {r}%" for c in CRITERIA for r in (10, 20, 30)] + [
    "layerwise 2:8 inverse taylor2 20%",
    "layerwise 2:8 uniform taylor2 20%",
    "global taylor2 30% --remove-empty-layers",
    "global taylor2 20% --uniform",
    "global wanda 20% --normalize mean",
    "global taylor2 20% + LoRA",
    "global taylor2 20% + bias",
    "global taylor2 20% + lstsq",
]
UNREACHABLE = ["layerwise 2:8 inverse taylor2 20%", "layerwise 2:8 uniform taylor2 20%"]
SCORE_RATIOS = {"forward_time": 1.15, "grad_time": 1.25, "grad_peak": 1.1}  # bench/score.py's goals


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_quality(report: dict) -> None:
    """bench/quality.py --tiny's quality.json: its settings, the dense model and a sane row per plan."""
    assert {k: report[k] for k in ("model", "device", "dtype", "calibration", "eval", "speed_windows")} == {
        "model": "tiny", "device": "cpu", "dtype": "torch.float32",
        "calibration": {"source": "valid.txt", "num_samples": 8, "seq_len": 32},
        "eval": {"128": {"windows": 4, "seq_len": 128}}, "speed_windows": 4,
    }
    assert finite_positive(report["score_seconds"])
    dense = report["dense"]["128"]
    assert dense["params"] == TINY_PARAMS
    assert VOCAB / 2 < dense["ppl"] < VOCAB * 2, dense  # random weights: about as unsure as a uniform guess
    rows = report["rows"]
    assert [row["label"] for row in rows] == LABELS
    # The layerwise 2:8 split can remove at most 6.75% of the tiny model; every other plan is reachable.
    errors = {row["label"]: row["error"] for row in rows if "error" in row}
    assert list(errors) == UNREACHABLE, errors
    unreachable = "ratio 0.2 is unreachable: with these constraints at most 0.0675 "
    assert all(error.startswith(unreachable) for error in errors.values()), errors
    for row in rows:
        if "error" in row:
            continue
        assert 0 < row["achieved_ratio"] <= row["ratio"], row
        assert row["sweep"] == (row["label"] in LABELS[:18]), row
        plan_after = dense["params"] * (1 - row["achieved_ratio"])
        if "compensation_seconds" in row:  # o_proj / down_proj may gain output biases
            assert finite_positive(row["compensation_seconds"])
            assert plan_after - 0.5 < row["params"] <= plan_after + 2 * LAYERS * HIDDEN + 0.5, row
        else:
            assert abs(row["params"] - plan_after) < 0.5, row
        assert finite_positive(row["ppl"]) and row["ppl"] == row["ppl@128"] > 1, row
        assert finite_positive(row["speedup"]) and math.isfinite(row["plan_seconds"]) and row["plan_seconds"] >= 0
        assert isinstance(row["removed_layers"], int) and 0 <= row["removed_layers"] < LAYERS, row
    lora = next(row for row in rows if "+ LoRA" in row["label"])["lora"]  # 16 samples, a batch of 8 held out
    assert {k: lora[k] for k in ("samples", "seq_len", "steps")} == {"samples": 16, "seq_len": 32, "steps": 1}
    assert finite_positive(lora["seconds"])
    for c in CRITERIA:  # a larger ratio removes more
        sweep = [row for row in rows if row["criterion"] == c and row["sweep"]]
        assert [row["ratio"] for row in sweep] == [0.1, 0.2, 0.3]
        assert sweep[0]["params"] > sweep[1]["params"] > sweep[2]["params"], sweep


def score_ratios(text: str) -> dict[str, float]:
    """bench/score.py's "ratios (goal):" lines, each checked against its goal and its ok / MISSED verdict."""
    found = re.findall(r"^ +(\w+) +(\S+) +\(<= ([\d.]+)\) +(ok|MISSED)$", text.split("ratios (goal):")[1], re.M)
    ratios = {}
    for key, value, goal, verdict in found:
        ratios[key] = float(value)
        assert float(goal) == SCORE_RATIOS[key] and verdict == ("ok" if float(value) <= float(goal) else "MISSED")
    assert list(ratios) == list(SCORE_RATIOS) and all(map(finite_positive, ratios.values())), ratios
    return ratios


def test_bench_run_tiny_writes_results(tmp_path):
    """It rewrites its own sections and keeps the separately run benchmarks' part below the marker."""
    kept = "<!-- Below: figures from benchmarks run on their own (...) -->\n\n## Error compensation\n\n| a | b |\n"
    (tmp_path / "RESULTS.md").write_text("# old\n\n## Quality (old)\n\nstale\n\n" + kept)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = (tmp_path / "RESULTS.md").read_text()
    for section in ("## Quality", "| dense |", "global taylor2 20% + LoRA", "global taylor2 20% + lstsq",
                    "## Scoring cost", "## Planning cost", "## Apply cost"):
        assert section in results
    assert "stale" not in results and results.endswith(kept) and results.count("## Error compensation") == 1
    assert (tmp_path / "ppl_vs_ratio.png").stat().st_size > 1000
    check_results(results, json.loads((tmp_path / "quality.json").read_text()))


def check_results(results: str, report: dict) -> None:
    """RESULTS.md's quality table shows quality.json's figures, and its scoring section bench/score.py's ratios."""
    check_quality(report)
    table = {line.split(" | ")[0].removeprefix("| "): line for line in results.splitlines() if line.startswith("| ")}
    dense = report["dense"]["128"]
    assert table["dense"] == f"| dense | 0% | {dense['params']:,} | {dense['ppl']:.2f} | 1.00 | |"
    for row in report["rows"]:
        if "error" in row:
            assert table[row["label"]] == f"| {row['label']} | unreachable | |  | | |"
            continue
        label = row["label"] + (f" ({row['lora']['steps']} LoRA steps, {row['lora']['seconds']:.0f} s)"
                                if "lora" in row else "")
        assert table[label] == (f"| {label} | {row['achieved_ratio']:.1%} | {row['params']:,} | {row['ppl']:.2f} | "
                                f"{row['speedup']:.2f} | {row['plan_seconds'] * 1000:.0f} |")
    score_ratios(results.split("## Scoring cost")[1].split("## ")[0])


def test_gpu_script_runs_on_cpu(tmp_path):
    """bench/gpu.sh on CPU: quality (its quality.json under $OUT, its rows as printed), scoring cost ratios and
    every phase of bench/scale.py, run by the tests' own Python ($PYTHON)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--dtype", "float32", "--tiny"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    check_gpu_output(done.stdout, json.loads((tmp_path / "quality.json").read_text()))


SCALE_PHASES = ["build", "score --stream (forward-only)", "score taylor2", "plan --ratio 0.2",
                "apply --compensate lstsq", "eval"]


def check_gpu_output(out: str, report: dict) -> None:
    """What bench/gpu.sh --tiny prints and writes: quality's rows as in its JSON, scoring's ratios, scale's phases."""
    assert "bench/quality: tiny random model; eval 4 windows x 128 tokens" in out
    check_quality(report)
    for row in report["rows"]:
        if "error" not in row:
            assert f"  {row['label']:<42} achieved {row['achieved_ratio']:6.1%}" in out, row["label"]
    assert "bench/score: 8 x 32 tokens, batch 8, tiny model, cpu, torch.float32" in out
    score_ratios(out.split("bench/score:")[1].split("-- build:")[0])
    scale = out.split("bench/scale: shape tiny, cpu,")[1].splitlines()[2:]
    rows = [line for line in scale if line[:44].strip() in SCALE_PHASES]
    assert [line[:44].strip() for line in rows] == SCALE_PHASES, scale
    assert all(finite_positive(float(line[44:53])) for line in rows), rows  # every phase's wall seconds


def test_scale_bench_runs_tiny(tmp_path):
    """Every phase through the CLI on the tiny shape; needs `score --stream` and `score --accumulate`."""
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--shape", "tiny", "--device", "cpu",
                           "--dir", str(tmp_path), "--json", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    rows = {r["phase"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["build", "score --stream (forward-only)", "score taylor2", "plan --ratio 0.2",
                          "apply --compensate lstsq", "eval"]
    assert all(rows[p]["recorded_peak_bytes"] > 0 for p in ("score --stream (forward-only)", "score taylor2"))
    assert rows["apply --compensate lstsq"]["compensation_seconds"] > 0


def test_compensation_bench_runs_tiny(tmp_path):
    out = tmp_path / "compensation.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compensation.py"), "--tiny", "--cases", "0,2,3",
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["compensation"] for r in rows] == ["none", "lstsq", "bias"]


def test_streamed_scoring_bench_runs_tiny(tmp_path):
    out = tmp_path / "score_stream.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "score_stream.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streamed peak RSS / checkpoint size" in done.stdout
    import json

    figures = json.loads(out.read_text())
    assert figures["peaks"]["stream"]["scoring_peak_scope"] in ("scoring", "process")
    assert figures["stream_over_checkpoint"] > 0 and figures["full_over_checkpoint"] > 0


def test_streamed_compensation_bench_runs_tiny(tmp_path):
    out = tmp_path / "compensation_stream.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compensation_stream.py"), "--tiny", "--json",
                           str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the refit's peak above the sliced apply's" in done.stdout
    import json

    figures = json.loads(out.read_text())
    assert figures["peaks"]["lstsq"]["peak_rss"] >= figures["peaks"]["none"]["rss_after_imports"] > 0
    assert figures["budget"]["widest_kept"] > 0 and figures["budget"]["largest_fit"] > 0
    assert "with --select obs" in done.stdout and figures["budget"]["obs_choice"] > 0
    assert figures["peaks"]["obs"]["peak_rss"] >= figures["peaks"]["obs"]["rss_after_imports"] > 0
    assert "with --target residual" in done.stdout and figures["residual_held_over_budget"] > 0
    assert figures["peaks"]["residual"]["peak_rss"] >= figures["peaks"]["residual"]["rss_after_imports"] > 0


def test_recovery_bench_runs_tiny(tmp_path):
    """bench/recovery.py --tiny: a row per method after the pruned one, each's share recovered on both domains
    (None where the tiny random model's pruning lost nothing), and the one-step peaks of KD against LM."""
    out = tmp_path / "recovery.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "recovery.py"), "--tiny", "--methods",
                           "lm-lora,kd-full", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("none", 0), ("lm-lora", 2), ("kd-full", 2)]
    assert [r["lr"] for r in rows[1:]] == [1e-4, 1e-5]  # each method's default
    for row in rows:
        assert finite_positive(row["ppl128"]) and finite_positive(row["other_ppl128"]), row
    for row, before in ((row, rows[0]) for row in rows[1:]):
        for prefix in ("", "other_"):
            dense, pruned, tuned = report["dense"][f"{prefix}ppl128"], before[f"{prefix}ppl128"], row[f"{prefix}ppl128"]
            share = row[f"{prefix}recovered"]
            assert share == (round((pruned - tuned) / (pruned - dense), 4) if pruned > dense else None), row
        assert finite_positive(row["seconds"]) and row["peak_mib"] > 0 and row["validation"][0]["step"] == 0
    assert "lm_loss" in rows[2]["validation"][0] and "lm_loss" not in rows[1]["validation"][0]
    peak = report["peak"]
    assert peak["kd_peak_mib"] >= peak["teacher_mib"] > 0 and finite_positive(peak["kd_over_lm"])
    assert f"one step's peak: {json.dumps(peak)}" in done.stdout
    assert (tmp_path / "recovery_curves.png").stat().st_size > 1000


def test_recovery_bench_keeps_each_ratios_compensated_model(tmp_path):
    """bench/recovery.py --pruned: the first invocation saves the compensated model (chosen as ``prune`` does, by
    obs among 1.25x the plan's groups), a later one loads it instead of compensating again, and starts from the same
    perplexities; one chosen otherwise is refused. With ``--text sampled`` the dense model's own text is written
    there once, enough for every step, and read again by the later invocation."""
    kept = tmp_path / "students"
    weights = kept / "0.2" / "model.safetensors"
    sampled = kept / "sampled_6x32.jsonl"  # --tiny: 2 steps of 2 windows of 32 tokens, and the held-out share

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench" / "recovery.py"), "--tiny", "--methods", "lm-lora",
                               "--no-peak", "--pruned", str(kept), "--lr", "3e-3", "--text", "sampled", "--out",
                               str(tmp_path / f"{name}.json"), *extra], capture_output=True, text=True, cwd=tmp_path)

    def report(name: str) -> dict:
        done = run(name)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / f"{name}.json").read_text())

    first = report("first")
    written, text_written = weights.stat().st_mtime_ns, sampled.stat().st_mtime_ns
    texts = [json.loads(line)["text"] for line in sampled.read_text().splitlines()]
    assert len(texts) == 7 and all(texts)  # 5% more than the 6 windows asked
    second = report("second")
    assert weights.stat().st_mtime_ns == written  # loaded, not made and saved again
    assert sampled.stat().st_mtime_ns == text_written
    assert first["settings"]["text"] == "sampled" and first["rows"][1]["steps"] == 2
    selection = json.loads((kept / "0.2" / "plan.json").read_text())["selection"]
    assert (selection["method"], selection["pool"]) == ("obs", 1.25)
    assert (first["settings"]["select"], first["settings"]["obs_pool"]) == ("obs", 1.25)
    assert first["rows"][0] == second["rows"][0]
    assert first["settings"]["lr"] == first["rows"][1]["lr"] == 3e-3
    for extra in (("--select", "score"), ("--obs-pool", "none")):  # a model chosen otherwise is not taken for this one
        other = run("other", *extra)
        assert other.returncode != 0 and "another selection than" in other.stderr.strip().splitlines()[-1]
