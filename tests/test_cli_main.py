"""The console entry point: typer's own usage errors also end as one `error:` line with exit code 2; a bug keeps
its traceback and exits with code 1."""

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import llamaprune.query
from llamaprune.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, says",
    [
        (["eval", "m", "--dtype", "float64"], "float64"),
        (["plan"], "RUN_DIR"),
        (["bogus"], "bogus"),
        (["plan", "x", "--ratio", "abc"], "number"),
        (["plan", "x", "--ratio", "abc"], "Invalid value for '--ratio'"),  # the option is named
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


BROADCAST = "operands could not be broadcast together with shapes (3,) (4,)"


def test_a_bug_is_a_traceback_with_exit_code_1_not_an_error_line(tmp_path):
    """A plain ValueError from inside a command (a numpy-style one, from the query) is not bad input."""
    code = (
        "import sys\n"
        "import llamaprune.query\n"
        "def broken(run_dir, query):\n"
        f"    raise ValueError({BROADCAST!r})\n"
        "llamaprune.query.run_query = broken\n"
        "from llamaprune.cli import main\n"
        f"sys.argv = ['llamaprune', 'sql', {str(tmp_path)!r}, 'SELECT 1']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and f"ValueError: {BROADCAST}" in done.stderr.splitlines()[-1]
    assert not any(line.startswith("error:") for line in done.stderr.splitlines()), done.stderr


def test_the_cli_runner_sees_the_bug_too(tmp_path, monkeypatch):
    def broken(run_dir, query):
        raise ValueError(BROADCAST)

    monkeypatch.setattr(llamaprune.query, "run_query", broken)
    result = CliRunner().invoke(app, ["sql", str(tmp_path), "SELECT 1"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "error:" not in result.output


@pytest.mark.parametrize("command", ["eval", "apply", "prune"])
def test_help_names_the_eval_extra_whole(command):
    """Rich markup would read [eval] as a style tag and print `pip install 'llamaprune'`."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    assert "pip install 'llamaprune[eval]'" in result.output
    assert "\\[" not in result.output


def help_texts(command):
    yield command.name, command.help or ""
    for param in command.params:
        yield f"{command.name} {param.name}", getattr(param, "help", None) or ""
    for sub in getattr(command, "commands", {}).values():
        yield from help_texts(sub)


def test_no_help_text_loses_characters_to_rich_markup():
    """typer renders help as rich markup: an unescaped [word] would vanish as a style tag."""
    from rich.markup import render

    for where, text in help_texts(typer.main.get_command(app)):
        assert render(text).plain == text.replace("\\[", "["), where
