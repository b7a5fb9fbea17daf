"""The console entry point: typer's own usage errors also end as one `error:` line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, says",
    [
        (["eval", "m", "--dtype", "float64"], "float64"),
        (["plan"], "run_dir"),
        (["bogus"], "bogus"),
        (["plan", "x", "--ratio", "abc"], "number"),
    ],
)
def test_usage_errors_are_one_line(args, says):
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], done.stderr


def test_help_and_no_arguments_exit_zero():
    for args in (["--help"], []):
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0 and "score" in done.stdout
