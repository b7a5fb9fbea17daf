"""The phase runner: cheap checks before any input is read, the atomic output with the command's log, the
manifest and its history; and the log's levels whatever logging the caller configured."""

from __future__ import annotations

import io
import json
import logging

import pytest

from llamaprune.core.artifacts import MANIFEST, atomic_write_json, new_manifest, read_manifest
from llamaprune.core.errors import MissingInput, UsageError
from llamaprune.runs.command_log import command_log
from llamaprune.runs.phase import Phase, preflight, run_phase

log = logging.getLogger("llamaprune.test_runs")


@pytest.fixture
def console(monkeypatch):
    """A caller that set the root logger to WARNING with one console handler (as a library user might)."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.WARNING)
    return stream, handler


def test_the_log_holds_llamaprune_info_and_debug_and_the_console_keeps_its_level(tmp_path, console):
    stream, handler = console
    package, handlers = logging.getLogger("llamaprune"), list(logging.getLogger().handlers)
    with command_log(tmp_path, "run.log") as path:
        log.debug("debug line")
        log.info("info line")
        log.warning("warning line")
        logging.getLogger("elsewhere").info("another library's info")
    text = path.read_text()
    assert path.parent.parent == tmp_path / "logs"
    assert "DEBUG llamaprune.test_runs: debug line" in text and "INFO llamaprune.test_runs: info line" in text
    assert "warning line" in text and "another library's info" not in text
    assert stream.getvalue() == "warning line\n"  # the console saw what it would have seen without the log
    # Everything is as it was: levels, handlers, filters.
    assert package.level == logging.NOTSET and not package.isEnabledFor(logging.INFO)
    assert logging.getLogger().handlers == handlers and handler.filters == []


def test_without_any_handler_warnings_still_reach_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    with command_log(tmp_path) as path:
        log.info("file only")
        log.warning("on stderr too")
    assert capsys.readouterr().err == "on stderr too\n"
    assert "file only" in path.read_text() and logging.getLogger().handlers == []


def test_record_writes_the_manifest_and_the_run_directory_gets_the_entry_once_published(tmp_path):
    run_dir = tmp_path / "run"
    atomic_write_json(run_dir / MANIFEST, {"schema_version": 1})
    out = tmp_path / "out"
    with run_phase(Phase("apply", out), lambda checked: "rows") as run:
        assert run.inputs == "rows" and run.dir != out
        log.info("applying")
        run.summary["params_after"] = 7
        run.record(new_manifest({"source": "tiny"}), also=run_dir)
        assert "history" not in read_manifest(run_dir)  # not before the output is in place
    for manifest in (read_manifest(out), read_manifest(run_dir)):
        (entry,) = manifest["history"]
        assert entry["command"] == "apply" and entry["params_after"] == 7
    (path,) = out.glob("logs/*/run.log")
    assert "applying" in path.read_text()


def test_a_failed_phase_leaves_neither_output_nor_history(tmp_path):
    run_dir = tmp_path / "run"
    atomic_write_json(run_dir / MANIFEST, {"schema_version": 1})
    with pytest.raises(RuntimeError):
        with run_phase(Phase("apply", tmp_path / "out")) as run:
            run.record(new_manifest({"source": "tiny"}), also=run_dir)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((run_dir / MANIFEST).read_text()) == {"schema_version": 1}


def test_an_in_place_phase_appends_to_the_run_directory(tmp_path):
    atomic_write_json(tmp_path / MANIFEST, {"schema_version": 1})
    with run_phase(Phase("plan", tmp_path, in_place=True)) as run:
        assert run.dir == tmp_path
        (run.dir / "plans").mkdir()
        run.record(read_manifest(tmp_path))
    assert [h["command"] for h in read_manifest(tmp_path)["history"]] == ["plan"]


def read_nothing(checked):
    pytest.fail("inputs are read only after the cheap checks pass")


def test_the_cheap_checks_come_before_any_input_is_read(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        preflight(Phase("score", tmp_path / "out", model=str(tmp_path / "model")), read_nothing)
    with pytest.raises(MissingInput, match="model not found"):
        preflight(Phase("score", tmp_path / "new", model=str(tmp_path / "model")), read_nothing)
    with pytest.raises(MissingInput, match="no manifest.json"):
        with run_phase(Phase("plan", tmp_path / "new", in_place=True)):
            pytest.fail("an in-place phase needs a run directory whose history it can record")
