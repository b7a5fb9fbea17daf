"""What a command may write: never over one of its inputs (whatever the flags), only where it can write (found
before any work), never over an existing plan without --overwrite; what killed runs left behind is swept; an
output that is in place is never lost to a manifest that cannot be updated."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TAYLOR, assert_one_error_line, calibration_text, write_run
from transformers import AutoConfig
from typer.testing import CliRunner

from llamaprune.cli.app import app
from llamaprune.core.artifacts import atomic_dir
from llamaprune.core.plan_file import plan_from_kept, write_plan


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree_hash(path: Path) -> str:
    """Every file under ``path`` with its bytes: equal before and after means untouched."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    """A checkpoint, a calibration text, and a run directory with a plan for the checkpoint."""
    run = tmp_path / "run"
    (run / "plans").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "history": []}))
    plan = plan_from_kept(AutoConfig.from_pretrained(tiny_checkpoint), [([1], [0, 4, 5]), ([0, 1], [3, 7])])
    write_plan(plan, run / "plans" / "p.json")
    return tiny_checkpoint, calibration_text(tmp_path), run, run / "plans" / "p.json"


def score(model, out, calib, *extra):
    return ["score", model, "--out", out, "--dataset", calib, "--num-samples", 2, "--seq-len", 16,
            "--criteria", "magnitude", *extra]


# (command line from (model, calibration text, run, plan, tmp_path), the input it would have replaced)
OVERLAPS = {
    "score-out-is-the-model": (lambda m, c, r, p, t: score(m, m, c, "--overwrite"), "is the input"),
    "score-out-inside-the-model": (lambda m, c, r, p, t: score(m, m / "run", c), "lies inside the input"),
    "score-out-contains-the-model": (lambda m, c, r, p, t: score(m, m.parent, c, "--overwrite"), "contains the input"),
    "score-out-is-the-calibration-text": (lambda m, c, r, p, t: score(m, c, c, "--overwrite"), "is the input"),
    "apply-out-is-the-model": (lambda m, c, r, p, t: ["apply", p, "--model", m, "--out", m, "--overwrite"],
                               "is the input"),
    "apply-out-is-the-run": (lambda m, c, r, p, t: ["apply", p, "--model", m, "--out", r, "--overwrite"],
                             "contains the input"),
    "apply-out-is-the-plans-dir": (lambda m, c, r, p, t: ["apply", p, "--model", m, "--out", r / "plans",
                                                           "--overwrite"], "contains the input"),
    "apply-finetune-pruned-out-is-the-model": (
        lambda m, c, r, p, t: ["apply", p, "--model", m, "--out", m.parent / m.name.removesuffix("-pruned"),
                               "--finetune", "lora", "--finetune-dataset", c, "--overwrite"], "is the input"),
    "finetune-out-is-the-model": (lambda m, c, r, p, t: ["finetune", m, "--out", m, "--dataset", c, "--overwrite"],
                                  "is the input"),
    "finetune-out-is-its-data": (lambda m, c, r, p, t: ["finetune", m, "--out", c, "--dataset", c, "--overwrite"],
                                 "is the input"),
    "prune-output-dir-is-the-model": (lambda m, c, r, p, t: ["prune", "--base_model", m, "--output_dir", m,
                                                              "--dataset", c, "--overwrite"], "--output_dir"),
    "eval-out-inside-the-model": (lambda m, c, r, p, t: ["eval", m, "--dataset", c, "--out", m / "config.json"],
                                  "lies inside the input"),
    "through-a-symlink": (lambda m, c, r, p, t: score(m, symlink(t / "alias", m), c, "--overwrite"), "is the input"),
}


def symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("case", OVERLAPS)
def test_an_output_never_replaces_an_input_even_with_overwrite(case, setup, tmp_path):
    model, calib, run, plan = setup
    if case == "apply-finetune-pruned-out-is-the-model":
        model = Path(shutil.copytree(model, tmp_path / "m-pruned"))
    command, relation = OVERLAPS[case]
    before = {path: tree_hash(path) if path.is_dir() else path.read_bytes() for path in (model, run, calib)}
    result = invoke(*command(model, calib, run, plan, tmp_path))
    assert_one_error_line(result, relation, "an output never replaces an input", "choose another")
    assert before == {path: tree_hash(path) if path.is_dir() else path.read_bytes() for path in (model, run, calib)}


def test_apply_may_write_its_checkpoint_inside_the_run(setup):
    model, calib, run, plan = setup
    for _ in range(2):  # and replace it
        result = invoke("apply", plan, "--model", model, "--out", run / "model", "--overwrite")
        assert result.exit_code == 0, result.output
    assert [h["command"] for h in json.loads((run / "manifest.json").read_text())["history"]] == ["apply"] * 2


def test_an_unwritable_output_is_refused_before_the_model_loads(setup, tmp_path, read_only, monkeypatch):
    model, calib, run, plan = setup
    target = tmp_path / "target"
    target.mkdir()
    read_only(target)
    monkeypatch.setattr("llamaprune.io.loading.load_model", lambda *a, **k: pytest.fail("refused before loading"))
    assert_one_error_line(invoke(*score(model, target, calib, "--overwrite")), f"{target} is not writable")
    assert_one_error_line(invoke(*score(model, target / "run", calib)), f"{target} is not writable")


def test_a_read_only_run_keeps_the_applied_checkpoint_and_warns(setup, tmp_path, read_only, caplog):
    model, calib, run, plan = setup
    read_only(run)
    manifest = (run / "manifest.json").read_bytes()
    with caplog.at_level(logging.WARNING, logger="llamaprune"):
        result = invoke("apply", plan, "--model", model, "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pruned" / "model.safetensors").is_file()  # complete, and a rerun is not needed
    assert f"its run {run} could not record it" in caplog.text and (run / "manifest.json").read_bytes() == manifest


@pytest.fixture
def run_with_plan(tmp_path):
    run = write_run(tmp_path / "run", {"taylor": TAYLOR})
    assert invoke("plan", run, "--ratio", 0.1, "--name", "p30").exit_code == 0
    return run


def test_plan_refuses_to_replace_a_plan_without_overwrite(run_with_plan):
    plans = run_with_plan / "plans"
    before = (plans / "p30.json").read_bytes()
    result = invoke("plan", run_with_plan, "--ratio", 0.2, "--name", "p30")
    assert_one_error_line(result, f"{plans / 'p30'}.json already exists", "--overwrite", "--name")
    assert (plans / "p30.json").read_bytes() == before
    sweep_names = ["p30-0.10", "p30-0.20"]
    assert invoke("plan", run_with_plan, "--ratios", "0.1:0.2:0.1", "--name", "p30").exit_code == 0
    result = invoke("plan", run_with_plan, "--ratio", 0.1, "--ratio", 0.2, "--name", "p30")
    assert_one_error_line(result, "already exists", "it and 1 more")
    assert sorted(p.stem for p in plans.glob("p30-*.json")) == sweep_names


def test_plan_overwrite_replaces_the_plan_and_drops_a_stale_picture(run_with_plan):
    plans = run_with_plan / "plans"
    assert (plans / "p30.png").is_file()
    result = invoke("plan", run_with_plan, "--ratio", 0.2, "--name", "p30", "--overwrite", "--no-png")
    assert result.exit_code == 0, result.output
    assert json.loads((plans / "p30.json").read_text())["target_ratio"] == 0.2
    assert not (plans / "p30.png").exists()


# ---------------------------------------------------------------- temporaries of killed runs


def leave_a_dead_temporary(parent: Path, name: str) -> Path:
    """What ``kill -9`` inside atomic_dir leaves: a locked temporary whose process is gone."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from llamaprune.core.temporaries import temporary_dir\n"
        f"with temporary_dir(Path({str(parent)!r}), {name!r}) as tmp:\n"
        "    (tmp.path / 'model-00001.safetensors').write_bytes(b'half')\n"
        "    print(tmp.path, flush=True)\n"
        "    os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    return Path(done.stdout.strip())


def test_temporaries_of_dead_runs_are_swept_live_ones_kept_unknown_ones_reported(tmp_path):
    from llamaprune.core.temporaries import LOCK, sweep, temporary_dir

    dead = leave_a_dead_temporary(tmp_path, "run")
    assert dead.is_dir() and (dead / LOCK).is_file()
    unknown = tmp_path / ".old.tmp-abcd1234"  # an older llamaprune's leftover: no lock to tell
    unknown.mkdir()
    (tmp_path / ".notes.tmp-abcd1234").write_text("a file, not ours")
    with temporary_dir(tmp_path, "live") as live:
        swept = sweep(tmp_path)
        assert swept.removed == [dead] and swept.unknown == [unknown] and live.path.is_dir()
    assert not live.path.exists()  # a temporary never outlives its block
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp-abcd1234", ".old.tmp-abcd1234"]


def test_the_next_run_into_the_same_parent_sweeps_them(setup, tmp_path, caplog):
    model, calib, run, plan = setup
    dead = leave_a_dead_temporary(tmp_path, "elsewhere")
    with caplog.at_level(logging.INFO, logger="llamaprune"):
        result = invoke("apply", plan, "--model", model, "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    assert not dead.exists() and f"removed {dead}, the temporary of a run that was killed" in caplog.text


def test_a_published_output_carries_no_lock_and_a_replaced_one_leaves_nothing(tmp_path):
    for content in ("old", "new"):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "a.txt").write_text(content)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["a.txt"]
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
