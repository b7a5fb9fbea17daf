"""Atomic directories and files, the manifest and its history, options as JSON values."""

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pytest

from llamaprune.core.artifacts import (
    MANIFEST,
    SCHEMA_VERSION,
    append_history,
    atomic_dir,
    atomic_write_json,
    manifest_in,
    plain_value,
    read_manifest,
)


def entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_dir_publishes_on_success(tmp_path):
    with atomic_dir(tmp_path / "run") as tmp:
        assert tmp.parent == tmp_path and tmp.name != "run"
        assert not (tmp_path / "run").exists()  # nothing under the final name while writing
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "run" / "a.txt").read_text() == "a"
    assert entries(tmp_path) == ["run"]


def test_atomic_dir_leaves_nothing_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "run") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert entries(tmp_path) == []


def test_atomic_dir_refuses_an_existing_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("old")
    with pytest.raises(ValueError, match=r"run already exists; pass --overwrite"):
        with atomic_dir(tmp_path / "run"):
            pytest.fail("the block must not run")
    assert entries(tmp_path / "run") == ["old.txt"]


def test_atomic_dir_replaces_on_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("old")
    with atomic_dir(tmp_path / "run", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert entries(tmp_path / "run") == ["new.txt"]
    assert entries(tmp_path) == ["run"]  # no .old / .tmp siblings left


def test_atomic_dir_failed_overwrite_keeps_the_old_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "run", overwrite=True):
            raise RuntimeError("boom")
    assert entries(tmp_path) == ["run"]
    assert entries(tmp_path / "run") == ["old.txt"]


def test_atomic_write_json(tmp_path):
    path = tmp_path / "sub" / "doc.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, "x"]})
    atomic_write_json(path, {"b": 2})  # replaces
    assert json.loads(path.read_text()) == {"b": 2}
    assert path.read_text().endswith("\n")
    assert entries(path.parent) == ["doc.json"]


def test_atomic_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "doc.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert entries(tmp_path) == ["doc.json"]


def test_append_history(tmp_path):
    atomic_write_json(tmp_path / MANIFEST, {"schema_version": SCHEMA_VERSION, "model": "tiny"})
    append_history(tmp_path, {"command": "score", "seconds": 1.5})
    append_history(tmp_path, {"command": "plan"})
    manifest = read_manifest(tmp_path)
    assert manifest["model"] == "tiny"
    assert [h["command"] for h in manifest["history"]] == ["score", "plan"]
    assert manifest["history"][0]["seconds"] == 1.5
    assert all(h["at"].endswith("+00:00") for h in manifest["history"])


def test_read_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest.json in .*llamaprune score"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "manifest, version",
    [({"schema_version": SCHEMA_VERSION + 1}, SCHEMA_VERSION + 1), ({"model": "x"}, None), ([], None)],
)
def test_read_manifest_schema_errors(tmp_path, manifest, version):
    atomic_write_json(tmp_path / MANIFEST, manifest)
    with pytest.raises(ValueError, match=f"schema_version {version}, this llamaprune reads {SCHEMA_VERSION}"):
        read_manifest(tmp_path)


def test_read_manifest_not_json(tmp_path):
    (tmp_path / MANIFEST).write_text("{truncated")
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON .*llamaprune score"):
        read_manifest(tmp_path)


def test_manifest_in_is_none_without_a_manifest(tmp_path):
    assert manifest_in(None) is None and manifest_in(tmp_path) is None
    atomic_write_json(tmp_path / MANIFEST, {"schema_version": SCHEMA_VERSION})
    assert manifest_in(tmp_path) == {"schema_version": SCHEMA_VERSION}


class Color(str, Enum):
    red = "red"


@dataclass(frozen=True)
class Inner:
    color: Color = Color.red
    path: Path = Path("a/b")


@dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    pair: tuple[int, int] = (2, 8)
    colors: tuple[Color, ...] = (Color.red,)
    none: None = None


def test_plain_value_turns_options_into_json_values():
    expected = {"inner": {"color": "red", "path": "a/b"}, "pair": [2, 8], "colors": ["red"], "none": None}
    assert plain_value(Outer()) == expected
    assert json.loads(json.dumps(plain_value(Outer()))) == expected
    assert plain_value({"out": Path("x"), "ratios": (0.1, 0.2)}) == {"out": "x", "ratios": [0.1, 0.2]}
    assert type(plain_value(Color.red)) is str
