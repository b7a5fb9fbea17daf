"""Fault injection: ``kill -9`` and SIGTERM at random moments of score, apply and finetune, and once each while the
output is surely half-written (forked from one warm process, tests/fault_runner.py). A signal that reaches a
running command interrupts it (signal 9, or exit 143 for SIGTERM); one whose moment comes after the command has
returned is not sent, and that run's output is complete. After every kill the output is absent or complete and
loadable (absent while its temporary is left), the sources are byte for byte as before, SIGTERM leaves no
temporary behind, and a rerun into the same directory succeeds and sweeps what the killed runs left."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import calibration_text, tiny_config, tiny_model
from transformers import AutoConfig
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.artifacts import read_manifest
from llamaprune.core.plan_file import plan_from_kept, write_plan
from llamaprune.io.pruned_checkpoint import load_pruned
from llamaprune.plan import load_run

RUNNER = Path(__file__).with_name("fault_runner.py")
COMMANDS = ("score", "apply", "finetune")
# Per command, at stratified random fractions of its duration, then one more of each as soon as the output's
# temporary is locked (the moment it is surely half-written). SIGKILL's comes last: the rerun must sweep it.
KILLS = {signal.SIGTERM: 2, signal.SIGKILL: 4}
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-")  # what atomic_dir names its temporaries (docs/ARTIFACTS.md)


def digest(path: Path) -> str:
    """Every file under ``path`` (or the file itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(path.parent)).encode() + b"\0" + file.read_bytes())
    return sha.hexdigest()


@dataclass
class Faults:
    sources: list[Path]
    before: dict[Path, str]
    argv: dict[str, list[str]]
    results: dict[str, dict]
    params: dict[str, int]  # parameters of each command's complete output


def kill_points(seed: int) -> list[tuple[float | str, int]]:
    """(when, signal) per kill: a fraction of the command's duration, or "temporary" (tests/fault_runner.py)."""
    rng = random.Random(seed)
    points = []
    for signum, count in KILLS.items():
        points += [(0.05 + 0.95 * (i + rng.random()) / count, int(signum)) for i in range(count)]
        points.append(("temporary", int(signum)))
    return points


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tokenizer) -> Faults:
    base = tmp_path_factory.mktemp("faults")
    model = base / "model"
    tiny_model(tiny_config(vocab=len(tokenizer))).save_pretrained(model)
    tokenizer.save_pretrained(model)
    calib = calibration_text(base)
    plan = plan_from_kept(AutoConfig.from_pretrained(model), [([1], [0, 4, 5, 9]), ([0, 1], [3, 7])])
    plan_path = base / "run" / "plans" / "p.json"
    write_plan(plan, plan_path)
    (base / "run" / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    argv = {
        "score": ["score", str(model), "--out", "{out}", "--dataset", str(calib), "--num-samples", "4",
                  "--seq-len", "16", "--criteria", "taylor,magnitude"],
        "apply": ["apply", str(plan_path), "--model", str(model), "--out", "{out}"],
        "finetune": ["finetune", str(model), "--out", "{out}", "--dataset", str(calib), "--samples", "8",
                     "--seq-len", "16", "--batch-size", "4", "--teacher", str(model)],  # distilled: two models
    }
    jobs = []
    for seed, command in enumerate(COMMANDS):
        parent = base / command
        parent.mkdir()
        points = enumerate(kill_points(seed))
        kills = [[str(parent / f"out{i}"), when, signum] for i, (when, signum) in points]
        jobs.append({"argv": argv[command], "full": str(parent / "full"), "kills": kills})
    sources = [model, plan_path, calib]
    before = {path: digest(path) for path in sources}
    (base / "logs").mkdir()
    spec = base / "spec.json"
    spec.write_text(json.dumps({"logs": str(base / "logs"), "jobs": jobs}))
    done = subprocess.run([sys.executable, str(RUNNER), str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(zip(COMMANDS, json.loads(done.stdout.strip().splitlines()[-1]), strict=True))
    params = {"score": plan.params_before, "apply": plan.params_after, "finetune": plan.params_before}
    return Faults(sources, before, argv, results, params)


def check_complete(command: str, out: Path, params: int) -> None:
    """A finished output: its manifest, and tables a plan can be made from or a checkpoint that loads."""
    assert read_manifest(out)["history"][-1]["command"] == command
    if command == "score":
        tables = load_run(out)
        assert tables.total == params and (out / "stats.safetensors").is_file()
    else:
        assert load_pruned(out).num_parameters() == params


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if TEMPORARY.match(p.name))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_killed_command_leaves_nothing_half_written_and_a_rerun_succeeds(faults, command):
    job = faults.results[command]
    assert job["full"] == "exit 0"
    parent = Path(job["kills"][0]["out"]).parent
    check_complete(command, parent / "full", faults.params[command])
    for kill in job["kills"]:
        out = Path(kill["out"])
        own = [name for name in kill["left"] if name.startswith(f".{out.name}.")]
        if not kill["running"]:  # the command returned before its moment came: no signal, so it is whole
            assert kill["when"] != "temporary" and kill["outcome"] == "exit 0", kill
            check_complete(command, out, faults.params[command])
            continue
        if kill["signal"] == signal.SIGKILL:
            assert kill["outcome"] == "signal 9", kill
        else:  # SIGTERM unwinds like Ctrl-C: exit 143 and no temporary of this output left
            assert kill["outcome"] == "exit 143", kill
            assert not own, kill
        if own:  # killed while its output was half-written: nothing under the final name
            assert not out.exists(), kill
        if kill["when"] == "temporary":  # landed midway, as it is meant to: nothing published, kill -9's left
            assert not out.exists() and bool(own) == (kill["signal"] == signal.SIGKILL), kill
        if out.exists():
            check_complete(command, out, faults.params[command])
    assert {path: digest(path) for path in faults.sources} == faults.before
    left = job["kills"][-1]["left"]  # the last kill's (kill -9 midway), which no later run has swept yet
    assert left and temporaries(parent) == left, job["kills"][-1]
    rerun = Path(job["kills"][0]["out"])
    argv = [arg.replace("{out}", str(rerun)) for arg in faults.argv[command]]
    result = CliRunner().invoke(app, [*argv, "--overwrite"])
    assert result.exit_code == 0, result.output
    check_complete(command, rerun, faults.params[command])
    assert temporaries(parent) == []  # what kill -9 left was swept by the rerun
    interrupted = sum(kill["running"] for kill in job["kills"])
    midway = sum(any(name.startswith(f".{Path(k['out']).name}.") for name in k["left"]) for k in job["kills"])
    assert interrupted >= len(KILLS) and midway >= 1, job["kills"]  # at least the kills on the temporary
    print(f"{command} ({job['seconds']:.2f} s): {interrupted} of {len(job['kills'])} kills interrupted it, "
          f"{midway} while its temporary output existed")
