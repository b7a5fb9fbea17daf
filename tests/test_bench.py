"""The benchmark scripts run end to end on a tiny model, so they cannot rot (figures are not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_gpu_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--dtype", "float32", "--tiny"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bench/quality" in done.stdout and "ratios (goal)" in done.stdout and "bench/scale" in done.stdout


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
